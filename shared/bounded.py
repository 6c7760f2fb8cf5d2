"""Bounded parsing of what others wrote: no input file makes qrobust do unbounded work.

JSON from a collaborator (a manifest, a summary, a results folder's records, a
checkpoint's metadata) is read through :func:`load_json`: refused above a size
limit before it is parsed, and refused when nested deeper than any file qrobust
writes, with one line naming the file, instead of a ``RecursionError``
traceback or a parse that takes minutes. A document parsed elsewhere is held to
the same nesting bound by :func:`check_depth` (code that copies or walks it
recursively would otherwise fail deep inside). A stream (a file, an HTTP
response) is read by :func:`read_at_most`: until its end or a byte limit,
whatever the sizes of the pieces it arrives in, never past the limit.
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
    check_depth(value, name, max_depth)
    return value


def check_depth(value, what: str, max_depth: int = JSON_MAX_DEPTH) -> None:
    """:class:`BoundsError` naming ``what`` if the parsed JSON ``value`` nests deeper than ``max_depth``."""
    if depth(value, max_depth) > max_depth:
        raise BoundsError(f"{what}: JSON nested deeper than {max_depth} levels")


def read_at_most(stream, limit: int) -> bytes:
    """The bytes of a binary ``stream`` up to its end or ``limit`` bytes, whichever comes first.

    A ``read(n)`` may return fewer than ``n`` bytes before the end (a socket, an
    HTTP body in chunks, a slow server): this reads on until ``limit`` or an
    empty read, and never asks for more than ``limit`` in all, so a source
    sending more than it should is cut off, never buffered."""
    parts, n = [], 0
    while n < limit:
        block = stream.read(limit - n)
        if not block:
            break
        parts.append(block)
        n += len(block)
    return b"".join(parts)


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
