"""``qrobust ls``: what is registered (corruptions, suites, variants, architectures, attacks, quantizers),
and the checkpoints in a folder."""
from __future__ import annotations

from qrobust.cli.common import EXIT_PROBLEMS, resolve, subparser


def add_ls(sub) -> None:
    p = subparser(sub, "ls", "List registered things: corruptions, suites, model architectures, or the variants "
                  "of a suite, or the checkpoints in a folder.",
                  "qrobust ls variants 'natural/glass*' --suite robustmq")
    p.add_argument("what", choices=("corruptions", "suites", "variants", "models", "attacks", "quantizers",
                                     "checkpoints"))
    p.add_argument("pattern", nargs="?", default="*", help="glob filter (for checkpoints: the folder)")
    p.add_argument("--suite", default="robustmq", help="suite for `ls variants`")
    p.set_defaults(run=_cmd_ls)


def _cmd_ls(args) -> int:
    import fnmatch

    if args.what == "corruptions":
        names = resolve("qrobust.generate.natural:CORRUPTIONS").names(args.pattern)
    elif args.what == "models":
        names = resolve("qrobust.shared.architectures:ARCHITECTURES").names(args.pattern)
    elif args.what == "attacks":
        attacks = resolve("qrobust.score.attacks:ATTACKS")
        names = [f"{n:16} {attacks.get(n).norm:5} budgets {attacks.get(n).budgets}"
                 for n in attacks.names(args.pattern)]
    elif args.what == "quantizers":
        names = resolve("qrobust.shared.quant:METHODS").names(args.pattern)
    elif args.what == "checkpoints":
        return _ls_checkpoints(args.pattern if args.pattern != "*" else ".")
    elif args.what == "suites":
        names = [n for n in resolve("qrobust.shared.suites:packaged_suites")() if fnmatch.fnmatchcase(n, args.pattern)]
    else:
        suite = resolve("qrobust.shared.suites:load_suite")(args.suite)
        names = [v.id for v in suite.variants if fnmatch.fnmatchcase(v.id, args.pattern)]
    print("\n".join(names))
    return 0 if names else EXIT_PROBLEMS


def _ls_checkpoints(folder: str) -> int:
    rows = resolve("qrobust.train.qat:list_checkpoints")(folder)
    for r in rows:
        if r.get("reason"):
            print(f"{r['file']}: not a qrobust checkpoint ({r['reason']})")
        else:
            acc = r.get("val_acc")
            print(f"{r['file']}: {r['name']} ({r['classes']} classes"
                  + (f", val acc {acc:.2%}" if isinstance(acc, (int, float)) else "") + ")")
    return 0 if rows else EXIT_PROBLEMS
