"""What the subcommand modules share: exit statuses, lazy imports by dotted path, argument helpers."""
from __future__ import annotations

import argparse
import importlib

EXIT_PROBLEMS = 1   # the command ran and found problems (e.g. verify mismatches)
EXIT_USAGE = 2      # bad arguments or inputs
EXIT_NO_SPACE = 3   # a write failed for lack of space; the run can resume


def resolve(dotted: str):
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


def globs(items: list[str] | None) -> list[str]:
    """--only values: repeatable, each possibly comma-separated."""
    return [g for item in (items or []) for g in item.split(",") if g]


def verbosity(parser: argparse.ArgumentParser, default=False) -> None:
    """-q/--quiet and -v/--verbose: before the subcommand (``default`` False) and after it (``default``
    SUPPRESS, so a subcommand that is not given them keeps what came before it)."""
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="warnings only: no progress, no info lines")
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="also debug lines")


def subparser(sub, name: str, help: str, example: str, json_output: bool = False) -> argparse.ArgumentParser:
    """A subcommand's parser, with -q/-v (and --json where the command has a machine-readable result)."""
    p = sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    verbosity(p, argparse.SUPPRESS)
    if json_output:
        p.add_argument("--json", action="store_true",
                       help="print the result as one JSON document on stdout (same exit status)")
    return p


def print_json(document) -> None:
    """A machine-readable result on stdout: one JSON document, nothing else on stdout."""
    import json
    import sys

    json.dump(document, sys.stdout, indent=1, sort_keys=True, default=str)
    sys.stdout.write("\n")


def printable(text: str) -> str:
    """Text for a terminal: control characters (from names in files: ESC sequences, CR, ...) shown escaped."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text)
