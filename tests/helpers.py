"""Test helpers: real photographs (shipped with scikit-image), image folders
made from them, and small suites so generation tests run in seconds."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from qrobust.shared.demo_data import photo


def photo_crop(name: str, size: int) -> np.ndarray:
    """A real photo, shorter side resized to ``size`` and center-cropped square (uint8 RGB)."""
    from qrobust.shared.preprocess import onecrop

    return onecrop(photo(name).convert("RGB"), size, size)


def save_jpeg(path: Path, image: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, **kw)
    path.write_bytes(buf.getvalue())
    return path


def make_class_folder(root: Path, per_class: int = 2, size: int = 80,
                      names=("astronaut", "chelsea", "coffee")) -> Path:
    """An ImageFolder of real photo crops: ``root/<photo>/<photo>_<n>.jpg``, non-square, 4:2:0."""
    for name in names:
        full = photo(name).convert("RGB")
        w, h = full.size
        for n in range(per_class):
            box = (n * w // 10, 0, w - n * w // 12, h)  # different non-square crops
            crop = full.crop(box)
            crop = crop.resize((size * crop.width // crop.height, size), Image.BILINEAR)
            save_jpeg(root / name / f"{name}_{n}.jpg", crop)
    return root


SMALL_SUITE = """
name = "small"
seed = 7
[geometry]
resize = 40
crop = 36
[shards]
samples = {shard}
[clean]
variants = ["onecrop", "square"]
encoding = "png"
[natural]
corruptions = {corruptions}
severities = {severities}
encoding = "jpg"
jpeg_quality = 85
[sequence]
perturbations = ["gaussian_noise", "rotate"]
encoding = "lossless"
[systematic]
decoders = ["ffmpeg"]
resizes = ["opencv-area"]
"""


def write_suite(path: Path, corruptions=("gaussian_noise", "impulse_noise", "fog"), severities=(1, 3),
                shard: int = 2) -> Path:
    path.write_text(SMALL_SUITE.format(shard=shard, corruptions=list(corruptions), severities=list(severities))
                    .replace("'", '"'))
    return path


