"""scipy / scikit-image routines replayed operation for operation, so the accelerated corruptions stay
bit-identical to the reference.

The reference ImageNet-C corruptions spend most of their time in library calls;
the kernels here return what those calls return, bit for bit: the same float
operations, in the same order, on the same types, compiled by numba without
``fastmath`` (no reassociation; LLVM fuses no multiply-add it is not allowed
to). Only the interpreter loops, temporaries and unused work go. They live apart
from :mod:`qrobust.generate.natural_fast` (the corruptions themselves) because
each is checked against the library routine it replays, before any rounding to
uint8 (``tests/test_natural_fast.py``), not against a corruption.

* :func:`gaussian_filter`, :func:`gaussian_rgb`: ``scipy.ndimage.gaussian_filter``
  (which scikit-image's ``gaussian`` calls), as ``NI_ExtendLine`` and
  ``NI_Correlate1D`` compute it; see the section's comment.
* :func:`zoom_add_f32`, :func:`zoom_f64`: ``scipy.ndimage.zoom(order=1)`` after
  scipy's ``NI_ZoomShift``: source coordinate ``k * (n_in - 1) / (n_out - 1)``
  per axis, weights ``1 - x`` and ``1 - (1 - x)``, points beyond the last sample
  0, the 2x2 corners summed in scipy's order as ``(value * wy) * wx``. The
  channel axis has zoom 1 and weights exactly 1 and 0, so its terms are exact or
  +0.0 and change nothing.
* :func:`map_coordinates_displaced`: ``map_coordinates(order=1, mode='reflect')``
  per pixel after scipy's ``NI_GeometricTransform`` (reflect mapping, edge taps,
  corner order).
* :func:`hsv_value_shift`: scikit-image's ``rgb2hsv`` and ``hsv2rgb``, the same
  float64 operations (ties of the maximum resolved as scikit-image does, float ``%``).
* :func:`salt_and_pepper`: scikit-image's ``random_noise(mode='s&p')``.

No compiled kernel of another module calls into these; each is called from
Python. numba keys a cached kernel on its own source file only, so a kernel
compiled into another file's kernel would keep its old code there after an edit
here. That is why :func:`hsv_value_shift` and :func:`salt_and_pepper` end in the
corruptions' ``np.uint8(np.clip(x, 0, 1) * 255)`` instead of leaving it to a
second loop.
"""
from __future__ import annotations

import numba
import numpy as np
from scipy import ndimage

try:  # the weights scipy's gaussian_filter1d correlates with (private; if it moves, scipy's filter is used)
    from scipy.ndimage._filters import _gaussian_kernel1d
except ImportError:  # pragma: no cover
    _gaussian_kernel1d = None


def cached_njit(fn):
    """``numba.njit(cache=True)``, or without the on-disk cache where no cache folder is usable.

    numba caches the compiled kernels next to the module that defines them; where
    that folder is not writable it uses its user-wide cache folder, and where no
    cache folder works at all the kernels are compiled once per process instead.
    """
    try:
        return numba.njit(cache=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(fn)


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


@cached_njit
def _scale_into(acc, a, w):
    for j in range(acc.size):
        acc[j] = a[j] * w


@cached_njit
def _symmetric_tap(acc, a, b, w):
    for j in range(acc.size):
        acc[j] = acc[j] + (a[j] + b[j]) * w


@cached_njit
def _correlate_rows(src, weights, ext, out):
    """NI_Correlate1D along axis 0 of a (H, K) float64 array, symmetric weights, extension map ``ext``."""
    half = weights.size // 2
    for r in range(src.shape[0]):
        acc = out[r]
        _scale_into(acc, src[ext[r + half]], weights[half])
        for m in range(half, 0, -1):
            _symmetric_tap(acc, src[ext[r + half - m]], src[ext[r + half + m]], weights[half - m])
    return out


@cached_njit
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


def gaussian_filter(image, sigmas, mode, truncate):
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


def gaussian_rgb(image, sigma):
    """skimage.filters.gaussian(image, sigma, channel_axis=-1) for a float64 (H, W, 3) image."""
    return gaussian_filter(image, (sigma, sigma), "nearest", 4.0)


# --------------------------------------------------------------------------- zoom


@cached_njit
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


@cached_njit
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


@cached_njit
def _scale_rows(s0, s1, wy0, wy1, tmp0, tmp1):
    for j in range(s0.size):
        tmp0[j] = np.float64(s0[j]) * wy0
        tmp1[j] = np.float64(s1[j]) * wy1


@cached_njit
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


@cached_njit
def _add_as_f32(dst, line):
    for j in range(line.size):
        dst[j] += np.float32(line[j])  # zoom's float32 output, then the float32 sum


@cached_njit
def zoom_add_f32(src, out_h, out_w, acc):
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


@cached_njit
def zoom_f64(src, out_h, out_w):
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


# --------------------------------------------------------------------------- map_coordinates


@cached_njit
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


@cached_njit
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


@cached_njit
def map_coordinates_displaced(image, dx, dy, out):
    """map_coordinates(image, (y + dy, x + dx, z), order=1, mode='reflect') into float32 ``out`` (H, W, C).

    ``y``, ``x``, ``z`` are every pixel's row, column and channel (the int64
    meshgrid elastic_transform builds), ``dy``, ``dx`` float32 (H, W) displacements.
    """
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


# --------------------------------------------------------------------------- scikit-image


@cached_njit
def hsv_value_shift(image, c, out):
    """For a uint8 RGB image, per pixel: skimage ``rgb2hsv(image / 255.)``, V += c clipped to [0, 1],
    skimage ``hsv2rgb``, then ``np.uint8(np.clip(., 0, 1) * 255)`` into ``out``."""
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


def salt_and_pepper(image, amount, seed, out):
    """``np.uint8(np.clip(random_noise(image / 255., mode='s&p', amount=amount, rng=seed), 0, 1) * 255)``
    (scikit-image's ``random_noise``) for a uint8 image, into ``out``."""
    rng = np.random.default_rng(seed)  # random_noise's generator, and its two draws in its order
    flip = rng.random(image.shape)
    salt = rng.random(image.shape)
    return _salt_and_pepper_kernel(image, flip, salt, amount, out)


@cached_njit
def _salt_and_pepper_kernel(image, flip, salt, amount, out):
    # random_noise('s&p', amount, salt_vs_pepper=0.5): flipped = r1 <= amount, salted = r2 <= 0.5;
    # flipped & salted -> 1, flipped & ~salted -> 0, then clip to [0, 1]; then clip * 255, np.uint8
    flat_x, flat_f, flat_s, flat_out = image.reshape(-1), flip.reshape(-1), salt.reshape(-1), out.reshape(-1)
    for i in range(flat_x.size):
        if flat_f[i] <= amount:
            v = 1.0 if flat_s[i] <= 0.5 else 0.0
        else:
            v = flat_x[i] / 255.0
        v = min(max(v, 0.0), 1.0)
        flat_out[i] = np.uint8(v * 255.0)
    return out

