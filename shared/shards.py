"""The shard format: what a qrobust shard may hold, checked before anything in it is decoded.

A shard is a tar of samples in strictly increasing key order, each a
``<key>.cls`` label (the integer, as text) and one payload (``jpg``, ``png``,
``mp4``, ``mkv`` or uint8 ``npy``). :func:`scan_shard` checks a shard's
structure (regular-file members with plain names, of the types qrobust
reads, wholly inside the shard) and lists its samples; :func:`shard_summary`
gives what the manifest records of a shard; :func:`check_payload` checks a
payload's header against the corpus's geometry without decoding it.

Every reader of shards (score, verify, pack, import, train) walks the tar
through :func:`iter_tar`, never :mod:`tarfile`: shards come from others, and
tarfile's parsing of extended headers is not bounded (before CPython 3.11.10 /
3.12.6 a pax header of a few MB takes hours). Here a header costs time in
proportion to its bytes, an extension header (pax ``x``/``g``, GNU ``L``/``K``)
larger than :data:`MAX_EXTENSION_BYTES` is refused unread, and no member may
reach beyond the end of the archive.
"""
from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

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
    order, duplicated or incomplete; or a payload whose header disagrees with the corpus's geometry.
    Messages name the member; callers prefix the shard."""


# the member types qrobust reads (cls: the label as text; images; sequences as video or uint8 npy):
# anything else, pickle-based types (.pyd, .pth, .pickle, ...) included, is refused, never decoded
LABEL_EXT = "cls"
PAYLOAD_EXTS = ("jpg", "png", "mp4", "mkv", "npy")
MEMBER_EXTS = (LABEL_EXT, *PAYLOAD_EXTS)
MAX_MEMBER_NAME = 1024  # a sample key is a file stem (at most 255 bytes)

# ---- the tar format, read with bounds -------------------------------------------------------------------

BLOCK = 512
# a pax or GNU long-name header holds a name (at most MAX_MEMBER_NAME) and a few numbers: qrobust's own are
# under 1 KiB, and 64 KiB leaves room for any honest writer's (GNU tar's atime/ctime records, long links)
MAX_EXTENSION_BYTES = 64 * 1024
MAX_EXTENSIONS = 4  # extension headers before one member (pax x, pax g, GNU L and K: one of each at most)
FILE_TYPES = (b"0", b"\0", b"7")  # regular, old regular, contiguous
PAX_TYPES = (b"x", b"X", b"g")  # per member (x; X is Solaris's), global (g)
GNU_NAME_TYPES = (b"L", b"K")  # long name, long link name
SPARSE_TYPE = b"S"
# types tarfile knows; the data blocks of any other type are skipped by its size, as tarfile does
KNOWN_TYPES = (*FILE_TYPES, b"1", b"2", b"3", b"4", b"5", b"6", *GNU_NAME_TYPES, SPARSE_TYPE)
_SIGNED = struct.Struct("148b8x356b")


@dataclass(frozen=True, slots=True)
class TarMember:
    """One member of a tar as :func:`iter_tar` read it: its name, type and where its data lies."""

    name: str
    type: bytes
    offset: int       # of its first header (extension headers included)
    offset_data: int
    size: int
    sparse: bool = False

    def isfile(self) -> bool:
        """A plain regular file: its data is ``size`` bytes at ``offset_data`` (a sparse file's is not)."""
        return self.type in FILE_TYPES and not self.sparse


def _text(raw: bytes) -> str:
    """A name field as tarfile reads it: up to the first NUL, UTF-8 with undecodable bytes kept."""
    end = raw.find(b"\0")
    return (raw if end < 0 else raw[:end]).decode("utf-8", "surrogateescape")


def _number(raw: bytes, what: str, at: int) -> int:
    """A numeric header field: octal text, or base-256 (GNU) when the first byte is 0x80 or 0xff."""
    if raw[0] in (0x80, 0xFF):
        n = int.from_bytes(raw[1:], "big")
        return n - 256 ** (len(raw) - 1) if raw[0] == 0xFF else n
    end = raw.find(b"\0")
    text = (raw if end < 0 else raw[:end]).strip()
    if not text:
        return 0
    if not all(48 <= c <= 55 for c in text):  # octal digits only: int() would also take signs and '_'
        raise ShardError(f"not a readable tar: the {what} field of the header at byte {at} is not a number")
    return int(text, 8)


def _pax_records(data: bytes, at: int) -> dict[str, str]:
    """The records ``"<length> <key>=<value>\\n"`` of a pax header, parsed in one linear pass (the data
    ends at the first NUL, as in CPython's fixed parser); a malformed record is refused."""
    records: dict[str, str] = {}
    pos, end = 0, data.find(b"\0")
    end = len(data) if end < 0 else end
    while pos < end:
        space = data.find(b" ", pos, min(end, pos + 20))
        digits = data[pos:space] if space > pos else b""
        length = int(digits) if digits.isdigit() else 0
        if length <= len(digits) + 1 or pos + length > end or data[pos + length - 1] != 0x0A:
            raise ShardError(f"not a readable tar: a malformed pax record at byte {at + BLOCK + pos}")
        record = data[space + 1:pos + length - 1]
        key, eq, value = record.partition(b"=")
        if not eq or not key:
            raise ShardError(f"not a readable tar: a malformed pax record at byte {at + BLOCK + pos}")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def iter_tar(source: bytes | bytearray | memoryview | BinaryIO, size: int | None = None) -> Iterator[TarMember]:
    """The members of a tar, in order, read with bounds (see the module docstring).

    ``source`` is the archive's bytes, or a seekable binary file of ``size``
    bytes (default: its size; only headers are read from it). Pax records
    ``path`` and ``size`` (global ones too) and GNU long names apply as tarfile
    applies them; GNU sparse members are marked ``sparse``. Raises
    :class:`ShardError` for an empty or unreadable archive, a header with a bad
    checksum or number, an extension header over :data:`MAX_EXTENSION_BYTES`
    or more than :data:`MAX_EXTENSIONS` of them in a row, and a member whose
    data reaches beyond the end of the archive. The archive ends at its first
    all-zero block (or at its last byte); what follows is not read.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source)
        total = len(view)

        def read(offset: int, n: int) -> bytes:
            return bytes(view[offset:offset + n])
    else:
        f = source
        total = size if size is not None else os.fstat(f.fileno()).st_size

        def read(offset: int, n: int) -> bytes:
            f.seek(offset)
            return f.read(n)

    offset = 0
    global_pax: dict[str, str] = {}
    while True:
        start, pax, long_name, extensions = offset, {}, None, 0
        while True:  # extension headers, then the member's own header
            if offset >= total and offset == start and start > 0:
                return  # the archive's last byte (no end-of-archive blocks: tarfile reads it so too)
            header = read(offset, BLOCK)
            if len(header) < BLOCK:
                raise ShardError("not a readable tar: empty" if total == 0 else
                                 f"not a readable tar: truncated header at byte {offset} of {total}")
            if header.count(0) == BLOCK:
                if offset != start:
                    raise ShardError(f"not a readable tar: the archive ends after an extension header at byte "
                                     f"{start}")
                return
            stored = _number(header[148:156], "checksum", offset)
            # the sum of the header's bytes with the checksum field as 8 spaces (unsigned, or signed as some
            # old writers computed it)
            if stored != sum(header) - sum(header[148:156]) + 256 and stored != 256 + sum(_SIGNED.unpack(header)):
                raise ShardError(f"not a readable tar: bad header checksum at byte {offset}")
            kind = header[156:157]
            length = _number(header[124:136], "size", offset)
            if kind in PAX_TYPES or kind in GNU_NAME_TYPES:
                extensions += 1
                if extensions > MAX_EXTENSIONS:
                    raise ShardError(f"not a readable tar: more than {MAX_EXTENSIONS} extension headers in a row "
                                     f"at byte {offset}")
                if not 0 <= length <= MAX_EXTENSION_BYTES:
                    raise ShardError(f"not a readable tar: an extension header of {length} bytes at byte {offset}, "
                                     f"more than the {MAX_EXTENSION_BYTES} qrobust reads")
                if offset + BLOCK + length > total:
                    raise ShardError(f"not a readable tar: the extension header at byte {offset} claims {length} "
                                     f"bytes, beyond the end ({total} bytes)")
                data = read(offset + BLOCK, length)
                if kind in GNU_NAME_TYPES:
                    if kind == b"L":
                        long_name = _text(data)
                else:
                    records = _pax_records(data, offset)
                    (global_pax if kind == b"g" else pax).update(records)
                offset += BLOCK + -(-length // BLOCK) * BLOCK
                continue
            break
        if long_name is not None:
            name = long_name
        else:
            name, prefix = _text(header[0:100]), _text(header[345:500])
            if prefix and kind != SPARSE_TYPE:
                name = f"{prefix}/{name}"
        if kind == b"\0" and name.endswith("/"):
            kind = b"5"  # an old-style folder
        records = {**global_pax, **pax}
        if "path" in records:
            name = records["path"]
        if "size" in records:
            if not records["size"].isdigit():
                raise ShardError(f"not a readable tar: member {shown(name)}: pax size {records['size'][:40]!r} is "
                                 "not a number")
            length = int(records["size"])
        if kind == SPARSE_TYPE and header[482]:  # its map continues in blocks before the data: not followed
            raise ShardError(f"not a readable tar: member {shown(name)} is a GNU sparse file with extended "
                             "headers; qrobust reads plain regular files")
        sparse = kind == SPARSE_TYPE or any(k.startswith("GNU.sparse.") for k in records)
        if kind == b"5":
            name = name.rstrip("/")
        data_at = offset + BLOCK
        holds_data = kind in FILE_TYPES or kind == SPARSE_TYPE or kind not in KNOWN_TYPES
        if holds_data and (length < 0 or data_at + length > total):
            raise ShardError(f"member {shown(name)} claims {length} bytes, beyond the end of the shard "
                             f"({total} bytes)")
        yield TarMember(name, kind, start, data_at, length, sparse)
        offset = data_at + (-(-length // BLOCK) * BLOCK if holds_data else 0)


def shown(name: str, limit: int = 200) -> str:
    """A member name for a message: its repr, cut after ``limit`` characters (a name can be 64 KiB)."""
    return repr(name) if len(name) <= limit else repr(name[:limit]) + "..."


# ---- shards -----------------------------------------------------------------------------------------


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


def scan_shard(data: bytes | BinaryIO, size: int | None = None) -> list[ShardSample]:
    """Check the structure of a shard (no member is decoded) and list its samples in order.

    ``data`` is the shard's bytes, or a seekable binary file of ``size`` bytes
    (only its headers are read). Every member must be a regular file with a
    plain name (no folders, no ``..``, not absolute), of a type in
    :data:`MEMBER_EXTS`, lying wholly inside the shard; samples must be in
    strictly increasing key order (a reordered or duplicated sample is
    refused), each with exactly one label and one payload. Raises
    :class:`ShardError`, naming the member.
    """
    samples: list[ShardSample] = []
    current: dict = {}
    key: str | None = None

    def finish():
        if LABEL_EXT not in current or len(current) != 2:
            raise ShardError(f"sample {key!r} must hold a label (cls) and one payload, has {sorted(current)}")
        samples.append(ShardSample(key, dict(current)))

    for member in iter_tar(data, size):
        name = member.name
        if not member.isfile():
            what = "a sparse file" if member.sparse else "a link, folder or device"
            raise ShardError(f"member {shown(name)} is not a regular file ({what})")
        problem = _member_name_problem(name)
        if problem:
            raise ShardError(f"member {shown(name)} {problem}")
        stem, _, ext = name.partition(".")
        if ext not in MEMBER_EXTS:
            raise ShardError(f"member {shown(name)}: type {ext[:40]!r} is refused; qrobust reads only "
                             f"{', '.join(MEMBER_EXTS)} members (nothing from a shard is unpickled)")
        if key is not None and stem != key:
            if stem < key:
                raise ShardError(f"sample {stem!r} out of key order (after {key!r}): samples reordered "
                                 "or duplicated")
            finish()
            current = {}
        if ext in current:
            raise ShardError(f"member {shown(name)} appears twice (a duplicated sample)")
        key = stem
        current[ext] = (name, member.offset_data, member.size)
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
    """:func:`shard_summary` and the shard's sample keys in order. The file is hashed in blocks and only
    its headers are parsed: memory does not grow with the shard."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        keys = [s.key for s in scan_shard(f, size)]
        f.seek(0)
        n = 0
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            n += len(block)
    if n != size:
        raise ShardError(f"{path}: changed while it was read ({n} bytes, {size} when opened)")
    return {"sha256": h.hexdigest(), "bytes": n, "count": len(keys), "keys_sha256": keys_digest(keys)}, keys


# ---- payloads, against the corpus's geometry (headers only) ---------------------------------------------

PIL_FORMATS = {"jpg": ("JPEG",), "png": ("PNG",)}  # Pillow tries only this plugin (never EPS/Ghostscript & co.)
LABEL = re.compile(rb"\s*([0-9]{1,9})\s*")


def payload_shape(manifest: dict, variant: str) -> tuple[int, ...]:
    """The shape every decoded payload of ``variant`` must have, as the manifest declares it: (crop, crop, 3),
    or (frames, crop, crop, 3) for a sequence."""
    crop = manifest["suite"]["spec"]["geometry"]["crop"]
    entry = manifest["variants"][variant]
    if entry["family"] == "sequence":
        return (entry["params"]["frames"], crop, crop, 3)
    return (crop, crop, 3)


def open_image(ext: str, payload: bytes, shape: tuple[int, ...] | None):
    """The payload opened as a Pillow image of its extension's format alone, its header's size checked
    against ``shape`` (H, W, 3) before any pixel is decoded (Pillow opens lazily): a few bytes can claim
    gigapixels. Raises :class:`ShardError`; the caller closes the image."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # over Pillow's bomb limit: an error when no size is declared; else the size check below says more
            warnings.simplefilter("ignore" if shape is not None else "error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(payload), formats=PIL_FORMATS[ext])
    except Exception as e:  # Pillow on untrusted bytes: any failure means a bad payload, said in one line
        raise ShardError(f"not a decodable {ext} image: {type(e).__name__}: {str(e)[:200]}") from None
    if shape is not None and (len(shape) != 3 or (image.size[1], image.size[0], 3) != tuple(shape)):
        image.close()
        expected = f"{shape[-2]}x{shape[-3]}" if len(shape) >= 3 else str(tuple(shape))
        raise ShardError(f"image of {image.size[0]}x{image.size[1]} pixels, the corpus's are {expected}"
                         + (f" ({shape[0]}-frame sequences)" if len(shape) == 4 else ""))
    return image


def npy_header(payload: bytes, shape: tuple[int, ...] | None = None) -> int:
    """Check the header of a ``.npy`` payload and return where its data starts: C-order uint8 of ``shape``,
    with exactly the bytes that shape needs. Any other dtype (object arrays are pickles) is refused before
    numpy reads the data. Raises :class:`ShardError`."""
    import numpy as np

    f = io.BytesIO(payload)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            found, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            found, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ShardError(f"npy format version {version} is not read (1.0 or 2.0 only)")
    except ShardError:
        raise
    except Exception as e:  # numpy parses the header literal safely; anything malformed ends here
        raise ShardError(f"not a valid npy array: {str(e)[:200]}") from None
    if dtype.hasobject:
        raise ShardError(f"npy of dtype {dtype} holds Python objects (a pickle); refused, never unpickled")
    if dtype != np.uint8 or fortran:
        raise ShardError(f"npy of dtype {dtype}{' (Fortran order)' if fortran else ''}; qrobust reads C-order uint8")
    if shape is not None and tuple(found) != tuple(shape):
        raise ShardError(f"npy of shape {tuple(found)}, the corpus's payloads are {tuple(shape)}")
    if len(payload) - f.tell() != int(np.prod(found, dtype=np.int64)):
        raise ShardError(f"npy data holds {len(payload) - f.tell()} bytes, its header claims shape {tuple(found)}")
    return f.tell()


def check_payload(ext: str, payload: bytes, shape: tuple[int, ...]) -> None:
    """Check one member against the corpus's geometry without decoding its pixels: a label is an integer;
    an image's header gives the corpus's size; a video holds at most the corpus's frames, and its
    container and every parameter set in its stream give the corpus's frame size
    (:func:`qrobust.shared.video.check_video`); an npy's header gives the payload shape. Raises
    :class:`ShardError` (callers prefix shard and member)."""
    if ext == LABEL_EXT:
        if not LABEL.fullmatch(payload):
            raise ShardError(f"not a non-negative integer label: {payload[:20]!r}")
    elif ext in PIL_FORMATS:
        open_image(ext, payload, shape).close()
    elif ext == "npy":
        npy_header(payload, shape)
    elif ext in ("mp4", "mkv"):
        from qrobust.shared.video import VideoError, check_video

        if len(shape) != 4:
            raise ShardError(f"a {ext} video, the corpus's payloads are images of {shape[1]}x{shape[0]} pixels")
        try:
            check_video(payload, ext, *shape[:3])
        except VideoError as e:
            raise ShardError(str(e)) from None
    else:
        raise ShardError(f"type {ext!r} is refused")
