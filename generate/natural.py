"""Natural corruptions (ImageNet-C): 15 corruptions x 5 severities.

The reference is PyPI ``imagecorruptions`` 1.1.2, mended for current libraries
by :mod:`qrobust.generate.imagecorruptions_compat`. :func:`corrupt` is the one
public entry: a deterministic function of (image, corruption, severity, seed).
It reseeds NumPy's legacy global generator because that is what the reference
draws from, and restores the caller's generator state afterwards.

The corruptions in :data:`ACCELERATED` run the faster implementations of
:mod:`qrobust.generate.natural_fast` (same random draws, same float operations,
outputs equal bit for bit; imported on first use since it compiles with numba);
the others run the reference. :func:`reference` always gives the reference.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from qrobust.generate import imagecorruptions_compat
from qrobust.shared.noises import BENCHMARK_CORRUPTIONS
from qrobust.shared.noises import CORRUPTIONS as CATALOGUE
from qrobust.shared.registry import Registry

# The 15 ImageNet-C test corruptions, in the benchmark's order (noise, blur, weather, digital): the ones the
# catalogue defines as the benchmark's, each implemented below
CORRUPTION_NAMES = BENCHMARK_CORRUPTIONS
SEVERITIES = (1, 2, 3, 4, 5)
MIN_SIDE = 32  # the reference rejects smaller images


def _reference(name: str):
    """A corruption computed by the mended reference function."""

    def run(image: np.ndarray, severity: int) -> np.ndarray:
        fn = imagecorruptions_compat.reference_function(name)
        return np.uint8(fn(Image.fromarray(image), severity))

    run.__name__ = name
    run.__doc__ = f"{name} via the reference imagecorruptions implementation."
    return run


# Corruptions computed by qrobust.generate.natural_fast (bit-identical to the reference);
# pixelate and jpeg_compression (Pillow, under a millisecond) stay with the reference.
ACCELERATED = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform",
)


def _accelerated(name: str):
    """A corruption computed by qrobust.generate.natural_fast (imported, with numba, on first use)."""

    def run(image: np.ndarray, severity: int) -> np.ndarray:
        from qrobust.generate import natural_fast

        return natural_fast.FUNCTIONS[name](image, severity)

    run.__name__ = name
    run.__doc__ = f"{name}, accelerated, bit-identical to the reference imagecorruptions implementation."
    return run


def reference(name: str):
    """``fn(image, severity) -> uint8`` computed by the reference implementation (for tests and benchmarks)."""
    CORRUPTIONS.get(name)  # unknown names raise UnknownNameError with suggestions
    return _reference(name)


CORRUPTIONS: Registry = Registry("corruption")
for _name in CATALOGUE.in_order():  # the benchmark's 15 and ImageNet-C's 4 held-out ones
    CORRUPTIONS.add(_name, _accelerated(_name) if _name in ACCELERATED else _reference(_name))


def corrupt(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """Apply corruption ``name`` at ``severity`` (1..5) to an RGB uint8 (H, W, 3) image.

    Returns a new uint8 array of the same shape, equal bit for bit to
    ``np.random.seed(seed); imagecorruptions.corrupt(image, corruption_name=name,
    severity=severity)`` with the compatibility mends applied (whether ``name``
    runs the reference or its accelerated twin in
    :mod:`qrobust.generate.natural_fast`). The caller's global NumPy random
    state is left as it was.

    >>> import numpy as np
    >>> x = np.full((64, 64, 3), 128, np.uint8)
    >>> corrupt(x, "brightness", 1, seed=0).shape
    (64, 64, 3)

    Raises ``ValueError`` for a bad image or severity and
    :class:`~qrobust.shared.registry.UnknownNameError` for an unknown name.
    """
    fn = CORRUPTIONS.get(name)
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError("expected an RGB uint8 array of shape (H, W, 3)")
    if min(image.shape[:2]) < MIN_SIDE:
        raise ValueError(f"image sides must be at least {MIN_SIDE} pixels, got {image.shape[:2]}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    if not 0 <= int(seed) < 2**32:
        raise ValueError("seed must be in [0, 2**32)")
    state = np.random.get_state()
    try:
        np.random.seed(int(seed))
        out = fn(image, severity)
    finally:
        np.random.set_state(state)
    return out
