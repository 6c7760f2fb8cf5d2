"""Several models on one corpus: N separate `score` runs against one many-model pass, in the same process.

Builds (once, in a temporary folder) a corpus of the demo photographs with
the clean, natural (JPEG) and systematic (PNG) variants and one sequence
family, then times, interleaved per repeat:

* separate: ``score`` once per model, each into a fresh folder (each run
  reads, verifies and decodes every shard again);
* one pass: ``score_many`` over the same models into fresh folders (each
  shard read, verified and decoded once, its batches through every model).

Two cases: ``--models`` tiny CNNs at 64 px (decoding dominates) and the same
number of ResNet-18s at 224 px (the forward passes dominate). Prints medians
and the ratio one pass / separate. The results folders of both are compared
byte for byte.

Run:  python bench/bench_score_many.py [--models 4] [--images 24] [--repeats 3] [--workers 1]
"""
import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path


def build_corpus(folder: Path, images: int, size: int) -> Path:
    import importlib.resources
    import re

    from qrobust.generate.run import generate
    from qrobust.shared.demo_data import PHOTOS, build_demo_dataset

    per_class = -(-images // len(PHOTOS))
    data = build_demo_dataset(folder / "data", train_per_class=1, val_per_class=per_class,
                              short_side=max(size * 8 // 7 + 8, 72))
    text = (importlib.resources.files("qrobust") / "suites" / "robustmq.toml").read_text()
    text = re.sub(r"(?m)^resize = 256", f"resize = {size * 8 // 7}", text)  # the benchmark's suite at `size`
    text = re.sub(r"(?m)^crop = 224", f"crop = {size}", text)
    (folder / "suite.toml").write_text(text)
    generate(str(folder / "suite.toml"), str(data / "val"), str(folder / "corpus"), limit=images, progress=False,
             only=["clean/*", "natural/*-3", "systematic/*", "sequence/rotate", "sequence/gaussian_noise"])
    return folder / "corpus"


def checkpoints(folder: Path, arch: str, n: int) -> list[str]:
    import torch

    from qrobust.shared.demo_data import PHOTOS
    from qrobust.shared.models import ModelSpec, build_model, save_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        torch.manual_seed(i)
        spec = ModelSpec(arch=arch, num_classes=len(PHOTOS))
        path = folder / f"{arch}-{i}.safetensors"
        save_checkpoint(build_model(spec).eval(), spec, path)
        out.append(str(path))
    return out


def tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    from qrobust.score.run import score, score_many

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label, arch, size in (("tiny CNN, 64 px", "tiny_cnn", 64), ("ResNet-18, 224 px", "resnet18", 224)):
            corpus = str(build_corpus(tmp / f"c{size}", args.images, size))
            ckpts = checkpoints(tmp / f"m{size}", arch, args.models)
            times = {"separate": [], "one pass": []}
            for r in range(args.repeats):
                t = time.perf_counter()
                for c in ckpts:
                    score(corpus, c, str(tmp / f"sep{size}-{r}" / Path(c).stem), workers=args.workers,
                          batch_size=args.batch_size, progress=False)
                times["separate"].append(time.perf_counter() - t)
                t = time.perf_counter()
                score_many(corpus, ckpts, str(tmp / f"many{size}-{r}"), workers=args.workers,
                           batch_size=args.batch_size, progress=False)
                times["one pass"].append(time.perf_counter() - t)
            assert tree(tmp / f"sep{size}-0") == tree(tmp / f"many{size}-0"), "the results differ"
            sep, many = statistics.median(times["separate"]), statistics.median(times["one pass"])
            print(f"{label}: {args.models} models x {args.images} images, medians of {args.repeats}: "
                  f"separate {sep:.1f} s, one pass {many:.1f} s, ratio {many / sep:.2f}")


if __name__ == "__main__":
    main()
