"""Parallel scaling of ``qrobust generate``: images/s with ``--workers 1`` against ``--workers 2``.

Builds one small source folder from the real photos bundled with scikit-image
(no downloads): ``--images`` non-square crops of ImageNet-like size (shorter
side 300-400 px, JPEG q90, 4:2:0), one class per photo. Then runs the real
command line (``python -m qrobust generate``, a fresh process and a
fresh ``--out`` each time, so parent start-up, source scanning, planning,
worker start-up and the manifest are all in the wall time) on the packaged
``robustmq`` suite (256/224; all 101 variants, or those ``--only`` selects),
alternating ``--workers 1`` and ``--workers 2`` over ``--repeats`` rounds. It
prints the median wall time and images/s (variants x samples / s) of each,
their ratio against the 1.8x goal, and checks that every corpus is
byte-identical (manifest bytes and every shard's sha256 on disk). Each run
also reports the CPU seconds other processes took meanwhile (/proc/stat): on a
shared machine, a run that competed for the cores understates the scaling.

A run has a fixed cost whatever the worker count (interpreter and library
start-up of the main process and of each worker, which start in parallel, the
numba kernels of the natural corruptions, the manifest): about 2 s here. The
work must be large against it for the ratio to measure the scheduling: the
default, the whole suite on 4 photos, is about 33 CPU s (the sequences' H.264
encoding is most of it); the cheap families alone need some 60 photos
(``--only 'clean/*' --only 'natural/*' --only 'systematic/*' --images 64``).

Run:  python bench/bench_workers.py [--images N] [--repeats R] [--only GLOB ...] [--workers-b N]
e.g.  python bench/bench_workers.py --images 4 --repeats 3
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL = 1.8


def make_sources(root: Path, n: int) -> Path:
    """``n`` JPEG crops of the bundled photos, ImageFolder layout (one class per photo)."""
    from PIL import Image

    from qrobust.shared.demo_data import PHOTOS, photo

    names = sorted(PHOTOS)
    for i in range(n):
        name = names[i % len(names)]
        image = photo(name).convert("RGB")
        w, h = image.size
        k = i // len(names)  # a different crop (and every other pass a mirror) on each pass over the photos
        box = ((k % 4) * w // 16, (k % 3) * h // 16, w - (k % 5) * w // 16, h - (k % 2) * h // 16)
        image = image.crop(box)
        if k % 2:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        short = 300 + (37 * i) % 101  # 300..400 px, like ImageNet validation images
        scale = short / min(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.BILINEAR)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90, subsampling=2)
        path = root / name / f"{name}_{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    return root


def corpus_digest(corpus: Path) -> dict:
    """sha256 of manifest.json and of every shard file on disk (not the manifest's claims)."""
    out = {"manifest.json": hashlib.sha256((corpus / "manifest.json").read_bytes()).hexdigest()}
    for p in sorted(corpus.rglob("*.tar")):
        out[str(p.relative_to(corpus))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (Linux /proc/stat; 0 elsewhere)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_generate(src: Path, out: Path, workers: int, only: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of the command and its workers, CPU seconds other processes took
    meanwhile: on a shared machine a run that competed for the cores does not measure the scaling)."""
    cmd = [sys.executable, "-m", "qrobust", "-q", "generate", "--suite", "robustmq", "--source",
           str(src), "--out", str(out), "--workers", str(workers), *(a for g in only for a in ("--only", g))]
    before, machine = resource.getrusage(resource.RUSAGE_CHILDREN), busy_cpu_seconds()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after, machine = resource.getrusage(resource.RUSAGE_CHILDREN), busy_cpu_seconds() - machine
    if proc.returncode != 0:
        raise SystemExit(f"generate failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return wall, cpu, max(0.0, machine - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", action="append", help="variant globs (default: the whole suite)")
    parser.add_argument("--workers-b", type=int, default=2, help="the worker count compared with 1")
    parser.add_argument("--keep", help="keep the source folder and corpora under this folder")
    args = parser.parse_args()
    if args.repeats < 1 or args.images < 1:
        parser.error("--images and --repeats must be at least 1")
    only = args.only or []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        src = make_sources(base / "src", args.images)
        counts = (1, args.workers_b)
        walls: dict[int, list[float]] = {n: [] for n in counts}
        foreign: list[float] = []
        digests: dict[tuple[int, int], dict] = {}
        images = None
        print(f"{args.images} source images, robustmq suite{' --only ' + ' '.join(only) if only else ''}, "
              f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}), {args.repeats} round(s) "
              f"alternating --workers {counts[0]} / {counts[1]}")
        for r in range(args.repeats):
            for n in (counts if r % 2 == 0 else counts[::-1]):  # alternate which goes first
                out = base / f"corpus-w{n}-r{r}"
                wall, cpu, others = run_generate(src, out, n, only)
                walls[n].append(wall)
                foreign.append(others / wall)
                digests[(n, r)] = corpus_digest(out)
                if images is None:
                    manifest = json.loads((out / "manifest.json").read_text())
                    images = sum(v["count"] for v in manifest["variants"].values())
                    print(f"  corpus: {len(manifest['variants'])} variants x {manifest['samples']['count']} samples"
                          f" = {images} images, {len(digests[(n, r)]) - 1} shards")
                print(f"  round {r + 1}: --workers {n}: {wall:7.2f} s  {images / wall:7.1f} images/s  "
                      f"({cpu:.1f} CPU s; other processes took {others:.1f} CPU s meanwhile)", flush=True)
                if not args.keep:
                    shutil.rmtree(out)
        reference = digests[(1, 0)]
        identical = all(d == reference for d in digests.values())
        med = {n: statistics.median(w) for n, w in walls.items()}
        rate = {n: images / med[n] for n in counts}
        ratio = rate[counts[1]] / rate[1]
        print(f"--workers 1: median {med[1]:7.2f} s  {rate[1]:7.1f} images/s")
        print(f"--workers {counts[1]}: median {med[counts[1]]:7.2f} s  {rate[counts[1]]:7.1f} images/s")
        print(f"other processes used {statistics.median(foreign):.2f} cores on median during the runs "
              f"(max {max(foreign):.2f}; on a busy machine the ratio understates the scaling)")
        print(f"ratio w{counts[1]}/w1 = {ratio:.2f}x (goal {GOAL:.1f}x: {'met' if ratio >= GOAL else 'NOT met'}); "
              f"corpora byte-identical: {'yes' if identical else 'NO'}")
        if not identical:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
