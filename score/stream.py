"""Reading a corpus for scoring: shards -> verified bytes -> decoded samples -> pieces.

A corpus is a local folder or a URL (http(s), s3, gs, ...: :data:`URL_SCHEMES`)
holding ``manifest.json`` and the shards it lists; ``pipe:`` locations, chained
fsspec URLs and other schemes are refused. Each shard is read whole (at most
the manifest's byte count plus one: a larger file is refused, not slurped), its
sha256 and byte size checked against the manifest, then its tar structure is
checked before any member is decoded (:func:`~qrobust.shared.shards.scan_shard`:
regular files with plain names only, no member beyond the shard's end, samples
in strictly increasing key order, one label and one payload each), and its
sample count and keys are checked against the manifest. A local shard must be a
regular file inside the corpus (no link out of it, no FIFO or device).

Only qrobust's own decoders run on members: images (jpg, png: Pillow limited to
that one format, the header's size checked against the corpus's before
decoding), sequences (mp4, mkv: FFmpeg held to that container, frame size and
count checked from it before decoding), uint8 ``npy`` (header checked; never ``allow_pickle``) and the
integer label (cls); any other member is an error naming the shard and the
member, so nothing from a shard is ever unpickled or executed.

qrobust does not use webdataset's reader here: it opens URLs through its own
``gopen`` (shell pipes for some schemes), and the hashes would have to be
computed on a second pass. One read, verified, is both safer and cheaper.
"""
from __future__ import annotations

import hashlib
import io
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.utils.data

from qrobust.shared.errors import QrobustError
from qrobust.shared.manifest import (MANIFEST_NAME, MAX_MANIFEST_BYTES, ManifestError, manifest_problems,
                                     parse_manifest, safe_relative)
from qrobust.shared.verify import extra_files, inside, local_shard_problem
from qrobust.shared.shards import ShardError, keys_digest, scan_shard
from qrobust.shared.video import rgb_frames

IMAGE_EXTS = ("jpg", "png")
VIDEO_EXTS = ("mp4", "mkv")
PIL_FORMATS = {"jpg": ("JPEG",), "png": ("PNG",)}  # Pillow tries only this plugin (never EPS/Ghostscript & co.)
# remote corpora: fsspec protocols that only read a store; `pipe:`, chained (`a::b`) and the rest are refused
URL_SCHEMES = ("http", "https", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "hf")


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


class Corpus:
    """A corpus at a local path or URL: its manifest, and the bytes of its shards."""

    def __init__(self, location: str):
        self.location = check_location(location).rstrip("/")
        raw = self._read(MANIFEST_NAME, what="manifest", limit=MAX_MANIFEST_BYTES + 1)
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        try:  # the same checks for a folder and a URL, on the very bytes that are used
            self.manifest = parse_manifest(raw, f"{self.location}/{MANIFEST_NAME}")
        except ManifestError as e:
            raise CorpusError(str(e)) from None

    def _read(self, name: str, what: str = "shard", limit: int | None = None) -> bytes:
        """At most ``limit`` bytes of the corpus file ``name`` (never one outside the corpus)."""
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
        root = Path(self.location)
        path = root / name
        try:  # a regular file inside the corpus: not a link out of it, not a FIFO or device that never ends
            st = path.stat()
            if not stat.S_ISREG(st.st_mode):
                raise CorpusError(f"{what} {path} is not a regular file")
            if not inside(root, path):
                raise CorpusError(f"{what} {name} resolves outside the corpus ({path.resolve()}); refused")
            with open(path, "rb") as f:
                return f.read(limit) if limit is not None else f.read()
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
        crop = self.manifest["suite"]["spec"]["geometry"]["crop"]
        entry = self.manifest["variants"][variant]
        if entry["family"] == "sequence":
            return (entry["params"]["frames"], crop, crop, 3)
        return (crop, crop, 3)


LABEL = re.compile(rb"\s*([0-9]{1,9})\s*")


def decode_member(ext: str, payload: bytes, shape: tuple[int, ...] | None = None):
    """qrobust's safe decoders (the label, images, videos, uint8 npy); anything else is refused.

    ``shape`` is the payload's expected shape: images and videos whose headers
    claim another size are refused before any pixel is decoded. Raises
    :class:`CorpusError` (callers prefix shard and member).
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
    from PIL import Image

    try:
        with Image.open(io.BytesIO(payload), formats=PIL_FORMATS[ext]) as image:
            if shape is not None and (image.size[1], image.size[0], 3) != tuple(shape):
                raise CorpusError(f"image of {image.size[0]}x{image.size[1]} pixels, the corpus's are "
                                  f"{shape[1]}x{shape[0]}")
            return np.asarray(image.convert("RGB"))
    except CorpusError:
        raise
    except Exception as e:  # Pillow on untrusted bytes: any failure means a bad payload, said in one line
        raise CorpusError(f"not a decodable {ext} image: {type(e).__name__}: {str(e)[:200]}") from None


VIDEO_FORMATS = {"mp4": "mp4", "mkv": "matroska"}  # FFmpeg demuxes only this container (never a playlist)


def _decode_video(ext: str, payload: bytes, shape):
    """Frames of an H.264 payload, as :func:`qrobust.shared.video.decode_frames` makes them, with FFmpeg held
    to the container its extension names (no format probing: no HLS/concat playlist that would open other
    files) and, before any frame is decoded, the frame size and number of packets checked against the
    corpus's: a few bytes of H.264 can claim gigabytes of frames."""
    import av

    def opened():
        return av.open(io.BytesIO(payload), format=VIDEO_FORMATS[ext])

    try:
        with opened() as container:
            if not container.streams.video or container.streams.video[0].codec_context.name != "h264":
                raise CorpusError("not an H.264 sequence payload")
            codec = container.streams.video[0].codec_context
            if shape is not None:
                if (codec.height, codec.width) != tuple(shape[1:3]):
                    raise CorpusError(f"video of {codec.width}x{codec.height} pixels, the corpus's are "
                                      f"{shape[2]}x{shape[1]}")
                packets = 0
                for packet in container.demux(video=0):
                    packets += packet.size > 0
                    if packets > shape[0]:
                        raise CorpusError(f"video of more than the corpus's {shape[0]} frames")
        with opened() as container:
            frames = rgb_frames(container)
    except CorpusError:
        raise
    except Exception as e:  # FFmpeg on untrusted bytes: any failure means a bad payload, said in one line
        raise CorpusError(f"not a decodable {ext} video: {type(e).__name__}: {str(e)[:200]}") from None
    if not frames or (shape is not None and len(frames) != shape[0]):
        raise CorpusError(f"the video holds {len(frames)} frames, expected {shape[0] if shape else 'some'}")
    frames = np.stack(frames)
    if shape is not None and frames.shape != tuple(shape):
        raise CorpusError(f"video frames of shape {frames.shape}, the corpus's are {tuple(shape)}")
    return frames


def decode_npy(payload: bytes, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A uint8 array stored as ``.npy``, its header checked before the data is read: any other dtype
    (object arrays are pickles) is refused, and ``np.load`` runs with ``allow_pickle=False``."""
    f = io.BytesIO(payload)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            found, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            found, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise CorpusError(f"npy format version {version} is not read (1.0 or 2.0 only)")
    except CorpusError:
        raise
    except Exception as e:  # numpy parses the header literal safely; anything malformed ends here
        raise CorpusError(f"not a valid npy array: {str(e)[:200]}") from None
    if dtype.hasobject:
        raise CorpusError(f"npy of dtype {dtype} holds Python objects (a pickle); refused, never unpickled")
    if dtype != np.uint8 or fortran:
        raise CorpusError(f"npy of dtype {dtype}{' (Fortran order)' if fortran else ''}; qrobust reads C-order uint8")
    if shape is not None and tuple(found) != tuple(shape):
        raise CorpusError(f"npy of shape {tuple(found)}, the corpus's payloads are {tuple(shape)}")
    if len(payload) - f.tell() != int(np.prod(found, dtype=np.int64)):
        raise CorpusError(f"npy data holds {len(payload) - f.tell()} bytes, its header claims shape {tuple(found)}")
    f.seek(0)
    try:
        return np.load(f, allow_pickle=False)
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
