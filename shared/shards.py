"""The shard format: what a qrobust shard may hold, checked before anything in it is decoded.

A shard is a tar of samples in strictly increasing key order, each a
``<key>.cls`` label (the integer, as text) and one payload (``jpg``, ``png``,
``mp4``, ``mkv`` or uint8 ``npy``). :func:`scan_shard` checks a shard's
structure (regular-file members with plain names, of the types qrobust
reads, wholly inside the shard) and lists its samples; :func:`shard_summary`
gives what the manifest records of a shard.
"""
from __future__ import annotations

import hashlib
import io
import os
import posixpath
import tarfile
from dataclasses import dataclass
from pathlib import Path

from qrobust.shared.errors import QrobustError


def keys_digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def member_key(name: str) -> str:
    """The sample key of a tar member, split as webdataset does (at the first dot of the basename)."""
    folder, base = posixpath.split(name)
    stem = base.split(".", 1)[0]
    return posixpath.join(folder, stem) if folder else stem


class ShardError(QrobustError, ValueError):
    """A shard is not a well-formed qrobust shard: not a readable tar, a member that is not a plain
    file with a plain name, a type qrobust does not read, a size beyond the shard, or samples out of
    order, duplicated or incomplete. Messages name the member; callers prefix the shard."""


# the member types qrobust reads (cls: the label as text; images; sequences as video or uint8 npy):
# anything else, pickle-based types (.pyd, .pth, .pickle, ...) included, is refused, never decoded
LABEL_EXT = "cls"
PAYLOAD_EXTS = ("jpg", "png", "mp4", "mkv", "npy")
MEMBER_EXTS = (LABEL_EXT, *PAYLOAD_EXTS)
MAX_MEMBER_NAME = 1024  # a sample key is a file stem (at most 255 bytes)


@dataclass(frozen=True)
class ShardSample:
    """One sample of a shard: its key and, per member type, (member name, offset, size) in the shard bytes."""

    key: str
    members: dict


def _member_name_problem(name: str) -> str | None:
    if not name or len(name) > MAX_MEMBER_NAME:
        return "has an empty or overlong name"
    if "/" in name or name.startswith("."):  # (a backslash is an ordinary character in a POSIX name)
        return "is not a plain file name (a path: absolute, with folders or '..'); qrobust never extracts members"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "has control characters in its name"
    return None


def scan_shard(data: bytes) -> list[ShardSample]:
    """Check the structure of a shard's bytes (no member is decoded) and list its samples in order.

    Every member must be a regular file with a plain name (no folders, no
    ``..``, not absolute), of a type in :data:`MEMBER_EXTS`, lying wholly
    inside the shard; samples must be in strictly increasing key order (a
    reordered or duplicated sample is refused), each with exactly one label
    and one payload. Raises :class:`ShardError`, naming the member.
    """
    samples: list[ShardSample] = []
    current: dict = {}
    key: str | None = None

    def finish():
        if LABEL_EXT not in current or len(current) != 2:
            raise ShardError(f"sample {key!r} must hold a label (cls) and one payload, has {sorted(current)}")
        samples.append(ShardSample(key, dict(current)))

    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                name = member.name
                if not member.isfile():
                    raise ShardError(f"member {name!r} is not a regular file (a link, folder or device)")
                problem = _member_name_problem(name)
                if problem:
                    raise ShardError(f"member {name!r} {problem}")
                stem, _, ext = name.partition(".")
                if ext not in MEMBER_EXTS:
                    raise ShardError(f"member {name!r}: type {ext!r} is refused; qrobust reads only "
                                     f"{', '.join(MEMBER_EXTS)} members (nothing from a shard is unpickled)")
                if member.size < 0 or member.offset_data + member.size > len(data):
                    raise ShardError(f"member {name!r} claims {member.size} bytes, beyond the end of the "
                                     f"shard ({len(data)} bytes)")
                if key is not None and stem != key:
                    if stem < key:
                        raise ShardError(f"sample {stem!r} out of key order (after {key!r}): samples reordered "
                                         "or duplicated")
                    finish()
                    current = {}
                if ext in current:
                    raise ShardError(f"member {name!r} appears twice (a duplicated sample)")
                key = stem
                current[ext] = (name, member.offset_data, member.size)
    except ShardError:
        raise
    except (tarfile.TarError, ValueError, EOFError, OverflowError, UnicodeError) as e:
        raise ShardError(f"not a readable tar: {e}") from None
    if key is not None:
        finish()
    return samples


def shard_summary(path: str | os.PathLike) -> dict:
    """sha256, byte size, sample count and keys digest of one shard file.

    Raises :class:`ShardError` (a :class:`ValueError`) if the file is not a
    well-formed shard (see :func:`scan_shard`): not a readable tar, an unsafe
    or unexpected member, or samples not in strictly increasing key order (a
    reordered or duplicated sample).
    """
    return read_shard_keys(path)[0]


def read_shard_keys(path: str | os.PathLike) -> tuple[dict, list[str]]:
    """:func:`shard_summary` and the shard's sample keys in order."""
    data = Path(path).read_bytes()
    keys = [s.key for s in scan_shard(data)]
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "count": len(keys),
            "keys_sha256": keys_digest(keys)}, keys
