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


def corrupt(image: np.ndarray, name=None, severity=1, seed: int | None = None, *, corruption_name: str | None = None,
            corruption_number: int = -1) -> np.ndarray:
    """Apply a corruption at ``severity`` (1..5) to an RGB uint8 (H, W, 3) image; also a drop-in for
    imagecorruptions' ``corrupt``.

    Returns a new uint8 array of the same shape, equal bit for bit to
    ``np.random.seed(seed); imagecorruptions.corrupt(image, corruption_name=name,
    severity=severity)`` with the compatibility mends applied (whether ``name``
    runs the reference or its accelerated twin in
    :mod:`qrobust.generate.natural_fast`). With a ``seed``, the caller's global
    NumPy random state is left as it was; without one, the corruption draws from
    that global state and advances it, as imagecorruptions does, so code that
    seeds NumPy itself gets the same images after changing only its import::

        from qrobust.generate.natural import corrupt   # was: from imagecorruptions import corrupt
        corrupted = corrupt(image, corruption_name="fog", severity=3)

    imagecorruptions' forms work: ``corruption_name=`` or ``corruption_number=``
    (its order: the 15 benchmark corruptions, then speckle_noise, gaussian_blur,
    spatter, saturate), and its positional order ``corrupt(image, severity,
    corruption_name)`` when the second argument is a number. A grayscale
    (H, W) or (H, W, 1) image is stacked to three channels, as there.

    >>> import numpy as np
    >>> x = np.full((64, 64, 3), 128, np.uint8)
    >>> corrupt(x, "brightness", 1, seed=0).shape
    (64, 64, 3)

    Raises ``ValueError`` for a bad image, severity or seed and
    :class:`~qrobust.shared.registry.UnknownNameError` for an unknown name.
    """
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):  # imagecorruptions' positional order
        name, severity = (severity if isinstance(severity, str) else None), int(name)
    names = [n for n in (name, corruption_name) if n is not None]
    if len(set(names)) > 1:
        raise ValueError(f"two corruption names given: {names[0]!r} and {names[1]!r}")
    if names:
        name = names[0]
    elif corruption_number != -1:
        order = CATALOGUE.in_order()
        if not isinstance(corruption_number, (int, np.integer)) or not 0 <= corruption_number < len(order):
            raise ValueError(f"corruption_number must be in 0..{len(order) - 1}, got {corruption_number!r}")
        name = order[corruption_number]
    else:
        raise ValueError("either a corruption name or corruption_number must be given")
    fn = CORRUPTIONS.get(name)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and (image.ndim == 2 or image.shape[-1] == 1):
        image = np.stack((image.reshape(image.shape[:2]),) * 3, axis=-1)  # grayscale, as imagecorruptions does
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError("expected an RGB uint8 array of shape (H, W, 3) (or a grayscale (H, W) one)")
    if min(image.shape[:2]) < MIN_SIDE:
        raise ValueError(f"image sides must be at least {MIN_SIDE} pixels, got {image.shape[:2]}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    if seed is None:
        return fn(image, severity)
    if not 0 <= int(seed) < 2**32:
        raise ValueError("seed must be in [0, 2**32)")
    state = np.random.get_state()
    try:
        np.random.seed(int(seed))
        out = fn(image, severity)
    finally:
        np.random.set_state(state)
    return out
