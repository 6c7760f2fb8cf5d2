"""The built-in demo dataset: real photographs that ship inside scikit-image.

One class per photograph; every sample is a random crop (random area and
aspect ratio, random horizontal flip) resized to a non-square size and saved as
a JPEG with a random quality and alternating 4:2:0 / 4:4:4 chroma subsampling,
so decode and resize noise is real. Grayscale photographs stay grayscale JPEGs
(the source reader converts them). Deterministic from a seed; ImageFolder
layout ``ROOT/{train,val}/<class>/<class>_<split>_<n>.jpg``.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

# scikit-image's bundled photographs (files in skimage/data, no download needed)
PHOTOS = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "motorcycle": "motorcycle_left.png",
    "hubble": "hubble_deep_field.jpg",
    "retina": "retina.jpg",
    "ihc": "ihc.png",
    "camera": "camera.png",
    "brick": "brick.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
}
VERSION = 1  # bump when the recipe changes, so caches rebuild


def photo(name: str) -> Image.Image:
    import skimage

    path = Path(skimage.__file__).parent / "data" / PHOTOS[name]
    image = Image.open(path)
    image.load()
    return image.convert("L") if image.mode in ("L", "I;16", "1") else image.convert("RGB")


def _sample(image: Image.Image, rng: np.random.Generator, short_side: int) -> Image.Image:
    w, h = image.size
    for _ in range(20):  # RandomResizedCrop-style: area 25-100%, aspect 3/4..4/3
        area = w * h * rng.uniform(0.25, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        cw, ch = min(w, h), min(w, h)
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = image.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    scale = short_side / min(cw, ch)
    return crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BILINEAR)


def build_demo_dataset(root: str | os.PathLike, *, train_per_class: int = 24, val_per_class: int = 6,
                       seed: int = 0, short_side: int = 96) -> Path:
    """Write (or reuse) the demo dataset under ``root``; returns ``root``.

    Reuses an existing build with the same recipe (recorded in ``recipe.json``).
    """
    root = Path(root)
    recipe = {"version": VERSION, "train_per_class": train_per_class, "val_per_class": val_per_class,
              "seed": seed, "short_side": short_side, "photos": PHOTOS}
    stamp = root / "recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return root
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(sorted(PHOTOS)):
            rng = np.random.default_rng([seed, c, 0 if split == "train" else 1])
            image = photo(name)
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                sample = _sample(image, rng, int(short_side * rng.uniform(0.9, 1.3)))
                buf = io.BytesIO()
                sample.save(buf, format="JPEG", quality=int(rng.integers(75, 96)),
                            subsampling=2 if n % 2 == 0 else 0)
                (folder / f"{name}_{split}_{n:04d}.jpg").write_bytes(buf.getvalue())
    stamp.write_text(json.dumps(recipe, indent=1, sort_keys=True))
    return root
