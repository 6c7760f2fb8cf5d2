"""The ``qrobust`` command: the command layer, the one place that reaches every program.

One module per group of subcommands (:mod:`~qrobust.cli.generate`,
:mod:`~qrobust.cli.score`, :mod:`~qrobust.cli.train`, :mod:`~qrobust.cli.ls`,
:mod:`~qrobust.cli.demo`). They name the programs' entry points by dotted
path, imported only when a subcommand runs, so ``qrobust --help`` stays fast
and nothing imports back up.
"""
from __future__ import annotations

import argparse
import logging
import sys

from qrobust.cli import demo, generate, ls, score, train
from qrobust.cli.common import EXIT_NO_SPACE, EXIT_PROBLEMS, EXIT_USAGE, verbosity  # noqa: F401  (the statuses)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrobust", description="How robust is this (quantized) model? The RobustMQ benchmark.",
        epilog="example:\n  qrobust demo --out demo-out\n\n`qrobust COMMAND --help` shows each command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    verbosity(parser)
    from qrobust._version import __version__

    parser.add_argument("--version", action="version", version=f"qrobust {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (generate.add_generate, generate.add_verify, score.add_score, score.add_report, generate.add_pack,
                generate.add_import, train.add_train, train.add_quantize, ls.add_ls, demo.add_demo):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_USAGE
    # qrobust's own lines at the level asked for; other libraries' only from warnings up (matplotlib's
    # "generated new fontManager" is not the user's business)
    logging.basicConfig(level=logging.WARNING, format="qrobust: %(message)s", stream=sys.stderr)
    logging.getLogger("qrobust").setLevel(logging.WARNING if args.quiet else
                                          logging.DEBUG if args.verbose else logging.INFO)
    from qrobust.shared.errors import NO_SPACE, USER_ERRORS

    try:
        if sys.stderr.isatty():  # log lines above the progress bar, never inside it
            from tqdm.contrib.logging import logging_redirect_tqdm

            with logging_redirect_tqdm():
                return args.run(args)
        return args.run(args)
    except USER_ERRORS as e:
        print(f"qrobust {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `qrobust ls ... | head`: the reader left; nothing more to say
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PROBLEMS
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

