"""Shard writing: encoded payloads into reproducible, atomically published tars.

``webdataset.ShardWriter`` writes in place and stamps the current time, so a
crash leaves a truncated shard under its final name and no two runs give the
same bytes. Here each shard is written with ``mtime=0`` to
``<name>.partial-<host>-<pid>`` and renamed when complete. The tar bytes are exactly
those of ``webdataset.TarWriter(encoder=False, mtime=0, user="qrobust",
group="qrobust")`` (a test compares them), written with the standard library's
``tarfile`` headers: importing webdataset imports torch, which cost every
worker process (and the main one) over a second of start-up.
"""
from __future__ import annotations

import contextlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from qrobust.shared.files import fsync_dir, partial_path
from qrobust.shared.shards import shard_summary
from qrobust.shared.suites import Variant
from qrobust.shared.video import encode_frames, recipe_for

PNG_LEVEL = 1  # OpenCV PNG level 1: lossless like any level, 5-7x faster to write than Pillow's default


class TarMembers:
    """Appends tar members to a binary file as ``webdataset.TarWriter`` does (which writes through
    ``tarfile.open(mode="w|")``): a header from ``TarInfo.tobuf`` in tarfile's default format and
    encoding, the data, NUL padding to 512 bytes; ``close`` writes the two end blocks and pads the
    archive to tarfile's 10240-byte record, as ``TarFile.close`` does."""

    MODE, OWNER = 0o444, "qrobust"

    def __init__(self, fileobj):
        self.file = fileobj
        self.offset = 0

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, self.MODE
        info.uname = info.gname = self.OWNER
        header = info.tobuf(tarfile.DEFAULT_FORMAT, tarfile.ENCODING, "surrogateescape")
        pad = -len(data) % tarfile.BLOCKSIZE
        self.file.write(header)
        self.file.write(data)
        self.file.write(tarfile.NUL * pad)
        self.offset += len(header) + len(data) + pad

    def close(self) -> None:
        end = 2 * tarfile.BLOCKSIZE
        self.file.write(tarfile.NUL * (end + -(self.offset + end) % tarfile.RECORDSIZE))
        self.offset = -1


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

    Until ``publish`` the data lives in ``<path>.partial-<host>-<pid>``; ``publish`` fsyncs,
    renames it to ``path`` and returns its summary (sha256, bytes, count,
    keys digest). ``discard`` (or leaving the ``with`` block on an error)
    removes the partial file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial = partial_path(self.path)
        self._file = open(self.partial, "wb")
        self._tar = TarMembers(self._file)
        self._last_key: str | None = None

    def add(self, key: str, label: int, ext: str, payload: bytes) -> None:
        if self._last_key is not None and key <= self._last_key:
            raise ValueError(f"samples must be added in increasing key order ({key!r} after {self._last_key!r})")
        with self._named_errors():
            for name, data in sorted({"cls": str(int(label)).encode(), ext: payload}.items()):  # webdataset's order
                self._tar.add(f"{key}.{name}", data)
        self._last_key = key

    def publish(self) -> dict:
        with self._named_errors():
            self._tar.close()  # the end of the archive, not our file object
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        summary = shard_summary(self.partial)
        os.replace(self.partial, self.path)
        fsync_dir(self.path.parent)
        return summary

    @contextlib.contextmanager
    def _named_errors(self):
        """A failed write (a full disk) names no file: name the shard being written."""
        try:
            yield
        except OSError as e:
            if e.filename is None:
                raise OSError(e.errno, e.strerror, str(self.path)) from e
            raise

    def discard(self) -> None:
        if not self._file.closed:
            with contextlib.suppress(OSError):  # flushing the rest onto a full disk fails again
                self._file.close()
        self.partial.unlink(missing_ok=True)

    def __enter__(self) -> "ShardFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
