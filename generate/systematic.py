"""Systematic noise (ImageNet-S): the same JPEG decoded and resized by different libraries.

Follows the RobustART generator (``noise/utils/imagenet_s_gen.py``): decode
the source file's original bytes, resize to a square ``resize x resize``
(aspect not kept), center crop ``crop`` with offset ``int(round((resize -
crop) / 2))``. Decoder variants use the Pillow bilinear resize; resize variants
use the Pillow decode. Deviations, one policy for every decoder: EXIF
orientation is ignored (OpenCV is told so; PyAV does not rotate; Pillow never
does), where the reference let OpenCV and the ffmpeg CLI rotate; and the Pillow
decode is qrobust's (:func:`qrobust.shared.sources.decode_rgb`), which equals
``Image.open(...).convert('RGB')`` except that 16-bit images keep their high
byte instead of being clipped to white.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from qrobust.shared.registry import Registry
from qrobust.shared.sources import BadImage, decode_rgb

DECODERS: Registry = Registry("decoder")
RESIZES: Registry = Registry("resize")


@DECODERS.register("pil")
def decode_pil(data: bytes) -> np.ndarray:
    """Pillow: ``Image.open(...).convert('RGB')`` (16-bit: high byte, see the module doc)."""
    return np.asarray(decode_rgb(data))


@DECODERS.register("opencv")
def decode_opencv(data: bytes) -> np.ndarray:
    """OpenCV: ``cv2.imdecode(..., IMREAD_COLOR)`` (orientation ignored), BGR -> RGB."""
    import cv2

    try:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as e:  # jobs.scan reports BadImage as a rejected input; a cv2.error would stop the run
        raise BadImage(f"OpenCV cannot decode it: {' '.join(str(e).split())}") from None
    if bgr is None:
        raise BadImage("OpenCV cannot decode it")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@DECODERS.register("ffmpeg")
def decode_ffmpeg(data: bytes) -> np.ndarray:
    """FFmpeg in-process (PyAV): the first frame converted to rgb24 by swscale, which is
    what ``ffmpeg -i FILE -f rawvideo -pix_fmt rgb24 pipe:`` gives (bicubic scaler flags,
    which decide the chroma upsampling)."""
    import av

    try:
        with av.open(io.BytesIO(data), format="image2pipe") as container:
            frame = next(container.decode(video=0))
            return frame.to_ndarray(format="rgb24", interpolation="BICUBIC")
    except (av.error.FFmpegError, StopIteration, ValueError) as e:
        raise BadImage(f"FFmpeg cannot decode it: {e}") from None


def _pil_resize(method):
    def resize(image: np.ndarray, size: int) -> np.ndarray:
        return np.asarray(Image.fromarray(image).resize((size, size), method))

    return resize


def _opencv_resize(flag_name: str):
    def resize(image: np.ndarray, size: int) -> np.ndarray:
        import cv2

        return cv2.resize(image, (size, size), interpolation=getattr(cv2, flag_name))

    return resize


for _name, _method in (("bilinear", Image.BILINEAR), ("nearest", Image.NEAREST), ("box", Image.BOX),
                       ("hamming", Image.HAMMING), ("cubic", Image.BICUBIC), ("lanczos", Image.LANCZOS)):
    RESIZES.add(f"pil-{_name}", _pil_resize(_method))
for _name, _flag in (("bilinear", "INTER_LINEAR"), ("nearest", "INTER_NEAREST"), ("area", "INTER_AREA"),
                     ("cubic", "INTER_CUBIC"), ("lanczos", "INTER_LANCZOS4")):
    RESIZES.add(f"opencv-{_name}", _opencv_resize(_flag))


def square_crop(image: np.ndarray, resize: str, size: int, crop: int) -> np.ndarray:
    """Square resize with method ``resize``, then the center crop of the reference."""
    squared = RESIZES.get(resize)(image, size)
    top = int(round((size - crop) / 2.0))
    return np.ascontiguousarray(squared[top:top + crop, top:top + crop])


def render_systematic(data: bytes, decoder: str, resize: str, size: int, crop: int) -> np.ndarray:
    """One systematic variant of one source file's bytes: uint8 (crop, crop, 3)."""
    return square_crop(DECODERS.get(decoder)(data), resize, size, crop)


def decoded(ctx_cache: dict, data: bytes, decoder: str) -> np.ndarray:
    """Decode once per sample and decoder (the 11 resize variants share the Pillow decode)."""
    if decoder not in ctx_cache:
        ctx_cache[decoder] = DECODERS.get(decoder)(data)
    return ctx_cache[decoder]
