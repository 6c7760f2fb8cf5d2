"""The ``qrobust`` command.

This is the command layer: the one place that reaches both programs. It names
their entry points by dotted path, imported only when a subcommand runs, so
``qrobust --help`` stays fast and nothing imports back up.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

EXIT_PROBLEMS = 1   # the command ran and found problems (e.g. verify mismatches)
EXIT_USAGE = 2      # bad arguments or inputs


def _resolve(dotted: str):
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


def _globs(items: list[str] | None) -> list[str]:
    """--only values: repeatable, each possibly comma-separated."""
    return [g for item in (items or []) for g in item.split(",") if g]


def _parser(sub, name: str, help: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_generate(sub) -> None:
    p = _parser(sub, "generate", "Build a noise corpus (WebDataset shards + manifest.json) from an image folder.",
                "qrobust generate --suite demo --source demo-out/data/val --out corpora/demo "
                "--only 'natural/glass_blur-*' --workers 2   # after `qrobust demo`")
    p.add_argument("--suite", required=True, help="packaged suite name (robustmq, demo) or a suite .toml path")
    p.add_argument("--source", required=True, help="image folder: class subfolders, or flat with a label file")
    p.add_argument("--out", required=True, help="corpus folder (created; an interrupted run resumes here)")
    p.add_argument("--labels", help="label file for a flat folder (LOC_val_solution.csv, or 'filename label' lines)")
    p.add_argument("--classes", help="file whose lines start with every class name (e.g. LOC_synset_mapping.txt)")
    p.add_argument("--only", action="append", metavar="GLOB",
                   help="build only variants whose id matches (repeatable, or comma-separated), e.g. 'natural/fog-*'")
    p.add_argument("--limit", type=int, help="first N samples by key")
    p.add_argument("--per-class", type=int, help="first K samples of every class, by key")
    p.add_argument("--workers", type=int, help="worker processes (default: all cores)")
    p.add_argument("--encoding", choices=("jpg", "png"),
                   help="storage of the natural family (default from the suite: JPEG q85, as ImageNet-C)")
    p.add_argument("--sequence-encoding", choices=("reference", "lossless"),
                   help="storage of the sequences: the reference H.264 recipe (lossy, as ImageNet-P) or "
                        "lossless H.264 RGB (default from the suite: reference)")
    p.add_argument("--seed", type=int, help="override the suite seed")
    p.add_argument("--strict", action="store_true", help="stop at the first unusable input instead of rejecting it")
    p.set_defaults(run=_cmd_generate)


def _cmd_generate(args) -> int:
    generate = _resolve("qrobust.generate.run:generate")
    only = _globs(args.only)
    manifest = generate(args.suite, args.source, args.out, labels=args.labels, classes=args.classes, only=only,
                        limit=args.limit, per_class=args.per_class, workers=args.workers,
                        encoding=args.encoding, sequence_encoding=args.sequence_encoding, seed=args.seed,
                        strict=args.strict, progress=not args.quiet)
    n_shards = sum(len(v["shards"]) for v in manifest["variants"].values())
    print(f"{args.out}: {len(manifest['variants'])} variants, {manifest['samples']['count']} samples, "
          f"{n_shards} shards, {len(manifest['rejected'])} rejected inputs")
    return 0


def _add_verify(sub) -> None:
    p = _parser(sub, "verify", "Re-hash and recount a corpus against its manifest; exit 1 naming every mismatch.",
                "qrobust verify corpora/robustmq")
    p.add_argument("corpus")
    p.add_argument("--size-only", action="store_true", help="check presence and byte sizes only (fast)")
    p.add_argument("--check-env", action="store_true",
                   help="also flag pixel-deciding libraries (Pillow, OpenCV, FFmpeg, ...) whose installed version "
                        "differs from the one that built the corpus")
    p.add_argument("--workers", type=int, help="hashing threads")
    p.set_defaults(run=_cmd_verify)


def _cmd_verify(args) -> int:
    manifest_mod = importlib.import_module("qrobust.shared.manifest")
    manifest = manifest_mod.load_manifest(args.corpus)
    n = sum(len(v["shards"]) for v in manifest["variants"].values())
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="verify", unit="shard", file=sys.stderr)
    try:
        problems = manifest_mod.verify_corpus(args.corpus, rehash=not args.size_only, workers=args.workers,
                                              progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    if args.check_env:
        problems += [f"environment: {d}" for d in manifest_mod.environment_differences(manifest)]
    for p in problems:
        print(f"MISMATCH {p}")
    if problems:
        print(f"{args.corpus}: {len(problems)} problem(s) in {n} shards")
        return EXIT_PROBLEMS
    print(f"{args.corpus}: OK ({len(manifest['variants'])} variants, {n} shards)")
    return 0


def _add_score(sub) -> None:
    p = _parser(sub, "score", "Stream a corpus through a model; store top-5 predictions and every metric "
                "(RESULTS/summary.json). An interrupted run resumes.",
                "qrobust score --corpus demo-out/corpus --model tiny_cnn --out results/tiny --limit 16")
    p.add_argument("--corpus", required=True, help="corpus folder, or a URL (http(s)://, s3://, ...) of one")
    p.add_argument("--model", required=True,
                   help="checkpoint.safetensors | ARCH (with --weights FILE) | ARCH:TORCHVISION_WEIGHTS | "
                        "module:callable; `qrobust ls models` lists architectures")
    p.add_argument("--weights", help="state dict (.pth/.pt loaded with weights_only=True, or .safetensors)")
    p.add_argument("--out", required=True, help="results folder (one per model and corpus)")
    p.add_argument("--only", action="append", metavar="GLOB", help="score only these variant ids (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, help="data-loading processes (default: min(4, cores - 1))")
    p.add_argument("--limit", type=int, help="score the first N samples of every variant")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of shards (sizes are checked)")
    p.set_defaults(run=_cmd_score)


def _cmd_score(args) -> int:
    score = _resolve("qrobust.score.run:score")
    only = _globs(args.only)
    summary = score(args.corpus, args.model, args.out, weights=args.weights, only=only, device=args.device,
                    batch_size=args.batch_size, workers=args.workers, limit=args.limit, verify=not args.no_verify,
                    progress=not args.quiet)
    acc = summary["clean"]["acc"]
    parts = [f"ACC {acc:.2%}" if acc is not None else "ACC -"]
    for family, key in (("natural", "mnr"), ("sequence", "mfp"), ("systematic", "mean")):
        value = (summary.get(family) or {}).get(key)
        if value is not None:
            parts.append(f"{family} {key} {value:.2%}")
    print(f"{args.out}/summary.json: {summary['model']['name']}: " + ", ".join(parts))
    return 0


def _add_report(sub) -> None:
    p = _parser(sub, "report", "Turn the results of many models into the paper's tables (Markdown, CSV, LaTeX), "
                "figures and one index.html.",
                "qrobust report results/* --out report")
    p.add_argument("results", nargs="+", help="results folders made by `qrobust score`")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--nc-threshold", type=float, default=0.1,
                   help="clean accuracy below which a model is reported as NC (not converged); default 0.1")
    p.set_defaults(run=_cmd_report)


def _cmd_report(args) -> int:
    index = _resolve("qrobust.score.report:build_report")(args.results, args.out, nc_threshold=args.nc_threshold)
    print(f"report: {index}")
    return 0


def _add_ls(sub) -> None:
    p = _parser(sub, "ls", "List registered things: corruptions, suites, model architectures, or the variants "
                "of a suite.", "qrobust ls variants 'natural/glass*' --suite robustmq")
    p.add_argument("what", choices=("corruptions", "suites", "variants", "models"))
    p.add_argument("pattern", nargs="?", default="*", help="glob filter")
    p.add_argument("--suite", default="robustmq", help="suite for `ls variants`")
    p.set_defaults(run=_cmd_ls)


def _cmd_ls(args) -> int:
    import fnmatch

    if args.what == "corruptions":
        names = _resolve("qrobust.generate.natural:CORRUPTIONS").names(args.pattern)
    elif args.what == "models":
        names = _resolve("qrobust.shared.models:ARCHITECTURES").names(args.pattern)
    elif args.what == "suites":
        names = [n for n in _resolve("qrobust.shared.spec:packaged_suites")() if fnmatch.fnmatchcase(n, args.pattern)]
    else:
        suite = _resolve("qrobust.shared.spec:load_suite")(args.suite)
        names = [v.id for v in suite.variants if fnmatch.fnmatchcase(v.id, args.pattern)]
    print("\n".join(names))
    return 0 if names else EXIT_PROBLEMS


def _add_demo(sub) -> None:
    p = _parser(sub, "demo", "Run the benchmark end to end on the built-in demo data (photos shipped with "
                "scikit-image): build the data set, generate the demo corpus, verify it.",
                "qrobust demo --out demo-out")
    p.add_argument("--out", default="demo-out", help="output folder (a second run reuses what is there)")
    p.add_argument("--workers", type=int, help="worker processes (default: all cores)")
    p.set_defaults(run=_cmd_demo)


def _cmd_demo(args) -> int:
    return _resolve("qrobust.shared.demo:run_demo")(args.out, workers=args.workers, progress=not args.quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrobust", description="How robust is this (quantized) model? The RobustMQ benchmark.",
        epilog="example:\n  qrobust demo --out demo-out\n\n`qrobust COMMAND --help` shows each command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    from qrobust import __version__

    parser.add_argument("--version", action="version", version=f"qrobust {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_generate, _add_verify, _add_score, _add_report, _add_ls, _add_demo):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="qrobust: %(message)s", stream=sys.stderr)
    from qrobust.shared.errors import USER_ERRORS

    try:
        return args.run(args)
    except USER_ERRORS as e:
        print(f"qrobust {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"qrobust {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
