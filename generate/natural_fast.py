"""Faster natural corruptions (ImageNet-C), bit-identical to the reference.

Each function in :data:`FUNCTIONS` takes an RGB uint8 (H, W, 3) array and a
severity and returns what :mod:`qrobust.generate.natural`'s reference path
returns (``np.uint8(imagecorruptions.<name>(PIL image, severity))``), bit for
bit, making exactly the reference's calls to NumPy's legacy global generator, in
the same order, so the generator ends in the same state.
``tests/test_natural_fast.py`` compares every corruption, severity and several
images and seeds with the reference, and the kernels below with the scipy
functions they replay, before any rounding to uint8.

How: the same float operations, in the same order, on the same types; only the
interpreter loops, temporaries and unused work go. The numba kernels are
compiled without ``fastmath`` (no reassociation; LLVM fuses no multiply-add it
is not allowed to). Per corruption:

* glass_blur: the reference's per-pixel ``np.random.randint(-d, d, size=(2,))``
  calls become one ``randint(-d, d, size=(N, 2))`` (the legacy generator draws
  every value the same way whatever the batch, range 6 included: same values,
  same final state) and its pixel loop runs compiled. Its "swap"
  ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on numpy views only copies
  ``x[h', w']`` into ``x[h, w]`` (the second view already shows the new value);
  the kernel does just that. Both Gaussian filters: see "Gaussian" below.
* zoom_blur, snow: ``scipy.ndimage.zoom(order=1)`` of the centre crop is replayed
  after scipy's ``NI_ZoomShift``: source coordinate ``k * (n_in - 1) / (n_out -
  1)`` per axis, weights ``1 - x`` and ``1 - (1 - x)``, points beyond the last
  sample 0, the 2x2 corners summed in scipy's order as ``(value * wy) * wx``. The
  channel axis has zoom 1 and weights exactly 1 and 0, so its terms are exact or
  +0.0 and change nothing. zoom_blur computes only the H x W output it keeps
  and adds each layer, rounded to float32, into the float32 sum in the
  reference's order of zoom factors.
* motion_blur, snow: the reference's ``shift`` (``np.roll``, then the edge
  row/column repeated) reads ``x[clamp(r - dy), clamp(c - dx)]``; the kernel adds
  ``kernel[i] * x[...]`` in float64 in the same order of taps, without the
  rolled copies. snow's final blend runs per pixel with the reference's float32
  and float64 steps.
* brightness: scikit-image's rgb2hsv and hsv2rgb per pixel, the same float64
  operations (ties of the maximum resolved as scikit-image does, float ``%``).
* elastic_transform: ``map_coordinates(order=1, mode='reflect')`` of the 3-D
  image with integer channel coordinates is replayed per pixel after scipy's
  ``NI_GeometricTransform`` (reflect mapping, edge taps, corner order).
* Gaussian (glass_blur twice, elastic_transform's two displacement fields):
  ``scipy.ndimage.gaussian_filter``, which scikit-image's ``gaussian`` calls, is
  replayed: axis by axis, scipy's weights, the line extended as ``NI_ExtendLine``
  does ('nearest' or 'reflect'), and for its symmetric kernel ``x[0] * w[0]``
  then ``+= (x[-m] + x[m]) * w[m]`` for m = radius .. 1, as ``NI_Correlate1D``;
  vectorised across lines.
* frost: the decoded, resized frost texture depends only on (texture, image
  size) and is cached per process (read-only), then cropped with the same two
  draws; the blend runs compiled.
* defocus_blur: the disk kernel is cached per severity and the image filtered by
  one 3-channel ``cv2.filter2D`` instead of three 1-channel ones (OpenCV filters
  the channel planes one by one alike, see the function).
* gaussian_noise, shot_noise, impulse_noise, contrast, fog: the reference's draws
  (and contrast's ``np.mean``, fog's plasma fractal), then the elementwise tail
  (scale, add, clip, * 255, to uint8) as one compiled loop. impulse_noise draws
  its seed from the legacy generator as the compatibility mend does and replays
  scikit-image's ``random_noise(mode='s&p')`` (its two ``Generator.random``
  draws) without its unused temporaries.

pixelate and jpeg_compression (Pillow, about half a millisecond each) stay with
the reference.

numba caches the compiled kernels next to this file (``cache=True``); where that
folder is not writable it uses its user-wide cache folder, and where no cache
folder works at all the kernels are compiled once per process instead.
"""
from __future__ import annotations

import functools
import math
import os

import cv2
import numba
import numpy as np
from scipy import ndimage

from qrobust.generate import imagecorruptions_compat

try:  # the weights scipy's gaussian_filter1d correlates with (private; if it moves, scipy's filter is used)
    from scipy.ndimage._filters import _gaussian_kernel1d
except ImportError:  # pragma: no cover
    _gaussian_kernel1d = None


def _njit(fn):
    """``numba.njit(cache=True)``, or without the on-disk cache where no cache folder is usable."""
    try:
        return numba.njit(cache=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(fn)


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


@_njit
def _unit_to_uint8(a, out):
    """out = np.uint8(np.clip(a, 0, 1) * 255) for float64 ``a`` (values in [0, 255] cast by truncation)."""
    flat_a = a.reshape(-1)
    flat_out = out.reshape(-1)
    for i in range(flat_a.size):
        v = flat_a[i]
        v = min(max(v, 0.0), 1.0)
        flat_out[i] = np.uint8(v * 255.0)
    return out


# --------------------------------------------------------------------------- Gaussian filter
# scipy.ndimage.gaussian_filter filters one axis after the other (axes whose sigma
# is 0 are skipped), each with NI_Correlate1D: the line, extended by the mode
# into a float64 buffer (NI_ExtendLine), is correlated with the reversed kernel,
# and for a symmetric kernel (always, for a Gaussian) each output is
# ``x[0] * w[0]``, then ``+= (x[-m] + x[+m]) * w[-m]`` for m = radius .. 1.
# The kernels below run those operations in that order, vectorised across the
# lines instead of along them.


def _extension_map(length, size, mode):
    """Source index of every slot of NI_ExtendLine's buffer (``size`` slots each side), for 'nearest' or 'reflect'."""
    buf = [-1] * size + list(range(length)) + [-1] * size
    first, last = size, size + length
    if mode == "nearest":  # aaaa|abcd|dddd
        for p in range(size):
            buf[p] = 0
            buf[last + p] = length - 1
    elif mode == "reflect":  # the C loops, replayed on indices: dcba|abcd|dcba, then repeating
        src, dst, n = first, first - 1, size
        while n and src < last:
            buf[dst] = buf[src]
            dst, src, n = dst - 1, src + 1, n - 1
        src = last - 1
        while n:
            buf[dst] = buf[src]
            dst, src, n = dst - 1, src - 1, n - 1
        src, dst, n = last - 1, last, size
        while n and src >= first:
            buf[dst] = buf[src]
            dst, src, n = dst + 1, src - 1, n - 1
        src = first
        while n:
            buf[dst] = buf[src]
            dst, src, n = dst + 1, src + 1, n - 1
    else:
        raise ValueError(f"unsupported mode {mode!r}")
    return np.array(buf, dtype=np.int64)


def _gaussian_weights(sigma, truncate):
    """gaussian_filter1d's correlation weights, or None where NI_Correlate1D would not treat them as symmetric."""
    sd = float(sigma)
    lw = int(truncate * sd + 0.5)
    weights = np.ascontiguousarray(_gaussian_kernel1d(sigma, 0, lw)[::-1], dtype=np.float64)
    half = weights.size // 2
    for i in range(1, half + 1):
        if abs(weights[half + i] - weights[half - i]) > np.finfo(np.float64).eps:
            return None
    return weights


@_njit
def _scale_into(acc, a, w):
    for j in range(acc.size):
        acc[j] = a[j] * w


@_njit
def _symmetric_tap(acc, a, b, w):
    for j in range(acc.size):
        acc[j] = acc[j] + (a[j] + b[j]) * w


@_njit
def _correlate_rows(src, weights, ext, out):
    """NI_Correlate1D along axis 0 of a (H, K) float64 array, symmetric weights, extension map ``ext``."""
    half = weights.size // 2
    for r in range(src.shape[0]):
        acc = out[r]
        _scale_into(acc, src[ext[r + half]], weights[half])
        for m in range(half, 0, -1):
            _symmetric_tap(acc, src[ext[r + half - m]], src[ext[r + half + m]], weights[half - m])
    return out


@_njit
def _correlate_columns(src, weights, ext, channels, out):
    """NI_Correlate1D along axis 1 of a (H, W * channels) float64 array (pixels of ``channels`` values)."""
    half = weights.size // 2
    n = src.shape[1]
    width = n // channels
    padded = np.empty((width + 2 * half) * channels, np.float64)
    for r in range(src.shape[0]):
        row = src[r]
        for p in range(width + 2 * half):
            q = ext[p] * channels
            for ch in range(channels):
                padded[p * channels + ch] = row[q + ch]
        acc = out[r]
        _scale_into(acc, padded[half * channels:half * channels + n], weights[half])
        for m in range(half, 0, -1):
            left = (half - m) * channels
            right = (half + m) * channels
            _symmetric_tap(acc, padded[left:left + n], padded[right:right + n], weights[half - m])
    return out


def _gaussian_filter(image, sigmas, mode, truncate):
    """``ndimage.gaussian_filter(image, sigma, mode=mode, cval=0, truncate=truncate)`` for a float64 (H, W)
    or (H, W, C) image, sigma ``sigmas`` on the first two axes and 0 on the channel axis.

    skimage.filters.gaussian (the reference's call) calls exactly that for float64
    input: ``gaussian(x, s, channel_axis=-1)`` with sigma (s, s, 0), mode
    'nearest', truncate 4; elastic_transform's 2-D ``gaussian(x, sigma, mode=
    'reflect', truncate=3)`` with its two sigmas.
    """
    image = np.ascontiguousarray(image, dtype=np.float64)
    height, width = image.shape[:2]
    channels = image.shape[2] if image.ndim == 3 else 1
    rows = [_gaussian_weights(s, truncate) if _gaussian_kernel1d is not None and s > 1e-15 else None
            for s in sigmas]
    if rows[0] is None or rows[1] is None:  # a case this does not mirror: scipy itself
        full = list(sigmas) + [0] * (image.ndim - 2)
        return ndimage.gaussian_filter(image, full, mode=mode, cval=0, truncate=truncate)
    flat = image.reshape(height, width * channels)
    tmp = _correlate_rows(flat, rows[0], _extension_map(height, rows[0].size // 2, mode), np.empty_like(flat))
    out = _correlate_columns(tmp, rows[1], _extension_map(width, rows[1].size // 2, mode), channels,
                             np.empty_like(flat))
    return out.reshape(image.shape)


def _gaussian_rgb(image, sigma):
    """skimage.filters.gaussian(image, sigma, channel_axis=-1) for a float64 (H, W, 3) image."""
    return _gaussian_filter(image, (sigma, sigma), "nearest", 4.0)


# --------------------------------------------------------------------------- noise


@_njit
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


@_njit
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


@_njit
def _impulse_noise_tail(image, flip, salt, amount, out):
    # skimage random_noise('s&p', amount, salt_vs_pepper=0.5): flipped = r1 <= amount, salted = r2 <= 0.5;
    # flipped & salted -> 1, flipped & ~salted -> 0, then clip to [0, 1]; reference: clip * 255, np.uint8
    flat_x, flat_f, flat_s, flat_out = image.reshape(-1), flip.reshape(-1), salt.reshape(-1), out.reshape(-1)
    for i in range(flat_x.size):
        if flat_f[i] <= amount:
            v = 1.0 if flat_s[i] <= 0.5 else 0.0
        else:
            v = flat_x[i] / 255.0
        v = min(max(v, 0.0), 1.0)
        flat_out[i] = np.uint8(v * 255.0)
    return out


@_accelerates
def impulse_noise(image, severity):
    c = [.03, .06, .09, 0.17, 0.27][severity - 1]
    # the compatibility mend's seed draw, then scikit-image's two Generator draws in its order
    seed = int(np.random.randint(0, 2**32, dtype=np.uint64))
    rng = np.random.default_rng(seed)
    flip = rng.random(image.shape)
    salt = rng.random(image.shape)
    return _impulse_noise_tail(image, flip, salt, c, np.empty(image.shape, np.uint8))


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


@_njit
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
    x = np.uint8(_gaussian_rgb(image / 255., sigma) * 255)
    height, width = x.shape[:2]
    n = iterations * max(0, height - 2 * d) * max(0, width - 2 * d)
    offsets = np.random.randint(-d, d, size=(n, 2))  # the n size-(2,) draws of the reference, at once
    _glass_shuffle(x, d, iterations, offsets)
    return _unit_to_uint8(_gaussian_rgb(x / 255., sigma), np.empty(image.shape, np.uint8))


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


@_njit
def _axpy(dst, src, k):
    """dst[j] = dst[j] + k * src[j] (separate arrays, so LLVM vectorizes it; same operations per element)."""
    for j in range(dst.size):
        dst[j] = dst[j] + k * src[j]


@_njit
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


@_njit
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


@_njit
def _zoom_axis(n_in, n_out):
    """scipy NI_ZoomShift's tables along one axis (order 1, mode 'constant', grid_mode False)."""
    zoom = (n_in - 1) / (n_out - 1) if n_out - 1 != 0 else 1.0  # np.divide(..., where=div != 0), else 1
    valid = np.empty(n_out, np.bool_)
    i0 = np.empty(n_out, np.int64)
    i1 = np.empty(n_out, np.int64)
    w0 = np.empty(n_out, np.float64)
    w1 = np.empty(n_out, np.float64)
    for k in range(n_out):
        cc = k * zoom
        # map_coordinate(..., CONSTANT): beyond the last sample -> -1 -> the output point is cval (0)
        valid[k] = not (cc > n_in - 1)
        start = np.floor(cc)
        i0[k] = np.int64(start)
        j = i0[k] + 1
        if j >= n_in:  # edge: the second tap index is mirrored (its weight is 0 there)
            if n_in <= 1:
                j = 0
            else:
                sz2 = 2 * n_in - 2
                j -= sz2 * (j // sz2)
                if j >= n_in:
                    j = sz2 - j
        i1[k] = j
        t = cc - start
        w0[k] = 1.0 - t
        w1[k] = 1.0 - w0[k]  # scipy: the last weight is 1 minus the others
    return valid, i0, i1, w0, w1


@_njit
def _zoom_columns(valid, c0, c1, wx0, wx1, cols, channels):
    """Per output element (column, channel) of a row: flat source indices and weights of the two taps.

    Only the leading valid columns get taps (k * zoom grows with k, so the invalid
    columns, beyond the last source sample, come last); they are returned as ``n``.
    """
    n = 0
    while n < cols and valid[n]:
        n += 1
    i0 = np.empty(n * channels, np.int64)
    i1 = np.empty(n * channels, np.int64)
    u = np.empty(n * channels, np.float64)
    v = np.empty(n * channels, np.float64)
    for c in range(n):
        for ch in range(channels):
            j = c * channels + ch
            i0[j] = c0[c] * channels + ch
            i1[j] = c1[c] * channels + ch
            u[j] = wx0[c]
            v[j] = wx1[c]
    return n, i0, i1, u, v


@_njit
def _scale_rows(s0, s1, wy0, wy1, tmp0, tmp1):
    for j in range(s0.size):
        tmp0[j] = np.float64(s0[j]) * wy0
        tmp1[j] = np.float64(s1[j]) * wy1


@_njit
def _zoom_row(tmp0, tmp1, i0, i1, u, v, line):
    """One output row: scipy sums the four corners with the last axis fastest, (0,0), (0,1), (1,0), (1,1),
    each as ``(value * wy) * wx``; ``tmp0``/``tmp1`` hold the two source rows' ``value * wy``."""
    for j in range(i0.size):
        t = 0.0
        t += tmp0[i0[j]] * u[j]
        t += tmp0[i1[j]] * v[j]
        t += tmp1[i0[j]] * u[j]
        t += tmp1[i1[j]] * v[j]
        line[j] = t


@_njit
def _add_as_f32(dst, line):
    for j in range(line.size):
        dst[j] += np.float32(line[j])  # zoom's float32 output, then the float32 sum


@_njit
def _zoom_add_f32(src, out_h, out_w, acc):
    """acc[:h, :w] += float32(scipy.ndimage.zoom(src, (zh, zw, 1), order=1)[:h, :w]) for float32 src, acc.

    Only the output rows and columns that are kept are computed; points beyond the
    last source sample are 0.0 in scipy, and adding 0.0 changes nothing.
    """
    valid_rows, r0, r1, wy0, wy1 = _zoom_axis(src.shape[0], out_h)
    valid_cols, c0, c1, wx0, wx1 = _zoom_axis(src.shape[1], out_w)
    channels = src.shape[2]
    n, i0, i1, u, v = _zoom_columns(valid_cols, c0, c1, wx0, wx1, min(out_w, acc.shape[1]), channels)
    rows = src.reshape(src.shape[0], -1)
    tmp0 = np.empty(rows.shape[1], np.float64)
    tmp1 = np.empty(rows.shape[1], np.float64)
    line = np.empty(n * channels, np.float64)
    for r in range(min(out_h, acc.shape[0])):
        if valid_rows[r]:
            _scale_rows(rows[r0[r]], rows[r1[r]], wy0[r], wy1[r], tmp0, tmp1)
            _zoom_row(tmp0, tmp1, i0, i1, u, v, line)
            _add_as_f32(acc[r, :n].reshape(-1), line)
    return acc


@_njit
def _zoom_f64(src, out_h, out_w):
    """scipy.ndimage.zoom(src, (zh, zw, 1), order=1) for a float64 (H, W, C) src with output (out_h, out_w, C)."""
    valid_rows, r0, r1, wy0, wy1 = _zoom_axis(src.shape[0], out_h)
    valid_cols, c0, c1, wx0, wx1 = _zoom_axis(src.shape[1], out_w)
    channels = src.shape[2]
    n, i0, i1, u, v = _zoom_columns(valid_cols, c0, c1, wx0, wx1, out_w, channels)
    rows = src.reshape(src.shape[0], -1)
    tmp0 = np.empty(rows.shape[1], np.float64)
    tmp1 = np.empty(rows.shape[1], np.float64)
    out = np.zeros((out_h, out_w, channels), np.float64)  # scipy's cval 0.0 where a point is out of range
    for r in range(out_h):
        if valid_rows[r]:
            _scale_rows(rows[r0[r]], rows[r1[r]], wy0[r], wy1[r], tmp0, tmp1)
            _zoom_row(tmp0, tmp1, i0, i1, u, v, out[r, :n].reshape(-1))
    return out


def _centre_crop_for_zoom(shape, zoom_factor):
    """The reference clipped_zoom's crop (top, height, left, width) and scipy's output size for it."""
    ch0 = int(np.ceil(shape[0] / float(zoom_factor)))
    top0 = (shape[0] - ch0) // 2
    ch1 = int(np.ceil(shape[1] / float(zoom_factor)))
    top1 = (shape[1] - ch1) // 2
    out_h, out_w = int(round(ch0 * zoom_factor)), int(round(ch1 * zoom_factor))  # scipy's output_shape
    return top0, ch0, top1, ch1, out_h, out_w


@_njit
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
            _zoom_add_f32(np.ascontiguousarray(crop), out_h, out_w, out)
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
    snow_layer = _zoom_f64(np.ascontiguousarray(snow_layer[top0:top0 + ch0, top1:top1 + ch1, np.newaxis]),
                           out_h, out_w)
    snow_layer[snow_layer < c[3]] = 0
    snow_layer = np.clip(snow_layer.squeeze(), 0, 1)
    angle = np.random.uniform(-135, -45)
    snow_layer = _shift_sum(snow_layer[..., np.newaxis], *_motion_taps(snow_layer.shape, c[4], c[5], angle))
    snow_layer = np.round(snow_layer * 255).astype(np.uint8)  # the reference then divides by 255.
    gray = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)
    return _snow_tail(x, gray, snow_layer, np.float32(c[6]), np.float32(1 - c[6]), np.empty(image.shape, np.uint8))


@_njit
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


@_njit
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


@_njit
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


@_njit
def _brightness_kernel(image, c, out):
    """skimage rgb2hsv, V += c clipped to [0, 1], skimage hsv2rgb, clip * 255, uint8: per pixel."""
    height, width, _ = image.shape
    for i in range(height):
        for j in range(width):
            r = image[i, j, 0] / 255.0
            g = image[i, j, 1] / 255.0
            b = image[i, j, 2] / 255.0
            # rgb2hsv
            v = max(r, max(g, b))
            delta = v - min(r, min(g, b))  # np.ptp
            if delta == 0.0:
                h = 0.0  # out_h[delta == 0] = 0, out_s[delta == 0] = 0
                s = 0.0
            else:
                s = delta / v
                # skimage assigns red-, then green-, then blue-is-max: the last match wins
                if b == v:
                    h = 4.0 + (r - g) / delta
                elif g == v:
                    h = 2.0 + (b - r) / delta
                else:
                    h = (g - b) / delta
                h = (h / 6.0) % 1.0
            v = min(max(v + c, 0.0), 1.0)
            # hsv2rgb
            hi = np.floor(h * 6)
            f = h * 6 - hi
            p = v * (1 - s)
            q = v * (1 - f * s)
            t = v * (1 - (1 - f) * s)
            sector = np.uint8(hi) % 6
            if sector == 0:
                rr, gg, bb = v, t, p
            elif sector == 1:
                rr, gg, bb = q, v, p
            elif sector == 2:
                rr, gg, bb = p, v, t
            elif sector == 3:
                rr, gg, bb = p, q, v
            elif sector == 4:
                rr, gg, bb = t, p, v
            else:
                rr, gg, bb = v, p, q
            out[i, j, 0] = np.uint8(min(max(rr, 0.0), 1.0) * 255.0)
            out[i, j, 1] = np.uint8(min(max(gg, 0.0), 1.0) * 255.0)
            out[i, j, 2] = np.uint8(min(max(bb, 0.0), 1.0) * 255.0)
    return out


@_accelerates
def brightness(image, severity):
    c = [.1, .2, .3, .4, .5][severity - 1]
    return _brightness_kernel(image, c, np.empty(image.shape, np.uint8))


# --------------------------------------------------------------------------- digital


@_njit
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


@_njit
def _reflect(cc, n):
    """scipy ni_interpolation.c map_coordinate(..., NI_EXTEND_REFLECT)."""
    if cc < 0:
        if n <= 1:
            return 0.0
        sz2 = 2 * n
        if cc < -sz2:
            cc = sz2 * np.int64(-cc / sz2) + cc
        if cc < -n:
            cc = cc + sz2
        else:
            cc = (1e-15 if cc > -1e-15 else -cc) - 1
    elif cc > n - 1:
        if n <= 1:
            return 0.0
        sz2 = 2 * n
        cc -= sz2 * np.int64(cc / sz2)
        if cc >= n:
            cc = sz2 - cc - 1
    return cc


@_njit
def _reflect_taps(cc, n):
    """Start index, both tap indices and weights of order-1 interpolation at cc (mode 'reflect')."""
    cc = _reflect(cc, n)
    start = np.floor(cc)
    i0 = np.int64(start)
    i1 = i0 + 1
    if i0 < 0 or i1 >= n:  # scipy maps both taps at the edges
        i0 = np.int64(_reflect(np.float64(i0), n))
        i1 = np.int64(_reflect(np.float64(i1), n))
    w0 = 1.0 - (cc - start)
    w1 = 1.0 - w0
    return i0, i1, w0, w1


@_njit
def _elastic_map(image, dx, dy, out):
    """map_coordinates(image, (y + dy, x + dx, z), order=1, mode='reflect') into float32 ``out`` (H, W, C)."""
    height, width, channels = image.shape
    for r in range(height):
        for c in range(width):
            # indices = y + dy, x + dx: int64 + float32 -> float64
            r0, r1, wy0, wy1 = _reflect_taps(np.float64(r) + np.float64(dy[r, c]), height)
            c0, c1, wx0, wx1 = _reflect_taps(np.float64(c) + np.float64(dx[r, c]), width)
            for ch in range(channels):
                # scipy's 8 corners, last axis fastest; the channel axis has weights exactly 1 and 0, so
                # its terms are exact or +0.0 (values and weights are >= 0) and leave the sum as it is
                t = 0.0
                t += (np.float64(image[r0, c0, ch]) * wy0) * wx0
                t += (np.float64(image[r0, c1, ch]) * wy0) * wx1
                t += (np.float64(image[r1, c0, ch]) * wy1) * wx0
                t += (np.float64(image[r1, c1, ch]) * wy1) * wx1
                out[r, c, ch] = t  # map_coordinates' float32 output
    return out


@_njit
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
    dx = (_gaussian_filter(np.random.uniform(-max_dx, max_dx, size=shape[:2]), sigma, "reflect", 3)
          * alpha).astype(np.float32)
    dy = (_gaussian_filter(np.random.uniform(-max_dy, max_dy, size=shape[:2]), sigma, "reflect", 3)
          * alpha).astype(np.float32)
    mapped = _elastic_map(x, dx, dy, np.empty(shape, np.float32))
    return _unit_f32_to_uint8(mapped, np.empty(shape, np.uint8))
