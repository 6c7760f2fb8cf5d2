"""Reading a corpus for scoring: shards -> verified bytes -> decoded samples -> pieces.

A corpus is a local folder or a URL (http(s), or any fsspec URL) holding
``manifest.json`` and the shards it lists. Each shard is read whole, its sha256
and byte size checked against the manifest while it is read (a tampered shard
stops the run, naming the file), then split into samples by webdataset's key
convention. Only qrobust's own decoders run on members: images (jpg, png),
sequences (mp4, mkv) and the integer label (cls); any other member is an error,
so nothing from a shard is ever unpickled or executed.

qrobust does not use webdataset's reader here: it opens URLs through its own
``gopen`` (shell pipes for some schemes), and the hashes would have to be
computed on a second pass. One read, verified, is both safer and cheaper.
"""
from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.utils.data

from qrobust.shared.errors import QrobustError
from qrobust.shared.manifest import MANIFEST_NAME, ManifestError, member_key, parse_manifest, safe_relative

IMAGE_EXTS = ("jpg", "png")
VIDEO_EXTS = ("mp4", "mkv")


class CorpusError(QrobustError):
    """A corpus cannot be read, or does not match its manifest."""


def is_url(location: str) -> bool:
    return "://" in str(location)


class Corpus:
    """A corpus at a local path or URL: its manifest, and the bytes of its shards."""

    def __init__(self, location: str):
        self.location = str(location).rstrip("/")
        raw = self._read(MANIFEST_NAME, what="manifest")
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        try:  # the same checks for a folder and a URL, on the very bytes that are used
            self.manifest = parse_manifest(raw, f"{self.location}/{MANIFEST_NAME}")
        except ManifestError as e:
            raise CorpusError(str(e)) from None

    def _read(self, name: str, what: str = "shard", limit: int | None = None) -> bytes:
        try:
            safe_relative(Path("."), name)  # never a path or URL outside the corpus
        except ManifestError as e:
            raise CorpusError(str(e)) from None
        if is_url(self.location):
            import fsspec

            url = f"{self.location}/{name}"
            try:
                with fsspec.open(url, "rb") as f:
                    return f.read(limit) if limit is not None else f.read()
            except (OSError, ValueError, ImportError) as e:
                raise CorpusError(f"cannot read {what} {url}: {e}") from None
        try:
            return safe_relative(Path(self.location), name).read_bytes()
        except ManifestError as e:
            raise CorpusError(str(e)) from None
        except OSError as e:
            raise CorpusError(f"cannot read {what} {Path(self.location) / name}: {e.strerror or e}") from None

    def shard_bytes(self, shard: dict, verify: bool = True) -> bytes:
        """The bytes of one shard, checked against the manifest (size always, sha256 unless ``verify`` is off)."""
        data = self._read(shard["name"], limit=shard["bytes"] + 1)  # a larger file is refused, not slurped
        if len(data) != shard["bytes"]:
            raise CorpusError(f"{shard['name']}: {len(data)} bytes, manifest says {shard['bytes']} "
                              "(truncated or replaced; run `qrobust verify`)")
        if verify and hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise CorpusError(f"{shard['name']}: sha256 differs from the manifest (tampered or corrupted; "
                              "run `qrobust verify`)")
        return data


def decode_member(ext: str, payload: bytes):
    """qrobust's safe decoders; anything else is refused."""
    if ext == "cls":
        try:
            return int(payload.decode().strip())
        except (UnicodeDecodeError, ValueError):
            raise CorpusError(f"a label (cls) member is not an integer: {payload[:20]!r}") from None
    if ext in IMAGE_EXTS:
        from PIL import Image

        with Image.open(io.BytesIO(payload)) as image:
            return np.asarray(image.convert("RGB"))
    if ext in VIDEO_EXTS:
        from qrobust.shared.video import decode_frames

        return decode_frames(payload)
    raise CorpusError(f"unexpected shard member type {ext!r} (qrobust only decodes jpg, png, mp4, mkv, cls)")


def iter_samples(name: str, data: bytes):
    """(key, label, pixels) of every sample of a shard, in order."""
    current: dict = {}
    key = None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    raise CorpusError(f"{name}: member {member.name!r} is not a regular file")
                k = member_key(member.name)
                base = posixpath.basename(member.name)
                ext = base.split(".", 1)[1] if "." in base else ""
                if key is not None and k != key:
                    yield _finish(name, key, current)
                    current = {}
                key = k
                current[ext] = decode_member(ext, tar.extractfile(member).read())
    except tarfile.TarError as e:
        raise CorpusError(f"{name}: not a readable tar: {e}") from None
    if key is not None:
        yield _finish(name, key, current)


def _finish(name: str, key: str, members: dict):
    if "cls" not in members or len(members) != 2:
        raise CorpusError(f"{name}: sample {key!r} must hold a label and one payload, has {sorted(members)}")
    payload = next(v for k, v in members.items() if k != "cls")
    return key, members["cls"], payload


@dataclass(frozen=True)
class Unit:
    """One shard of one variant: the unit of reading, of progress and of resumption."""

    variant: str
    index: int
    shard: dict
    start: int   # row of the shard's first sample in the variant's results
    count: int   # samples to score from it (fewer than the shard holds under --limit)


@dataclass
class Piece:
    """Decoded samples of one unit, small enough to batch: rows start..start+len(keys)."""

    unit: Unit
    start: int
    keys: list
    labels: np.ndarray
    pixels: np.ndarray  # uint8 (n, H, W, 3), or (n, T, H, W, 3) for sequences


def read_unit(corpus: Corpus, unit: Unit, verify: bool, piece_samples: int):
    """Read, verify and decode one unit, yielding pieces of up to ``piece_samples`` samples."""
    data = corpus.shard_bytes(unit.shard, verify=verify)
    keys, labels, pixels = [], [], []
    row = unit.start
    seen = 0
    for key, label, payload in iter_samples(unit.shard["name"], data):
        if seen == unit.count:
            break
        keys.append(key)
        labels.append(label)
        pixels.append(payload)
        seen += 1
        if len(keys) == piece_samples:
            yield Piece(unit, row, keys, np.asarray(labels), np.stack(pixels))
            row += len(keys)
            keys, labels, pixels = [], [], []
    if keys:
        yield Piece(unit, row, keys, np.asarray(labels), np.stack(pixels))
    if seen < unit.count:
        raise CorpusError(f"{unit.shard['name']}: {seen} samples, manifest says {unit.shard['count']}")


class UnitStream(torch.utils.data.IterableDataset):
    """The units as a stream of pieces; each DataLoader worker reads every n-th unit."""

    def __init__(self, corpus: Corpus, units: list[Unit], verify: bool, piece_samples: dict[str, int]):
        super().__init__()
        self.corpus, self.units, self.verify, self.piece_samples = corpus, units, verify, piece_samples

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.units if info is None else self.units[info.id::info.num_workers]
        try:
            for unit in mine:
                yield from read_unit(self.corpus, unit, self.verify, self.piece_samples[unit.variant])
        except QrobustError as e:  # handed to the main process as data: a one-line error there, not a traceback
            yield Failure(type(e).__name__, str(e))


@dataclass(frozen=True)
class Failure:
    """A worker's error, re-raised by the main process."""

    kind: str
    message: str
