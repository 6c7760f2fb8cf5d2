"""Canonical geometry of the clean references (docs/generating.md, "Clean references").

``onecrop``: resize the shorter side (Pillow bilinear, antialiased, exactly what
torchvision's ``Resize(int)`` does on a PIL image), then center crop: the input
of ImageNet-C and of the clean and adversarial evaluation.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size``; the longer one is truncated as torchvision does."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), Image.BILINEAR)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Center crop to ``size`` x ``size`` with torchvision's offsets ``int(round((h - th) / 2))``."""
    w, h = image.size
    if w < size or h < size:
        raise ValueError(f"image of {w}x{h} is smaller than the {size}x{size} crop")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def onecrop(image: Image.Image, resize: int, crop: int) -> np.ndarray:
    """``Resize(resize)`` then ``CenterCrop(crop)`` of an RGB image, as uint8 (crop, crop, 3)."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    return np.asarray(center_crop(resize_shorter(image, resize), crop)).copy()
