"""The accelerated natural corruptions (qrobust.generate.natural_fast) equal the reference bit for bit.

The expected outputs come from the (mended) reference package itself,
``np.random.seed(seed); imagecorruptions.corrupt(image, corruption_name=..., severity=...)``,
so nothing here compares the accelerated code with itself. Images: real photos
cropped small (square, non-square, odd sizes), a random image, flat black and
white; several seeds; every severity. The draws from NumPy's legacy generator
must be the same too (same generator state afterwards).
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qrobust.generate import imagecorruptions_compat, natural, natural_fast, replay
from qrobust.generate.natural import ACCELERATED, CORRUPTIONS, SEVERITIES, corrupt
from qrobust.shared.demo_data import photo

SEEDS = (0, 12345)
imagecorruptions = imagecorruptions_compat.package()


def _photo(name: str, height: int, width: int) -> np.ndarray:
    """A real photo resized to cover height x width (bilinear), then center-cropped to it."""
    image = photo(name).convert("RGB")
    scale = max(height / image.height, width / image.width)
    image = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                         Image.BILINEAR)
    top, left = (image.height - height) // 2, (image.width - width) // 2
    return np.asarray(image.crop((left, top, left + width, top + height)), dtype=np.uint8).copy()


@pytest.fixture(scope="module")
def images():
    return {
        "astronaut 64x64": _photo("astronaut", 64, 64),
        "chelsea 48x80": _photo("chelsea", 48, 80),
        "coffee 37x53": _photo("coffee", 37, 53),
        "random 41x35": np.random.RandomState(8).randint(0, 256, (41, 35, 3)).astype(np.uint8),
    }


def _state_equal(a, b) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and tuple(a[2:]) == tuple(b[2:])


def _reference(image, name, severity, seed):
    np.random.seed(seed)
    out = imagecorruptions.corrupt(image, corruption_name=name, severity=severity)
    return out, np.random.get_state()


def _fast(image, name, severity, seed):
    np.random.seed(seed)
    out = natural_fast.FUNCTIONS[name](image, severity)
    return out, np.random.get_state()


def _assert_same(image, name, severity, seed, label):
    expected, expected_state = _reference(image, name, severity, seed)
    actual, actual_state = _fast(image, name, severity, seed)
    where = f"{name} severity {severity} seed {seed} on {label}"
    assert actual.dtype == expected.dtype == np.uint8, where
    assert actual.shape == expected.shape == image.shape, where
    if not np.array_equal(actual, expected):
        diff = np.abs(actual.astype(int) - expected.astype(int))
        pytest.fail(f"{where}: {np.count_nonzero(diff)} values differ, by up to {diff.max()}")
    assert _state_equal(actual_state, expected_state), f"{where}: different random draws"


def test_accelerated_list_matches_the_implementations():
    assert set(ACCELERATED) == set(natural_fast.FUNCTIONS)
    assert set(ACCELERATED) < set(natural.CORRUPTION_NAMES)


@pytest.mark.parametrize("name", ACCELERATED)
def test_bit_identical_to_reference(images, name):
    for label, image in images.items():
        before = image.copy()
        for severity in SEVERITIES:
            for seed in SEEDS:
                _assert_same(image, name, severity, seed, label)
        assert np.array_equal(image, before), f"{name} modified its input"


@pytest.mark.parametrize("name", ACCELERATED)
def test_bit_identical_on_flat_and_strided_images(images, name):
    """Flat black and white images (ties and zero ranges everywhere), and non-contiguous input views."""
    big = _photo("astronaut", 90, 120)
    cases = {
        "black 40x40": np.zeros((40, 40, 3), np.uint8),
        "white 33x70": np.full((33, 70, 3), 255, np.uint8),
        "strided view 45x60": big[::2, ::2],
        "cropped view 37x50": big[10:47, 33:83],
    }
    for label, image in cases.items():
        for severity in (1, 5):
            _assert_same(image, name, severity, 7, label)


@pytest.mark.parametrize("name", ("zoom_blur", "elastic_transform", "motion_blur", "snow", "frost"))
def test_bit_identical_at_benchmark_size(name):
    """224 x 224 (the benchmark size): larger zoom crops, frost textures without upscaling, long motion taps."""
    image = _photo("coffee", 224, 224)
    for severity in SEVERITIES:
        _assert_same(image, name, severity, 3, "coffee 224x224")


def test_registry_runs_the_accelerated_functions(images):
    image = images["chelsea 48x80"]
    for name in ACCELERATED:
        fn = CORRUPTIONS.get(name)
        assert fn is not natural.reference(name)
        assert "accelerated" in fn.__doc__
        np.random.seed(5)
        expected = imagecorruptions.corrupt(image, corruption_name=name, severity=3)
        np.testing.assert_array_equal(corrupt(image, name, 3, seed=5), expected, err_msg=name)
    for name in set(natural.CORRUPTION_NAMES) - set(ACCELERATED):
        assert "reference" in CORRUPTIONS.get(name).__doc__


def test_reference_is_the_reference(images):
    image = images["astronaut 64x64"]
    run = natural.reference("brightness")
    np.random.seed(1)
    expected = imagecorruptions.corrupt(image, corruption_name="brightness", severity=2)
    np.testing.assert_array_equal(run(image, 2), expected)
    with pytest.raises(KeyError):
        natural.reference("brightnes")


def test_caller_random_state_is_untouched(images):
    image = images["coffee 37x53"]
    np.random.seed(2024)
    np.random.normal()  # leaves a cached Gaussian in the legacy state: that must survive too
    before = np.random.get_state()
    for name in ACCELERATED:
        corrupt(image, name, 4, seed=11)
    assert _state_equal(np.random.get_state(), before)


def test_a_wrong_draw_would_be_caught(images):
    """The comparison is sharp: one seed apart, every random corruption differs from the reference."""
    image = images["astronaut 64x64"]
    for name in ("gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow",
                 "frost", "fog", "elastic_transform"):
        expected, _ = _reference(image, name, 3, 0)
        actual, _ = _fast(image, name, 3, 1)
        assert not np.array_equal(actual, expected), name


# The kernels that replay scipy / the reference's float64 and float32 arithmetic, compared before any
# rounding to uint8 hides a last-bit difference.


def test_zoom_kernels_equal_scipy_zoom():
    from scipy.ndimage import zoom

    rng = np.random.RandomState(3)
    for height, width in ((64, 64), (37, 53), (224, 224), (33, 90)):
        for factor in (1.01, 1.07, 1.12, 1.3, 2, 2.5, 3, 4.5):
            top0, ch0, top1, ch1, out_h, out_w = natural_fast._centre_crop_for_zoom((height, width), factor)
            crop = rng.rand(ch0, ch1, 3).astype(np.float32)
            expected = zoom(crop, (factor, factor, 1), order=1)
            acc = np.zeros((height, width, 3), np.float32)
            replay.zoom_add_f32(crop, out_h, out_w, acc)
            kept = expected[:height, :width]
            np.testing.assert_array_equal(acc[:kept.shape[0], :kept.shape[1]], kept, err_msg=f"{factor}")
            layer = rng.normal(0.3, 0.3, (ch0, ch1, 1))  # snow: float64, negative values too
            np.testing.assert_array_equal(replay.zoom_f64(layer, out_h, out_w),
                                          zoom(layer, (factor, factor, 1), order=1), err_msg=f"{factor}")


def test_gaussian_filter_equals_scipy():
    from scipy import ndimage

    rng = np.random.RandomState(4)
    for shape in ((64, 64, 3), (37, 53, 3), (3, 5, 3), (224, 224), (40, 33), (2, 4)):
        for mode, truncate in (("nearest", 4.0), ("reflect", 3)):
            for sigma in (0.1, 0.7, 1.1, 1.5, 2.24, 3.7):
                image = rng.rand(*shape)
                sigmas = (sigma, sigma * 1.3)
                expected = ndimage.gaussian_filter(image, list(sigmas) + [0] * (image.ndim - 2), mode=mode,
                                                   cval=0, truncate=truncate)
                np.testing.assert_array_equal(replay.gaussian_filter(image, sigmas, mode, truncate),
                                              expected, err_msg=f"{shape} {mode} {sigma}")


def test_shift_sum_equals_reference_motion_blur():
    reference = imagecorruptions_compat.apply()
    rng = np.random.RandomState(5)
    layer = rng.rand(46, 39)
    photo_ = _photo("chelsea", 40, 52)
    for radius, sigma in ((10, 3), (12, 8), (20, 15)):
        for angle in (-135.0, -100.3, -45.0, -12.5, 0.0, 33.3, 45.0):
            for x in (layer, photo_):
                expected = reference._motion_blur(x, radius=radius, sigma=sigma, angle=angle)
                taps = natural_fast._motion_taps(x.shape, radius, sigma, angle)
                actual = natural_fast._shift_sum(x if x.ndim == 3 else x[..., np.newaxis], *taps)
                np.testing.assert_array_equal(actual.reshape(expected.shape), expected,
                                              err_msg=f"{radius} {sigma} {angle} {x.shape}")


def test_elastic_map_equals_scipy_map_coordinates():
    from scipy.ndimage import map_coordinates

    rng = np.random.RandomState(6)
    # float32 as in elastic_transform; float64 too, where a change in the order of the float64 sum would
    # not be hidden by the rounding to float32
    for height, width, dtype in ((64, 64, np.float32), (37, 53, np.float32), (50, 31, np.float64)):
        image = rng.rand(height, width, 3).astype(dtype)
        for spread in (0.5, 3.0, 40.0):  # 40 pixels: coordinates reflected across the borders, some twice
            dx = rng.uniform(-spread, spread, (height, width)).astype(np.float32)
            dy = rng.uniform(-spread, spread, (height, width)).astype(np.float32)
            # the reference's coordinates, verbatim
            x, y, z = np.meshgrid(np.arange(width), np.arange(height), np.arange(3))
            indices = (np.reshape(y + dy[..., np.newaxis], (-1, 1)), np.reshape(x + dx[..., np.newaxis], (-1, 1)),
                       np.reshape(z, (-1, 1)))
            expected = map_coordinates(image, indices, order=1, mode="reflect").reshape(image.shape)
            actual = replay.map_coordinates_displaced(image, dx, dy, np.empty(image.shape, dtype))
            np.testing.assert_array_equal(actual, expected, err_msg=f"{height}x{width} spread {spread}")
