"""Per-image cost of each noise family of the robustmq suite, encoding included.

For real photos bundled with scikit-image (no downloads) at the suite's
geometry (256/224), this times, on one thread, what a generator worker does
for one source image: decode + clean crops (clean family: onecrop and square,
PNG), the 75 natural variants (JPEG q85), the 10 sequences (reference H.264,
and lossless for comparison) and the 14 systematic variants (PNG), and prints
the median CPU seconds per image per family (and how much of it is encoding),
the projected core-hours for 50,000 images (ImageNet's validation set), and at
the end the whole robustmq suite per source image (reference encodings) in CPU
seconds and core-hours / 50k.

As a same-process baseline it also times the plain reference loop for the
natural family (``np.random.seed`` + ``imagecorruptions.corrupt``, no
encoding), about 5.7 s/image on a 2-core VM, prints the ratio, and
the suite total with the natural family at that baseline instead.

Run:  python bench/bench_families.py [--images N] [--repeats R] [--only FAMILY]
e.g.  python bench/bench_families.py --images 1 --repeats 1 --only systematic
"""
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported: one thread, as in a generator worker

import argparse  # noqa: E402
import io  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
FAMILIES = ("clean", "natural", "sequence", "systematic")


def source_samples(n: int, folder: Path):
    """Real photos written as JPEG source files, as SourceSamples."""
    from qrobust.shared.demo_data import photo
    from qrobust.shared.sources import SourceSample

    samples = []
    for i, name in enumerate(PHOTOS[:n]):
        path = folder / f"{name}.jpg"
        buf = io.BytesIO()
        photo(name).convert("RGB").save(buf, format="JPEG", quality=90)
        path.write_bytes(buf.getvalue())
        samples.append(SourceSample(key=name, path=str(path), label=i, bytes=path.stat().st_size))
    return samples


def family_cost(suite, variants, sample) -> tuple[float, float]:
    """CPU seconds to render and encode every variant of one family for one fresh sample (decode
    included): (total, of which encoding)."""
    from qrobust.generate.render import RENDERERS, SampleContext
    from qrobust.generate.writer import encode_payload
    from qrobust.shared.seeding import sample_seed

    encoding = 0.0
    start = time.process_time()
    ctx = SampleContext(sample, suite)
    for v in variants:
        pixels = RENDERERS.get(v.family)(v, ctx, sample_seed(suite.seed, v.id, sample.key))
        t = time.process_time()
        encode_payload(pixels, v)
        encoding += time.process_time() - t
    return time.process_time() - start, encoding


def reference_natural_cost(suite, sample) -> float:
    from qrobust.generate import imagecorruptions_compat
    from qrobust.generate.natural import CORRUPTION_NAMES
    from qrobust.generate.render import SampleContext

    reference = imagecorruptions_compat.package()
    image = SampleContext(sample, suite).onecrop
    start = time.process_time()
    for k, name in enumerate(CORRUPTION_NAMES):
        for severity in range(1, 6):
            np.random.seed(k * 5 + severity)
            reference.corrupt(image, corruption_name=name, severity=severity)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2, choices=range(1, len(PHOTOS) + 1))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=FAMILIES, action="append")
    args = parser.parse_args()
    import cv2

    cv2.setNumThreads(1)
    from qrobust.shared.suites import load_suite

    suites = {"reference": load_suite("robustmq"), "lossless": load_suite("robustmq", sequence_encoding="lossless")}
    families = args.only or list(FAMILIES)
    rows = [(f, "reference") for f in families] + ([("sequence", "lossless")] if "sequence" in families else [])
    print(f"{args.images} photo(s) at 256/224, {args.repeats} repeat(s), 1 thread; CPU seconds per source image")
    with tempfile.TemporaryDirectory() as tmp:
        samples = source_samples(args.images, Path(tmp))
        medians, counts = {}, {}
        for family, encoding in rows:
            suite = suites[encoding]
            variants = [v for v in suite.variants if v.family == family]
            small = load_suite("demo", sequence_encoding=encoding)  # untimed, at 64 px: imports, compiled code
            family_cost(small, [v for v in small.variants if v.family == family], samples[0])
            runs = []
            for _ in range(args.repeats):
                costs = [family_cost(suite, variants, s) for s in samples]
                runs.append((sum(c[0] for c in costs) / len(samples), sum(c[1] for c in costs) / len(samples)))
            total, encode = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            medians[(family, encoding)], counts[(family, encoding)] = total, len(variants)
            label = family + (f" ({encoding})" if family == "sequence" else "")
            print(f"{label:24s} {len(variants):3d} variants  {total:8.3f} s/image  {total * 50_000 / 3600:8.1f} "
                  f"core-hours / 50k   (encoding {encode:.3f} s, rendering {total - encode:.3f} s)", flush=True)
        base = None
        if "natural" in families:
            suite = suites["reference"]
            base = statistics.median(
                sum(reference_natural_cost(suite, s) for s in samples) / len(samples) for _ in range(args.repeats))
            print(f"natural baseline: plain imagecorruptions loop (no encoding) {base:.3f} s/image "
                  f"({base * 50_000 / 3600:.1f} core-hours / 50k); qrobust natural incl. JPEG / baseline = "
                  f"{medians[('natural', 'reference')] / base:.2f}")
        total = sum(t for (f, e), t in medians.items() if e == "reference")
        n = sum(c for (f, e), c in counts.items() if e == "reference")
        which = "robustmq suite" if set(families) == set(FAMILIES) else "+".join(families)
        print(f"total ({which}, {n} variants, reference encodings): {total:.3f} CPU s per source image = "
              f"{total * 50_000 / 3600:.1f} core-hours for 50,000 images")
        if base is not None:
            with_base = total - medians[("natural", "reference")] + base
            print(f"  the same with the natural family at its plain-reference baseline (no encoding): "
                  f"{with_base:.3f} s/image = {with_base * 50_000 / 3600:.1f} core-hours / 50k")


if __name__ == "__main__":
    main()
