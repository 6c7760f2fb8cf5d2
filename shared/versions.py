"""The versions of the libraries that decide a corpus's pixels.

A corpus records them (``manifest["versions"]``): shards made with other
versions may differ by a few levels, so a run does not resume a corpus that
other versions started, and ``verify --check-env`` names the differences.
"""
from __future__ import annotations

# the libraries whose versions decide pixels: a corpus rebuilt with others may differ by a few levels
PIXEL_LIBRARIES = ("numpy", "Pillow", "libjpeg_turbo", "scipy", "scikit-image", "imagecorruptions", "opencv")
FFMPEG_LIBRARIES = ("av", "libavcodec", "libavformat", "libswscale", "x264")  # sequences, decode-ffmpeg


def pixel_libraries(spec: dict) -> tuple[str, ...]:
    """The libraries that decide the pixels of a suite (FFmpeg's only if it has sequences or systematic noise).

    Their versions are part of a corpus's settings: a run does not resume a
    corpus that other versions started, since the shards would mix outputs."""
    uses_ffmpeg = "sequence" in spec or "systematic" in spec
    return PIXEL_LIBRARIES + (FFMPEG_LIBRARIES if uses_ffmpeg else ())


def library_versions() -> dict:
    """Versions of Python, qrobust and every library that touches pixels or shards."""
    import importlib.metadata as md
    import sys

    import numpy
    import PIL
    from PIL import features

    from qrobust._version import __version__
    from qrobust.shared.video import ffmpeg_versions

    out = {"python": sys.version.split()[0], "qrobust": __version__, "numpy": numpy.__version__,
           "Pillow": PIL.__version__, "libjpeg_turbo": features.version("libjpeg_turbo")}
    for dist in ("scipy", "scikit-image", "imagecorruptions", "webdataset", "opencv-python",
                 "opencv-python-headless"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    try:
        import cv2

        out["opencv"] = cv2.__version__
    except ImportError:
        pass
    out.update(ffmpeg_versions())
    return out


def environment_differences(manifest: dict) -> list[str]:
    """Pixel-deciding libraries (recorded in the manifest) whose installed version differs."""
    built, here = manifest.get("versions") or {}, library_versions()
    libs = pixel_libraries(manifest.get("suite", {}).get("spec") or {})
    return [f"{lib}: corpus built with {built[lib]}, installed {here.get(lib)}"
            for lib in libs if built.get(lib) is not None and built[lib] != here.get(lib)]


# the PyPI distributions that carry the pixel libraries (libjpeg-turbo ships in Pillow's wheel, FFmpeg and
# x264 in av's), in the order of the constraints file shipped with qrobust
PIXEL_DISTRIBUTIONS = ("numpy", "Pillow", "scipy", "scikit-image", "imagecorruptions", "opencv-python",
                       "opencv-python-headless", "av")


def constraints_file():
    """The pip constraints file shipped with qrobust: the pixel libraries' versions it was last tested with."""
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "constraints" / "pixels.txt"


def corpus_pins(manifest: dict) -> list[str]:
    """``name==version`` pins of the pixel libraries that built a corpus (from its manifest), for
    ``pip install -c``: with them, another machine makes the same bytes."""
    built = manifest.get("versions") or {}
    uses_ffmpeg = "av" in pixel_libraries(manifest.get("suite", {}).get("spec") or {})
    return [f"{dist}=={built[dist]}" for dist in PIXEL_DISTRIBUTIONS
            if isinstance(built.get(dist), str) and (dist != "av" or uses_ffmpeg) and _plain_version(built[dist])]


def _plain_version(version: str) -> bool:
    """A version fit for a pin (a manifest is a file from someone else: no spaces, options or URLs)."""
    import re

    return re.fullmatch(r"[0-9][0-9A-Za-z.+!-]{0,40}", version) is not None
