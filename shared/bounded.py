"""Bounded parsing of what others wrote: no input file makes qrobust do unbounded work.

JSON from a collaborator (a manifest, a summary, a results folder's records, a
checkpoint's metadata) is read through :func:`load_json`: refused above a size
limit before it is parsed, and refused when nested deeper than any file qrobust
writes, with one line naming the file, instead of a ``RecursionError``
traceback or a parse that takes minutes.
"""
from __future__ import annotations

import json
import os

from qrobust.shared.errors import QrobustError

JSON_MAX_BYTES = 256 * 1024 * 1024  # a 1000-class, 101-variant manifest is ~1 MB; a summary ~100 kB
JSON_MAX_DEPTH = 32  # qrobust's own files nest at most ~8 deep


class BoundsError(QrobustError):
    """An input that exceeds what qrobust will parse (size, nesting)."""


def load_json(source: bytes | str | os.PathLike, what: str | None = None, *, max_bytes: int = JSON_MAX_BYTES,
              max_depth: int = JSON_MAX_DEPTH):
    """Parse JSON from ``source`` (bytes, or a file path) within ``max_bytes`` and ``max_depth``.

    ``what`` names the input in errors (default: the path). Raises :class:`BoundsError` for too large or too
    deep, and ``ValueError`` (``json.JSONDecodeError``) for text that is not JSON, as ``json.loads`` does."""
    if isinstance(source, (bytes, bytearray)):
        raw, name = bytes(source), what or "JSON input"
    else:
        name = what or str(source)
        size = os.stat(source).st_size
        if size > max_bytes:
            raise BoundsError(f"{name}: {size} bytes, more than the {max_bytes} qrobust reads as JSON")
        with open(source, "rb") as f:
            raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise BoundsError(f"{name}: more than the {max_bytes} bytes qrobust reads as JSON")
    try:
        value = json.loads(raw)
    except RecursionError:
        raise BoundsError(f"{name}: JSON nested deeper than {max_depth} levels") from None
    if depth(value, max_depth) > max_depth:
        raise BoundsError(f"{name}: JSON nested deeper than {max_depth} levels")
    return value


def depth(value, limit: int) -> int:
    """The nesting depth of a parsed JSON value (a scalar is 0), counted up to ``limit + 1`` (iterative)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (dict, list)):
            level += 1
            deepest = max(deepest, level)
            if deepest > limit:
                return deepest
            stack.extend((child, level) for child in (node.values() if isinstance(node, dict) else node))
    return deepest
