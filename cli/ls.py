"""``qrobust ls``: what is registered (corruptions, suites, variants, architectures, attacks, quantizers),
and the checkpoints in a folder."""
from __future__ import annotations

from qrobust.cli.common import EXIT_PROBLEMS, print_json, printable, resolve, subparser


def add_ls(sub) -> None:
    p = subparser(sub, "ls", "List registered things: corruptions, suites, model architectures, attacks, "
                  "quantizers, or the variants of a suite, or the checkpoints in a folder.",
                  "qrobust ls variants 'natural/glass*' --suite robustmq", json_output=True)
    p.add_argument("what", choices=("corruptions", "suites", "variants", "models", "attacks", "quantizers",
                                     "checkpoints"))
    p.add_argument("pattern", nargs="?", default="*", help="glob filter (for checkpoints: the folder)")
    p.add_argument("--suite", default="robustmq", help="suite for `ls variants`")
    p.set_defaults(run=_cmd_ls)


def _cmd_ls(args) -> int:
    import fnmatch

    if args.what == "checkpoints":
        return _ls_checkpoints(args.pattern if args.pattern != "*" else ".", args.json)
    if args.what == "attacks":
        return _ls_attacks(args.pattern, args.json)
    if args.what == "corruptions":
        names = resolve("qrobust.generate.natural:CORRUPTIONS").names(args.pattern)
    elif args.what == "models":
        names = resolve("qrobust.shared.architectures:ARCHITECTURES").names(args.pattern)
    elif args.what == "quantizers":
        names = resolve("qrobust.shared.quant:METHODS").names(args.pattern)
    elif args.what == "suites":
        names = [n for n in resolve("qrobust.shared.suites:packaged_suites")() if fnmatch.fnmatchcase(n, args.pattern)]
    else:
        suite = resolve("qrobust.shared.suites:load_suite")(args.suite)
        names = [v.id for v in suite.variants if fnmatch.fnmatchcase(v.id, args.pattern)]
    if args.json:
        print_json(names)
    else:
        print("\n".join(names))
    return 0 if names else EXIT_PROBLEMS


def _budget(norm: str, eps: float) -> str:
    return f"{eps * 255:g}/255" if norm == "linf" else f"{eps:g}"


def _ls_attacks(pattern: str, as_json: bool) -> int:
    """A table: each attack's norm, budgets (at 3x224x224), whether it is one of the paper's five, defaults."""
    attacks = resolve("qrobust.score.attacks:ATTACKS")
    paper = resolve("qrobust.score.comparability:PAPER_ATTACKS")
    rows = [{"name": n, "norm": a.norm, "budgets": dict(a.budgets), "paper": n in paper,
             "white_box": a.white_box, "defaults": dict(a.defaults)}
            for n in attacks.names(pattern) for a in [attacks.get(n)]]
    if as_json:
        print_json(rows)
        return 0 if rows else EXIT_PROBLEMS
    table = [["attack", "norm", "small", "middle", "large", "set", "settings"]]
    for r in rows:
        b = r["budgets"]
        table.append([r["name"], r["norm"], *(_budget(r["norm"], b[k]) for k in ("small", "middle", "large")),
                      "paper" if r["paper"] else "extra" + ("" if r["white_box"] else " (black-box)"),
                      ", ".join(f"{k}={v}" for k, v in r["defaults"].items())])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    return 0 if rows else EXIT_PROBLEMS


def _ls_checkpoints(folder: str, as_json: bool) -> int:
    rows = resolve("qrobust.train.qat:list_checkpoints")(folder)
    if as_json:
        print_json(rows)
        return 0 if rows else EXIT_PROBLEMS
    for r in rows:  # names come from files: printed with control characters escaped
        if r.get("reason"):
            print(printable(f"{r['file']}: not a qrobust checkpoint ({r['reason']})"))
        else:
            acc = r.get("val_acc")
            print(printable(f"{r['file']}: {r['name']} ({r['classes']} classes"
                            + (f", val acc {acc:.2%}" if isinstance(acc, (int, float)) else "") + ")"))
    return 0 if rows else EXIT_PROBLEMS
