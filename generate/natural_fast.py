"""Faster natural corruptions (ImageNet-C), bit-identical to the reference.

Each function in :data:`FUNCTIONS` takes an RGB uint8 (H, W, 3) array and a
severity and returns what :mod:`qrobust.generate.natural`'s reference path
returns (``np.uint8(imagecorruptions.<name>(PIL image, severity))``), bit for
bit, making exactly the reference's calls to NumPy's legacy global generator, in
the same order, so the generator ends in the same state.
``tests/test_natural_fast.py`` compares every corruption, severity and several
images and seeds with the reference.

How: the same float operations, in the same order, on the same types; only the
interpreter loops, temporaries and unused work go. The numba kernels are
compiled without ``fastmath`` (no reassociation; LLVM fuses no multiply-add it
is not allowed to). This module holds the corruptions, what each one does; the
scipy and scikit-image routines they call are replayed in
:mod:`qrobust.generate.replay`. Per corruption:

* glass_blur: the reference's per-pixel ``np.random.randint(-d, d, size=(2,))``
  calls become one ``randint(-d, d, size=(N, 2))`` (the legacy generator draws
  every value the same way whatever the batch, range 6 included: same values,
  same final state) and its pixel loop runs compiled. Its "swap"
  ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on numpy views only copies
  ``x[h', w']`` into ``x[h, w]`` (the second view already shows the new value);
  the kernel does just that. Both Gaussian filters: ``replay.gaussian_rgb``.
* zoom_blur, snow: the reference's ``clipped_zoom`` crops the centre and zooms
  it with ``scipy.ndimage.zoom(order=1)`` (``replay.zoom_add_f32``,
  ``replay.zoom_f64``). zoom_blur computes only the H x W output it keeps and
  adds each layer, rounded to float32, into the float32 sum in the reference's
  order of zoom factors.
* motion_blur, snow: the reference's ``shift`` (``np.roll``, then the edge
  row/column repeated) reads ``x[clamp(r - dy), clamp(c - dx)]``; the kernel adds
  ``kernel[i] * x[...]`` in float64 in the same order of taps, without the
  rolled copies. snow's final blend runs per pixel with the reference's float32
  and float64 steps.
* brightness: scikit-image's HSV round trip with V moved (``replay.hsv_value_shift``).
* elastic_transform: the reference's two displacement fields, smoothed by
  ``replay.gaussian_filter``, then ``replay.map_coordinates_displaced``.
* frost: the decoded, resized frost texture depends only on (texture, image
  size) and is cached per process (read-only), then cropped with the same two
  draws; the blend runs compiled.
* defocus_blur: the disk kernel is cached per severity and the image filtered by
  one 3-channel ``cv2.filter2D`` instead of three 1-channel ones (OpenCV filters
  the channel planes one by one alike, see the function).
* gaussian_noise, shot_noise, contrast, fog: the reference's draws (and
  contrast's ``np.mean``, fog's plasma fractal), then the elementwise tail
  (scale, add, clip, * 255, to uint8) as one compiled loop. impulse_noise draws
  its seed from the legacy generator as the compatibility mend does and hands
  it to ``replay.salt_and_pepper`` (scikit-image's ``random_noise(mode='s&p')``).

pixelate and jpeg_compression (Pillow, about half a millisecond each) stay with
the reference.

The kernels are cached on disk by numba (:func:`~qrobust.generate.replay.cached_njit`).
"""
from __future__ import annotations

import functools
import math
import os

import cv2
import numpy as np

from qrobust.generate import imagecorruptions_compat, replay
from qrobust.generate.replay import cached_njit


def _reference_module():
    return imagecorruptions_compat.apply()


FUNCTIONS: dict = {}  # corruption name -> fn(image, severity) -> uint8, bit-identical to the reference


def _accelerates(fn):
    """Register ``fn`` under its name; it receives the image C-contiguous (the kernels read it flat)."""

    @functools.wraps(fn)
    def run(image, severity):
        return fn(np.ascontiguousarray(image), severity)

    FUNCTIONS[fn.__name__] = run
    return run


# --------------------------------------------------------------------------- helpers


@cached_njit
def _unit_to_uint8(a, out):
    """out = np.uint8(np.clip(a, 0, 1) * 255) for float64 ``a`` (values in [0, 255] cast by truncation)."""
    flat_a = a.reshape(-1)
    flat_out = out.reshape(-1)
    for i in range(flat_a.size):
        v = flat_a[i]
        v = min(max(v, 0.0), 1.0)
        flat_out[i] = np.uint8(v * 255.0)
    return out


# --------------------------------------------------------------------------- noise


@cached_njit
def _gaussian_noise_tail(image, noise, out):
    # reference: np.clip(x / 255. + noise, 0, 1) * 255, then np.uint8
    flat_x, flat_n, flat_out = image.reshape(-1), noise.reshape(-1), out.reshape(-1)
    for i in range(flat_x.size):
        v = flat_x[i] / 255.0 + flat_n[i]
        v = min(max(v, 0.0), 1.0)
        flat_out[i] = np.uint8(v * 255.0)
    return out


@_accelerates
def gaussian_noise(image, severity):
    c = [.08, .12, 0.18, 0.26, 0.38][severity - 1]
    noise = np.random.normal(size=image.shape, scale=c)  # the reference's one draw
    return _gaussian_noise_tail(image, noise, np.empty(image.shape, np.uint8))


@cached_njit
def _shot_noise_tail(counts, c, out):
    # reference: np.clip(counts / float(c), 0, 1) * 255, then np.uint8
    flat_k, flat_out = counts.reshape(-1), out.reshape(-1)
    for i in range(flat_k.size):
        v = flat_k[i] / c
        v = min(max(v, 0.0), 1.0)
        flat_out[i] = np.uint8(v * 255.0)
    return out


@_accelerates
def shot_noise(image, severity):
    c = [60, 25, 12, 5, 3][severity - 1]
    counts = np.random.poisson((image / 255.) * c)  # same lambdas, same draw
    return _shot_noise_tail(counts, float(c), np.empty(image.shape, np.uint8))


@_accelerates
def impulse_noise(image, severity):
    c = [.03, .06, .09, 0.17, 0.27][severity - 1]
    seed = int(np.random.randint(0, 2**32, dtype=np.uint64))  # the compatibility mend's seed draw
    return replay.salt_and_pepper(image, c, seed, np.empty(image.shape, np.uint8))


# --------------------------------------------------------------------------- blur


@functools.lru_cache(maxsize=None)
def _defocus_kernel(radius, alias_blur):
    kernel = _reference_module().disk(radius=radius, alias_blur=alias_blur)
    kernel.setflags(write=False)
    return kernel


@_accelerates
def defocus_blur(image, severity):
    c = [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)][severity - 1]
    x = image / 255.
    kernel = _defocus_kernel(*c)  # deterministic: computed once per severity
    # One 3-channel filter2D instead of three 1-channel ones: for float64 and a kernel of >= 50 taps (17x17
    # and 21x21 here) OpenCV takes its DFT path (crossCorr), whose tiles and DFT sizes depend on the image
    # and kernel sizes only and which filters a multi-channel image one channel plane at a time, with the
    # same operations as a 1-channel image, and copies each plane into place. The tests check it.
    channels = cv2.filter2D(x, -1, kernel)
    return _unit_to_uint8(channels, np.empty(image.shape, np.uint8))  # np.clip(., 0, 1) * 255, np.uint8


@cached_njit
def _glass_shuffle(x, d, iterations, offsets):
    """The reference's pixel loop; ``offsets[k] = (dx, dy)`` is its k-th ``randint(-d, d, size=(2,))``."""
    height, width, channels = x.shape
    k = 0
    for _ in range(iterations):
        for h in range(height - d, d, -1):
            for w in range(width - d, d, -1):
                dx = offsets[k, 0]
                dy = offsets[k, 1]
                k += 1
                hp = h + dy
                wp = w + dx
                # ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on views: x[h, w] takes x[h', w'], which stays
                for ch in range(channels):
                    x[h, w, ch] = x[hp, wp, ch]
    return x


@_accelerates
def glass_blur(image, severity):
    sigma, d, iterations = [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)][severity - 1]
    x = np.uint8(replay.gaussian_rgb(image / 255., sigma) * 255)
    height, width = x.shape[:2]
    n = iterations * max(0, height - 2 * d) * max(0, width - 2 * d)
    offsets = np.random.randint(-d, d, size=(n, 2))  # the n size-(2,) draws of the reference, at once
    _glass_shuffle(x, d, iterations, offsets)
    return _unit_to_uint8(replay.gaussian_rgb(x / 255., sigma), np.empty(image.shape, np.uint8))


def _motion_taps(shape, radius, sigma, angle):
    """Kernel weights and (dy, dx) shifts of the reference's ``_motion_blur``, up to its border break."""
    ref = _reference_module()
    width = ref.getOptimalKernelWidth1D(radius, sigma)
    kernel = ref.getMotionBlurKernel(width, sigma)
    point = (width * np.sin(np.deg2rad(angle)), width * np.cos(np.deg2rad(angle)))
    hypot = math.hypot(point[0], point[1])
    dys, dxs = [], []
    for i in range(width):
        dy = -math.ceil(((i * point[0]) / hypot) - 0.5)
        dx = -math.ceil(((i * point[1]) / hypot) - 0.5)
        if np.abs(dy) >= shape[0] or np.abs(dx) >= shape[1]:
            break  # simulated motion exceeded image borders
        dys.append(dy)
        dxs.append(dx)
    n = len(dys)
    return (np.ascontiguousarray(kernel[:n], dtype=np.float64),
            np.array(dys, dtype=np.int64), np.array(dxs, dtype=np.int64))


@cached_njit
def _axpy(dst, src, k):
    """dst[j] = dst[j] + k * src[j] (separate arrays, so LLVM vectorizes it; same operations per element)."""
    for j in range(dst.size):
        dst[j] = dst[j] + k * src[j]


@cached_njit
def _shift_sum(x, kernel, dys, dxs):
    """sum_i kernel[i] * shift(x, dx_i, dy_i) in float64, summed in i order, for x of shape (H, W, C).

    The reference's ``shift`` (``np.roll``, then the edge column/row repeated over
    what wrapped around) reads ``x[clamp(r - dy), clamp(c - dx)]``. Row by row,
    each tap adds ``kernel[i] * x[...]`` to the row sum: the columns that read
    column 0 or W-1, then the contiguous middle.
    """
    height, width, channels = x.shape
    out = np.empty((height, width, channels), np.float64)
    rows = x.reshape(height, width * channels)
    for r in range(height):
        line = out[r].reshape(-1)
        line[:] = 0.0  # the reference's sum starts at zeros too (float32, made float64 by the first add)
        for i in range(kernel.size):
            k = kernel[i]
            dx = dxs[i]
            src = rows[min(max(r - dys[i], 0), height - 1)]
            lo = min(max(dx, 0), width)  # columns c < lo read column 0 (dx > 0)
            hi = max(min(width + dx, width), lo)  # columns c >= hi read column W-1 (dx < 0)
            for c in range(lo):
                for ch in range(channels):
                    line[c * channels + ch] = line[c * channels + ch] + k * src[ch]
            if hi > lo:
                _axpy(line[lo * channels:hi * channels], src[(lo - dx) * channels:(hi - dx) * channels], k)
            for c in range(hi, width):
                for ch in range(channels):
                    line[c * channels + ch] = line[c * channels + ch] + k * src[(width - 1) * channels + ch]
    return out


@cached_njit
def _clip255_to_uint8(a, out):
    flat_a, flat_out = a.reshape(-1), out.reshape(-1)
    for i in range(flat_a.size):
        flat_out[i] = np.uint8(min(max(flat_a[i], 0.0), 255.0))
    return out


@_accelerates
def motion_blur(image, severity):
    radius, sigma = [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)][severity - 1]
    angle = np.random.uniform(-45, 45)
    taps = _motion_taps(image.shape, radius, sigma, angle)
    blurred = _shift_sum(image, *taps)
    return _clip255_to_uint8(blurred, np.empty(image.shape, np.uint8))  # np.clip(x, 0, 255), np.uint8


def _centre_crop_for_zoom(shape, zoom_factor):
    """The reference clipped_zoom's crop (top, height, left, width) and scipy's output size for it."""
    ch0 = int(np.ceil(shape[0] / float(zoom_factor)))
    top0 = (shape[0] - ch0) // 2
    ch1 = int(np.ceil(shape[1] / float(zoom_factor)))
    top1 = (shape[1] - ch1) // 2
    out_h, out_w = int(round(ch0 * zoom_factor)), int(round(ch1 * zoom_factor))  # scipy's output_shape
    return top0, ch0, top1, ch1, out_h, out_w


@cached_njit
def _zoom_blur_tail(x, out, n, result):
    # reference: x = (x + out) / (len(c) + 1) in float32; np.clip(x, 0, 1) * 255 (float32); np.uint8
    flat_x, flat_o, flat_r = x.reshape(-1), out.reshape(-1), result.reshape(-1)
    for i in range(flat_x.size):
        v = (flat_x[i] + flat_o[i]) / n
        v = min(max(v, np.float32(0)), np.float32(1))
        flat_r[i] = np.uint8(v * np.float32(255))
    return result


@_accelerates
def zoom_blur(image, severity):
    factors = [np.arange(1, 1.11, 0.01),
               np.arange(1, 1.16, 0.01),
               np.arange(1, 1.21, 0.02),
               np.arange(1, 1.26, 0.02),
               np.arange(1, 1.31, 0.03)][severity - 1]
    x = (image / 255.).astype(np.float32)
    out = np.zeros_like(x)
    for zoom_factor in factors:
        top0, ch0, top1, ch1, out_h, out_w = _centre_crop_for_zoom(x.shape, zoom_factor)
        crop = x[top0:top0 + ch0, top1:top1 + ch1]
        if zoom_factor == 1:  # scipy returns a copy of the input for zoom 1
            out[:ch0, :ch1] += crop
        else:
            replay.zoom_add_f32(np.ascontiguousarray(crop), out_h, out_w, out)
    return _zoom_blur_tail(x, out, np.float32(len(factors) + 1), np.empty(image.shape, np.uint8))


# --------------------------------------------------------------------------- weather


@_accelerates
def snow(image, severity):
    c = [(0.1, 0.3, 3, 0.5, 10, 4, 0.8),
         (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
         (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
         (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
         (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)][severity - 1]
    x = np.array(image, dtype=np.float32) / 255.
    snow_layer = np.random.normal(size=x.shape[:2], loc=c[0], scale=c[1])
    top0, ch0, top1, ch1, out_h, out_w = _centre_crop_for_zoom(snow_layer.shape, c[2])
    snow_layer = replay.zoom_f64(np.ascontiguousarray(snow_layer[top0:top0 + ch0, top1:top1 + ch1, np.newaxis]),
                           out_h, out_w)
    snow_layer[snow_layer < c[3]] = 0
    snow_layer = np.clip(snow_layer.squeeze(), 0, 1)
    angle = np.random.uniform(-135, -45)
    snow_layer = _shift_sum(snow_layer[..., np.newaxis], *_motion_taps(snow_layer.shape, c[4], c[5], angle))
    snow_layer = np.round(snow_layer * 255).astype(np.uint8)  # the reference then divides by 255.
    gray = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)
    return _snow_tail(x, gray, snow_layer, np.float32(c[6]), np.float32(1 - c[6]), np.empty(image.shape, np.uint8))


@cached_njit
def _snow_tail(x, gray, snow_u8, c6, one_minus_c6, out):
    """The reference's last two lines, per pixel, with its types.

    x = c6 * x + (1 - c6) * np.maximum(x, gray * 1.5 + 0.5) is float32 throughout
    (Python floats meet a float32 array as float32); adding the float64 snow layer
    and its 180-degree rotation (cropped to H x W first) makes float64; then clip,
    * 255, uint8.
    """
    height, width, channels = x.shape
    for r in range(height):
        for c in range(width):
            lifted = gray[r, c] * np.float32(1.5) + np.float32(0.5)
            flake = snow_u8[r, c, 0] / 255.0
            flake_rotated = snow_u8[height - 1 - r, width - 1 - c, 0] / 255.0
            for ch in range(channels):
                v = x[r, c, ch]
                blended = c6 * v + one_minus_c6 * max(v, lifted)
                total = (np.float64(blended) + flake) + flake_rotated
                total = min(max(total, 0.0), 1.0)
                out[r, c, ch] = np.uint8(total * 255.0)
    return out


_FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")


@functools.lru_cache(maxsize=20)  # 5 textures x a few image sizes; a 224 x 224 run needs 5 (about 2 MB each)
def _frost_texture(idx, height, width):
    """The reference's frost texture ``idx`` read and resized for an image of this size (read-only)."""
    folder = os.path.join(os.path.dirname(_reference_module().__file__), "frost")
    frost = cv2.imread(os.path.join(folder, _FROST_FILES[idx]))
    if frost is None:
        raise FileNotFoundError(f"cannot read frost texture {_FROST_FILES[idx]} in {folder}")
    frost_shape = frost.shape
    x_shape = (height, width, 3)
    # the reference's scaling rule, verbatim
    scaling_factor = 1
    if frost_shape[0] >= x_shape[0] and frost_shape[1] >= x_shape[1]:
        scaling_factor = 1
    elif frost_shape[0] < x_shape[0] and frost_shape[1] >= x_shape[1]:
        scaling_factor = x_shape[0] / frost_shape[0]
    elif frost_shape[0] >= x_shape[0] and frost_shape[1] < x_shape[1]:
        scaling_factor = x_shape[1] / frost_shape[1]
    elif frost_shape[0] < x_shape[0] and frost_shape[1] < x_shape[1]:
        scaling_factor_0 = x_shape[0] / frost_shape[0]
        scaling_factor_1 = x_shape[1] / frost_shape[1]
        scaling_factor = np.maximum(scaling_factor_0, scaling_factor_1)
    scaling_factor *= 1.1
    new_shape = (int(np.ceil(frost_shape[1] * scaling_factor)), int(np.ceil(frost_shape[0] * scaling_factor)))
    rescaled = cv2.resize(frost, dsize=new_shape, interpolation=cv2.INTER_CUBIC)
    rescaled.setflags(write=False)
    return rescaled


@cached_njit
def _frost_tail(image, frost_bgr, c0, c1, out):
    # reference: np.clip(c0 * x + c1 * frost[..., [2, 1, 0]], 0, 255), then np.uint8
    height, width, _ = image.shape
    for r in range(height):
        for c in range(width):
            for ch in range(3):
                v = c0 * np.float64(image[r, c, ch]) + c1 * np.float64(frost_bgr[r, c, 2 - ch])
                out[r, c, ch] = np.uint8(min(max(v, 0.0), 255.0))
    return out


@_accelerates
def frost(image, severity):
    c = [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)][severity - 1]
    idx = np.random.randint(5)
    height, width = image.shape[:2]
    rescaled = _frost_texture(idx, height, width)  # the same bytes cv2.imread + cv2.resize give each call
    x_start, y_start = (np.random.randint(0, rescaled.shape[0] - height),
                        np.random.randint(0, rescaled.shape[1] - width))
    crop = rescaled[x_start:x_start + height, y_start:y_start + width]
    return _frost_tail(image, crop, float(c[0]), float(c[1]), np.empty(image.shape, np.uint8))


@cached_njit
def _fog_tail(x, plasma, c0, max_val, out):
    # reference: x += c0 * plasma[..., None]; np.clip(x * max_val / (max_val + c0), 0, 1) * 255; np.uint8
    height, width, channels = x.shape
    denominator = max_val + c0
    for r in range(height):
        for c in range(width):
            p = c0 * plasma[r, c]
            for ch in range(channels):
                v = x[r, c, ch] + p
                v = v * max_val / denominator
                v = min(max(v, 0.0), 1.0)
                out[r, c, ch] = np.uint8(v * 255.0)
    return out


@_accelerates
def fog(image, severity):
    c = [(1.5, 2), (2., 2), (2.5, 1.7), (2.5, 1.5), (3., 1.4)][severity - 1]
    height, width = image.shape[:2]
    map_size = _reference_module().next_power_of_2(int(max(image.shape)))
    x = image / 255.
    max_val = x.max()
    plasma = _reference_module().plasma_fractal(mapsize=map_size, wibbledecay=c[1])[:height, :width]
    return _fog_tail(x, np.ascontiguousarray(plasma), float(c[0]), float(max_val), np.empty(image.shape, np.uint8))


@_accelerates
def brightness(image, severity):
    c = [.1, .2, .3, .4, .5][severity - 1]
    return replay.hsv_value_shift(image, c, np.empty(image.shape, np.uint8))


# --------------------------------------------------------------------------- digital


@cached_njit
def _contrast_tail(image, means, c, out):
    # reference: x = x / 255.; np.clip((x - means) * c + means, 0, 1) * 255; np.uint8
    height, width, channels = image.shape
    for r in range(height):
        for col in range(width):
            for ch in range(channels):
                m = means[ch]
                v = (image[r, col, ch] / 255.0 - m) * c + m
                v = min(max(v, 0.0), 1.0)
                out[r, col, ch] = np.uint8(v * 255.0)
    return out


@_accelerates
def contrast(image, severity):
    c = [0.4, .3, .2, .1, .05][severity - 1]
    x = image / 255.
    means = np.mean(x, axis=(0, 1), keepdims=True)  # numpy's own summation order
    return _contrast_tail(image, means.reshape(-1), c, np.empty(image.shape, np.uint8))


@cached_njit
def _unit_f32_to_uint8(a, out):
    """out = np.uint8(np.clip(a, 0, 1) * 255) for float32 ``a`` (float32 arithmetic, as numpy does)."""
    flat_a, flat_out = a.reshape(-1), out.reshape(-1)
    for i in range(flat_a.size):
        v = min(max(flat_a[i], np.float32(0)), np.float32(1))
        flat_out[i] = np.uint8(v * np.float32(255))
    return out


@_accelerates
def elastic_transform(image, severity):
    x = np.array(image, dtype=np.float32) / 255.
    shape = x.shape
    sigma = np.array(shape[:2]) * 0.01
    alpha = [250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12][severity - 1]
    max_dx = shape[0] * 0.005
    max_dy = shape[0] * 0.005
    # skimage.filters.gaussian(a, sigma, mode='reflect', truncate=3) on a 2-D float64 array; draws in the same order
    dx = (replay.gaussian_filter(np.random.uniform(-max_dx, max_dx, size=shape[:2]), sigma, "reflect", 3)
          * alpha).astype(np.float32)
    dy = (replay.gaussian_filter(np.random.uniform(-max_dy, max_dy, size=shape[:2]), sigma, "reflect", 3)
          * alpha).astype(np.float32)
    mapped = replay.map_coordinates_displaced(x, dx, dy, np.empty(shape, np.float32))
    return _unit_f32_to_uint8(mapped, np.empty(shape, np.uint8))
