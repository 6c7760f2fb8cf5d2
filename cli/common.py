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


def subparser(sub, name: str, help: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
