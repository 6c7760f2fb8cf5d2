"""Reading a corpus for scoring: shards -> verified bytes -> decoded samples -> pieces.

A corpus is a local folder or a URL (http(s), s3, gs, ...: :data:`URL_SCHEMES`)
holding ``manifest.json`` and the shards it lists; ``pipe:`` locations, chained
fsspec URLs and other schemes are refused. Each shard is read whole (at most
the manifest's byte count plus one: a larger file is refused, not slurped; a
remote one is read on until that count or its end, however the server sends
it), its sha256 and byte size checked against the manifest, then its tar
structure is checked before any member is decoded
(:func:`~qrobust.shared.shards.scan_shard`, with bounded header parsing:
regular files with plain names only, no member beyond the shard's end, samples
in strictly increasing key order, one label and one payload each), and its
sample count and keys are checked against the manifest. A local shard must be a
regular file inside the corpus (no link out of it, no FIFO or device). HTTP(S)
is read with the standard library (:func:`read_url`), not fsspec: its HTTP
client may buffer a whole response, and inflates compressed bodies unasked.

Only qrobust's own decoders run on members: images (jpg, png: Pillow limited to
that one format, the header's size checked against the corpus's before
decoding), sequences (mp4, mkv: FFmpeg held to that container; the frame size of
the container and of every parameter set in the stream, each decoded frame's
size and the frame count held to the corpus's:
:func:`~qrobust.shared.video.decode_video`), uint8 ``npy`` (header checked;
never ``allow_pickle``) and the integer label (cls); any other member is an
error naming the shard and the member, so nothing from a shard is ever
unpickled or executed.

qrobust does not use webdataset's reader here: it opens URLs through its own
``gopen`` (shell pipes for some schemes), and the hashes would have to be
computed on a second pass. One read, verified, is both safer and cheaper.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import io
import stat
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np
import torch.utils.data

from qrobust.shared.bounded import BoundsError, check_depth, read_at_most
from qrobust.shared.errors import QrobustError
from qrobust.shared.manifest import (MANIFEST_NAME, MAX_MANIFEST_BYTES, ManifestError, manifest_problems,
                                     parse_manifest, safe_relative)
from qrobust.shared.shards import (LABEL, PIL_FORMATS, ShardError, keys_digest, npy_header, open_image,
                                   payload_shape, scan_shard)
from qrobust.shared.verify import extra_files, inside, local_shard_problem
from qrobust.shared.video import CONTAINERS, VideoError, decode_video

IMAGE_EXTS = tuple(PIL_FORMATS)
VIDEO_EXTS = tuple(CONTAINERS)
# remote corpora: fsspec protocols that only read a store; `pipe:`, chained (`a::b`) and the rest are refused
URL_SCHEMES = ("http", "https", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "hf")
HTTP_TIMEOUT_S = 120  # a server silent this long (no byte at all) is down; a slow one is waited for


class CorpusError(QrobustError):
    """A corpus cannot be read, or does not match its manifest."""


def is_url(location: str) -> bool:
    return "://" in str(location)


def check_location(location: str) -> str:
    """The corpus location, or :class:`CorpusError` for one that is no folder or plain store URL:
    ``pipe:`` (a shell command to webdataset), chained fsspec URLs, and unknown schemes."""
    text = str(location)
    if text.lower().startswith("pipe:") or "|" in text.split("://")[0]:
        raise CorpusError(f"corpus location {text[:80]!r} is a shell pipe; qrobust never runs commands to "
                          "read a corpus: give a folder or a URL (" + ", ".join(URL_SCHEMES) + ")")
    if is_url(text):
        scheme = text.split("://", 1)[0].lower()
        if "::" in text or scheme not in URL_SCHEMES:
            raise CorpusError(f"corpus URL {text[:80]!r}: scheme {scheme[:20]!r} is not one qrobust reads "
                              f"({', '.join(URL_SCHEMES)}; chained URLs are refused); or give a local folder")
    return text


def _without_credentials(url: str) -> str:
    """A URL fit for a message: no user name or password."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def read_url(url: str, limit: int) -> bytes:
    """At most ``limit`` bytes of the file at ``url``, read on until that or its end (see
    :func:`~qrobust.shared.bounded.read_at_most`) whatever its Content-Length, chunking or pace.

    HTTP(S) goes through :mod:`urllib` without proxies (as fsspec did),
    redirects only to HTTP(S), no compression asked for (a compressed body
    is read as the bytes it is, and fails the sha256), credentials in the
    URL sent as basic authentication; other schemes through fsspec. Raises
    ``OSError`` (``urllib.error.URLError``, a timeout) or
    ``http.client.HTTPException`` for a failed transfer."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        import fsspec

        with fsspec.open(url, "rb") as f:
            return read_at_most(f, limit)
    headers = {"Accept-Encoding": "identity"}
    if "@" in parts.netloc:
        user, _, password = parts.netloc.rpartition("@")[0].partition(":")
        token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
        url = _without_credentials(url)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _HTTPRedirects())
    with opener.open(urllib.request.Request(url, headers=headers), timeout=HTTP_TIMEOUT_S) as response:
        return read_at_most(response, limit)


class _HTTPRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects followed to HTTP(S) URLs only (urllib's own handler also follows one to ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.HTTPError(_without_credentials(newurl), code,
                                         "redirect to a URL that is not HTTP(S), refused", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class Corpus:
    """A corpus at a local path or URL: its manifest, and the bytes of its shards."""

    def __init__(self, location: str):
        self.location = check_location(location).rstrip("/")
        raw = self._read(MANIFEST_NAME, what="manifest", limit=MAX_MANIFEST_BYTES + 1)
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        where = f"{_without_credentials(self.location)}/{MANIFEST_NAME}"
        try:  # the same checks for a folder and a URL, on the very bytes that are used
            self.manifest = parse_manifest(raw, where)
            check_depth(self.manifest, where)  # what the scorer copies or walks recursively stays shallow
        except (ManifestError, BoundsError) as e:
            raise CorpusError(str(e)) from None

    def _read(self, name: str, what: str = "shard", *, limit: int) -> bytes:
        """At most ``limit`` bytes of the corpus file ``name`` (never one outside the corpus)."""
        try:
            safe_relative(Path("."), name)  # never a path or URL outside the corpus
        except ManifestError as e:
            raise CorpusError(str(e)) from None
        if is_url(self.location):
            url = f"{self.location}/{name}"
            try:
                return read_url(url, limit)
            except (OSError, ValueError, ImportError, http.client.HTTPException) as e:
                raise CorpusError(f"cannot read {what} {_without_credentials(url)}: {e}") from None
        root = Path(self.location)
        path = root / name
        try:  # a regular file inside the corpus: not a link out of it, not a FIFO or device that never ends
            st = path.stat()
            if not stat.S_ISREG(st.st_mode):
                raise CorpusError(f"{what} {path} is not a regular file")
            if not inside(root, path):
                raise CorpusError(f"{what} {name} resolves outside the corpus ({path.resolve()}); refused")
            with open(path, "rb") as f:
                return read_at_most(f, limit)
        except OSError as e:
            if what == "manifest" and isinstance(e, FileNotFoundError):
                raise CorpusError(f"{path} not found: is {root} a qrobust corpus (made by `qrobust generate`)?") \
                    from None
            raise CorpusError(f"cannot read {what} {path}: {e.strerror or e}") from None

    def shard_bytes(self, shard: dict, verify: bool = True) -> bytes:
        """The bytes of one shard, checked against the manifest (size always, sha256 unless ``verify`` is off)."""
        data = self._read(shard["name"], limit=shard["bytes"] + 1)  # a larger file is refused, not slurped
        if len(data) > shard["bytes"]:
            raise CorpusError(f"{shard['name']}: larger than the manifest's {shard['bytes']} bytes (grown or "
                              "replaced; not read further)")
        if len(data) < shard["bytes"]:
            raise CorpusError(f"{shard['name']}: {len(data)} bytes, manifest says {shard['bytes']} (truncated)")
        if verify and hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise CorpusError(f"{shard['name']}: sha256 differs from the manifest (tampered or corrupted)")
        return data

    def problems(self, variants: list[str]) -> list[tuple[str | None, str]]:
        """What stops ``variants`` from being scored, found without reading shards: hand edits of the
        manifest (:func:`~qrobust.shared.manifest.manifest_problems`) and, for a local corpus, shards
        missing, of the wrong size, not regular files or links out of the corpus, and extra files in
        the variants' folders. As (variant id, or None for the whole corpus, message naming the file).
        Contents (sha256, keys, members) are checked as each shard is read."""
        wanted = set(variants)
        out = [(vid, msg) for vid, msg in manifest_problems(self.manifest) if vid is None or vid in wanted]
        if not is_url(self.location):
            root = Path(self.location)
            for vid in variants:
                for shard in self.manifest["variants"][vid]["shards"]:
                    problem = local_shard_problem(root, shard["name"], shard["bytes"])
                    if problem:
                        out.append((vid, problem))
                out += [(vid, f"{rel}: extra file not in the manifest")
                        for rel in extra_files(root, self.manifest, [vid])]
        return out

    def payload_shape(self, variant: str) -> tuple[int, ...]:
        """The shape every decoded payload of ``variant`` must have: (crop, crop, 3), or (frames, crop, crop, 3)."""
        return payload_shape(self.manifest, variant)


def decode_member(ext: str, payload: bytes, shape: tuple[int, ...] | None = None):
    """qrobust's safe decoders (the label, images, videos, uint8 npy); anything else is refused.

    ``shape`` is the payload's expected shape: an image whose header claims
    another size is refused before any pixel is decoded; a video whose
    container or any parameter set in its stream claims another frame size, or
    that holds more frames, is refused before the decoder meets that parameter
    set or frame. Raises :class:`CorpusError` (callers prefix shard and member).
    """
    if ext == "cls":
        match = LABEL.fullmatch(payload)
        if not match:
            raise CorpusError(f"not a non-negative integer label: {payload[:20]!r}")
        return int(match.group(1))
    if ext in IMAGE_EXTS:
        return _decode_image(ext, payload, shape)
    if ext in VIDEO_EXTS:
        return _decode_video(ext, payload, shape)
    if ext == "npy":
        return decode_npy(payload, shape)
    raise CorpusError(f"unexpected type {ext!r} (qrobust only decodes jpg, png, mp4, mkv, npy, cls)")


def _decode_image(ext: str, payload: bytes, shape):
    """Pixels of a jpg/png payload, its header's size checked against ``shape`` before any is decoded."""
    try:
        with open_image(ext, payload, shape) as image:
            return np.asarray(image.convert("RGB"))
    except ShardError as e:
        raise CorpusError(str(e)) from None
    except Exception as e:  # Pillow on untrusted bytes: any failure means a bad payload, said in one line
        raise CorpusError(f"not a decodable {ext} image: {type(e).__name__}: {str(e)[:200]}") from None


def _decode_video(ext: str, payload: bytes, shape):
    """Frames of an H.264 payload, within the corpus's frame count and size for every frame
    (:func:`~qrobust.shared.video.decode_video`)."""
    if shape is not None and len(shape) != 4:
        raise CorpusError(f"a {ext} video, the corpus's payloads are images of {shape[1]}x{shape[0]} pixels")
    frames, height, width = shape[:3] if shape is not None else (None, None, None)
    try:
        return decode_video(payload, ext, frames, height, width)
    except VideoError as e:
        raise CorpusError(str(e)) from None


def decode_npy(payload: bytes, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A uint8 array stored as ``.npy``, its header checked before the data is read
    (:func:`~qrobust.shared.shards.npy_header`: any other dtype, object arrays (pickles) included, is
    refused), and ``np.load`` runs with ``allow_pickle=False``."""
    try:
        npy_header(payload, shape)
    except ShardError as e:
        raise CorpusError(str(e)) from None
    try:
        return np.load(io.BytesIO(payload), allow_pickle=False)
    except Exception as e:
        raise CorpusError(f"not a valid npy array: {str(e)[:200]}") from None


def iter_samples(name: str, data: bytes, shape: tuple[int, ...] | None = None, keys: list | None = None):
    """(key, label, pixels) of every sample of a shard, in order; each member is decoded only after the
    whole shard's structure has been checked (:func:`~qrobust.shared.shards.scan_shard`). Raises
    :class:`CorpusError` naming the shard and the member. ``keys``, if given, receives every key first."""
    try:
        samples = scan_shard(data)
    except ShardError as e:
        raise CorpusError(f"{name}: {e}") from None
    if keys is not None:
        keys.extend(s.key for s in samples)
    for sample in samples:
        decoded = {}
        for ext, (member, offset, size) in sample.members.items():
            try:
                decoded[ext] = decode_member(ext, data[offset:offset + size], shape)
            except CorpusError as e:
                raise CorpusError(f"{name}: member {member!r}: {e}") from None
        payload = next(v for k, v in decoded.items() if k != "cls")
        yield sample.key, decoded["cls"], payload


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
    """Read, verify and decode one unit, yielding pieces of up to ``piece_samples`` samples.

    Before any member is decoded, the shard's size and sha256 (unless ``verify``
    is off), its structure, its sample count and its keys are checked against
    the manifest; labels must be classes of the corpus. A problem raises
    :class:`CorpusError` naming the shard (and member) and how to leave the variant out.
    """
    try:
        yield from _read_unit(corpus, unit, verify, piece_samples)
    except CorpusError as e:
        raise CorpusError(f"{e}; `qrobust verify` checks the whole corpus, `--exclude {unit.variant}` scores "
                          "the rest") from None


def _read_unit(corpus: Corpus, unit: Unit, verify: bool, piece_samples: int):
    name = unit.shard["name"]
    data = corpus.shard_bytes(unit.shard, verify=verify)
    shape = corpus.payload_shape(unit.variant)
    n_classes = len(corpus.manifest.get("classes") or []) or None
    all_keys: list[str] = []
    samples = iter_samples(name, data, shape, keys=all_keys)
    first = next(samples, None)  # the shard's structure is checked and its keys are known
    if len(all_keys) != unit.shard["count"]:
        raise CorpusError(f"{name}: {len(all_keys)} samples, manifest says {unit.shard['count']}")
    if "keys_sha256" in unit.shard and keys_digest(all_keys) != unit.shard["keys_sha256"]:
        raise CorpusError(f"{name}: sample keys differ from the manifest's (samples swapped or renamed)")
    keys, labels, pixels = [], [], []
    row = unit.start
    for seen, (key, label, payload) in enumerate(_chain(first, samples)):
        if seen == unit.count:
            break
        if n_classes is not None and label >= n_classes:
            raise CorpusError(f"{name}: member {key + '.cls'!r}: label {label}, the corpus has {n_classes} classes")
        keys.append(key)
        labels.append(label)
        pixels.append(payload)
        if len(keys) == piece_samples:
            yield Piece(unit, row, keys, np.asarray(labels), np.stack(pixels))
            row += len(keys)
            keys, labels, pixels = [], [], []
    if keys:
        yield Piece(unit, row, keys, np.asarray(labels), np.stack(pixels))


def _chain(first, rest):
    if first is not None:
        yield first
        yield from rest


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
