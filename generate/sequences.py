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


def _to_uint8_into(out: np.ndarray, x: np.ndarray) -> None:
    """``out[...] = (np.clip(x, 0, 1) * 255).astype(np.uint8)``: [0, 1] floats to uint8 by truncation
    (torchvision's ToPILImage, numpy's uint8 cast), reusing ``x`` (a float temporary) for the clip
    and the scale."""
    np.clip(x, 0, 1, out=x)
    x *= 255
    out[...] = x  # the same float -> uint8 cast (truncation) as astype


def _frames(count: int, crop: int) -> np.ndarray:
    return np.empty((count, crop, crop, 3), np.uint8)


class _MotionBlur:
    """imagecorruptions' ``_motion_blur`` (the numpy port of ImageMagick's), bit for bit, for many angles
    of one image: the shifted copies are views into one edge-padded image instead of two ``np.roll``
    copies and a fill per kernel tap, and the products and sums run in place in the same order and
    float64 arithmetic (``blurred + kernel[i] * shifted``, starting from zeros)."""

    def __init__(self, image: np.ndarray, radius: int, sigma: float):
        from qrobust.generate import imagecorruptions_compat

        ref = imagecorruptions_compat.apply()
        self.image = image
        self.width = ref.getOptimalKernelWidth1D(radius, sigma)
        self.kernel = ref.getMotionBlurKernel(self.width, sigma)
        pad = [(self.width, self.width), (self.width, self.width)] + [(0, 0)] * (image.ndim - 2)
        self.padded = np.pad(image, pad, mode="edge")  # shifts never exceed the kernel width
        self.term = np.empty(image.shape, np.float64)

    def __call__(self, angle: float) -> np.ndarray:
        h, w = self.image.shape[:2]
        width, pad = self.width, self.width
        point = (width * np.sin(np.deg2rad(angle)), width * np.cos(np.deg2rad(angle)))
        hypot = math.hypot(point[0], point[1])
        blurred = None
        for i in range(width):
            dy = -math.ceil(((i * point[0]) / hypot) - 0.5)
            dx = -math.ceil(((i * point[1]) / hypot) - 0.5)
            if abs(dy) >= h or abs(dx) >= w:  # simulated motion exceeded image borders
                break
            # the reference's shift(image, dx, dy): pixel (r, c) <- image[clip(r - dy), clip(c - dx)]
            shifted = self.padded[pad - dy:pad - dy + h, pad - dx:pad - dx + w]
            if blurred is None:  # float32 zeros + float64 product: the product, as float64
                blurred = np.multiply(shifted, self.kernel[i], dtype=np.float64)
            else:
                np.multiply(shifted, self.kernel[i], out=self.term, dtype=np.float64)
                blurred += self.term
        return np.zeros(self.image.shape, np.float32) if blurred is None else blurred

    def uint8(self, angle: float) -> np.ndarray:
        """The blur rounded to uint8, as ImageMagick's PNG output is."""
        blurred = self(angle)
        np.round(blurred, out=blurred)
        np.clip(blurred, 0, 255, out=blurred)
        return blurred.astype(np.uint8)


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
    params = list(params)
    frames = _frames(len(params), crop)
    for k, p in enumerate(params):
        frames[k] = _crop(make(resized, p), crop)
    return frames


@PERTURBATIONS.register("gaussian_noise")
def gaussian_noise(resized: Image.Image, crop: int, rng: np.random.Generator, difficulty: int = 1) -> np.ndarray:
    """Frame 0 clean; frame i >= 1: clip(x + sigma N(0, 1)), fresh noise per frame (float32, as torch)."""
    clean = _crop(resized, crop)
    x = clean.astype(np.float32) / 255
    sigma = np.float32(GAUSSIAN_SIGMA[difficulty])
    frames = _frames(31, crop)
    frames[0] = clean
    noise = np.empty(x.shape, np.float32)
    for i in range(1, 31):
        rng.standard_normal(x.shape, dtype=np.float32, out=noise)  # the same draws as without out=
        noise *= sigma
        np.add(x, noise, out=noise)  # x + sigma * noise, in float32
        _to_uint8_into(frames[i], noise)
    return frames


@PERTURBATIONS.register("shot_noise")
def shot_noise(resized: Image.Image, crop: int, rng: np.random.Generator, difficulty: int = 1) -> np.ndarray:
    """Frame 0 clean; frame i >= 1: poisson(x lambda) / lambda, fresh per frame."""
    clean = _crop(resized, crop)
    lam = SHOT_LAMBDA[difficulty]
    mean = clean / 255.0 * lam  # the same per frame: computed once
    frames = _frames(31, crop)
    frames[0] = clean
    for i in range(1, 31):
        counts = rng.poisson(mean)
        _to_uint8_into(frames[i], np.true_divide(counts, lam))
    return frames


@PERTURBATIONS.register("motion_blur")
def motion_blur(resized: Image.Image, crop: int, rng: np.random.Generator, difficulty: int = 1) -> np.ndarray:
    """Motion blur radius 10, sigma 3, angle (i - 30) * 4 degrees, i = 0..30 (no clean frame)."""
    blur = _MotionBlur(_crop(resized, crop), 10, 3)
    frames = _frames(31, crop)
    for i in range(31):
        frames[i] = blur.uint8((i - 30) * 4)
    return frames


@PERTURBATIONS.register("zoom_blur")
def zoom_blur(resized: Image.Image, crop: int, rng: np.random.Generator, difficulty: int = 1) -> np.ndarray:
    """Frame 0 clean; frame i: running mean of the crop and zooms 1 + 0.004 j, j = 1..i."""
    clean = _crop(resized, crop)
    total = clean.astype(np.float32) / 255
    frames = _frames(31, crop)
    frames[0] = clean
    for i in range(1, 31):
        zoomed = _crop(affine(resized, scale=1 + 0.004 * i), crop).astype(np.float32)
        zoomed /= 255
        total += zoomed
        _to_uint8_into(frames[i], np.true_divide(total, i + 1, dtype=np.float32))
    return frames


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
    blur = _MotionBlur(_snow_layer(crop, rng), 14, 4)
    frames = _frames(31, crop)
    for i in range(31):
        flakes = (blur.uint8(4 * i - 150) / 255.0)[..., None]
        x = base + flakes
        x += np.rot90(flakes, k=2)
        _to_uint8_into(frames[i], x)
    return frames


@PERTURBATIONS.register("brightness")
def brightness(resized: Image.Image, crop: int, rng: np.random.Generator, difficulty: int = 1) -> np.ndarray:
    """HSV value + (i - 15) * 0.02, i = 0..30."""
    from skimage.color import rgb2hsv

    hsv = rgb2hsv(_crop(resized, crop) / 255.0)
    factors = _hsv2rgb_factors(hsv)
    frames = _frames(31, crop)
    for i in range(31):
        v = np.clip(hsv[..., 2] + (i - 15) * 0.02, 0, 1)
        _to_uint8_into(frames[i], v[..., None] * factors)
    return frames


def _hsv2rgb_factors(hsv: np.ndarray) -> np.ndarray:
    """scikit-image's ``hsv2rgb`` with the value channel factored out: every output channel is
    ``v``, ``p = v * (1 - s)``, ``q = v * (1 - f s)`` or ``t = v * (1 - (1 - f) s)``, chosen by the hue
    sector; this returns the factor (1, 1 - s, 1 - f s or 1 - (1 - f) s) of each channel, so
    ``hsv2rgb(hsv with value v) == v[..., None] * factors`` bit for bit (the same products; v * 1 == v)
    for any v: the brightness frames, which change only the value, need one product each."""
    h, s = hsv[..., 0], hsv[..., 1]
    hi = np.floor(h * 6)
    f = h * 6 - hi
    one = np.ones_like(h)
    p, q, t = 1 - s, 1 - f * s, 1 - (1 - f) * s
    sector = hi.astype(np.uint8) % 6
    table = ((one, t, p), (q, one, p), (p, one, t), (p, q, one), (t, p, one), (one, p, q))  # hsv2rgb's choose
    return np.stack([np.choose(sector, [row[c] for row in table]) for c in range(3)], axis=-1)


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
