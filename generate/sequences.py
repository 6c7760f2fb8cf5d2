"""Perturbation sequences (ImageNet-P): 10 perturbations, one video per sample.

Each perturbation follows the reference generator (hendrycks/robustness,
``ImageNet-P/create_p/make_imagenet_p.py``): frame counts, per-frame
parameters and pixel arithmetic (float in [0, 1], truncation to uint8). The
photometric and noise perturbations act on the center crop; the geometric ones
(translate, rotate, scale, zoom_blur, tilt) on the whole resized image, which
is cropped afterwards. Two substitutions, both recorded here:

* motion blur: the reference calls ImageMagick's MagickMotionBlurImage; we use
  imagecorruptions' numpy port of it (same kernel and offsets), rounded to
  uint8 as ImageMagick's PNG output is;
* randomness: the reference draws unseeded from torch (gaussian_noise) and
  numpy (shot_noise, snow); here every sample has its own seeded generator.

Every function returns uint8 frames (T, crop, crop, 3).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image

from qrobust.shared.preprocess import center_crop
from qrobust.shared.registry import Registry

GAUSSIAN_SIGMA = {1: 0.03, 2: 0.05, 3: 0.08}
MIN_SIDE = 32  # the snow blur kernel is 29 px wide; below this the numpy port darkens the borders
SHOT_LAMBDA = {1: 300, 2: 120, 3: 60}

Perturbation = Callable[[Image.Image, int, np.random.Generator, int], np.ndarray]
PERTURBATIONS: Registry[Perturbation] = Registry("sequence perturbation")


def _crop(resized: Image.Image, crop: int) -> np.ndarray:
    return np.asarray(center_crop(resized, crop))


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats to uint8 by truncation (torchvision's ToPILImage, numpy's uint8 cast)."""
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)


def _motion_blur(image: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
    from qrobust.generate import imagecorruptions_compat

    blurred = imagecorruptions_compat.apply()._motion_blur(image, radius=radius, sigma=sigma, angle=angle)
    return np.clip(np.round(blurred), 0, 255).astype(np.uint8)


def affine(image: Image.Image, angle: float = 0.0, translate: tuple[float, float] = (0, 0), scale: float = 1.0,
           resample=Image.BILINEAR) -> Image.Image:
    """torchvision 0.2's ``F.affine`` (what the reference called): rotate ``angle`` degrees
    clockwise, scale and translate about the centre ``(w/2 + 0.5, h/2 + 0.5)``, black fill."""
    w, h = image.size
    cx, cy = w * 0.5 + 0.5, h * 0.5 + 0.5
    a = math.radians(angle)
    # inverse map (output -> input) for PIL: rotation by -a, scaled by 1/scale
    m = [math.cos(a) / scale, math.sin(a) / scale, 0.0, -math.sin(a) / scale, math.cos(a) / scale, 0.0]
    tx, ty = translate
    m[2] = cx + m[0] * (-cx - tx) + m[1] * (-cy - ty)
    m[5] = cy + m[3] * (-cx - tx) + m[4] * (-cy - ty)
    return image.transform((w, h), Image.AFFINE, m, resample=resample, fillcolor=(0, 0, 0))


def _geometric(resized: Image.Image, crop: int, params, make) -> np.ndarray:
    return np.stack([_crop(make(resized, p), crop) for p in params])


@PERTURBATIONS.register("gaussian_noise")
def gaussian_noise(resized: Image.Image, crop: int, rng: np.random.Generator, difficulty: int = 1) -> np.ndarray:
    """Frame 0 clean; frame i >= 1: clip(x + sigma N(0, 1)), fresh noise per frame (float32, as torch)."""
    clean = _crop(resized, crop)
    x = clean.astype(np.float32) / 255
    sigma = np.float32(GAUSSIAN_SIGMA[difficulty])
    frames = [clean] + [_to_uint8(x + sigma * rng.standard_normal(x.shape, dtype=np.float32)) for _ in range(30)]
    return np.stack(frames)


@PERTURBATIONS.register("shot_noise")
def shot_noise(resized: Image.Image, crop: int, rng: np.random.Generator, difficulty: int = 1) -> np.ndarray:
    """Frame 0 clean; frame i >= 1: poisson(x lambda) / lambda, fresh per frame."""
    clean = _crop(resized, crop)
    x = clean / 255.0
    lam = SHOT_LAMBDA[difficulty]
    return np.stack([clean] + [_to_uint8(rng.poisson(x * lam) / lam) for _ in range(30)])


@PERTURBATIONS.register("motion_blur")
def motion_blur(resized: Image.Image, crop: int, rng: np.random.Generator, difficulty: int = 1) -> np.ndarray:
    """Motion blur radius 10, sigma 3, angle (i - 30) * 4 degrees, i = 0..30 (no clean frame)."""
    clean = _crop(resized, crop)
    return np.stack([_motion_blur(clean, 10, 3, (i - 30) * 4) for i in range(31)])


@PERTURBATIONS.register("zoom_blur")
def zoom_blur(resized: Image.Image, crop: int, rng: np.random.Generator, difficulty: int = 1) -> np.ndarray:
    """Frame 0 clean; frame i: running mean of the crop and zooms 1 + 0.004 j, j = 1..i."""
    clean = _crop(resized, crop)
    total = clean.astype(np.float32) / 255
    frames = [clean]
    for i in range(1, 31):
        total = total + _crop(affine(resized, scale=1 + 0.004 * i), crop).astype(np.float32) / 255
        frames.append(_to_uint8(total / (i + 1)))
    return np.stack(frames)


def _snow_layer(size: int, rng: np.random.Generator) -> np.ndarray:
    """The reference's snow layer (drawn once per video), as the 8-bit image it saved."""
    from scipy.ndimage import zoom

    layer = rng.normal(loc=0.05, scale=0.3, size=(size, size))
    side = int(np.ceil(size / 3))
    top = (size - side) // 2
    layer = zoom(layer[top:top + side, top:top + side], 3, order=1)
    trim = (layer.shape[0] - size) // 2
    layer = layer[trim:trim + size, trim:trim + size]
    layer[layer < 0.5] = 0
    return (np.clip(layer, 0, 1) * 255).astype(np.uint8)


@PERTURBATIONS.register("snow")
def snow(resized: Image.Image, crop: int, rng: np.random.Generator, difficulty: int = 1) -> np.ndarray:
    """A fixed snow layer, motion-blurred with radius 14, sigma 4, angle 4 i - 150, over a whitened image."""
    import cv2

    x = _crop(resized, crop) / 255.0
    gray = cv2.cvtColor(x.astype(np.float32), cv2.COLOR_RGB2GRAY)[..., None]
    base = 0.85 * x + 0.15 * np.maximum(x, gray * 1.5 + 0.5)
    layer = _snow_layer(crop, rng)
    frames = []
    for i in range(31):
        flakes = (_motion_blur(layer, 14, 4, 4 * i - 150) / 255.0)[..., None]
        frames.append(_to_uint8(base + flakes + np.rot90(flakes, k=2)))
    return np.stack(frames)


@PERTURBATIONS.register("brightness")
def brightness(resized: Image.Image, crop: int, rng: np.random.Generator, difficulty: int = 1) -> np.ndarray:
    """HSV value + (i - 15) * 0.02, i = 0..30."""
    from skimage.color import hsv2rgb, rgb2hsv

    hsv = rgb2hsv(_crop(resized, crop) / 255.0)
    frames = []
    for i in range(31):
        shifted = hsv.copy()
        shifted[..., 2] = np.clip(shifted[..., 2] + (i - 15) * 0.02, 0, 1)
        frames.append(_to_uint8(hsv2rgb(shifted)))
    return np.stack(frames)


@PERTURBATIONS.register("translate")
def translate(resized: Image.Image, crop: int, rng: np.random.Generator, difficulty: int = 1) -> np.ndarray:
    """41 frames: horizontal shift by i - 20 pixels (nearest, black fill), then crop."""
    return _geometric(resized, crop, range(-20, 21),
                      lambda im, dx: affine(im, translate=(dx, 0), resample=Image.NEAREST))


@PERTURBATIONS.register("rotate")
def rotate(resized: Image.Image, crop: int, rng: np.random.Generator, difficulty: int = 1) -> np.ndarray:
    """Rotation by i - 15 degrees (bilinear), then crop."""
    return _geometric(resized, crop, range(-15, 16), lambda im, a: affine(im, angle=a))


@PERTURBATIONS.register("scale")
def scale(resized: Image.Image, crop: int, rng: np.random.Generator, difficulty: int = 1) -> np.ndarray:
    """Zoom by (2.5 i + 40) / 100, i = 0..30 (bilinear, black fill), then crop."""
    return _geometric(resized, crop, [(2.5 * i + 40) / 100 for i in range(31)], lambda im, s: affine(im, scale=s))


def tilt_matrix(w: int, h: int, degrees: float) -> np.ndarray:
    """The reference's perspective map for a tilt of ``degrees`` about both axes (phi = theta)."""
    t = math.radians(degrees)
    f = math.hypot(w, h)
    to_3d = np.array([[1, 0, -w / 2], [0, 1, -h / 2], [0, 0, 1], [0, 0, 1]], dtype=np.float64)
    rx = np.array([[1, 0, 0, 0], [0, math.cos(t), -math.sin(t), 0], [0, math.sin(t), math.cos(t), 0],
                   [0, 0, 0, 1]])
    ry = np.array([[math.cos(t), 0, -math.sin(t), 0], [0, 1, 0, 0], [math.sin(t), 0, math.cos(t), 0],
                   [0, 0, 0, 1]])
    move = np.eye(4)
    move[2, 3] = f
    to_2d = np.array([[f, 0, w / 2, 0], [0, f, h / 2, 0], [0, 0, 1, 0]], dtype=np.float64)
    return to_2d @ move @ rx @ ry @ to_3d


@PERTURBATIONS.register("tilt")
def tilt(resized: Image.Image, crop: int, rng: np.random.Generator, difficulty: int = 1) -> np.ndarray:
    """Perspective tilt by i - 15 degrees about both axes (OpenCV, bilinear, black border), then crop."""
    import cv2

    x = np.asarray(resized)
    h, w = x.shape[:2]
    frames = []
    for i in range(31):
        warped = cv2.warpPerspective(x, tilt_matrix(w, h, i - 15), (w, h))
        frames.append(_crop(Image.fromarray(warped), crop))
    return np.stack(frames)


def render_sequence(resized: Image.Image, crop: int, perturbation: str, difficulty: int, seed: int) -> np.ndarray:
    """The frames of one sequence variant for one sample (deterministic in ``seed``)."""
    fn = PERTURBATIONS.get(perturbation)
    return fn(resized, crop, np.random.default_rng(seed), difficulty)
