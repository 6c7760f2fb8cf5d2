"""``qrobust score`` and ``qrobust report``."""
from __future__ import annotations

import sys

from qrobust.cli.common import globs, print_json, printable, resolve, subparser


def add_score(sub) -> None:
    p = subparser(sub, "score", "Stream a corpus through a model; store top-5 predictions and every metric "
                  "(RESULTS/summary.json). An interrupted run resumes. A corpus that does not match its manifest "
                  "is refused (a damaged variant can be left out with --exclude); a model whose logits are NaN, "
                  "infinite or not one per class stops the run.",
                  "qrobust score --corpus demo-out/corpus --model tiny_cnn --out results/tiny --limit 16 "
                  "--exclude 'natural/fog-*'   # --exclude: leave out variants that `qrobust verify` reports damaged\n"
                  "  qrobust score --corpus demo-out/corpus --model demo-out/models --out results   "
                  "# every checkpoint of a folder in one pass: results/<checkpoint name>/",
                  json_output=True)
    p.add_argument("--corpus", required=True, help="corpus folder, or a URL of one (http(s)://, s3://, gs://, az://, "
                   "hf://; pipe: and chained URLs are refused)")
    p.add_argument("--model", required=True, action="append",
                   help="checkpoint.safetensors | ARCH (with --weights FILE) | ARCH:TORCHVISION_WEIGHTS | "
                        "module:callable; `qrobust ls models` lists architectures. Several models in one pass "
                        "(each shard decoded once): repeat --model, or give a folder of checkpoints or @LIST "
                        "(a file, one model per line); --out is then a folder holding one results folder per "
                        "model, named after it")
    p.add_argument("--weights", help="state dict (.pth/.pt loaded with weights_only=True, or .safetensors)")
    p.add_argument("--normalize", choices=("none", "imagenet"),
                   help="input convention of a module:callable model: none (default: it gets RGB in [0, 1] and "
                        "normalizes itself, as qrobust's own models do) or imagenet (qrobust applies ImageNet "
                        "mean/std first). Registered architectures always normalize with ImageNet statistics")
    p.add_argument("--out", required=True, help="results folder (one per model and corpus)")
    p.add_argument("--only", action="append", metavar="GLOB", help="score only these variant ids (repeatable)")
    p.add_argument("--exclude", action="append", metavar="GLOB",
                   help="leave these variant ids out (repeatable or comma-separated), e.g. a variant that "
                        "`qrobust verify` reports damaged: --exclude natural/fog-3")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (per process under torchrun)")
    p.add_argument("--workers", type=int, help="data-loading processes (default: min(4, cores - 1))")
    p.add_argument("--limit", type=int, help="score the first N samples of every variant")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of shards (sizes are checked)")
    p.add_argument("--distributed", action="store_true",
                   help="one process of several started by torchrun (implied under torchrun): shards and attack "
                        "batches are split over the ranks, results merged by rank 0")
    a = p.add_argument_group("attacks (run live on clean/onecrop; budgets and settings: docs/metrics.md, README)")
    a.add_argument("--attacks", action="append", metavar="NAMES",
                   help="comma-separated: fgsm-linf, pgd-linf, pgd-l2, pgd-l1, autoattack-linf, or all; extras: "
                        "slide-l1, apgd-l1, square-linf (`qrobust ls attacks`)")
    a.add_argument("--budgets", default="small,middle,large", help="comma-separated budget names")
    a.add_argument("--attack-limit", type=int, metavar="N", help="attack N rows spread over the corpus (default all)")
    a.add_argument("--attack-config", metavar="TOML", help="per-attack hyper-parameters and budgets")
    a.add_argument("--attack-set", action="append", metavar="ATTACK.KEY=VALUE",
                   help="override one setting, e.g. pgd-linf.steps=50 or pgd-l2.budgets.small=0.25 (repeatable)")
    a.add_argument("--budget-scale", choices=("dims", "none"), default="dims",
                   help="scale L1/L2 budgets from 3x224x224 to the corpus's crop size (dims, default) or not")
    a.add_argument("--cascade", action="store_true",
                   help="cheapest attack first, skip rows already fooled: exact WCAR, no per-attack AR")
    a.add_argument("--transfer-from", metavar="MODEL", help="FP model whose PGD-Linf examples are replayed "
                   "(a gradient-masking check)")
    p.set_defaults(run=_cmd_score)


def _cmd_score(args) -> int:
    only = globs(args.only)
    attacks = globs(args.attacks)
    config = resolve("qrobust.score.adversarial:attack_config")(args.attack_config, args.attack_set) \
        if attacks else None
    common = dict(only=only, exclude=globs(args.exclude) or None, device=args.device, batch_size=args.batch_size,
                  workers=args.workers, limit=args.limit, verify=not args.no_verify,
                  progress=not args.quiet and not args.json, attacks=attacks or None, budgets=globs([args.budgets]),
                  attack_limit=args.attack_limit, attack_config=config, budget_scale=args.budget_scale,
                  cascade=args.cascade, transfer_from=args.transfer_from, normalize=args.normalize)
    models, many = resolve("qrobust.score.run:expand_models")(args.model)
    if many:
        if args.weights or args.distributed:
            print("qrobust score: error: --weights and --distributed take one --model (a checkpoint holds its "
                  "weights; torchrun splits one model's units)", file=sys.stderr)
            return 2
        found = resolve("qrobust.score.run:score_many")(args.corpus, models, args.out, **common)
        if args.json:
            print_json(found)
            return 0
        for name, summary in found.items():
            _print_summary(f"{args.out}/{name}", summary)
        return 0
    summary = resolve("qrobust.score.run:score")(args.corpus, models[0], args.out, weights=args.weights,
                                                 distributed=args.distributed, **common)
    if summary is None:  # a rank other than 0 of a distributed run: rank 0 reports
        return 0
    if args.json:
        print_json(summary)
        return 0
    _print_summary(args.out, summary)
    return 0


def _print_summary(out: str, summary: dict) -> None:
    acc = summary["clean"]["acc"]
    parts = [f"ACC {acc:.2%}" if acc is not None else "ACC -"]
    for family, key in (("natural", "mnr"), ("sequence", "mfp"), ("systematic", "mean")):
        value = (summary.get(family) or {}).get(key)
        if value is not None:
            parts.append(f"{family} {key} {value:.2%}")
    if summary.get("wcar"):
        parts.append("WCAR " + " ".join(f"{b} {v:.2%}" for b, v in summary["wcar"].items()))
    # a model's name can come from a checkpoint someone else wrote: no control character reaches the terminal
    print(printable(f"{out}/summary.json: {summary['model']['name']}: " + ", ".join(parts)))
    for warning in (summary["checks"].get("gradient_masking") or []) + (summary["checks"].get("warnings") or []):
        print(printable(f"warning: {warning}"), file=sys.stderr)


def add_report(sub) -> None:
    p = subparser(sub, "report", "Turn the results of many models into the paper's tables (Markdown, CSV, LaTeX), "
                  "figures and one index.html, with 95% intervals, paired comparisons between models (each "
                  "quantized model against its FP model, methods at equal bits) and findings that claim only "
                  "significant differences.",
                  "qrobust report results/* --out report --power 0.005   # images needed to tell 0.5 points apart",
                  json_output=True)
    p.add_argument("results", nargs="+", help="results folders made by `qrobust score`")
    p.add_argument("--out", required=True, help="report folder: new, empty, or an earlier report (rewritten); a "
                   "folder of other files, or a link, is refused")
    p.add_argument("--nc-threshold", type=float, default=0.1,
                   help="clean accuracy below which a model is reported as NC (not converged); default 0.1")
    p.add_argument("--power", type=float, default=0.005, metavar="DELTA",
                   help="the difference (a fraction: 0.005 = 0.5 points of WCAR, or of ACC without attacks) the "
                        "sample-size line is about: how many images a corpus needs to detect it; default 0.005")
    p.set_defaults(run=_cmd_report)


def _cmd_report(args) -> int:
    if not 0 < args.power < 1:
        from qrobust.shared.errors import QrobustError

        raise QrobustError(f"--power {args.power}: give a difference between 0 and 1 (0.005 = half a point)")
    index = resolve("qrobust.score.report:build_report")(args.results, args.out, nc_threshold=args.nc_threshold,
                                                        power=args.power)
    findings = (index.parent / "findings.txt").read_text(encoding="utf-8").splitlines()
    if args.json:
        print_json({"index": str(index), "tables": sorted(str(p) for p in (index.parent / "tables").glob("*.csv")),
                    "results": str(index.parent / "results.csv"), "findings": findings})
        return 0
    print(f"report: {index}")
    for line in findings:
        if line.startswith("To tell two models apart"):
            print(line)
    return 0
