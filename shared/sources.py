"""Source datasets: where the clean images come from.

Layouts read:

* **class folders** (ImageFolder, and the ImageNet validation set sorted into
  WordNet-id folders): ``ROOT/<class>/**/<file>``;
* **flat folder + label file**: ``ROOT/<file>`` with ``LOC_val_solution.csv``
  (``ImageId,PredictionString``, the label is the first WordNet id) or a text
  file of ``filename label`` lines (``val.txt``); labels are class names, or
  integers that are used as class indices as they stand.

Class index = position of the class name in sorted order (the torchvision
convention), computed over every class of the dataset before any subset is
taken. A sample's key is its file stem with dots replaced by ``_`` (webdataset
splits keys at the first dot); samples are ordered by key. Files that cannot
be used are never dropped silently: they are listed as rejected with a reason.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from qrobust.shared.errors import QrobustError

log = logging.getLogger("qrobust.sources")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LABEL_FILE_NAMES = ("LOC_val_solution.csv", "val.txt")


class SourceError(QrobustError, ValueError):
    """The source dataset as a whole cannot be read (bad layout, bad label file)."""


class BadImage(ValueError):
    """One source file cannot be decoded; the message is a one-line reason."""


@dataclass(frozen=True)
class SourceSample:
    key: str
    path: str  # absolute
    label: int
    bytes: int


@dataclass(frozen=True)
class Rejected:
    path: str
    reason: str


@dataclass
class SourceDataset:
    """A listed (not yet decoded) dataset: samples sorted by key, plus rejects."""

    root: str
    layout: str
    classes: list[str]
    samples: list[SourceSample]
    rejected: list[Rejected] = field(default_factory=list)
    label_file: str | None = None
    label_entries_without_file: int = 0  # label-file lines whose image is not in the folder

    def fingerprint(self) -> dict:
        """Sample count and a sha256 over the sorted (key, byte size, label) triples."""
        h = hashlib.sha256()
        for s in self.samples:
            h.update(f"{s.key}\t{s.bytes}\t{s.label}\n".encode())
        return {"samples": len(self.samples), "sha256": h.hexdigest()}

    def select(self, limit: int | None = None, per_class: int | None = None) -> "SourceDataset":
        """A deterministic subset: the first ``per_class`` keys of every class, then the first ``limit`` keys."""
        samples = self.samples
        if per_class is not None:
            if per_class < 1:
                raise SourceError("--per-class must be at least 1")
            seen: dict[int, int] = {}
            kept = []
            for s in samples:
                if seen.get(s.label, 0) < per_class:
                    seen[s.label] = seen.get(s.label, 0) + 1
                    kept.append(s)
            samples = kept
        if limit is not None:
            if limit < 1:
                raise SourceError("--limit must be at least 1")
            samples = samples[:limit]
        return replace(self, samples=samples)

    def without(self, bad: dict[str, str]) -> "SourceDataset":
        """This dataset with the samples whose key is in ``bad`` moved to the rejects."""
        if not bad:
            return self
        kept = [s for s in self.samples if s.key not in bad]
        moved = [Rejected(s.path, bad[s.key]) for s in self.samples if s.key in bad]
        return replace(self, samples=kept, rejected=sorted(self.rejected + moved, key=lambda r: r.path))


def open_source(root: str | os.PathLike, labels: str | os.PathLike | None = None,
                classes: str | os.PathLike | None = None) -> SourceDataset:
    """List a source dataset.

    ``labels`` names a label file for a flat folder (found automatically when a
    file named like ``LOC_val_solution.csv`` or ``val.txt`` sits in ``root``).
    ``classes`` optionally names a file whose lines start with the class names
    (e.g. ``LOC_synset_mapping.txt``), so the class indices cover every class even
    when the folder holds only some of them.

    Raises :class:`SourceError` when the folder cannot be read as any layout.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise SourceError(f"source folder {root} does not exist or is not a folder")
    class_list = _read_class_list(Path(classes)) if classes else None
    if labels is None:
        found = [root / n for n in LABEL_FILE_NAMES if (root / n).is_file()]
        has_images = any(f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS for f in root.iterdir())
        subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if subdirs and not (found and has_images):
            return _class_folders(root, subdirs, class_list)
        if not found:
            raise SourceError(
                f"{root} has no class subfolders and no label file ({' or '.join(LABEL_FILE_NAMES)}); "
                "pass --labels FILE (lines 'filename label', or ImageNet's LOC_val_solution.csv)")
        labels = found[0]
    return _flat_with_labels(root, Path(labels).expanduser().resolve(), class_list)


def _read_class_list(path: Path) -> list[str]:
    try:
        names = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"cannot read class list {path}: {e}") from None
    if not names:
        raise SourceError(f"class list {path} is empty")
    if len(set(names)) != len(names):
        raise SourceError(f"class list {path} names a class twice")
    return names


def _key_for(path: Path) -> str:
    return path.stem.replace(".", "_")


def _finish(root: Path, layout: str, classes: list[str], entries: list[tuple[Path, int]],
            rejected: list[Rejected], label_file: Path | None) -> SourceDataset:
    """Turn (path, label) pairs into samples with keys; duplicate keys and bad extensions are rejected."""
    by_key: dict[str, SourceSample] = {}
    for path, label in sorted(entries, key=lambda e: str(e[0])):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            rejected.append(Rejected(str(path), f"not an image file extension ({path.suffix or 'none'})"))
            continue
        key = _key_for(path)
        if key in by_key:
            rejected.append(Rejected(str(path), f"duplicate key {key!r} (also {by_key[key].path})"))
            continue
        try:
            size = path.stat().st_size
        except OSError as e:
            rejected.append(Rejected(str(path), f"cannot stat: {e.strerror}"))
            continue
        by_key[key] = SourceSample(key=key, path=str(path), label=label, bytes=size)
    samples = [by_key[k] for k in sorted(by_key)]
    return SourceDataset(root=str(root), layout=layout, classes=classes, samples=samples,
                         rejected=sorted(rejected, key=lambda r: r.path),
                         label_file=str(label_file) if label_file else None)


def _class_folders(root: Path, subdirs: list[Path], class_list: list[str] | None) -> SourceDataset:
    names = [d.name for d in subdirs]
    classes = sorted(class_list) if class_list else names
    index = {c: i for i, c in enumerate(classes)}
    entries: list[tuple[Path, int]] = []
    rejected: list[Rejected] = []
    for d in subdirs:
        if d.name not in index:
            raise SourceError(f"class folder {d.name!r} is not in the class list")
        for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
            dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
            for name in filenames:
                if not name.startswith("."):
                    entries.append((Path(dirpath) / name, index[d.name]))
    for f in root.iterdir():
        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
            rejected.append(Rejected(str(f), "image outside any class folder"))
    if not entries:
        raise SourceError(f"no files in the class folders of {root}")
    return _finish(root, "class-folders", classes, entries, rejected, None)


def _read_label_file(path: Path) -> dict[str, str]:
    """filename stem -> label string, from LOC_val_solution.csv or 'filename label' lines."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"cannot read label file {path}: {e}") from None
    out: dict[str, str] = {}
    lines = text.splitlines()
    if lines and lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        for row in csv.reader(lines[1:]):
            if not row:
                continue
            if len(row) < 2 or not row[1].split():
                raise SourceError(f"{path}: bad row {row!r} (expected ImageId,PredictionString)")
            out[_key_for(Path(row[0]))] = row[1].split()[0]
        return out
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise SourceError(f"{path}:{n}: expected 'filename label', got {line!r}")
        out[_key_for(Path(parts[0]))] = parts[1]
    return out


def _flat_with_labels(root: Path, label_file: Path, class_list: list[str] | None) -> SourceDataset:
    if not label_file.is_file():
        raise SourceError(f"label file {label_file} does not exist")
    by_key = _read_label_file(label_file)
    if not by_key:
        raise SourceError(f"label file {label_file} lists no samples")
    values = set(by_key.values())
    if all(v.isdigit() for v in values):
        # integer labels (e.g. Caffe's val.txt) are class indices already
        n = max(int(v) for v in values) + 1
        classes = class_list if class_list else [str(i) for i in range(n)]
        if len(classes) < n:
            raise SourceError(f"label {n - 1} in {label_file} but the class list has {len(classes)} classes")
        index = {v: int(v) for v in values}
    else:
        classes = sorted(class_list) if class_list else sorted(values)
        unknown = values - set(classes)
        if unknown:
            raise SourceError(f"labels not in the class list: {', '.join(sorted(unknown)[:5])}")
        index = {c: i for i, c in enumerate(classes)}
    entries, rejected = [], []
    for f in sorted(root.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f == label_file:
            continue
        key = _key_for(f)
        if key in by_key:
            entries.append((f, index[by_key[key]]))
        elif f.suffix.lower() in IMAGE_EXTENSIONS:
            rejected.append(Rejected(str(f), f"no label in {label_file.name}"))
    if not entries:
        raise SourceError(f"none of the files in {root} is listed in {label_file}")
    dataset = _finish(root, "flat+labels", classes, entries, rejected, label_file)
    dataset.label_entries_without_file = len(set(by_key) - {_key_for(p) for p, _ in entries})
    if dataset.label_entries_without_file:
        log.warning("%d entries of %s have no file in %s", dataset.label_entries_without_file, label_file.name, root)
    return dataset


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes with Pillow into an RGB image, with one policy for odd inputs.

    Policy (the one ImageNet pipelines use): EXIF orientation is ignored;
    grayscale, palette, CMYK and alpha images are converted with Pillow's
    ``convert('RGB')`` (alpha is dropped, not composited); 16-bit images keep
    their 8 high bits. Pillow's decompression-bomb limit applies.

    Raises :class:`BadImage` with a one-line reason for anything undecodable.
    """
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb refused: {e}") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not a readable image (format not recognised)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"cannot decode: {e}") from None
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        array = np.asarray(image).astype(np.uint32)
        image = Image.fromarray((array >> 8).clip(0, 255).astype(np.uint8), mode="L")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Read and decode one source file; raises :class:`BadImage` with a reason."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadImage(f"cannot read: {e.strerror or e}") from None
    return decode_rgb(data)
