"""Training and validation data: an ImageFolder tree or WebDataset shards, as float tensors in [0, 1].

Two inputs, one map-style dataset (:class:`ImageData`):

* an **image folder** (any layout :func:`qrobust.shared.sources.open_source`
  reads: class folders, or a flat folder with a label file);
* **WebDataset shards**: a folder of ``.tar`` files, a glob, or one ``.tar``.
  Each sample is ``<key>.cls`` (the integer label, as text) plus ``<key>.jpg``
  / ``.jpeg`` / ``.png``. The shards are indexed once (tar headers only, read
  with bounds by :func:`~qrobust.shared.shards.iter_tar`: the byte range of
  each payload) and read by random access, so shuffling,
  ``DistributedSampler`` and resumption work exactly as for a folder. Members
  are read as bytes and decoded only by
  :func:`~qrobust.shared.sources.decode_rgb`; every other extension is ignored
  and nothing is ever unpickled. Shards must be local files. Shards of a
  qrobust corpus (listed by the ``manifest.json`` two folders up) hold images
  of its declared crop: one of another size is refused from its header, before
  it is decoded, as any image over
  :data:`~qrobust.shared.sources.MAX_SOURCE_PIXELS` is.

Images are never dropped silently. Samples unusable at indexing time (no
label, no image, unreadable shard) are in ``dataset.rejected``; an image that
fails to decode while training is logged with its key, skipped (the batch is
one smaller) and counted in :attr:`Loader.bad`.

Augmentation: ``RandomResizedCrop(size)`` + horizontal flip for training;
shorter side to ``size * 256 / 224`` then center crop for validation. The
random draws of a training sample come from a seed derived from (seed, epoch,
sample key), so they do not depend on worker count, rank count or on a resumed
run, and the caller's global RNG is left as it was.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.transforms import v2

from qrobust.shared.bounded import BoundsError, check_depth
from qrobust.shared.errors import QrobustError
from qrobust.shared.manifest import MANIFEST_NAME, ManifestError, load_manifest
from qrobust.shared.seeding import sample_seed
from qrobust.shared.shards import ShardError, iter_tar, member_key
from qrobust.shared.sources import BadImage, decode_rgb, open_source

log = logging.getLogger("qrobust.train.data")

SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")  # in order of preference when a sample has several
VAL_RESIZE_RATIO = 256 / 224


class DataError(QrobustError, ValueError):
    """Training data cannot be used as given (missing folder, no samples, class mismatch)."""


@dataclass(frozen=True)
class Item:
    """Where one sample's image bytes are: a whole file, or a byte range of a shard."""

    key: str
    label: int
    path: str
    offset: int = -1  # -1: the whole file (size is then its size when listed)
    size: int = -1
    crop: int | None = None  # the side of the images a corpus's manifest declares for this shard

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.offset < 0:
                return f.read()
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise BadImage(f"truncated shard member ({len(data)} of {self.size} bytes)")
        return data


@dataclass(frozen=True)
class BadSample:
    """What ``ImageData[i]`` returns for an image that cannot be decoded."""

    key: str
    reason: str


def train_transform(size: int) -> v2.Compose:
    return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                       v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def val_transform(size: int) -> v2.Compose:
    return v2.Compose([v2.Resize(int(round(size * VAL_RESIZE_RATIO)), antialias=True), v2.CenterCrop(size),
                       v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


@dataclass
class ImageData(Dataset):
    """Samples as ``(float tensor (3, size, size) in [0, 1], int label)``; see the module docstring.

    ``mode`` is ``"train"`` (random crop + flip) or ``"val"`` (resize + center crop).
    """

    items: list[Item]
    classes: list[str]
    source: str
    layout: str  # "class-folders", "flat+labels" or "shards"
    image_size: int = 224
    mode: str = "val"
    seed: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (path or key, reason)
    epoch: int = 0

    def __post_init__(self):
        if self.mode not in ("train", "val"):
            raise ValueError(f"mode must be 'train' or 'val', not {self.mode!r}")
        self._transform = (train_transform if self.mode == "train" else val_transform)(self.image_size)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose augmentation draws to make (part of every sample's seed)."""
        self.epoch = int(epoch)

    def with_mode(self, mode: str, image_size: int | None = None) -> "ImageData":
        """The same samples with another transform (e.g. training images, validation transform)."""
        return replace(self, mode=mode, image_size=self.image_size if image_size is None else image_size)

    def subset(self, indices) -> "ImageData":
        return replace(self, items=[self.items[i] for i in indices])

    def labels(self) -> list[int]:
        return [it.label for it in self.items]

    def fingerprint(self) -> dict:
        """Sample count, class count and a sha256 over sorted (key, byte size, label): what the data is."""
        h = hashlib.sha256()
        for it in sorted(self.items, key=lambda i: (i.key, i.path)):
            h.update(f"{it.key}\t{it.size}\t{it.label}\n".encode())
        return {"samples": len(self.items), "classes": len(self.classes), "sha256": h.hexdigest(),
                "layout": self.layout}

    def __getitem__(self, index: int):
        item = self.items[index]
        try:
            image = decode_rgb(item.read(), None if item.crop is None else (item.crop, item.crop))
        except (BadImage, OSError) as e:
            where = item.key if item.offset < 0 else f"{os.path.basename(item.path)}:{item.key}"
            return BadSample(where, str(e) if isinstance(e, BadImage) else f"cannot read: {e}")
        if self.mode == "val":
            return self._transform(image), item.label
        seed = sample_seed(self.seed, f"train/epoch-{self.epoch}", item.key)
        with torch.random.fork_rng(devices=[]):  # the draws of this sample only; the global RNG is untouched
            torch.manual_seed(seed)
            return self._transform(image), item.label


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


# --------------------------------------------------------------------------- opening data

def is_shards(root: str | os.PathLike) -> bool:
    """Whether ``root`` names WebDataset shards: a ``.tar`` file, a glob, or a folder holding ``.tar`` files."""
    text = str(root)
    if glob.has_magic(text) or text.endswith(".tar"):
        return True
    p = Path(text)
    return p.is_dir() and any(p.glob("*.tar"))


def shard_paths(root: str | os.PathLike) -> list[Path]:
    text = os.path.expanduser(str(root))
    if glob.has_magic(text):
        paths = sorted(Path(p) for p in glob.glob(text) if p.endswith(".tar"))
    elif Path(text).is_dir():
        paths = sorted(Path(text).glob("*.tar"))
    else:
        paths = [Path(text)]
    paths = [p.resolve() for p in paths]
    if not paths or not all(p.is_file() for p in paths):
        missing = [str(p) for p in paths if not p.is_file()]
        raise DataError(f"no shard files at {root}" + (f" (missing: {', '.join(missing[:3])})" if missing else ""))
    return paths


def corpus_crops(paths: list[Path]) -> dict[Path, int]:
    """The declared crop of every shard among ``paths`` that a qrobust corpus's manifest lists (the
    corpus folder is two levels above a shard: ``<corpus>/<family>/<name>/<name>-000000.tar``).
    Raises :class:`DataError` for a manifest that cannot be read: a corpus whose geometry is unknown
    is not trained on."""
    crops: dict[Path, int] = {}
    manifests: dict[Path, dict | None] = {}
    for path in paths:
        if len(path.parents) < 3:
            continue
        root = path.parents[2]
        if root not in manifests:
            manifests[root] = None
            if (root / MANIFEST_NAME).exists():
                try:
                    manifest = load_manifest(root)
                    check_depth(manifest, str(root / MANIFEST_NAME))
                except (ManifestError, BoundsError) as e:
                    raise DataError(f"shards of the corpus {root}: {e}") from None
                manifests[root] = manifest
        manifest = manifests[root]
        if manifest is None:
            continue
        listed = {s["name"] for entry in manifest["variants"].values() for s in entry["shards"]}
        if path.relative_to(root).as_posix() in listed:
            crops[path] = manifest["suite"]["spec"]["geometry"]["crop"]
    return crops


def index_shard(path: Path, crop: int | None = None) -> tuple[list[Item], list[tuple[str, str]]]:
    """The samples of one shard (byte ranges of their images) and the rejected ones with reasons; ``crop``:
    the size its images must have (a corpus's declared crop), checked when each is decoded."""
    groups: dict[str, dict] = {}
    order: list[str] = []
    labels: dict[str, str] = {}
    rejected: list[tuple[str, str]] = []
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            for member in iter_tar(f, size):  # headers only, each within bounds; nothing is extracted
                if not member.isfile():
                    continue
                key = member_key(member.name)
                base = member.name.rsplit("/", 1)[-1]
                ext = base.split(".", 1)[1].lower() if "." in base else ""
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                if ext == "cls":
                    f.seek(member.offset_data)
                    labels[key] = f.read(min(member.size, 64)).decode("utf-8", "replace").strip()
                elif ext in SHARD_IMAGE_EXTENSIONS:
                    groups[key].setdefault(ext, member)
    except (ShardError, OSError) as e:
        rejected.append((f"{path.name}", f"unreadable shard (samples after this point lost): {e}"))
    size = _file_size(str(path))
    items = []
    for key in order:
        where = f"{path.name}:{key}"
        image = next((groups[key][e] for e in SHARD_IMAGE_EXTENSIONS if e in groups[key]), None)
        if image is None:
            if key in labels:  # a sample with only other payloads (npy, mp4, json ...) is not an image sample
                rejected.append((where, "no jpg/jpeg/png member"))
            continue
        text = labels.get(key)
        if text is None:
            rejected.append((where, "no cls member"))
            continue
        try:
            label = int(text)
            if label < 0:
                raise ValueError
        except ValueError:
            rejected.append((where, f"cls {text[:20]!r} is not a non-negative integer"))
            continue
        if image.offset_data + image.size > size:
            rejected.append((where, "image member truncated"))
            continue
        items.append(Item(key=key, label=label, path=str(path), offset=image.offset_data, size=image.size,
                          crop=crop))
    return items, rejected


def open_shards(root: str | os.PathLike, num_classes: int | None = None, **kw) -> ImageData:
    """Index WebDataset shards (see the module docstring)."""
    items, rejected = [], []
    paths = shard_paths(root)
    crops = corpus_crops(paths)
    for path in paths:
        found, bad = index_shard(path, crops.get(path))
        items += found
        rejected += bad
    for where, reason in rejected:
        log.warning("shards %s: rejected %s: %s", root, where, reason)
    if not items:
        raise DataError(f"no usable samples (jpg/jpeg/png + cls) in the shards at {root}")
    top = max(it.label for it in items)
    n = top + 1 if num_classes is None else num_classes
    if top >= n:
        raise DataError(f"shards at {root} have label {top}, but there are {n} classes")
    return ImageData(items=items, classes=[str(i) for i in range(n)], source=str(root), layout="shards",
                     rejected=rejected, **kw)


def open_folder(root: str | os.PathLike, **kw) -> ImageData:
    """An image folder, listed by :func:`~qrobust.shared.sources.open_source`."""
    try:
        src = open_source(root)
    except QrobustError as e:
        raise DataError(str(e)) from None
    rejected = [(r.path, r.reason) for r in src.rejected]
    for where, reason in rejected:
        log.warning("%s: rejected %s: %s", root, where, reason)
    items = [Item(key=s.key, label=s.label, path=s.path, size=s.bytes) for s in src.samples]
    return ImageData(items=items, classes=list(src.classes), source=src.root, layout=src.layout,
                     rejected=rejected, **kw)


def open_data(root: str | os.PathLike, *, mode: str = "val", image_size: int = 224, seed: int = 0,
              num_classes: int | None = None) -> ImageData:
    """An :class:`ImageData` from an image folder or shards (found by :func:`is_shards`)."""
    kw = dict(mode=mode, image_size=image_size, seed=seed)
    if is_shards(root):
        return open_shards(root, num_classes=num_classes, **kw)
    data = open_folder(root, **kw)
    if num_classes is not None and data.num_classes > num_classes:
        raise DataError(f"{root} has {data.num_classes} classes, more than the {num_classes} expected")
    return data


def _align_val(train: ImageData, val: ImageData) -> ImageData:
    """Give the validation samples the training set's class indices (matched by class name)."""
    if train.layout == "shards" or val.layout == "shards" or val.classes == train.classes:
        if val.layout == "shards" and val.num_classes > train.num_classes:
            raise DataError(f"validation data {val.source} has labels up to {val.num_classes - 1}, "
                            f"beyond the {train.num_classes} training classes")
        return replace(val, classes=train.classes)
    index = {c: i for i, c in enumerate(train.classes)}
    unknown = sorted(set(val.classes[it.label] for it in val.items) - set(index))
    if unknown:
        raise DataError(f"validation classes not in the training data {train.source}: {', '.join(unknown[:5])}")
    items = [replace(it, label=index[val.classes[it.label]]) for it in val.items]
    return replace(val, items=items, classes=train.classes)


def open_splits(train_root: str | os.PathLike, val_root: str | os.PathLike | None = None, *,
                image_size: int = 224, seed: int = 0, num_classes: int | None = None,
                holdout: int = 10) -> tuple[ImageData, ImageData]:
    """Training data (augmented) and validation data (center crop) with the same class indices.

    Without ``val_root``: a folder holding ``train/`` and ``val/`` uses them, a
    folder named ``train`` uses its sibling ``val`` (``data/train`` and
    ``data/val``, ImageNet's own layout); otherwise every ``holdout``-th sample
    of each class (in key order) is held out for validation (logged).
    """
    root = Path(os.path.expanduser(str(train_root)))
    if val_root is None and not is_shards(root) and (root / "train").is_dir() and (root / "val").is_dir():
        root, val_root = root / "train", root / "val"
    elif val_root is None and root.name == "train" and root.is_dir() and (root.parent / "val").is_dir():
        val_root = root.parent / "val"
        log.info("validation data: %s (the sibling of %s)", val_root, root)
    train = open_data(root, mode="train", image_size=image_size, seed=seed, num_classes=num_classes)
    if val_root is not None:
        val = open_data(val_root, mode="val", image_size=image_size, seed=seed, num_classes=num_classes)
        return train, _align_val(train, val)
    seen: dict[int, int] = {}
    held, kept = [], []
    for i in sorted(range(len(train.items)), key=lambda j: train.items[j].key):
        n = seen.get(train.items[i].label, 0)
        seen[train.items[i].label] = n + 1
        (held if n % holdout == holdout - 1 else kept).append(i)
    if not held:
        raise DataError(f"{train_root}: too few samples to hold out a validation set; pass a validation folder")
    log.warning("no validation data given: holding out %d of %d samples of %s (every %dth of each class)",
                len(held), len(train), train_root, holdout)
    return train.subset(sorted(kept)), train.subset(sorted(held)).with_mode("val")


# --------------------------------------------------------------------------- loading

class StridedSampler(Sampler):
    """Indices ``rank, rank + world, ...`` in order: every sample exactly once over all ranks (no padding)."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SkipBadCollate:
    """Stack the good samples of a batch; the bad ones travel along as ``(key, reason)`` pairs."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, batch):
        good = [b for b in batch if not isinstance(b, BadSample)]
        bad = [(b.key, b.reason) for b in batch if isinstance(b, BadSample)]
        if good:
            x = torch.stack([g[0] for g in good])
        else:
            x = torch.empty(0, 3, self.image_size, self.image_size)
        y = torch.tensor([int(g[1]) for g in good], dtype=torch.long)
        return x, y, bad


def seed_worker(worker_id: int) -> None:
    """Seed NumPy and ``random`` in a loader worker from the worker's torch seed (loader generator based)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class Loader:
    """Batches ``(x, y)`` of a dataset, deterministic given the seed; bad images are skipped and counted.

    Training loaders shuffle with a ``DistributedSampler`` (also on one process:
    the order is a function of (seed, epoch) only); call :meth:`set_epoch`
    before every epoch. Evaluation loaders give each rank a strided share of
    the samples, without padding. A batch whose images all fail to decode is
    skipped (under DDP the other ranks would then wait: clean such data first).
    """

    def __init__(self, dataset, batch_size: int, *, train: bool, seed: int = 0, workers: int = 0,
                 rank: int = 0, world: int = 1, pin_memory: bool = False):
        self.dataset = dataset
        self.train = train
        n = len(dataset)
        if train:
            self.sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
            drop_last = len(self.sampler) >= batch_size  # no ragged last batch (BatchNorm) unless data is tiny
        else:
            self.sampler = StridedSampler(n, rank, world)
            drop_last = False
        size = getattr(dataset, "image_size", 224)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                 collate_fn=SkipBadCollate(size), drop_last=drop_last, pin_memory=pin_memory,
                                 worker_init_fn=seed_worker if workers else None,
                                 generator=torch.Generator().manual_seed(seed))
        self.bad: dict[str, str] = {}  # key -> reason, over every epoch so far

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y, bad in self.loader:
            for key, reason in bad:
                if key not in self.bad:
                    log.warning("skipped bad image %s: %s", key, reason)
                self.bad[key] = reason
            if len(y):
                yield x, y
