"""A released ImageNet-C or ImageNet-P tree: its layout, which files make which samples, and probing
one file's header (nothing is decoded). Read-only; :mod:`qrobust.generate.release_import` writes the corpus.

Found when listing (no file read): missing from a variant, a duplicate key,
another class folder in another variant, an unknown class, a bad file name,
extension, type or size. Found when probing (container and headers only): not a
JPEG (magic, Pillow's header, the end-of-image marker that a truncated file
lacks) / not an H.264 mp4 (FFmpeg held to the mp4 demuxer, packets counted).
"""
from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import re
import stat
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from qrobust.shared import manifest as mf
from qrobust.shared.errors import QrobustError
from qrobust.shared.sources import MAX_SOURCE_BYTES, Rejected, bad_name_reason, key_for, one_line

KINDS = ("imagenet-c", "imagenet-p")
SAMPLES_PER_SHARD = {"imagenet-c": 1000, "imagenet-p": 100}
EXTENSIONS = {"imagenet-c": (".jpeg", ".jpg"), "imagenet-p": (".mp4",)}
MEMBER = {"imagenet-c": "jpg", "imagenet-p": "mp4"}
SEVERITIES = ("1", "2", "3", "4", "5")
NOISE_DIFFICULTY = re.compile(r"(.+_noise)_([23])")  # ImageNet-P's gaussian_noise_2, shot_noise_3, ...
LAYOUT = {"imagenet-c": "CORRUPTION/SEVERITY/WNID/FILE.JPEG", "imagenet-p": "PERTURBATION/WNID/FILE.mp4"}


class ReleaseError(QrobustError, RuntimeError):
    """The release tree cannot be imported as asked (layout, selection, --out, --strict and a bad file)."""


class BadFile(ValueError):
    """One released file cannot be used; the message is a one-line reason."""


@dataclass
class Listing:
    """The files of the selected variants, before any is read."""

    variants: dict[str, tuple[str, dict]]                   # id -> (folder relative to root, params)
    files: dict[str, dict[str, tuple[str, str, int]]]       # id -> key -> (wnid, file name, bytes)
    rejected: list[Rejected] = field(default_factory=list)  # entries that are no sample, and rejected samples

    def path(self, root: Path, vid: str, key: str) -> Path:
        wnid, name, _ = self.files[vid][key]
        return root / self.variants[vid][0] / wnid / name



# ---- listing (nothing is read) -----------------------------------------------------------------------


def _entries(folder: Path, rejected: list[Rejected]) -> list[os.DirEntry]:
    """The non-hidden entries of ``folder``, sorted by name; an unlistable folder is a rejected entry."""
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as e:
        rejected.append(Rejected(str(folder), f"cannot list folder: {e.strerror or e}"))
        return []


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _variant_folders(kind: str, root: Path, rejected: list[Rejected]) -> dict[str, tuple[str, dict]]:
    """Variant id -> (folder relative to root, params) for every variant folder of the tree."""
    out = {}
    for entry in _entries(root, rejected):
        if not _is_dir(entry):
            rejected.append(Rejected(entry.path, f"not part of the {LAYOUT[kind]} layout"))
            continue
        name = entry.name
        if kind == "imagenet-p":
            noise = NOISE_DIFFICULTY.fullmatch(name)
            params = ({"perturbation": noise.group(1), "difficulty": int(noise.group(2))} if noise
                      else {"perturbation": name, "difficulty": 1})
            candidates = [(f"sequence/{name}", name, params)]
        else:
            candidates = []
            for sub in _entries(Path(entry.path), rejected):
                if _is_dir(sub) and sub.name in SEVERITIES:
                    candidates.append((f"natural/{name}-{sub.name}", f"{name}/{sub.name}",
                                       {"corruption": name, "severity": int(sub.name)}))
                else:
                    rejected.append(Rejected(sub.path, f"not a severity folder (1..5) of the {LAYOUT[kind]} layout"))
        for vid, folder, params in candidates:
            if mf.VARIANT_ID.fullmatch(vid):
                out[vid] = (folder, params)
            else:
                rejected.append(Rejected(str(root / folder), f"{name!r} cannot name a variant (letters, digits "
                                                             "and _ first; then also . + -)"))
    return out


def list_release(kind: str, root: Path, only: list[str] | None = None) -> Listing:
    """List the files of the variants ``only`` selects (all if None): every ``<variant>/<wnid>/<file>``.

    Files that cannot be samples (hidden files aside) are listed as rejected:
    a wrong extension or level, a bad name, not a regular file, too large.
    Raises :class:`ReleaseError` for a tree with no variant folders or a glob that matches none.
    """
    rejected: list[Rejected] = []
    variants = _variant_folders(kind, root, rejected)
    if not variants:
        raise ReleaseError(f"{root} holds no {LAYOUT[kind]} folders; is it the released {kind} tree?")
    ids = sorted(variants)
    for pattern in only or []:
        if not any(fnmatch.fnmatchcase(v, pattern) for v in ids):
            raise ReleaseError(f"--only {pattern!r} matches no variant of {root} (found {len(ids)}: "
                               f"{', '.join(ids[:4])}{', ...' if len(ids) > 4 else ''})")
    if only:
        variants = {v: variants[v] for v in ids if any(fnmatch.fnmatchcase(v, p) for p in only)}
    files: dict[str, dict[str, tuple[str, str, int]]] = {}
    for vid, (folder, _) in sorted(variants.items()):
        found: dict[str, tuple[str, str, int]] = {}
        twice: set[str] = set()
        for class_dir in _entries(root / folder, rejected):
            if not _is_dir(class_dir):
                rejected.append(Rejected(class_dir.path, f"not in a class folder ({LAYOUT[kind]})"))
                continue
            wnid = sys.intern(class_dir.name)
            for entry in _entries(Path(class_dir.path), rejected):
                key, problem = _file_problem(kind, entry)
                if problem:
                    rejected.append(Rejected(entry.path, problem))
                elif key in found:
                    other = root / folder / found[key][0] / found[key][1]
                    rejected.append(Rejected(entry.path, f"duplicate key {key!r} (also {other}); the sample is "
                                                         "left out of every variant"))
                    twice.add(key)
                else:
                    found[key] = (wnid, entry.name, entry.stat().st_size)
        for key in twice:
            wnid, name, _ = found.pop(key)
            rejected.append(Rejected(str(root / folder / wnid / name), f"duplicate key {key!r}; the sample is "
                                                                       "left out of every variant"))
        files[vid] = found
    return Listing(variants, files, rejected)


def _file_problem(kind: str, entry: os.DirEntry) -> tuple[str, str | None]:
    """(key, why the file cannot be a sample or None)."""
    name = entry.name
    bad = bad_name_reason(name)
    if bad:
        return "", bad
    suffix = os.path.splitext(name)[1]
    if suffix.lower() not in EXTENSIONS[kind]:
        return "", f"not a {MEMBER[kind]} file extension ({suffix or 'none'}) in a class folder"
    try:
        st = entry.stat()
    except OSError as e:
        return "", f"{'broken link' if entry.is_symlink() else 'cannot stat'}: {e.strerror or e}"
    if not stat.S_ISREG(st.st_mode):
        return "", "not a regular file (a folder, FIFO, device or socket)"
    if st.st_size > MAX_SOURCE_BYTES:
        return "", f"file of {st.st_size} bytes, over the {MAX_SOURCE_BYTES} bytes allowed"
    return key_for(Path(name)), None


def usable_keys(kind: str, listing: Listing, root: Path, classes: list[str], class_file: str | None
                 ) -> tuple[list[str], dict[str, int]]:
    """Sorted keys present in every selected variant, in one known class folder; the others are rejected
    (listed once per file or missing file) and dropped from ``listing.files``."""
    index = {c: i for i, c in enumerate(classes)}
    every = sorted({k for files in listing.files.values() for k in files})
    if not every:
        raise ReleaseError(f"no sample files in the variant folders of {root} (layout {LAYOUT[kind]})")
    most = max(len(files) for files in listing.files.values())
    for vid, files in sorted(listing.files.items()):
        if len(files) < most / 2:
            raise ReleaseError(f"{vid} holds {len(files)} samples, other variants up to {most}: an incomplete tree? "
                               f"(finish extracting it, or leave the variant out with --only)")
    keys, labels = [], {}
    for key in every:
        where = {vid: files[key] for vid, files in listing.files.items() if key in files}
        problems = []
        classes_seen = sorted({w for w, _, _ in where.values()})
        if len(where) < len(listing.files):
            some = next(iter(where.values()))
            for vid in sorted(set(listing.files) - set(where)):
                missing = root / listing.variants[vid][0] / some[0] / some[1]
                problems.append(Rejected(str(missing), f"missing (sample {key!r} is in {len(where)} of the "
                                                       f"{len(listing.files)} variants); left out of every variant"))
        elif len(classes_seen) > 1:
            problems += [Rejected(str(listing.path(root, vid, key)), f"sample {key!r} is in class folders "
                                  f"{', '.join(classes_seen)} in different variants; left out of every variant")
                         for vid in sorted(where)]
        elif classes_seen[0] not in index:
            vid = sorted(where)[0]
            problems.append(Rejected(str(listing.path(root, vid, key)), f"unknown label: class folder "
                                     f"{classes_seen[0]!r} is not in the class list {class_file or ''}"))
        if problems:
            listing.rejected.extend(problems)
            for files in listing.files.values():
                files.pop(key, None)
        else:
            keys.append(key)
            labels[key] = index[classes_seen[0]]
    return keys, labels


def select_keys(keys: list[str], labels: dict[str, int], limit: int | None, per_class: int | None) -> list[str]:
    """The first ``per_class`` keys of every class, then the first ``limit`` keys (as ``generate``)."""
    if per_class is not None:
        seen: Counter = Counter()
        kept = []
        for k in keys:
            seen[labels[k]] += 1
            if seen[labels[k]] <= per_class:
                kept.append(k)
        keys = kept
    return keys[:limit] if limit is not None else keys


def fingerprint(listing: Listing, keys: list[str], labels: dict[str, int]) -> dict:
    """Sample count and a sha256 over (variant, key, byte size, label) of every selected file."""
    h = hashlib.sha256()
    for vid in sorted(listing.files):
        for k in keys:
            h.update(f"{vid}\t{k}\t{listing.files[vid][k][2]}\t{labels[k]}\n".encode())
    return {"samples": len(keys), "variants": sorted(listing.files), "sha256": h.hexdigest()}


# ---- probing (headers and containers only) ---------------------------------------------------------------


def probe(kind: str, data: bytes) -> tuple[int, int, int | None]:
    """(width, height, frames or None) of one released file, read from its header or container; raises
    :class:`BadFile` with a one-line reason for a file the scorer could not read."""
    if not data:
        raise BadFile("empty file")
    if kind == "imagenet-c":
        return _probe_jpeg(data)
    return _probe_mp4(data)


def _probe_jpeg(data: bytes) -> tuple[int, int, None]:
    from PIL import Image

    if not data.startswith(b"\xff\xd8\xff"):
        raise BadFile(f"not a JPEG file (starts with {data[:4]!r})")
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise BadFile("truncated JPEG: no end-of-image marker at the end of the file")
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:
            return image.size[0], image.size[1], None
    except Exception as e:  # Pillow on untrusted bytes: any failure is a bad file
        raise BadFile(f"not a readable JPEG: {type(e).__name__}: {e}") from None


def _probe_mp4(data: bytes) -> tuple[int, int, int]:
    import av

    if data[4:8] != b"ftyp":
        raise BadFile(f"not an mp4 file (no ftyp box at the start: {data[:8]!r})")
    try:
        with av.open(io.BytesIO(data), format="mp4") as container:
            if not container.streams.video or container.streams.video[0].codec_context.name != "h264":
                raise BadFile("not an H.264 video")
            codec = container.streams.video[0].codec_context
            width, height = codec.width, codec.height
            frames = sum(packet.size > 0 for packet in container.demux(video=0))
    except BadFile:
        raise
    except Exception as e:  # FFmpeg on untrusted bytes: any failure is a bad file
        raise BadFile(f"not a readable mp4: {type(e).__name__}: {e}") from None
    if frames < 2:
        raise BadFile(f"a video of {frames} frames (a sequence needs at least 2)")
    return width, height, frames


def probe_files(kind: str, items: list[tuple[str, int]]) -> list:
    """Probe files ``(path, listed bytes)``; per file (width, height, frames or None), or a one-line reason."""
    out: list = []
    for path, size in items:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_SOURCE_BYTES + 1)
            if len(data) != size:
                raise BadFile(f"{len(data)} bytes, {size} when listed (changed during the import)")
            out.append(probe(kind, data))
        except OSError as e:
            out.append(f"cannot read: {e.strerror or e}")
        except BadFile as e:
            out.append(one_line(str(e)))
    return out
