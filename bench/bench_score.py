"""Scoring throughput: the streamed corpus against the same images already in memory.

Builds (once, in a temporary folder) a corpus of ``clean/onecrop`` at 256/224
from the demo photographs, then times, in the same process and on the same
model and batch size:

* in memory: the decoded images as one uint8 array, forward + top-5 in batches;
* streamed: ``qrobust score`` on the corpus (shard reading and sha256 checks,
  decoding in DataLoader workers, zarr writes, summary) into a fresh folder.

The ratio streamed / in-memory is the data path's overhead (1.0 = the scorer
is limited by the model alone). Medians over --repeats runs; these machines
are noisy. On a GPU (--device cuda) one warm-up batch runs first (CUDA context,
kernel choice) and CUDA is synchronized before each timer is read.

Run:  python bench/bench_score.py [--arch resnet18] [--images 192] [--workers 1] [--repeats 3] [--device cuda]
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def build_corpus(folder: Path, images: int) -> Path:
    from qrobust.generate.run import generate
    from qrobust.shared.demo_data import PHOTOS, build_demo_dataset

    per_class = -(-images // len(PHOTOS))
    data = build_demo_dataset(folder / "data", train_per_class=1, val_per_class=per_class, short_side=300)
    generate("robustmq", str(data / "val"), str(folder / "corpus"), only=["clean/onecrop"], limit=images,
             progress=False)
    return folder / "corpus"


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work, so a timer read next counts it (no-op on the CPU)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda})"
    return device


def in_memory(model, images: np.ndarray, batch_size: int, device: str = "cpu") -> float:
    import torch

    from qrobust.score.logits import top5

    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        top5(model, images, batch_size, device)
    synchronize(device)
    return time.perf_counter() - start


def streamed(corpus: Path, arch: str, out: Path, batch_size: int, workers: int, device: str = "cpu",
             limit: int | None = None) -> float:
    from qrobust.score.run import score

    synchronize(device)
    start = time.perf_counter()
    score(str(corpus), arch, str(out), batch_size=batch_size, workers=workers, progress=False, device=device,
          limit=limit)
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    args = parser.parse_args()
    import logging

    import torch

    from qrobust.score.stream import Corpus, read_unit
    from qrobust.score.run import plan_units
    from qrobust.shared.models import load_model

    logging.getLogger("qrobust").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = build_corpus(Path(tmp), args.images)
        source = Corpus(str(corpus))
        units, _ = plan_units(source.manifest, ["clean/onecrop"], None)
        images = np.concatenate([p.pixels for u in units for p in read_unit(source, u, True, 10**6)])
        from qrobust.score.run import fp32_kernels

        fp32_kernels(args.device)  # the scorer's kernels (no TF32) for the in-memory runs too
        model, _, _ = load_model(args.arch, device=args.device)
        print(f"{args.arch}, {len(images)} images 224x224, batch {args.batch_size}, "
              f"{torch.get_num_threads()} torch threads, {args.workers} loader worker(s)")
        if args.device != "cpu":
            print(f"device: {device_name(args.device)}")
            in_memory(model, images[:args.batch_size], args.batch_size, args.device)  # warm-up: CUDA context, kernels
        memory, stream, fixed = [], [], []
        for r in range(args.repeats):  # interleaved, so machine noise hits both
            memory.append(in_memory(model, images, args.batch_size, args.device))
            stream.append(streamed(corpus, args.arch, Path(tmp) / f"results-{r}", args.batch_size, args.workers,
                                   args.device))
            # one batch only: the fixed cost of a run (model load, loader workers, store, summary)
            fixed.append(streamed(corpus, args.arch, Path(tmp) / f"one-{r}", args.batch_size, args.workers,
                                  args.device, limit=args.batch_size))
        m, s, f = statistics.median(memory), statistics.median(stream), statistics.median(fixed)
        print(f"in memory: {len(images) / m:7.1f} img/s   (median {m:.2f} s)")
        print(f"streamed:  {len(images) / s:7.1f} img/s   (median {s:.2f} s, incl. model load, zarr, summary)")
        print(f"streamed / in memory time: {s / m:.2f}")
        if s > f and len(images) > args.batch_size:
            steady = (len(images) - args.batch_size) / (s - f)
            print(f"streamed, steady state: {steady:7.1f} img/s (a one-batch run takes {f:.2f} s: model load, "
                  f"loader workers, store, summary); steady / in memory: {len(images) / m / steady:.2f}")


if __name__ == "__main__":
    main()
