"""Speed of qrobust's natural corruptions against the reference imagecorruptions.

For each of the 75 ImageNet-C variants (15 corruptions x 5 severities) this times
the baseline, a plain loop of ``np.random.seed(s); imagecorruptions.corrupt(img,
corruption_name=c, severity=sev)`` (the reference mended by
``qrobust.generate.imagecorruptions_compat.apply()``), and
``qrobust.generate.natural.corrupt(img, c, sev, s)`` over the same images, on
one thread. Baseline and qrobust calls alternate within each repeat, so machine
noise hits both; each variant reports the median over repeats of seconds per
image. Every qrobust output is checked bit for bit against the baseline's, so a
speed-up can never come from wrong output.

Before a corruption is timed, both paths run once untimed on every severity
(another seed): numba compiles qrobust's kernels on first use (or loads them
from its on-disk cache), and one-off per-process work such as imports is not
what a run over 50,000 images pays per image. The per-process caches this fills
(e.g. frost's resized textures) are part of what is measured.

Images are real photos bundled with scikit-image (no downloads), shorter side
resized to --size with Pillow bilinear, then center-cropped to --size x --size.

Run:  python bench/bench_natural.py [--images N] [--size 224] [--repeats R] [--only GLOB]
e.g.  python bench/bench_natural.py --only '*blur' --repeats 1
"""
import os

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")
for _var in THREAD_VARS:  # before numpy is imported, or the BLAS pools ignore it
    os.environ[_var] = "1"

import argparse  # noqa: E402
import fnmatch  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
from PIL import Image  # noqa: E402

from qrobust.generate import imagecorruptions_compat  # noqa: E402
from qrobust.generate.natural import CORRUPTION_NAMES, SEVERITIES, corrupt  # noqa: E402

imagecorruptions_compat.apply()  # mend the reference first, else glass_blur and fog crash
import imagecorruptions  # noqa: E402

PHOTOS = (skimage.data.astronaut, skimage.data.chelsea, skimage.data.coffee, skimage.data.rocket)
IMAGES_PER_RUN = 50_000
GOAL_RATIO = 8.0  # the target: at least 8x less CPU per image for the whole natural family


def load_photo(load, size):
    """A bundled photo, shorter side resized to ``size`` (bilinear), center-cropped to size x size."""
    photo = Image.fromarray(load()).convert("RGB")
    scale = size / min(photo.size)
    width, height = max(size, round(photo.width * scale)), max(size, round(photo.height * scale))
    photo = photo.resize((width, height), Image.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
    return np.asarray(photo.crop((left, top, left + size, top + size)), dtype=np.uint8)


def warm_up(image, name):
    """Run both paths once per severity, untimed (numba compilation, imports, first-use caches)."""
    for severity in SEVERITIES:
        seed = 10**6 + severity
        np.random.seed(seed)
        imagecorruptions.corrupt(image, corruption_name=name, severity=severity)
        corrupt(image, name, severity, seed)


def time_variant(images, name, severity, repeats):
    """Median over repeats of (baseline, qrobust) seconds per image for one variant."""
    baseline_times, qrobust_times = [], []
    for _ in range(repeats):
        baseline_total = qrobust_total = 0.0
        for index, image in enumerate(images):
            seed = 1000 * index + severity
            start = time.perf_counter()
            np.random.seed(seed)
            expected = imagecorruptions.corrupt(image, corruption_name=name, severity=severity)
            baseline_total += time.perf_counter() - start

            start = time.perf_counter()
            actual = corrupt(image, name, severity, seed)
            qrobust_total += time.perf_counter() - start

            if actual.shape != expected.shape or actual.dtype != expected.dtype or not np.array_equal(actual, expected):
                raise SystemExit(f"MISMATCH: qrobust differs from the baseline for {name} "
                                 f"severity {severity}, image {index}, seed {seed}")
        baseline_times.append(baseline_total / len(images))
        qrobust_times.append(qrobust_total / len(images))
    return statistics.median(baseline_times), statistics.median(qrobust_times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2, help=f"number of photos, 1..{len(PHOTOS)}")
    parser.add_argument("--size", type=int, default=224, help="side of the square images")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per variant (median taken)")
    parser.add_argument("--only", default="*", help="glob over corruption names, e.g. '*noise'")
    args = parser.parse_args()
    if not 1 <= args.images <= len(PHOTOS):
        parser.error(f"--images must be 1..{len(PHOTOS)}")
    names = [name for name in CORRUPTION_NAMES if fnmatch.fnmatch(name, args.only)]
    if not names:
        parser.error(f"--only {args.only!r} matches no corruption; names: {', '.join(CORRUPTION_NAMES)}")

    cv2.setNumThreads(1)
    images = [load_photo(load, args.size) for load in PHOTOS[:args.images]]
    print(f"threads pinned to 1 ({', '.join(THREAD_VARS)}=1, cv2.setNumThreads(1))")
    print(f"{args.images} image(s) {args.size}x{args.size}, {args.repeats} repeat(s), "
          f"{len(names)} corruption(s) x {len(SEVERITIES)} severities; outputs checked bit for bit")
    print(f"{'corruption':<20}{'baseline ms/img':>16}{'qrobust ms/img':>16}{'ratio':>8}   (summed over severities)")

    baseline_sum = qrobust_sum = 0.0
    for name in names:
        warm_up(images[0], name)
        baseline_ms = qrobust_ms = 0.0
        for severity in SEVERITIES:
            baseline_s, qrobust_s = time_variant(images, name, severity, args.repeats)
            baseline_ms += 1000 * baseline_s
            qrobust_ms += 1000 * qrobust_s
        print(f"{name:<20}{baseline_ms:>16.1f}{qrobust_ms:>16.1f}{baseline_ms / qrobust_ms:>8.2f}", flush=True)
        baseline_sum += baseline_ms / 1000
        qrobust_sum += qrobust_ms / 1000

    variants = len(names) * len(SEVERITIES)
    ratio = baseline_sum / qrobust_sum
    print(f"TOTAL for {variants} variants: baseline {baseline_sum:.3f} s/image, qrobust {qrobust_sum:.3f} s/image, "
          f"ratio {ratio:.2f}; {IMAGES_PER_RUN:,} images = "
          f"{baseline_sum * IMAGES_PER_RUN / 3600:.1f} vs {qrobust_sum * IMAGES_PER_RUN / 3600:.1f} core-hours")
    goal_s = baseline_sum / GOAL_RATIO
    print(f"GOAL {GOAL_RATIO:.0f}x less CPU per image (<= {goal_s:.3f} s/image here): "
          f"{'met' if ratio >= GOAL_RATIO else 'NOT met'} (ratio {ratio:.2f})")


if __name__ == "__main__":
    main()
