"""Sequence payloads: frames <-> one video file per sample, in-process with PyAV.

Two recipes (the ``encoding`` of the sequence family):

* ``reference``: what ImageNet-P was released as. H.264 (libx264) in mp4 at
  1 fps, yuv444p, ``-preset veryslow -crf 20``; the noise sequences use
  ``-tune grain`` at x264's default crf 23. Lossy: the scorer sees the
  compressed noise, as with the released videos.
* ``lossless``: H.264 RGB (libx264rgb) at ``qp 0`` in Matroska, which
  round-trips every frame exactly.

Encoding is single-threaded and deterministic: x264 runs with its SSE2
routines at most (see :func:`_x264_asm`).
"""
from __future__ import annotations

import io
import platform
from fractions import Fraction

import numpy as np

from qrobust.shared.errors import QrobustError
from qrobust.shared.noises import is_noise_sequence

def _x264_asm() -> str:
    """x264's ``asm`` CPU mask: SSE2 at most on x86-64 (every such CPU has it), plain C elsewhere.

    The AVX-512 routines of the x264 in PyAV's wheels read uninitialised memory
    (the mb-tree rate control path): the same frames gave different bytes from
    run to run. x264's C code and its SSE2 routines give identical bytes (tested),
    so this mask makes the output reproducible across runs and machines at
    nearly full speed. Values are x264.h's X264_CPU_MMX | MMX2 | SSE | SSE2.
    """
    return "15" if platform.machine().lower() in ("x86_64", "amd64") else "0"


RECIPES = {
    "reference": {"container": "mp4", "ext": "mp4", "codec": "libx264", "pix_fmt": "yuv444p", "fps": 1,
                  "options": {"preset": "veryslow", "crf": "20", "threads": "1", "x264-params": f"asm={_x264_asm()}"}},
    "reference-noise": {"container": "mp4", "ext": "mp4", "codec": "libx264", "pix_fmt": "yuv444p", "fps": 1,
                        "options": {"preset": "veryslow", "tune": "grain", "crf": "23", "threads": "1",
                                    "x264-params": f"asm={_x264_asm()}"}},
    "lossless": {"container": "matroska", "ext": "mkv", "codec": "libx264rgb", "pix_fmt": "rgb24", "fps": 1,
                 "options": {"preset": "veryfast", "qp": "0", "threads": "1", "x264-params": f"asm={_x264_asm()}"}},
}
VIDEO_EXTENSIONS = ("mp4", "mkv")


class VideoError(QrobustError):
    """A sequence cannot be encoded (missing encoder) or decoded (bad payload)."""


def recipe_for(encoding: str, perturbation: str) -> dict:
    """The recipe of a sequence family ``encoding`` for one perturbation (noise gets the grain tuning)."""
    if encoding == "reference" and is_noise_sequence(perturbation):
        return RECIPES["reference-noise"]
    try:
        return RECIPES[encoding]
    except KeyError:
        raise VideoError(f"unknown sequence encoding {encoding!r}; known: reference, lossless") from None


def check_encoder(encoding: str) -> None:
    """Fail with a clear message if the installed FFmpeg cannot encode ``encoding``."""
    try:
        import av
    except ImportError as e:
        raise VideoError(f"sequences need PyAV (`pip install av`): {e}") from None
    codec = RECIPES["lossless" if encoding == "lossless" else "reference"]["codec"]
    try:
        av.codec.Codec(codec, "w")
    except Exception:  # PyAV raises different errors across versions for an absent codec
        other = "--sequence-encoding lossless" if encoding == "reference" else "a PyAV build with libx264"
        raise VideoError(f"the installed FFmpeg (PyAV {av.__version__}) has no {codec} encoder needed by the "
                         f"{encoding!r} sequence encoding; use {other}") from None


def encode_frames(frames: np.ndarray, recipe: dict) -> bytes:
    """Encode uint8 (T, H, W, 3) RGB frames into one video file's bytes."""
    import av

    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError("expected uint8 frames of shape (T, H, W, 3)")
    buf = io.BytesIO()
    with av.open(buf, "w", format=recipe["container"], options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream(recipe["codec"], rate=Fraction(recipe["fps"]), options=dict(recipe["options"]))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = recipe["pix_fmt"]
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = i  # PyAV converts to the stream's pix_fmt with swscale (BT.601), as the ffmpeg CLI
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def rgb_frames(container) -> list[np.ndarray]:
    """Every frame of the first video stream of an open PyAV ``container``, as uint8 (H, W, 3) RGB.

    The same pixels as ``frame.to_ndarray(format="rgb24")`` (swscale, its default
    flags), through one converter for the whole video: ``to_ndarray`` sets up a
    new swscale context for every frame, which took 10x longer than the conversion
    itself on 64 px frames (``bench/bench_decode.py``; the per-frame call is the
    oracle in ``tests/test_sequences_systematic.py``).
    """
    from av.video.reformatter import VideoReformatter

    reformatter = VideoReformatter()
    return [reformatter.reformat(f, format="rgb24").to_ndarray() for f in container.decode(video=0)]


def decode_frames(payload: bytes, expected_frames: int | None = None) -> np.ndarray:
    """Decode a sequence payload (mp4 / mkv) into uint8 (T, H, W, 3) RGB frames.

    ``expected_frames`` (the variant's ``frames`` parameter in the manifest)
    catches a truncated payload. Raises :class:`VideoError` for a payload that
    is not an H.264 video or holds another number of frames.
    """
    import av

    try:
        with av.open(io.BytesIO(payload)) as container:
            if not container.streams.video or container.streams.video[0].codec_context.name != "h264":
                raise VideoError("not an H.264 sequence payload")
            frames = rgb_frames(container)
    except (av.error.FFmpegError, ValueError, IndexError) as e:
        raise VideoError(f"not a decodable video: {e}") from None
    if not frames or (expected_frames is not None and len(frames) != expected_frames):
        raise VideoError(f"the video holds {len(frames)} frames, expected {expected_frames or 'some'}")
    return np.stack(frames)


def x264_version() -> str | None:
    """The x264 core version PyAV's FFmpeg encodes with (it decides the reference sequences' bytes),
    read from the version SEI of a one-frame encode."""
    import re

    try:
        payload = encode_frames(np.zeros((1, 16, 16, 3), np.uint8), RECIPES["lossless"])
    except Exception:  # no libx264: nothing to record
        return None
    match = re.search(rb"x264 - core (\d+)", payload)
    return f"core {match.group(1).decode()}" if match else None


def ffmpeg_versions() -> dict:
    """PyAV and the versions of the FFmpeg libraries it bundles (they decide sequence and decode pixels)."""
    try:
        import av
    except ImportError:
        return {}
    libs = {k: ".".join(map(str, v)) for k, v in av.library_versions.items()}
    return {"av": av.__version__, **libs, "x264": x264_version()}
