"""Shard writing: encoded payloads into reproducible, atomically published tars.

``webdataset.ShardWriter`` writes in place and stamps the current time, so a
crash leaves a truncated shard under its final name and no two runs give the
same bytes. Here each shard is written by ``webdataset.TarWriter`` with
``mtime=0`` to ``<name>.partial-<pid>`` and renamed when complete.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image
from webdataset import TarWriter

from qrobust.shared.manifest import fsync_dir, partial_path, shard_summary
from qrobust.shared.spec import Variant
from qrobust.shared.video import encode_frames, recipe_for

PNG_LEVEL = 1  # OpenCV PNG level 1: lossless like any level, 5-7x faster to write than Pillow's default


def encode_image(image: np.ndarray, encoding: dict) -> tuple[str, bytes]:
    """Encode an RGB uint8 image; returns (extension, bytes).

    ``jpg``: Pillow, ``quality`` (85 by default) with optimized Huffman tables,
    exactly how the reference saved ImageNet-C. ``png``: lossless, via OpenCV
    at compression level 1.
    """
    fmt = encoding["format"]
    if fmt == "jpg":
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=encoding.get("quality", 85), optimize=True)
        return "jpg", buf.getvalue()
    if fmt == "png":
        import cv2

        ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]),
                               [cv2.IMWRITE_PNG_COMPRESSION, PNG_LEVEL])
        if not ok:
            raise RuntimeError("OpenCV failed to encode a PNG")
        return "png", buf.tobytes()
    raise ValueError(f"unknown encoding {fmt!r}")


def encoding_record(variant: Variant) -> dict:
    """How a variant's payloads are encoded, as the manifest records it (sequences: the full recipe)."""
    fmt = variant.encoding["format"]
    if variant.family == "sequence":
        recipe = recipe_for(fmt, variant.params["perturbation"])
        return {"format": fmt, **recipe}
    return dict(variant.encoding)


def encode_payload(pixels: np.ndarray, variant: Variant) -> tuple[str, bytes]:
    """Encode what a renderer made for ``variant``: an image, or a sequence's frames."""
    if variant.family == "sequence":
        recipe = recipe_for(variant.encoding["format"], variant.params["perturbation"])
        return recipe["ext"], encode_frames(pixels, recipe)
    return encode_image(pixels, variant.encoding)


class ShardFile:
    """One shard being written: ``add`` samples in key order, then ``publish``.

    Until ``publish`` the data lives in ``<path>.partial-<pid>``; ``publish`` fsyncs,
    renames it to ``path`` and returns its summary (sha256, bytes, count,
    keys digest). ``discard`` (or leaving the ``with`` block on an error)
    removes the partial file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial = partial_path(self.path)
        self._file = open(self.partial, "wb")
        self._tar = TarWriter(self._file, encoder=False, mtime=0, user="qrobust", group="qrobust")
        self._last_key: str | None = None

    def add(self, key: str, label: int, ext: str, payload: bytes) -> None:
        if self._last_key is not None and key <= self._last_key:
            raise ValueError(f"samples must be added in increasing key order ({key!r} after {self._last_key!r})")
        self._tar.write({"__key__": key, "cls": str(int(label)).encode(), ext: payload})
        self._last_key = key

    def publish(self) -> dict:
        self._tar.close()  # closes the tar stream, not our file object
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        summary = shard_summary(self.partial)
        os.replace(self.partial, self.path)
        fsync_dir(self.path.parent)
        return summary

    def discard(self) -> None:
        if not self._file.closed:
            with contextlib.suppress(Exception):
                self._tar.close()  # else tarfile's finalizer writes into the closed file later
            self._file.close()
        self.partial.unlink(missing_ok=True)

    def __enter__(self) -> "ShardFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
