"""``qrobust generate``, ``verify``, ``pack`` and ``import``: making and checking corpora."""
from __future__ import annotations

import sys

from qrobust.cli.common import EXIT_PROBLEMS, globs, print_json, printable, resolve, subparser


def add_generate(sub) -> None:
    p = subparser(sub, "generate", "Build a noise corpus (WebDataset shards + manifest.json) from an image folder.",
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
    generate = resolve("qrobust.generate.run:generate")
    only = globs(args.only)
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


def add_verify(sub) -> None:
    p = subparser(sub, "verify", "Re-hash and recount a corpus against its manifest (sizes, sha256, sample order "
                  "and keys, members qrobust does not read, extra or missing files, links out of the corpus, "
                  "hand edits of the manifest); exit 1 naming every mismatch.",
                  "qrobust verify corpora/robustmq", json_output=True)
    p.add_argument("corpus")
    p.add_argument("--size-only", action="store_true", help="check presence and byte sizes only (fast)")
    p.add_argument("--check-env", action="store_true",
                   help="also flag pixel-deciding libraries (Pillow, OpenCV, FFmpeg, ...) whose installed version "
                        "differs from the one that built the corpus, and print the pins that match it "
                        "(qrobust ships its tested versions as constraints/pixels.txt: pip install -c FILE)")
    p.add_argument("--workers", type=int, help="hashing threads")
    p.set_defaults(run=_cmd_verify)


def _cmd_verify(args) -> int:
    from qrobust.shared.manifest import load_manifest
    from qrobust.shared.verify import verify_corpus
    from qrobust.shared.versions import constraints_file, corpus_pins, environment_differences

    manifest = load_manifest(args.corpus)
    n = sum(len(v["shards"]) for v in manifest["variants"].values())
    bar = None
    if not args.quiet and not args.json:
        from qrobust.shared.progress import bar as progress_bar

        bar = progress_bar(n, "verify", "shard")
    try:
        problems = verify_corpus(args.corpus, rehash=not args.size_only, workers=args.workers,
                                 progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    pins = []
    if args.check_env:
        differences = environment_differences(manifest)
        problems += [f"environment: {d}" for d in differences]
        if differences:
            pins = corpus_pins(manifest)
    if args.json:
        print_json({"corpus": args.corpus, "ok": not problems, "variants": len(manifest["variants"]), "shards": n,
                    "problems": problems, "pins": pins})
        return EXIT_PROBLEMS if problems else 0
    for p in problems:
        print(printable(f"MISMATCH {p}"))
    if pins:  # how to get back to the bytes of this corpus
        shipped = constraints_file()
        print(printable("to build or extend this corpus byte for byte, install the versions that built it: "
                        f"pip install {' '.join(pins)}  (qrobust's own tested versions: pip install -c {shipped})"),
              file=sys.stderr)
    if problems:
        print(printable(f"{args.corpus}: {len(problems)} problem(s) in {n} shards"))
        return EXIT_PROBLEMS
    print(printable(f"{args.corpus}: OK ({len(manifest['variants'])} variants, {n} shards)"))
    return 0


def add_pack(sub) -> None:
    p = subparser(sub, "pack", "Make a smaller corpus to share: a subset of the variants and/or samples of a "
                  "corpus, shard bytes kept (samples re-sharded when subset), with its own valid manifest.",
                  "qrobust pack corpora/robustmq --only 'natural/*-3' --only 'clean/*' --per-class 5 "
                  "--out corpora/small")
    p.add_argument("corpus", help="corpus folder (made by `qrobust generate` or `qrobust import`)")
    p.add_argument("--out", required=True, help="new corpus folder (created; must be new or empty)")
    p.add_argument("--only", action="append", metavar="GLOB", help="keep these variant ids (repeatable)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="leave these variant ids out (repeatable)")
    p.add_argument("--limit", type=int, help="keep the first N samples (in corpus order)")
    p.add_argument("--per-class", type=int, help="keep the first K samples of every class")
    p.set_defaults(run=_cmd_pack)


def _cmd_pack(args) -> int:
    manifest = resolve("qrobust.generate.pack:pack")(
        args.corpus, args.out, only=globs(args.only) or None, exclude=globs(args.exclude) or None,
        limit=args.limit, per_class=args.per_class, progress=not args.quiet)
    _print_corpus(args.out, manifest)
    return 0


def add_import(sub) -> None:
    p = subparser(sub, "import", "Turn a released ImageNet-C tree (CORRUPTION/SEVERITY/WNID/*.JPEG) or ImageNet-P "
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
    manifest = resolve("qrobust.generate.release_import:import_release")(
        args.kind, args.root, args.out, classes=args.classes, only=globs(args.only) or None, limit=args.limit,
        per_class=args.per_class, workers=args.workers, strict=args.strict, progress=not args.quiet)
    _print_corpus(args.out, manifest, "rejected files")
    return 0
