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
EXIT_NO_SPACE = 3   # a write failed for lack of space; the run can resume


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
    c = p.add_argument_group("across machines (README: Scaling out)")
    c.add_argument("--part", metavar="I/N", help="build only part I of N (1-based) of the shards, e.g. "
                   "--part $((SLURM_ARRAY_TASK_ID + 1))/$SLURM_ARRAY_TASK_COUNT; the part that finds every "
                   "shard recorded writes the manifest")
    c.add_argument("--finalize", action="store_true",
                   help="write the manifest from the parts' records; names the shards still missing")
    c.add_argument("--executor", choices=("local", "dask"), default="local",
                   help="local worker processes (default), or a Dask cluster (pip install 'qrobust[dask]')")
    c.add_argument("--scheduler", metavar="ADDRESS",
                   help="with --executor dask: scheduler address (tcp://host:8786) or scheduler file; "
                        "default: a local cluster of --workers processes")
    p.set_defaults(run=_cmd_generate)


def _cmd_generate(args) -> int:
    generate = _resolve("qrobust.generate.run:generate")
    only = _globs(args.only)
    manifest = generate(args.suite, args.source, args.out, labels=args.labels, classes=args.classes, only=only,
                        limit=args.limit, per_class=args.per_class, workers=args.workers,
                        encoding=args.encoding, sequence_encoding=args.sequence_encoding, seed=args.seed,
                        strict=args.strict, progress=not args.quiet, part=args.part, finalize=args.finalize,
                        executor=args.executor, scheduler=args.scheduler)
    if manifest is not None:  # None: a part whose corpus still waits for other parts
        _print_corpus(args.out, manifest, "rejected inputs")
    return 0


def _print_corpus(out: str, manifest: dict, rejected: str | None = None) -> None:
    """The one-line account of a corpus written by generate, pack or import."""
    n_shards = sum(len(v["shards"]) for v in manifest["variants"].values())
    print(f"{out}: {len(manifest['variants'])} variants, {manifest['samples']['count']} samples, {n_shards} shards"
          + (f", {len(manifest['rejected'])} {rejected}" if rejected else ""))


def _add_verify(sub) -> None:
    p = _parser(sub, "verify", "Re-hash and recount a corpus against its manifest (sizes, sha256, sample order "
                "and keys, members qrobust does not read, extra or missing files, links out of the corpus, "
                "hand edits of the manifest); exit 1 naming every mismatch.",
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
                "(RESULTS/summary.json). An interrupted run resumes. A corpus that does not match its manifest "
                "is refused (a damaged variant can be left out with --exclude); a model whose logits are NaN, "
                "infinite or not one per class stops the run.",
                "qrobust score --corpus demo-out/corpus --model tiny_cnn --out results/tiny --limit 16 "
                "--exclude 'natural/fog-*'   # --exclude: leave out variants that `qrobust verify` reports damaged")
    p.add_argument("--corpus", required=True, help="corpus folder, or a URL of one (http(s)://, s3://, gs://, az://, "
                   "hf://; pipe: and chained URLs are refused)")
    p.add_argument("--model", required=True,
                   help="checkpoint.safetensors | ARCH (with --weights FILE) | ARCH:TORCHVISION_WEIGHTS | "
                        "module:callable; `qrobust ls models` lists architectures")
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
    score = _resolve("qrobust.score.run:score")
    only = _globs(args.only)
    attacks = _globs(args.attacks)
    config = _resolve("qrobust.score.adversarial:attack_config")(args.attack_config, args.attack_set) \
        if attacks else None
    summary = score(args.corpus, args.model, args.out, weights=args.weights, only=only,
                    exclude=_globs(args.exclude) or None, device=args.device,
                    batch_size=args.batch_size, workers=args.workers, limit=args.limit, verify=not args.no_verify,
                    progress=not args.quiet, attacks=attacks or None, budgets=_globs([args.budgets]),
                    attack_limit=args.attack_limit, attack_config=config, budget_scale=args.budget_scale,
                    cascade=args.cascade, transfer_from=args.transfer_from, distributed=args.distributed,
                    normalize=args.normalize)
    if summary is None:  # a rank other than 0 of a distributed run: rank 0 reports
        return 0
    acc = summary["clean"]["acc"]
    parts = [f"ACC {acc:.2%}" if acc is not None else "ACC -"]
    for family, key in (("natural", "mnr"), ("sequence", "mfp"), ("systematic", "mean")):
        value = (summary.get(family) or {}).get(key)
        if value is not None:
            parts.append(f"{family} {key} {value:.2%}")
    if summary.get("wcar"):
        parts.append("WCAR " + " ".join(f"{b} {v:.2%}" for b, v in summary["wcar"].items()))
    print(f"{args.out}/summary.json: {summary['model']['name']}: " + ", ".join(parts))
    for warning in (summary["checks"].get("gradient_masking") or []) + (summary["checks"].get("warnings") or []):
        print(f"warning: {warning}", file=sys.stderr)
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


def _add_pack(sub) -> None:
    p = _parser(sub, "pack", "Make a smaller corpus to share: a subset of the variants and/or samples of a "
                "corpus, shard bytes kept (samples re-sharded when subset), with its own valid manifest.",
                "qrobust pack corpora/robustmq --only 'natural/*-3' --only 'clean/*' --per-class 5 --out corpora/small")
    p.add_argument("corpus", help="corpus folder (made by `qrobust generate` or `qrobust import`)")
    p.add_argument("--out", required=True, help="new corpus folder (created; must be new or empty)")
    p.add_argument("--only", action="append", metavar="GLOB", help="keep these variant ids (repeatable)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="leave these variant ids out (repeatable)")
    p.add_argument("--limit", type=int, help="keep the first N samples (in corpus order)")
    p.add_argument("--per-class", type=int, help="keep the first K samples of every class")
    p.set_defaults(run=_cmd_pack)


def _cmd_pack(args) -> int:
    manifest = _resolve("qrobust.generate.pack:pack")(
        args.corpus, args.out, only=_globs(args.only) or None, exclude=_globs(args.exclude) or None,
        limit=args.limit, per_class=args.per_class, progress=not args.quiet)
    _print_corpus(args.out, manifest)
    return 0


def _add_import(sub) -> None:
    p = _parser(sub, "import", "Turn a released ImageNet-C tree (CORRUPTION/SEVERITY/WNID/*.JPEG) or ImageNet-P "
                "tree (PERTURBATION/WNID/*.mp4) into a qrobust corpus, bytes kept as released, so published "
                "numbers can be reproduced on the canonical data.",
                "qrobust import imagenet-c /data/ImageNet-C --out corpora/imagenet-c")
    p.add_argument("kind", choices=("imagenet-c", "imagenet-p"))
    p.add_argument("root", help="the released folder tree")
    p.add_argument("--out", required=True, help="corpus folder (created; an interrupted run resumes here)")
    p.add_argument("--classes", help="file whose lines start with every class name (e.g. LOC_synset_mapping.txt; "
                   "default: the class folders found, sorted)")
    p.add_argument("--only", action="append", metavar="GLOB",
                   help="import only these variant ids, e.g. 'natural/fog-*' or 'sequence/rotate' (repeatable)")
    p.add_argument("--limit", type=int, help="first N samples by key")
    p.add_argument("--per-class", type=int, help="first K samples of every class, by key")
    p.add_argument("--workers", type=int, help="worker processes (default: all cores)")
    p.add_argument("--strict", action="store_true", help="stop at the first unusable file instead of rejecting it")
    p.set_defaults(run=_cmd_import)


def _cmd_import(args) -> int:
    manifest = _resolve("qrobust.generate.imported:import_release")(
        args.kind, args.root, args.out, classes=args.classes, only=_globs(args.only) or None, limit=args.limit,
        per_class=args.per_class, workers=args.workers, strict=args.strict, progress=not args.quiet)
    _print_corpus(args.out, manifest, "rejected files")
    return 0


def _recipe_arguments(p) -> None:
    r = p.add_argument_group("training recipe (defaults: SETTINGS.md / README; every field can be set)")
    r.add_argument("--epochs", type=int)
    r.add_argument("--batch-size", type=int, help="global batch (split over torchrun processes)")
    r.add_argument("--lr", type=float, help="peak learning rate")
    r.add_argument("--image-size", type=int)
    r.add_argument("--workers", type=int, help="data-loading processes")
    r.add_argument("--seed", type=int)
    r.add_argument("--set", action="append", metavar="FIELD=VALUE", dest="recipe_set",
                   help="any other recipe field, e.g. --set optimizer=adam --set warmup_epochs=0.5")
    p.add_argument("--val", help="validation ImageFolder or shards (default: train/../val, else a held-out tenth)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...; under torchrun each process takes its GPU")


def _recipe_overrides(args) -> dict:
    out = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "image_size", "workers", "seed")
           if getattr(args, k) is not None}
    for item in args.recipe_set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise _resolve("qrobust.shared.errors:QrobustError")(f"--set {item!r}: expected FIELD=VALUE")
        import json

        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def _recipe(base, overrides: dict):
    if not overrides:
        return None if base is None else base
    recipe = _resolve("qrobust.train.loop:Recipe")
    return recipe.from_dict({**base.to_dict(), **overrides})


def _add_train(sub) -> None:
    p = _parser(sub, "train", "Train a float model from scratch on an ImageFolder (or WebDataset shards); "
                "writes a self-describing checkpoint. An interrupted run resumes.",
                "qrobust train --arch tiny_resnet --train demo-out/data/train --out models/tiny_resnet.safetensors")
    p.add_argument("--arch", required=True, help="architecture (`qrobust ls models`)")
    p.add_argument("--train", required=True, help="training ImageFolder, or a folder/glob of WebDataset shards")
    p.add_argument("--out", required=True, help="checkpoint file (.safetensors) or folder")
    _recipe_arguments(p)
    p.set_defaults(run=_cmd_train)


def _cmd_train(args) -> int:
    base = _resolve("qrobust.train.loop:fp_recipe")(args.arch)
    path = _resolve("qrobust.train.qat:train_fp")(args.arch, args.train, args.out, val_root=args.val,
                                                   recipe=_recipe(base, _recipe_overrides(args)), device=args.device,
                                                   progress=not args.quiet)
    print(f"checkpoint: {path}")
    return 0


def _add_quantize(sub) -> None:
    p = _parser(sub, "quantize", "Quantization-aware fine-tuning of a float model with DoReFa, PACT or LSQ "
                "(first/last layer 8 bit); --grid makes the method x bits grid. Multi-GPU: torchrun "
                "--nproc_per_node N -m qrobust.shared.cli quantize ...",
                "qrobust quantize --from models/tiny_resnet.safetensors --method lsq --bits 4 "
                "--train demo-out/data/train --out models/")
    p.add_argument("--from", dest="fp_model", required=True,
                   help="FP model: a qrobust checkpoint, FILE with --arch (torchvision/timm/pycls state dict), "
                        "or ARCH:TORCHVISION_WEIGHTS")
    p.add_argument("--arch", help="architecture of a plain state dict given to --from")
    p.add_argument("--method", help="dorefa, pact or lsq (--grid: comma-separated, default all)")
    p.add_argument("--bits", help="2, 4, 6 or 8 (weights and activations; --grid: comma-separated, default all)")
    p.add_argument("--grid", action="store_true", help="every method x bits; --out is a folder")
    p.add_argument("--train", required=True, help="training ImageFolder, or a folder/glob of WebDataset shards")
    p.add_argument("--out", required=True, help="checkpoint file, or folder (named like resnet18-lsq-w4a4)")
    p.add_argument("--first-last-bits", default="8", help="bits of the first and last layer, or 'same'")
    _recipe_arguments(p)
    p.set_defaults(run=_cmd_quantize)


def _cmd_quantize(args) -> int:
    from qrobust.shared.errors import QrobustError

    qat = _resolve("qrobust.train.qat:quantize_grid") if args.grid else _resolve("qrobust.train.qat:quantize")
    methods = _globs([args.method]) if args.method else (["dorefa", "pact", "lsq"] if args.grid else [])
    try:
        bits = [int(b) for b in _globs([args.bits])] if args.bits else ([2, 4, 6, 8] if args.grid else [])
        first_last = None if args.first_last_bits == "same" else int(args.first_last_bits)
    except ValueError:
        raise QrobustError("--bits and --first-last-bits take integers (or 'same')") from None
    if not args.grid and (len(methods) != 1 or len(bits) != 1):
        raise QrobustError("quantize needs one --method and one --bits (or --grid)")
    fp_model, weights = (args.arch, args.fp_model) if args.arch else (args.fp_model, None)
    arch = args.arch or _resolve("qrobust.train.qat:fp_arch")(args.fp_model)
    overrides = _recipe_overrides(args)
    recipe = _recipe(_resolve("qrobust.train.loop:qat_recipe")(arch, bits[0]), overrides) if overrides else None
    kw = dict(weights=weights, val_root=args.val, recipe=recipe, first_last_bits=first_last, device=args.device,
              progress=not args.quiet)
    if args.grid:
        paths = qat(fp_model, methods, bits, args.train, args.out, **kw)
    else:
        paths = [qat(fp_model, methods[0], bits[0], args.train, args.out, **kw)]
    for path in paths:
        print(f"checkpoint: {path}")
    return 0


def _add_ls(sub) -> None:
    p = _parser(sub, "ls", "List registered things: corruptions, suites, model architectures, or the variants "
                "of a suite, or the checkpoints in a folder.", "qrobust ls variants 'natural/glass*' --suite robustmq")
    p.add_argument("what", choices=("corruptions", "suites", "variants", "models", "attacks", "quantizers",
                                     "checkpoints"))
    p.add_argument("pattern", nargs="?", default="*", help="glob filter (for checkpoints: the folder)")
    p.add_argument("--suite", default="robustmq", help="suite for `ls variants`")
    p.set_defaults(run=_cmd_ls)


def _cmd_ls(args) -> int:
    import fnmatch

    if args.what == "corruptions":
        names = _resolve("qrobust.generate.natural:CORRUPTIONS").names(args.pattern)
    elif args.what == "models":
        names = _resolve("qrobust.shared.models:ARCHITECTURES").names(args.pattern)
    elif args.what == "attacks":
        attacks = _resolve("qrobust.score.attacks:ATTACKS")
        names = [f"{n:16} {attacks.get(n).norm:5} budgets {attacks.get(n).budgets}" for n in attacks.names(args.pattern)]
    elif args.what == "quantizers":
        names = _resolve("qrobust.shared.quant:METHODS").names(args.pattern)
    elif args.what == "checkpoints":
        return _ls_checkpoints(args.pattern if args.pattern != "*" else ".")
    elif args.what == "suites":
        names = [n for n in _resolve("qrobust.shared.spec:packaged_suites")() if fnmatch.fnmatchcase(n, args.pattern)]
    else:
        suite = _resolve("qrobust.shared.spec:load_suite")(args.suite)
        names = [v.id for v in suite.variants if fnmatch.fnmatchcase(v.id, args.pattern)]
    print("\n".join(names))
    return 0 if names else EXIT_PROBLEMS


def _ls_checkpoints(folder: str) -> int:
    rows = _resolve("qrobust.train.qat:list_checkpoints")(folder)
    for r in rows:
        if r.get("reason"):
            print(f"{r['file']}: not a qrobust checkpoint ({r['reason']})")
        else:
            acc = r.get("val_acc")
            print(f"{r['file']}: {r['name']} ({r['classes']} classes"
                  + (f", val acc {acc:.2%}" if isinstance(acc, (int, float)) else "") + ")")
    return 0 if rows else EXIT_PROBLEMS


def _add_demo(sub) -> None:
    p = _parser(sub, "demo", "Run the benchmark end to end on the built-in demo data (photos shipped with "
                "scikit-image): build the data set, train a small model and its DoReFa/PACT/LSQ versions at "
                "2/4/8 bits, generate and verify the demo corpus, score every model (attacks included), "
                "write the report.", "qrobust demo --out demo-out")
    p.add_argument("--out", default="demo-out", help="output folder (a second run reuses what is there)")
    p.add_argument("--workers", type=int, help="worker processes (default: all cores)")
    p.add_argument("--quick", action="store_true",
                   help="reduced demo (fewer variants and attacked images, 4 bit only, shorter training)")
    p.set_defaults(run=_cmd_demo)


def _cmd_demo(args) -> int:
    return _resolve("qrobust.shared.demo:run_demo")(args.out, workers=args.workers, progress=not args.quiet,
                                                    quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrobust", description="How robust is this (quantized) model? The RobustMQ benchmark.",
        epilog="example:\n  qrobust demo --out demo-out\n\n`qrobust COMMAND --help` shows each command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    from qrobust import __version__

    parser.add_argument("--version", action="version", version=f"qrobust {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_generate, _add_verify, _add_score, _add_report, _add_pack, _add_import, _add_train,
                _add_quantize, _add_ls, _add_demo):
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
    from qrobust.shared.errors import NO_SPACE, USER_ERRORS

    try:
        return args.run(args)
    except USER_ERRORS as e:
        print(f"qrobust {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"qrobust {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(f"qrobust {args.command}: error: out of disk space{where} ({e.strerror}); nothing half-written is "
              "kept: free space and rerun the same command to resume", file=sys.stderr)
        return EXIT_NO_SPACE


if __name__ == "__main__":
    sys.exit(main())
