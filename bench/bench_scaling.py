"""Generation beyond one process: the same corpus by one local run, by N ``--part`` runs at once, and on
a Dask cluster, each timed against the local run in the same process.

Same sources and command line as ``bench_workers.py`` (real photos bundled with
scikit-image, a fresh process and ``--out`` per run, the packaged ``robustmq``
suite or what ``--only`` selects). Per round, in rotating order:

- ``local``: one ``qrobust generate --workers W`` (the baseline);
- ``parts``: W ``qrobust generate --part i/W --workers 1`` started together in one folder (what a job
  array does), timed until the last has written the manifest (``--finalize`` after, if two finished at
  once and each saw the other still running);
- ``dask``: ``--executor dask --scheduler ADDRESS`` on a LocalCluster of W one-thread workers started
  once before the rounds (its start-up is printed apart: a real cluster is already running).

It prints the median wall time of each and its ratio to ``local`` (1.00 = no
overhead; parts pay one source scan and interpreter start-up per part, Dask
its task round-trips), and checks that all corpora are byte-identical.

Run:  python bench/bench_scaling.py [--images N] [--repeats R] [--workers W] [--only GLOB ...]
e.g.  python bench/bench_scaling.py --images 4 --repeats 3 --only 'clean/*' --only 'natural/*' --only 'systematic/*'
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_workers import corpus_digest, make_sources  # noqa: E402


def command(src: Path, out: Path, only: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "qrobust", "-q", "generate", "--suite", "robustmq", "--source", str(src),
            "--out", str(out), *(a for g in only for a in ("--only", g)), *extra]


def timed(commands: list[list[str]]) -> float:
    """Wall seconds for ``commands`` started together, until the last ends."""
    start = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in commands]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"generate failed ({p.returncode}):\n{err[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="W: local workers, parts, Dask workers")
    parser.add_argument("--only", action="append", help="variant globs (default: the whole suite)")
    parser.add_argument("--no-dask", action="store_true")
    args = parser.parse_args()
    only, w = args.only or [], args.workers
    modes = ["local", "parts"] + ([] if args.no_dask else ["dask"])
    cluster = None
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        src = make_sources(base / "src", args.images)
        if "dask" in modes:
            from distributed import LocalCluster

            start = time.perf_counter()
            cluster = LocalCluster(n_workers=w, threads_per_worker=1, processes=True, dashboard_address=None)
            print(f"Dask LocalCluster of {w} workers started in {time.perf_counter() - start:.1f} s (not counted)")
        walls: dict[str, list[float]] = {m: [] for m in modes}
        digests = {}
        try:
            for r in range(args.repeats):
                for mode in modes[r % len(modes):] + modes[:r % len(modes)]:  # rotate which goes first
                    out = base / f"{mode}-{r}"
                    if mode == "local":
                        wall = timed([command(src, out, only, "--workers", str(w))])
                    elif mode == "parts":
                        wall = timed([command(src, out, only, "--part", f"{i}/{w}", "--workers", "1")
                                      for i in range(1, w + 1)])
                        if not (out / "manifest.json").exists():
                            wall += timed([command(src, out, only, "--finalize", "--workers", "1")])
                    else:
                        wall = timed([command(src, out, only, "--executor", "dask", "--scheduler",
                                              cluster.scheduler_address)])
                    walls[mode].append(wall)
                    digests[(mode, r)] = corpus_digest(out)
                    print(f"  round {r + 1}: {mode:5}: {wall:7.2f} s", flush=True)
        finally:
            if cluster is not None:
                cluster.close()
        identical = all(d == digests[("local", 0)] for d in digests.values())
        med = {m: statistics.median(v) for m, v in walls.items()}
        n_shards = len(digests[("local", 0)]) - 1
        print(f"{args.images} source images, {n_shards} shards, W = {w}, {args.repeats} round(s)")
        for m in modes:
            print(f"{m:5}: median {med[m]:7.2f} s   time ratio to local {med[m] / med['local']:.2f}")
        print(f"corpora byte-identical: {'yes' if identical else 'NO'}")
        if not identical:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
