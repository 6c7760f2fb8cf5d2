"""Makes PyPI ``imagecorruptions`` 1.1.2 (the reference ImageNet-C implementation
that qrobust follows) work on current numpy / scikit-image, in one place.

What is mended, and why each mend leaves the reference's numbers alone:

* ``pkg_resources`` (gone from Python >= 3.12 venvs and setuptools >= 82) is
  needed only to locate the bundled frost textures: while the module imports,
  a stand-in resolves the same paths from the package folder.
* ``skimage.filters.gaussian(..., multichannel=True)`` (glass_blur,
  gaussian_blur) no longer exists: it is the same filter as
  ``channel_axis=-1``.
* ``np.float_`` (fog's plasma fractal) is gone from numpy 2: it was
  ``np.float64``, so fog stays bit-exact.
* impulse_noise is not reproducible: scikit-image >= 0.19 ``random_noise``
  draws from its own unseeded generator. It now draws one integer from NumPy's
  legacy global generator (``np.random.randint(2**32)``) and passes it as
  ``rng=``; so ``np.random.seed(k)`` before the call fixes impulse_noise too,
  like every other corruption.

The mends swap names in ``imagecorruptions.corruptions``' namespace only
(numpy and scikit-image are not touched). :func:`original` restores the
unpatched names for a while, which is how the tests prove that the corruptions
that still run unpatched give the same bytes both ways.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types
import warnings

import numpy as np

_MISSING = object()
_state: dict = {}


def _pkg_resources_stand_in() -> types.ModuleType:
    stand_in = types.ModuleType("pkg_resources")

    def resource_filename(package: str, path: str) -> str:
        return os.path.join(os.path.dirname(importlib.import_module(package).__file__), path)

    stand_in.resource_filename = resource_filename
    return stand_in


def _import_reference() -> types.ModuleType:
    """Import ``imagecorruptions.corruptions`` without needing ``pkg_resources``."""
    try:
        import cv2  # noqa: F401  (imagecorruptions needs it; say how to fix a broken one)
    except ImportError as e:
        raise ImportError(
            f"OpenCV does not import ({e}). imagecorruptions installs opencv-python, which needs "
            "libGL; on a headless server run `pip install --force-reinstall --no-deps "
            "opencv-python-headless` (same cv2, no GUI)") from e
    saved = sys.modules.get("pkg_resources", _MISSING)
    if saved is _MISSING:
        sys.modules["pkg_resources"] = _pkg_resources_stand_in()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notices of its old imports
            importlib.import_module("imagecorruptions")  # the package imports .corruptions
            return importlib.import_module("imagecorruptions.corruptions")
    finally:
        if saved is _MISSING:
            sys.modules.pop("pkg_resources", None)


def _gaussian_with_multichannel(original):
    def gaussian(image, *args, multichannel=None, **kwargs):
        if multichannel is not None and "channel_axis" not in kwargs:
            kwargs["channel_axis"] = -1 if multichannel else None
        return original(image, *args, **kwargs)

    return gaussian


def _numpy_with_float_() -> types.ModuleType:
    proxy = types.ModuleType("numpy")
    proxy.__dict__.update(np.__dict__)  # same objects, dict hits stay fast in hot loops
    proxy.float_ = np.float64
    return proxy


def _skimage_with_seeded_noise(skimage: types.ModuleType) -> types.ModuleType:
    util = types.ModuleType("skimage.util")
    util.__getattr__ = lambda name: getattr(skimage.util, name)

    def random_noise(image, mode="gaussian", rng=None, **kwargs):
        if rng is None:
            rng = int(np.random.randint(0, 2**32, dtype=np.uint64))
        return skimage.util.random_noise(image, mode=mode, rng=rng, **kwargs)

    util.random_noise = random_noise
    proxy = types.ModuleType("skimage")
    proxy.__getattr__ = lambda name: getattr(skimage, name)
    proxy.util = util
    return proxy


def apply() -> types.ModuleType:
    """Mend the reference module (idempotent) and return it."""
    if "module" in _state:
        return _state["module"]
    module = _import_reference()
    import skimage.util  # noqa: F401  (load the lazily imported submodules the proxy forwards to)
    import skimage.color  # noqa: F401

    _state["original"] = {name: getattr(module, name) for name in ("gaussian", "np", "sk")}
    _state["patched"] = {
        "gaussian": _gaussian_with_multichannel(module.gaussian),
        "np": _numpy_with_float_(),
        "sk": _skimage_with_seeded_noise(module.sk),
    }
    for name, value in _state["patched"].items():
        setattr(module, name, value)
    _state["module"] = module
    return module


@contextlib.contextmanager
def original():
    """Within this block the reference module runs unpatched (for tests)."""
    module = apply()
    for name, value in _state["original"].items():
        setattr(module, name, value)
    try:
        yield module
    finally:
        for name, value in _state["patched"].items():
            setattr(module, name, value)


def package() -> types.ModuleType:
    """The mended ``imagecorruptions`` package (its ``corrupt`` is the reference call)."""
    apply()
    return sys.modules["imagecorruptions"]


def reference_function(name: str):
    """The (mended) reference corruption function ``name(PIL image, severity)``."""
    return getattr(apply(), name)
