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

Decoding a payload from a shard is bounded by the corpus's declared geometry
(:func:`decode_video`; :func:`check_video` checks the same without decoding):
every sequence parameter set the decoder would meet is read first and must
give the declared frame size, the decoder may allocate no larger frames, each
decoded frame is checked, and decoding stops past the declared frame count.
"""
from __future__ import annotations

import contextlib
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
    catches a truncated payload. Every frame must have the size the container
    declares (see :func:`decode_video`). Raises :class:`VideoError` for a
    payload that is not an H.264 video or holds another number of frames.
    """
    return decode_video(payload, None, expected_frames)


# ---- bounded by the declared geometry --------------------------------------------------------------------
#
# A few bytes of H.264 can claim gigapixels, and a stream can change its frame size at any parameter set:
# the container's header says nothing about the frames after it. So every sequence parameter set (SPS)
# FFmpeg would read (the container's extradata, new extradata carried by a packet, parameter sets inside
# packets) is parsed here first and must give the declared frame size; the decoder is capped at a small
# multiple of it (``max_pixels``) in case a parameter set reached it another way; and every decoded frame
# is checked before it is converted or kept. Decoding stops at the first frame past the declared count.

CONTAINERS = {"mp4": "mp4", "mkv": "matroska"}  # FFmpeg demuxes only this container (never a playlist)
SPS_TYPE = 7
MAX_SPS_BYTES = 4096  # an SPS is some 10-1000 bytes; only its first fields are read
# profiles whose SPS carries chroma format, bit depths and scaling lists (FFmpeg's list)
_HIGH_PROFILES = frozenset((100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135))


class _Bits:
    """An RBSP read bit by bit (as a string of '0'/'1': one C-speed search finds an Exp-Golomb prefix)."""

    def __init__(self, rbsp: bytes):
        self.bits = bin(int.from_bytes(b"\1" + rbsp, "big"))[3:]
        self.pos = 0

    def u(self, n: int) -> int:
        if self.pos + n > len(self.bits):
            raise ValueError("truncated")
        value = int(self.bits[self.pos:self.pos + n] or "0", 2)
        self.pos += n
        return value

    def ue(self) -> int:
        one = self.bits.find("1", self.pos, self.pos + 33)
        if one < 0:
            raise ValueError("not an Exp-Golomb code")
        zeros = one - self.pos
        self.pos = one + 1
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)


def sps_size(nal: bytes) -> tuple[int, int, int, int]:
    """(coded width, coded height, width, height) in pixels from an H.264 SPS NAL unit (header byte
    included), as FFmpeg reads them: macroblocks, field coding and the cropping window. Raises
    ``ValueError`` for a parameter set that cannot be read."""
    bits = _Bits(nal[1:MAX_SPS_BYTES].replace(b"\0\0\3", b"\0\0"))  # emulation prevention bytes out
    profile = bits.u(8)
    bits.u(16)  # constraint flags, level
    bits.ue()  # seq_parameter_set_id
    chroma, separate = 1, 0
    if profile in _HIGH_PROFILES:
        chroma = bits.ue()
        if chroma > 3:
            raise ValueError(f"chroma format {chroma}")
        if chroma == 3:
            separate = bits.u(1)
        bits.ue(), bits.ue(), bits.u(1)  # bit depths, transform bypass
        if bits.u(1):  # scaling matrices
            for i in range(8 if chroma != 3 else 12):
                if bits.u(1):
                    last = following = 8
                    for _ in range(16 if i < 6 else 64):
                        if following:
                            following = (last + bits.se()) % 256
                        last = following or last
    bits.ue()  # log2_max_frame_num_minus4
    order = bits.ue()
    if order == 0:
        bits.ue()
    elif order == 1:
        bits.u(1), bits.se(), bits.se()
        cycle = bits.ue()
        if cycle > 255:
            raise ValueError(f"{cycle} reference frames in a picture order cycle")
        for _ in range(cycle):
            bits.se()
    elif order != 2:
        raise ValueError(f"picture order count type {order}")
    bits.ue(), bits.u(1)  # reference frames, gaps allowed
    mb_width, map_units = bits.ue() + 1, bits.ue() + 1
    frame_only = bits.u(1)
    if not frame_only:
        bits.u(1)  # adaptive frame/field
    bits.u(1)  # direct 8x8 inference
    left = right = top = bottom = 0
    if bits.u(1):
        left, right, top, bottom = bits.ue(), bits.ue(), bits.ue(), bits.ue()
    coded_w, coded_h = 16 * mb_width, 16 * map_units * (2 - frame_only)
    kind = 0 if separate else chroma  # ChromaArrayType
    unit_x = 1 if kind in (0, 3) else 2
    unit_y = (2 - frame_only) * (2 if kind == 1 else 1)
    return coded_w, coded_h, coded_w - unit_x * (left + right), coded_h - unit_y * (top + bottom)


def _annexb_units(data: bytes):
    """The NAL units after each 00 00 01 start code of ``data``."""
    start = data.find(b"\0\0\1")
    while start >= 0:
        begin = start + 3
        start = data.find(b"\0\0\1", begin)
        unit = data[begin:start if start >= 0 else len(data)].rstrip(b"\0")
        if unit:
            yield unit


def _sized_units(data: bytes, length_size: int):
    """The NAL units of length-prefixed data. As FFmpeg splits them, a start code inside a unit also
    begins a new unit (some muxers pack several units under one length), so those are split out too."""
    pos = 0
    while len(data) - pos >= 4:  # FFmpeg ignores a tail shorter than that
        size = int.from_bytes(data[pos:pos + length_size], "big")
        pos += length_size
        if size > len(data) - pos:
            raise VideoError("a packet whose NAL unit sizes overrun it")
        unit = data[pos:pos + size]
        pos += size
        inner = unit.find(b"\0\0\1")
        yield unit if inner < 0 else unit[:inner]
        if inner >= 0:
            yield from _annexb_units(unit[inner:])


def _avcc_entries(data: bytes):
    """The NAL units of an avcC record's SPS and PPS lists (FFmpeg reads any unit type in either)."""
    pos = 6
    for section in range(2):
        if section == 0:
            count = data[5] & 0x1F
        else:
            count = data[pos] if pos < len(data) else 0
            pos += 1
        for _ in range(count):
            size = int.from_bytes(data[pos:pos + 2], "big")
            if pos + 2 + size > len(data):
                raise VideoError("a truncated decoder configuration (avcC)")
            yield from _sized_units(data[pos:pos + 2 + size], 2)
            pos += 2 + size


class ParameterSets:
    """Every SPS of an H.264 stream, checked as FFmpeg's decoder would meet it, before the decoder sees it.

    ``width`` x ``height`` is the declared frame size: an SPS must crop to exactly that size and code at most
    it rounded up to whole macroblocks (a larger coded picture is what the decoder would allocate). Framing
    follows FFmpeg: length-prefixed NAL units after an avcC record (``extradata[0] == 1``), Annex-B start
    codes otherwise; an avcC record as a packet, or a packet's new extradata, replaces the configuration.
    """

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.length_size = 0  # 0: Annex-B; else the byte length of each NAL unit's size prefix

    def check(self, units) -> None:
        for nal in units:
            if not nal or nal[0] & 0x1F != SPS_TYPE:
                continue
            try:
                coded_w, coded_h, w, h = sps_size(nal)
            except ValueError as e:
                raise VideoError(f"an unreadable sequence parameter set in the stream ({e})") from None
            if (w, h) != (self.width, self.height) or coded_w >= self.width + 16 or coded_h >= self.height + 32:
                raise VideoError(f"a parameter set in the stream sets frames of {w}x{h} pixels (coded {coded_w}x"
                                 f"{coded_h}), the corpus's are {self.width}x{self.height}")

    def extradata(self, data: bytes | None) -> None:
        """A decoder configuration: an avcC record, or Annex-B parameter sets."""
        if not data:
            return
        if data[0] != 1:
            self.check(_annexb_units(data))
            self.length_size = 0
            return
        if len(data) < 7:
            raise VideoError("a truncated decoder configuration (avcC)")
        self.check(_avcc_entries(data))
        self.length_size = (data[4] & 3) + 1

    def packet(self, packet) -> None:
        """One demuxed packet, before it is decoded."""
        if packet.size and packet.has_sidedata("new_extradata"):
            self.extradata(bytes(packet.get_sidedata("new_extradata")))
        data = bytes(packet)
        if not data:
            return
        if self.length_size and _is_avcc(data):  # FFmpeg takes such a packet as a new configuration
            self.extradata(data)
        elif self.length_size:
            self.check(_sized_units(data, self.length_size))
        else:
            self.check(_annexb_units(data))


def _is_avcc(data: bytes) -> bool:
    """Whether FFmpeg's H.264 decoder reads this packet as an avcC record (its is_avcc_extradata test)."""
    if len(data) < 9 or data[0] != 1 or data[2] != 0 or data[4] & 0xFC != 0xFC:
        return False
    pos = 6
    for section, kind in ((0, SPS_TYPE), (1, 8)):
        if section == 0:
            count = data[5] & 0x1F
        elif pos < len(data):
            count, pos = data[pos], pos + 1
        else:
            return False
        if not count:
            return False
        for _ in range(count):
            if pos + 3 > len(data):
                return False
            size = int.from_bytes(data[pos:pos + 2], "big") + 2
            if size > len(data) - pos or data[pos + 2] & 0x9F != kind:
                return False
            pos += size
    return True


def _open_h264(payload: bytes, ext: str | None):
    """The payload opened by FFmpeg held to the container its extension names (None: probed, for files
    qrobust wrote itself); its first stream must be H.264."""
    import av

    container = av.open(io.BytesIO(payload), format=CONTAINERS[ext] if ext else None)
    if not container.streams.video or container.streams.video[0].codec_context.name != "h264":
        container.close()
        raise VideoError("not an H.264 sequence payload")
    return container


def _declared(container, width: int | None, height: int | None) -> tuple[int, int]:
    codec = container.streams.video[0].codec_context
    if width is None or height is None:
        width, height = codec.width, codec.height
    if (codec.height, codec.width) != (height, width):
        raise VideoError(f"video of {codec.width}x{codec.height} pixels, the corpus's are {width}x{height}")
    if width <= 0 or height <= 0:
        raise VideoError(f"video of {width}x{height} pixels")
    return width, height


@contextlib.contextmanager
def _ffmpeg_errors(ext: str | None):
    """FFmpeg on untrusted bytes: any failure means a bad payload, said in one line."""
    try:
        yield
    except VideoError:
        raise
    except Exception as e:
        raise VideoError(f"not a decodable {ext or 'sequence'} video: {type(e).__name__}: {str(e)[:200]}") from None


def check_video(payload: bytes, ext: str, frames: int, height: int, width: int) -> None:
    """Check a sequence payload against the declared geometry without decoding a frame: the container
    (:data:`CONTAINERS`, by extension) holds H.264 of ``width`` x ``height`` pixels, every parameter set in
    the stream gives that size (:class:`ParameterSets`), and it holds at most ``frames`` frames (packets).
    Raises :class:`VideoError`."""
    with _ffmpeg_errors(ext), _open_h264(payload, ext) as container:
        stream = container.streams.video[0]
        sets = ParameterSets(*_declared(container, width, height))
        sets.extradata(stream.codec_context.extradata)
        packets = 0
        for packet in container.demux(stream):
            sets.packet(packet)
            packets += packet.size > 0
            if packets > frames:
                raise VideoError(f"video of more than the corpus's {frames} frames")


def decode_video(payload: bytes, ext: str | None, frames: int | None, height: int | None = None,
                 width: int | None = None) -> np.ndarray:
    """The frames of an H.264 payload as uint8 (T, H, W, 3) RGB, decoded within the declared geometry.

    ``ext`` (``mp4``/``mkv``) holds FFmpeg to that container (no format
    probing: no HLS/concat playlist that would open other files). ``frames``,
    ``height``, ``width``: the declared count and size (None: the container's
    size, and any count). Before a packet is decoded its parameter sets are
    checked (:class:`ParameterSets`) and the packets counted; the decoder may
    not allocate frames over :func:`pixel_cap` pixels; each frame must have
    the declared size before it is converted. Memory stays within the output
    (allocated once, at the declared size) plus a few decoder frames. The
    pixels are those of :func:`rgb_frames`. Raises :class:`VideoError`.
    """
    from av.video.reformatter import VideoReformatter

    with _ffmpeg_errors(ext), _open_h264(payload, ext) as container:
        stream = container.streams.video[0]
        width, height = _declared(container, width, height)
        sets = ParameterSets(width, height)
        sets.extradata(stream.codec_context.extradata)
        stream.codec_context.options = {"max_pixels": str(pixel_cap(width, height))}
        reformatter = VideoReformatter()
        out = np.empty((frames, height, width, 3), np.uint8) if frames is not None else None
        kept: list[np.ndarray] = []
        packets = n = 0
        for packet in container.demux(stream):
            sets.packet(packet)
            packets += packet.size > 0
            if frames is not None and packets > frames:
                raise VideoError(f"video of more than the corpus's {frames} frames")
            for frame in packet.decode():
                if (frame.width, frame.height) != (width, height):
                    raise VideoError(f"frame {n} of {frame.width}x{frame.height} pixels, the corpus's are "
                                     f"{width}x{height}")
                if frames is not None and n == frames:
                    raise VideoError(f"video of more than the corpus's {frames} frames")
                rgb = reformatter.reformat(frame, format="rgb24").to_ndarray()
                if out is not None:
                    out[n] = rgb
                else:
                    kept.append(rgb)
                n += 1
    if not n or (frames is not None and n != frames):
        raise VideoError(f"the video holds {n} frames, expected {frames or 'some'}")
    return out if out is not None else np.stack(kept)


def pixel_cap(width: int, height: int) -> int:
    """The most pixels the decoder may allocate per frame: the declared size rounded up as FFmpeg pads it
    (to 64-pixel strides and whole macroblock rows), twice over."""
    return 2 * (-(-width // 64) * 64) * (-(-height // 32) * 32)


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
