"""``qrobust demo``: the benchmark end to end on the built-in demo data.

Today it builds the demo data set (scikit-image photographs), generates the
demo corpus (every model-independent family: 101 variants) and verifies it. Scoring,
quantized models and the report join as those programs land. Every step reuses
what a previous run left in ``out``.
"""
from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path

log = logging.getLogger("qrobust.demo")


def run_demo(out: str, *, workers: int | None = None, progress: bool = True) -> int:
    """Run the demo into folder ``out``; returns the process exit status."""
    from qrobust.shared.demo_data import build_demo_dataset
    from qrobust.shared.manifest import verify_corpus

    generate = importlib.import_module("qrobust.generate.run").generate
    out_path = Path(out)
    t0 = time.perf_counter()
    data = build_demo_dataset(out_path / "data")
    log.info("demo data: %s (%.1f s)", data, time.perf_counter() - t0)
    t1 = time.perf_counter()
    manifest = generate("demo", str(data / "val"), str(out_path / "corpus"), workers=workers, progress=progress)
    log.info("demo corpus: %s (%.1f s)", out_path / "corpus", time.perf_counter() - t1)
    problems = verify_corpus(out_path / "corpus")
    for p in problems:
        print(f"MISMATCH {p}")
    n_shards = sum(len(v["shards"]) for v in manifest["variants"].values())
    print(f"demo corpus {out_path / 'corpus'}: {len(manifest['variants'])} variants x "
          f"{manifest['samples']['count']} samples in {n_shards} shards, "
          f"{'verified OK' if not problems else f'{len(problems)} PROBLEMS'}; "
          f"total {time.perf_counter() - t0:.1f} s")
    return 1 if problems else 0
