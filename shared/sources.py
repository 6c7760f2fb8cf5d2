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
be used are never dropped silently: they are listed as rejected with a one-line
reason (hidden files, whose names start with a dot, are not part of a dataset).

What is rejected when listing (no pixel is decoded): a file whose extension is
not an image's; a key another file already has (``a.b.jpg`` and ``a_b.jpg``
too); a name that is not valid UTF-8 or holds control characters; anything but
a regular file (a FIFO or a device would block or never end), a broken link, a
file larger than :data:`MAX_SOURCE_BYTES`; an image without a label, or with a
label the class list does not know, or with two different labels in the label
file; an image outside any class folder; a folder that cannot be listed. What
is rejected when decoding: see :func:`decode_rgb`.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import stat
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from qrobust.shared.errors import QrobustError

log = logging.getLogger("qrobust.sources")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# the Pillow formats decoded, whatever the file is named (a PNG named .JPEG is a PNG); MPO (camera JPEGs
# with a second picture) opens as JPEG. Other formats are refused: no other plugin (EPS runs Ghostscript)
# ever parses a source file.
ACCEPTED_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "DIB", "TIFF", "WEBP")
LABEL_FILE_NAMES = ("LOC_val_solution.csv", "val.txt")
MAX_SOURCE_BYTES = 1 << 30  # a bigger file is no photograph; reading it whole could exhaust memory
# the most pixels decoded from one file, checked from its header whatever Pillow's own decompression-bomb
# limit is set to (code that imports qrobust may raise or disable Image.MAX_IMAGE_PIXELS): Pillow's default
MAX_SOURCE_PIXELS = 89_478_485
# the longer side at most this many times the shorter: the resize of the shorter side to the suite's size
# would otherwise blow a thin image (1 x 80,000 px is a 20 kB PNG) up to gigabytes
MAX_ASPECT = 100
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(text: str, limit: int = 300) -> str:
    """``text`` as a single line (whitespace runs, newlines included, become one space; terminal escapes go),
    at most ``limit`` characters."""
    line = _CONTROL.sub("?", " ".join(_ANSI.sub("", str(text)).split()))
    return line if len(line) <= limit else line[:limit - 3] + "..."


class SourceError(QrobustError, ValueError):
    """The source dataset as a whole cannot be read (bad layout, bad label file)."""


class BadImage(ValueError):
    """One source file cannot be decoded; the message is a one-line reason."""

    def __init__(self, reason: str):
        super().__init__(one_line(reason))


@dataclass(frozen=True)
class SourceSample:
    key: str
    path: str  # absolute (a manifest records it relative to the source folder)
    label: int
    bytes: int


@dataclass(frozen=True)
class Rejected:
    path: str
    reason: str  # one line, whatever it was made from

    def __post_init__(self):
        object.__setattr__(self, "reason", one_line(self.reason))


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
    class_list = read_class_list(Path(classes)) if classes else None
    try:
        children = sorted(root.iterdir())
    except OSError as e:
        raise SourceError(f"cannot list source folder {root}: {e.strerror or e}") from None
    if labels is None:
        found = [root / n for n in LABEL_FILE_NAMES if (root / n).is_file()]
        has_images = any(f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS for f in children)
        subdirs = [d for d in children if d.is_dir() and not d.name.startswith(".")]
        if subdirs and not (found and has_images):
            return _class_folders(root, children, subdirs, class_list, Path(classes) if classes else None)
        if not found:
            raise SourceError(
                f"{root} has no class subfolders and no label file ({' or '.join(LABEL_FILE_NAMES)}); "
                "pass --labels FILE (lines 'filename label', or ImageNet's LOC_val_solution.csv)")
        labels = found[0]
    return _flat_with_labels(root, children, Path(labels).expanduser().resolve(), class_list,
                             Path(classes) if classes else None)


def read_class_list(path: Path) -> list[str]:
    try:
        names = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"cannot read class list {path}: {e}") from None
    if not names:
        raise SourceError(f"class list {path} is empty")
    if len(set(names)) != len(names):
        raise SourceError(f"class list {path} names a class twice")
    return names


def key_for(path: Path) -> str:
    return path.stem.replace(".", "_")


def bad_name_reason(name: str) -> str | None:
    """Why a file name cannot give a sample key (None if it can)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, kept by Python as lone surrogates
        return "file name is not valid UTF-8"
    if _CONTROL.search(name):
        return "file name holds control characters (a newline, a tab, ...)"
    return None


def _finish(root: Path, layout: str, classes: list[str], entries: list[tuple[Path, int]],
            rejected: list[Rejected], label_file: Path | None) -> SourceDataset:
    """Turn (path, label) pairs into samples with keys; rejects what cannot be a sample (see the module doc)."""
    by_key: dict[str, SourceSample] = {}
    for path, label in sorted(entries, key=lambda e: str(e[0])):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            rejected.append(Rejected(str(path), f"not an image file extension ({path.suffix or 'none'})"))
            continue
        bad_name = bad_name_reason(path.name)
        if bad_name:
            rejected.append(Rejected(str(path), bad_name))
            continue
        key = key_for(path)
        if key in by_key:
            rejected.append(Rejected(str(path), f"duplicate key {key!r} (also {by_key[key].path})"))
            continue
        try:
            st = path.stat()
        except OSError as e:
            what = "broken link" if path.is_symlink() else "cannot stat"
            rejected.append(Rejected(str(path), f"{what}: {e.strerror or e}"))
            continue
        if not stat.S_ISREG(st.st_mode):
            rejected.append(Rejected(str(path), "not a regular file (a FIFO, device or socket)"))
            continue
        if st.st_size > MAX_SOURCE_BYTES:
            rejected.append(Rejected(str(path), f"file of {st.st_size} bytes, over the {MAX_SOURCE_BYTES} bytes "
                                                "allowed for a source image"))
            continue
        by_key[key] = SourceSample(key=key, path=str(path), label=label, bytes=st.st_size)
    samples = [by_key[k] for k in sorted(by_key)]
    return SourceDataset(root=str(root), layout=layout, classes=classes, samples=samples,
                         rejected=sorted(rejected, key=lambda r: r.path),
                         label_file=str(label_file) if label_file else None)


def _walk(folder: Path, rejected: list[Rejected]):
    """Every non-hidden file under ``folder`` (links followed, each real folder once); unlistable
    folders and link cycles are recorded as rejected."""
    seen: dict[str, str] = {}  # real path -> the path under ``folder`` it was listed as

    def unlistable(e: OSError) -> None:
        rejected.append(Rejected(str(e.filename or folder), f"cannot list folder: {e.strerror or e}"))

    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=unlistable):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back to a folder already listed: its files are there already
            # named as listed, inside the source folder (the real path may lie outside it)
            rejected.append(Rejected(dirpath, f"folder link loop (already listed as {seen[real]})"))
            dirnames[:] = []
            continue
        seen[real] = dirpath
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath) / name


def _class_folders(root: Path, children: list[Path], subdirs: list[Path], class_list: list[str] | None,
                   class_file: Path | None) -> SourceDataset:
    names = [d.name for d in subdirs]
    classes = sorted(class_list) if class_list else names
    index = {c: i for i, c in enumerate(classes)}
    if not any(n in index for n in names):
        raise SourceError(f"none of the class folders of {root} ({', '.join(names[:3])}, ...) is in the class "
                          f"list {class_file}")
    entries: list[tuple[Path, int]] = []
    rejected: list[Rejected] = []
    for d in subdirs:
        for path in _walk(d, rejected):
            if d.name in index:
                entries.append((path, index[d.name]))
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                rejected.append(Rejected(str(path), f"unknown label: class folder {d.name!r} is not in the "
                                                    f"class list {class_file.name if class_file else ''}"))
    for f in children:
        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."):
            rejected.append(Rejected(str(f), "image outside any class folder"))
    if not entries:
        raise SourceError(f"no files in the class folders of {root}")
    return _finish(root, "class-folders", classes, entries, rejected, None)


def _read_label_file(path: Path) -> dict[str, list[str]]:
    """name as written -> the labels given to it (one, unless listed twice), from LOC_val_solution.csv
    (names without extension) or 'filename label' lines."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"cannot read label file {path}: {e}") from None
    out: dict[str, list[str]] = {}
    lines = text.splitlines()
    if lines and lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        for row in csv.reader(lines[1:]):
            if not row:
                continue
            if len(row) < 2 or not row[1].split():
                raise SourceError(f"{path}: bad row {row!r} (expected ImageId,PredictionString)")
            out.setdefault(row[0].strip(), []).append(row[1].split()[0])
        return out
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise SourceError(f"{path}:{n}: expected 'filename label', got {line!r}")
        out.setdefault(parts[0], []).append(parts[1])
    return out


def _flat_with_labels(root: Path, children: list[Path], label_file: Path, class_list: list[str] | None,
                      class_file: Path | None) -> SourceDataset:
    if not label_file.is_file():
        raise SourceError(f"label file {label_file} does not exist")
    by_name = _read_label_file(label_file)
    if not by_name:
        raise SourceError(f"label file {label_file} lists no samples")
    by_key: dict[str, list[str]] = {}  # for names given without extension (ImageId) or with another case
    for name, labels in by_name.items():
        by_key.setdefault(key_for(Path(name)), []).extend(labels)
    values = {v for labels in by_name.values() for v in labels}
    listed_in = f"the class list {class_file.name}" if class_file else "the class list"
    if all(v.isdigit() for v in values):
        # integer labels (e.g. Caffe's val.txt) are class indices already
        n = max(int(v) for v in values) + 1
        classes = class_list if class_list else [str(i) for i in range(n)]
        index = {v: int(v) for v in values if int(v) < len(classes)}
    else:
        classes = sorted(class_list) if class_list else sorted(values)
        index = {c: i for i, c in enumerate(classes)}
    if not set(index) & values:
        raise SourceError(f"no label of {label_file} is in {listed_in} (labels {', '.join(sorted(values)[:3])}, "
                          f"...; classes {', '.join(classes[:3])}, ...)")
    entries, rejected = [], []
    for f in children:
        if f.is_dir() or f.name.startswith(".") or f == label_file:
            continue  # a FIFO or a broken link listed in the label file is rejected by _finish, not skipped
        labels = sorted(set(by_name[f.name] if f.name in by_name else by_key.get(key_for(f), [])))
        bad_name = bad_name_reason(f.name)
        if bad_name and (labels or f.suffix.lower() in IMAGE_EXTENSIONS):  # a label file cannot name it anyway
            rejected.append(Rejected(str(f), bad_name))
        elif len(labels) == 1 and labels[0] in index:
            entries.append((f, index[labels[0]]))
        elif f.suffix.lower() not in IMAGE_EXTENSIONS and not labels:
            continue  # another file of the folder (notes, class lists): not a sample
        elif not labels:
            rejected.append(Rejected(str(f), f"missing label: not listed in {label_file.name}"))
        elif len(labels) > 1:
            rejected.append(Rejected(str(f), f"listed in {label_file.name} with different labels "
                                             f"({', '.join(labels)})"))
        else:
            rejected.append(Rejected(str(f), f"unknown label {labels[0]!r}: not in {listed_in} "
                                             f"({len(classes)} classes)"))
    if not entries:
        raise SourceError(f"none of the files in {root} is listed in {label_file} with a known label")
    dataset = _finish(root, "flat+labels", classes, entries, rejected, label_file)
    dataset.label_entries_without_file = len(set(by_key) - {key_for(p) for p in children})
    if dataset.label_entries_without_file:
        log.warning("%d entries of %s have no file in %s", dataset.label_entries_without_file, label_file.name, root)
    return dataset


def decode_rgb(data: bytes, size: tuple[int, int] | None = None) -> Image.Image:
    """Decode image bytes with Pillow into an RGB image, with one policy for odd inputs.

    Policy (the one ImageNet pipelines use, and every decoder of qrobust
    follows it): the format is read from the bytes, not the name (a PNG named
    ``.JPEG`` is decoded as the PNG it is), and must be one of
    :data:`ACCEPTED_FORMATS`; EXIF orientation is ignored (pixels as stored);
    grayscale, palette, CMYK and alpha images are converted with Pillow's
    ``convert('RGB')`` (alpha is dropped, not composited); 16-bit images keep
    their 8 high bits; images smaller than the crop are not refused (the resize
    scales them up). Damage that libjpeg itself recovers from (a marker inside
    the compressed data, extraneous bytes: its "Corrupt JPEG data" warnings) is
    decoded as libjpeg, hence Pillow, torchvision and the reference pipelines,
    decode it; damage it reports as an error (a truncated file, a bad marker
    where a header segment should be) rejects the file.

    Raises :class:`BadImage` with a one-line reason for anything else: an empty
    file, a format that is not accepted or not an image, a truncated or damaged
    file, more pixels than Pillow's decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS``) or :data:`MAX_SOURCE_PIXELS` (whichever is
    lower), a side over :data:`MAX_ASPECT` times the other, or a size other
    than ``size`` (width, height) when one is declared (images of a corpus's
    shards); sizes are checked from the header, before any pixel is decoded.
    """
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            w, h = image.size
            if size is not None and (w, h) != tuple(size):
                raise BadImage(f"image of {w}x{h} pixels, the corpus's are {size[0]}x{size[1]}")
            if w * h > MAX_SOURCE_PIXELS:
                raise BadImage(f"decompression bomb refused: {w}x{h} pixels, more than the {MAX_SOURCE_PIXELS} "
                               "qrobust decodes from one file")
            if max(w, h) > MAX_ASPECT * min(w, h):
                raise BadImage(f"{w}x{h} pixels: one side is over {MAX_ASPECT} times the other (the resize of the "
                               "shorter side would blow it up)")
            image.load()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb refused: {e}") from None
    except Image.UnidentifiedImageError:
        raise BadImage(_unidentified(data)) from None
    except MemoryError:
        raise BadImage("out of memory decoding it") from None
    except Exception as e:  # OSError (truncated), SyntaxError (broken stream), ValueError, struct.error, ...
        raise BadImage(f"cannot decode: {e or type(e).__name__}") from None
    try:
        if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            array = np.asarray(image).astype(np.uint32)
            image = Image.fromarray((array >> 8).clip(0, 255).astype(np.uint8), mode="L")
        if image.mode != "RGB":
            image = image.convert("RGB")
    except (ValueError, OSError) as e:  # a mode Pillow cannot convert to RGB (LAB, ...)
        raise BadImage(f"cannot convert {image.mode} pixels to RGB: {e}") from None
    return image


def _unidentified(data: bytes) -> str:
    """Why Pillow found no accepted format in ``data``, as precisely as the header allows (no other
    decoder is run: the plugins' ``accept`` functions only look at the first bytes)."""
    prefix = data[:16]
    Image.init()

    def accepts(accept) -> bool:
        try:
            return accept is not None and accept(prefix) is True
        except Exception:  # some plugins' checks fail on a prefix shorter than they read (struct.error)
            return False

    for fmt in ACCEPTED_FORMATS:
        factory, accept = Image.OPEN.get(fmt, (None, None))
        if factory is not None and accepts(accept):
            try:  # the format's own complaint, e.g. "no marker found" for a JPEG with a bad marker
                factory(io.BytesIO(data), None)
            except Exception as e:
                return f"not a readable image: a damaged {fmt} file ({e or type(e).__name__})"
    for fmt, (_, accept) in Image.OPEN.items():
        if fmt not in ACCEPTED_FORMATS and accepts(accept):
            return f"not a readable image: {fmt} format, not one of {', '.join(ACCEPTED_FORMATS)}"
    return f"not a readable image (format not recognised; accepted: {', '.join(ACCEPTED_FORMATS)})"


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Read and decode one source file; raises :class:`BadImage` with a reason."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadImage(f"cannot read: {e.strerror or e}") from None
    return decode_rgb(data)
