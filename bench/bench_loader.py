"""The scorer's loader per payload type against the bare decoder call, in the same process.

Builds (once, in a temporary folder) a corpus of the demo photographs at
256/224 with one variant of each payload type the scorer reads: JPEG q85
(``natural/fog-3``), PNG (``clean/onecrop``) and H.264 sequences
(``sequence/rotate``). Then, per payload type and interleaved per repeat:

* ``bare``: the library call alone on each member's bytes (Pillow's
  ``Image.open(...).convert("RGB")`` for images, PyAV's decode to RGB for
  videos), the floor;
* ``member``: qrobust's :func:`~qrobust.score.stream.decode_member` (the
  header checks against the corpus geometry, then the same decoder);
* ``loader``: :func:`~qrobust.score.stream.read_unit` on every shard of the
  variant (shard read and sha256, tar structure scan, key and label checks,
  decoding, batching into pieces of one batch of 64 images, as the scorer does) in this
  process, no worker.

Prints the median time per image (per frame for sequences) and the ratios to
``bare``: a ratio near 1.0 means the loader runs at the decoder's speed.

Run:  python bench/bench_loader.py [--images 48] [--repeats 5]
"""
import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

VARIANTS = {"JPEG q85": "natural/fog-3", "PNG": "clean/onecrop", "H.264": "sequence/rotate"}


def build_corpus(folder: Path, images: int) -> Path:
    from qrobust.generate.run import generate
    from qrobust.shared.demo_data import PHOTOS, build_demo_dataset

    per_class = -(-images // len(PHOTOS))
    data = build_demo_dataset(folder / "data", train_per_class=1, val_per_class=per_class, short_side=300)
    generate("robustmq", str(data / "val"), str(folder / "corpus"), only=list(VARIANTS.values()), limit=images,
             progress=False)
    return folder / "corpus"


def members(corpus, variant: str) -> list[tuple[str, bytes]]:
    """(extension, payload bytes) of every sample's pixel member, as stored."""
    from qrobust.shared.shards import scan_shard

    out = []
    for shard in corpus.manifest["variants"][variant]["shards"]:
        data = corpus.shard_bytes(shard)
        for sample in scan_shard(data):
            ext, (_, offset, size) = next((e, m) for e, m in sample.members.items() if e != "cls")
            out.append((ext, data[offset:offset + size]))
    return out


def bare_decode(ext: str, payload: bytes):
    import av
    import numpy as np
    from PIL import Image

    if ext in ("jpg", "png"):
        return np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))
    with av.open(io.BytesIO(payload)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import numpy as np

    from qrobust.score.run import plan_units
    from qrobust.score.stream import Corpus, decode_member, read_unit

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Corpus(str(build_corpus(Path(tmp), args.images)))
        print(f"{args.images} images at 224, medians of {args.repeats} repeats, one process, no worker")
        print(f"{'payload':<10} {'bare ms':>9} {'member ms':>10} {'loader ms':>10} {'member/bare':>12} "
              f"{'loader/bare':>12}")
        for label, variant in VARIANTS.items():
            stored = members(corpus, variant)
            shape = corpus.payload_shape(variant)
            units, _ = plan_units(corpus.manifest, [variant], None)
            per = len(stored) * (shape[0] if len(shape) == 4 else 1)  # images, or frames
            for (ext, payload) in stored[:1]:  # identical pixels, or the comparison is meaningless
                assert np.array_equal(bare_decode(ext, payload), decode_member(ext, payload, shape))

            def bare():
                for ext, payload in stored:
                    bare_decode(ext, payload)

            def member():
                for ext, payload in stored:
                    decode_member(ext, payload, shape)

            piece = max(1, 64 // shape[0]) if len(shape) == 4 else 64  # as the scorer cuts them at batch 64

            def loader():
                for unit in units:
                    for _ in read_unit(corpus, unit, True, piece):
                        pass

            times = {f.__name__: [] for f in (bare, member, loader)}
            for _ in range(args.repeats):
                for f in (bare, member, loader):
                    t = time.perf_counter()
                    f()
                    times[f.__name__].append(time.perf_counter() - t)
            ms = {k: statistics.median(v) / per * 1e3 for k, v in times.items()}
            print(f"{label:<10} {ms['bare']:>9.3f} {ms['member']:>10.3f} {ms['loader']:>10.3f} "
                  f"{ms['member'] / ms['bare']:>12.2f} {ms['loader'] / ms['bare']:>12.2f}")


if __name__ == "__main__":
    main()
