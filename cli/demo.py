"""``qrobust demo``: the whole benchmark end to end on the built-in demo data, on a CPU, in minutes.

Steps, each reusing what an earlier run left in ``out``:

1. the demo data set: crops of the photographs scikit-image ships (one class
   per photo; JPEG, mixed chroma subsampling) in an ImageFolder train/val tree;
2. a small float classifier trained on it, and its DoReFa, PACT and LSQ
   versions at 2, 4 and 8 bits fine-tuned from it (quantization-aware);
3. the demo corpus (``--suite demo``: 2 clean, 75 natural, 10 sequence and 14
   systematic variants at 64 px) and its verification;
4. every model scored on every variant and attacked with every attack at the
   three budgets (L1/L2 budgets scaled to 3x64x64, see the README);
5. the report (tables, figures, ``index.html``) and a short summary of findings.

``quick=True`` (``--quick``) runs a reduced demo for CI: fewer variants, one
bit width, fewer attacked images, cheaper training.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import time
from pathlib import Path

from qrobust.cli.common import subparser

log = logging.getLogger("qrobust.demo")

ARCH = "tiny_cnn"           # ~2.8 M multiply-adds at 64 px: 10 models x 29k images + AutoAttack fit the budget
BITS = (2, 4, 8)            # of each quantization method's bits (2, 4, 6, 8): 6 left out for time
ATTACKS = ["all"]           # the paper's five
ATTACK_ROWS = 48            # attacked images per model, 4 per class
AUTOATTACK_ROWS = 12        # AutoAttack costs ~7,900 forward passes per robust image: 1 image per class
NC_THRESHOLD = 0.1          # the report's default
QUICK_ONLY = ["clean/*", "natural/*-3", "sequence/gaussian_noise", "sequence/rotate", "systematic/*"]


def _recipes(quick: bool):
    from qrobust.train.recipes import Recipe

    fp = Recipe(epochs=8 if quick else 24, batch_size=64, lr=3e-3, warmup_epochs=1, optimizer="adam",
                weight_decay=5e-4, label_smoothing=0.1, image_size=64, seed=0, workers=0)
    qat = dataclasses.replace(fp, epochs=2 if quick else 5, lr=1e-3, warmup_epochs=0.5)
    return fp, qat


def run_demo(out: str, *, workers: int | None = None, progress: bool = True, quick: bool = False) -> int:
    """Run the demo into folder ``out``; returns the process exit status."""
    from qrobust.shared.demo_data import build_demo_dataset
    from qrobust.shared.verify import verify_corpus

    generate = importlib.import_module("qrobust.generate.run").generate
    build_report = importlib.import_module("qrobust.score.report").build_report
    qat = importlib.import_module("qrobust.train.qat")

    out_path = Path(out)
    times: dict[str, float] = {}
    t0 = time.perf_counter()

    def step(name: str):
        times[name] = time.perf_counter() - sum(times.values()) - t0
        log.info("demo: %s done (%.1f s)", name, times[name])

    data = build_demo_dataset(out_path / "data", train_per_class=48)
    step("data")
    fp_recipe, qat_recipe = _recipes(quick)
    models = out_path / "models"
    fp_ckpt = qat.train_fp(ARCH, data / "train", models / f"{ARCH}.safetensors", val_root=data / "val",
                           recipe=fp_recipe, progress=progress)
    methods = importlib.import_module("qrobust.shared.quant").METHODS.in_order()  # every registered method
    checkpoints = [fp_ckpt] + qat.quantize_grid(str(fp_ckpt), methods, [4] if quick else list(BITS),
                                                data / "train", models, val_root=data / "val",
                                                recipe=qat_recipe, progress=progress)
    step("models")
    only = QUICK_ONLY if quick else None
    manifest = generate("demo", str(data / "val"), str(out_path / "corpus"), only=only, workers=workers,
                        progress=progress)
    problems = verify_corpus(out_path / "corpus")
    for p in problems:
        print(f"MISMATCH {p}")
    if problems:
        return 1
    step("corpus")
    results = _score_all(out_path, checkpoints, quick=quick, workers=workers, progress=progress)
    step("scoring")
    index = build_report(results, out_path / "report", nc_threshold=NC_THRESHOLD)
    step("report")
    _print_findings(index, results, manifest, times)
    return 0


def _score_group(corpus: str, ckpts: list[str], root: str, quick: bool, workers: int | None,
                 progress: bool) -> list[str]:
    """Score ``ckpts`` in one pass (each shard decoded once for all of them) into ``root/<checkpoint name>``."""
    score_many = importlib.import_module("qrobust.score.run").score_many
    found = score_many(corpus, ckpts, root, workers=workers, progress=progress, attacks=ATTACKS,
                       attack_limit=12 if quick else ATTACK_ROWS,
                       attack_config={"autoattack-linf": {"limit": 6 if quick else AUTOATTACK_ROWS}})
    return list(found)


def _one_thread() -> None:
    """Pool initializer: one torch thread per process (the processes are the parallelism), warnings shown."""
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="qrobust: %(message)s")


def _score_all(out: Path, checkpoints: list, *, quick: bool, workers: int | None, progress: bool) -> list[Path]:
    """Score every model: one pass per process over its share of the models (a tiny model cannot use 2
    threads well, so on several cores the models are split among processes; within each, a shard is
    decoded once for all its models)."""
    import os

    corpus, root = str(out / "corpus"), out / "results"
    folders = [root / Path(c).stem for c in checkpoints]
    procs = min(len(checkpoints), workers or os.cpu_count() or 1)
    if procs <= 1:
        _score_group(corpus, [str(c) for c in checkpoints], str(root), quick, workers, progress)
        return folders
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from qrobust.shared.progress import bar as progress_bar

    # round robin: the FP model and each method's bits spread over the processes (their attack costs differ)
    groups = [[str(c) for c in checkpoints[i::procs]] for i in range(procs)]
    log.info("demo: scoring %d models in %d processes, each one pass over the corpus", len(checkpoints), procs)
    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread) as pool:
        futures = [pool.submit(_score_group, corpus, g, str(root), quick, 0, False) for g in groups]
        with progress_bar(len(checkpoints), "score models", "model", enabled=progress) as bar:
            for future in as_completed(futures):
                bar.update(len(future.result()))  # an error in one model stops the demo with that error
    return folders


def _print_findings(index: Path, results: list[Path], manifest: dict, times: dict[str, float]) -> None:
    """The terminal summary: a one-line-per-model table, the report's findings, the timings."""
    rows = []
    for folder in results:
        s = json.loads((folder / "summary.json").read_text())
        nat = s.get("natural") or {}
        syst = s.get("systematic") or {}
        wcar = s.get("wcar") or {}
        rows.append((s["model"]["name"], s["clean"]["acc"], nat.get("mnr"), syst.get("mean"),
                     (s.get("sequence") or {}).get("mfp"), wcar.get("small"), wcar.get("large")))
    fmt = "{:<28} {:>7} {:>7} {:>9} {:>7} {:>11} {:>11}"
    print(fmt.format("model", "ACC", "mNR", "mean ACCs", "mFP", "WCAR small", "WCAR large"))
    for name, *vals in rows:
        print(fmt.format(name, *("-" if v is None else f"{100 * v:.1f}" for v in vals)))
    nc = [name for name, acc, *_ in rows if acc is not None and acc < NC_THRESHOLD]
    print(f"\nnot converged (clean accuracy below {NC_THRESHOLD:.0%}, NC in the report): {', '.join(nc) or 'none'}")
    findings = index.parent / "findings.txt"
    if findings.is_file():
        print("\nfindings:")
        for line in findings.read_text().splitlines()[:12]:
            print(f"  - {line}")
    n = len(manifest["variants"])
    print(f"\nreport: {index}\ndemo: {len(results)} models x {n} variants x {manifest['samples']['count']} images; "
          + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"; total {sum(times.values()):.0f} s")


def add_demo(sub) -> None:
    p = subparser(sub, "demo", "Run the benchmark end to end on the built-in demo data (photos shipped with "
                  "scikit-image): build the data set, train a small model and its DoReFa/PACT/LSQ versions at "
                  "2/4/8 bits, generate and verify the demo corpus, score every model (attacks included), "
                  "write the report.", "qrobust demo --out demo-out")
    p.add_argument("--out", default="demo-out", help="output folder (a second run reuses what is there)")
    p.add_argument("--workers", type=int, help="worker processes (default: all cores)")
    p.add_argument("--quick", action="store_true",
                   help="reduced demo (fewer variants and attacked images, 4 bit only, shorter training)")
    p.set_defaults(run=_cmd_demo)


def _cmd_demo(args) -> int:
    return run_demo(args.out, workers=args.workers, progress=not args.quiet, quick=args.quick)
