"""Decoders bounded by the corpus's declared geometry, for every frame: hostile videos and images.

Each hostile payload is built here (videos with PyAV: frames of two sizes spliced into one H.264 stream,
more frames than declared, a container header that lies) and planted in a real corpus with the manifest's
size and sha256 rewritten to match, so that the readers themselves must refuse it: the scorer, training and
``pack``, with one line naming the shard and member (exit status 2), and before the decoder allocates frames
of the claimed size.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import MEAN_MODEL, small_corpus, tar_members
from qrobust.cli import main
from qrobust.score.stream import Corpus, CorpusError, decode_member
from qrobust.shared import video
from qrobust.shared.shards import ShardError, check_payload
from qrobust.shared.video import (RECIPES, ParameterSets, VideoError, check_video, decode_video, encode_frames,
                                  rgb_frames, sps_size)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CROP = 36
FRAMES = 31
IMAGES = "clean/onecrop/onecrop-000000.tar"
VIDEOS = "sequence/rotate/rotate-000000.tar"


MODEL = MEAN_MODEL


def run(*args) -> int:
    return main(["-q", *map(str, args)])


# ---- hostile payloads ------------------------------------------------------------------------------------


def annexb(frames: np.ndarray) -> bytes:
    """H.264 Annex-B bytes of uint8 RGB frames (x264, no B-frames: one packet per frame, in order); the
    stream opens with its own parameter sets, so two of them concatenated change size where they meet."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="h264") as out:
        stream = out.add_stream("libx264", rate=1, options={"preset": "ultrafast", "bframes": "0", "threads": "1"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def contained(raw: bytes, fmt: str, width: int = CROP, height: int = CROP) -> bytes:
    """Annex-B H.264 put into an mkv/mp4 container whose header says ``width`` x ``height`` and whose decoder
    configuration is that of the stream's first parameter sets; every packet is kept as it is (the
    parameter sets inside later packets included)."""
    import av

    out_buf = io.BytesIO()
    with av.open(io.BytesIO(raw), format="h264") as source, \
            av.open(out_buf, "w", format={"mkv": "matroska", "mp4": "mp4"}[fmt]) as out:
        original = source.streams.video[0]
        stream = out.add_stream("h264", rate=1)
        stream.width, stream.height = width, height
        stream.codec_context.extradata = original.codec_context.extradata
        stream.time_base = Fraction(1, 1000)
        for i, packet in enumerate(p for p in source.demux(original) if p.size):
            packet.stream, packet.time_base = stream, Fraction(1, 1000)
            packet.pts = packet.dts = 1000 * i
            packet.duration = 1000
            out.mux(packet)
    return out_buf.getvalue()


def frames_of(n: int, side: int, value: int = 90) -> np.ndarray:
    rng = np.random.default_rng(side + n)
    return np.clip(rng.normal(value, 30, (n, side, side, 3)), 0, 255).astype(np.uint8)


def size_changing(fmt: str = "mkv", big: int = 1024, tail: int = 2) -> bytes:
    """A video of the corpus's frame count whose first frames have the corpus's size and whose last
    ``tail`` frames are ``big`` x ``big``: one stream, the size changed by a parameter set mid-stream. The big
    frames are flat, so a few kB claim them: the memory they would take is the decoder's alone."""
    return contained(annexb(frames_of(FRAMES - tail, CROP)) + annexb(np.full((tail, big, big, 3), 128, np.uint8)),
                     fmt)


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming ``width`` x ``height``, with almost no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) is rewritten to claim ``width`` x ``height``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frames_of(1, CROP)[0]).save(buf, format="JPEG", quality=90)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# ---- corpora with a planted payload ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """6 photos (3 classes), 2 per shard: clean/onecrop (png) and sequence/rotate (lossless mkv, 31 frames)."""
    return small_corpus(tmp_path_factory.mktemp("bounded"), "clean/onecrop,sequence/rotate")


@pytest.fixture
def corpus(pristine, tmp_path) -> Path:
    copy = tmp_path / "corpus"
    shutil.copytree(pristine, copy)
    return copy


def plant(corpus: Path, shard: str, member: int, payload: bytes) -> str:
    """Replace the payload of the ``member``-th tar member of ``shard`` (same name), record the shard's new
    size and sha256 in the manifest, and return the member's name."""
    items = tar_members(corpus / shard)
    name = items[member][0].name
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (info, data) in enumerate(items):
            data = payload if i == member else data
            info = tarfile.TarInfo(info.name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    (corpus / shard).write_bytes(data)
    manifest = json.loads((corpus / "manifest.json").read_text())
    for entry in manifest["variants"].values():
        for record in entry["shards"]:
            if record["name"] == shard:
                record["bytes"], record["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (corpus / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return name


def refused_by_score_and_pack(corpus: Path, tmp_path: Path, capsys, shard: str, *needles: str) -> None:
    """``score`` and ``pack`` (shards linked, and samples re-sharded) both refuse, exit 2, in one line naming
    the shard and every needle; pack leaves its --out without a corpus in it."""
    vid = shard.rsplit("/", 1)[0]
    commands = {"score": ["score", "--corpus", corpus, "--model", MODEL, "--out", tmp_path / "r", "--workers", 0,
                          "--only", vid],
                "pack": ["pack", corpus, "--out", tmp_path / "packed", "--only", vid],
                "pack --limit": ["pack", corpus, "--out", tmp_path / "subset", "--only", vid, "--limit", 5]}
    for what, command in commands.items():
        capsys.readouterr()
        assert run(*command) == 2, what
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, (what, err)
        assert all(n in err for n in (shard, *needles)), (what, err)
    for out in ("packed", "subset"):
        assert not (tmp_path / out / "manifest.json").exists()
        assert not [p for p in (tmp_path / out).rglob("*") if p.is_file()]


# ---- videos ----------------------------------------------------------------------------------------------


def test_the_hostile_video_really_changes_size_mid_stream():
    """The planted stream is what it claims to be: FFmpeg, unchecked, decodes frames of both sizes, so the
    refusals below are about the stream, not a broken file."""
    import av

    for fmt in ("mkv", "mp4"):
        payload = size_changing(fmt)
        with av.open(io.BytesIO(payload), format={"mkv": "matroska", "mp4": "mp4"}[fmt]) as container:
            assert (container.streams.video[0].codec_context.width, container.streams.video[0].codec_context.height) \
                == (CROP, CROP)
            sizes = [f.shape[:2] for f in rgb_frames(container)]
        assert sizes == [(CROP, CROP)] * (FRAMES - 2) + [(1024, 1024)] * 2


@pytest.mark.parametrize("fmt", ["mkv", "mp4"])
def test_a_size_change_mid_stream_is_refused_before_the_decoder_meets_it(fmt):
    """The scorer's decoder and pack's check (which decodes nothing) both refuse at the parameter set."""
    payload = size_changing(fmt)
    shape = (FRAMES, CROP, CROP, 3)
    for check in (lambda: decode_member(fmt, payload, shape), lambda: check_payload(fmt, payload, shape)):
        with pytest.raises((CorpusError, ShardError), match=r"a parameter set in the stream sets frames of 1024x1024 "
                                                            r"pixels \(coded 1024x1024\), the corpus's are 36x36"):
            check()


def test_each_layer_refuses_on_its_own(monkeypatch):
    """With the parameter-set check switched off, the decoder's pixel cap refuses the big frames; with the cap
    lifted too, the check of each decoded frame's size does. Never a frame of the claimed size is kept."""
    payload = size_changing("mkv")
    monkeypatch.setattr(ParameterSets, "check", lambda self, units: None)
    with pytest.raises(VideoError, match="not a decodable mkv video"):
        decode_video(payload, "mkv", FRAMES, CROP, CROP)
    monkeypatch.setattr(video, "pixel_cap", lambda width, height: 1 << 30)
    with pytest.raises(VideoError, match=f"frame {FRAMES - 2} of 1024x1024 pixels, the corpus's are 36x36"):
        decode_video(payload, "mkv", FRAMES, CROP, CROP)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads the peak memory Linux keeps")
def test_memory_stays_bounded_while_refusing_a_size_change(tmp_path):
    """Peak memory in a fresh process: the bounded decoder refuses a stream turning 4096 x 4096 within a few
    MB of a small decode's; FFmpeg unchecked on the same bytes takes well over 100 MB."""
    path = tmp_path / "hostile.mkv"
    path.write_bytes(size_changing("mkv", big=4096))
    warm = tmp_path / "warm.mkv"
    warm.write_bytes(encode_frames(frames_of(FRAMES, CROP), RECIPES["lossless"]))
    code = f"""
import io, sys
import av, numpy as np
from qrobust.shared.video import VideoError, decode_video, rgb_frames
def peak_kib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
payload = open({str(path)!r}, "rb").read()
decode_video(open({str(warm)!r}, "rb").read(), "mkv", {FRAMES}, {CROP}, {CROP})  # libraries loaded and warm
try:
    open("/proc/self/clear_refs", "w").write("5")  # the peak from here on
except OSError:  # a kernel that keeps the peak from us
    print("unmeasurable")
    sys.exit()
before = peak_kib()
if sys.argv[1] == "bounded":
    try:
        decode_video(payload, "mkv", {FRAMES}, {CROP}, {CROP})
    except VideoError as e:
        print("refused:", e, file=sys.stderr)
else:
    with av.open(io.BytesIO(payload), format="matroska") as c:
        frames = rgb_frames(c)
print((peak_kib() - before) // 1024)
"""
    grown = {}
    for mode in ("bounded", "unchecked"):
        proc = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
        if proc.stdout.strip() == "unmeasurable":
            pytest.skip("this kernel does not let a process reset its peak memory")
        grown[mode] = int(proc.stdout.split()[-1])
        if mode == "bounded":
            assert "refused: a parameter set in the stream sets frames of 4096x4096" in proc.stderr
    assert grown["bounded"] < 8 and grown["unchecked"] > 100, grown


@pytest.mark.parametrize("case", ["size change", "more frames", "header lies"])
def test_hostile_videos_are_refused_by_score_and_pack(corpus, tmp_path, capsys, case):
    payload, message = {
        "size change": (size_changing("mkv"), "a parameter set in the stream sets frames of 1024x1024 pixels"),
        "more frames": (encode_frames(frames_of(FRAMES + 9, CROP), RECIPES["lossless"]),
                        f"video of more than the corpus's {FRAMES} frames"),
        "header lies": (contained(annexb(frames_of(FRAMES, 64)), "mkv"), "pixels, the corpus's are 36x36"),
    }[case]
    member = plant(corpus, VIDEOS, 1, payload)
    refused_by_score_and_pack(corpus, tmp_path, capsys, VIDEOS, f"member {member!r}", message)


def test_benign_videos_decode_to_the_pixels_of_an_unchecked_decode():
    """The bounded decoder changes no pixel: both recipes, odd sizes (x264 crops them from macroblocks)."""
    import av

    for recipe, ext in ((RECIPES["lossless"], "mkv"), (RECIPES["reference"], "mp4")):
        for side in (CROP, 17, 80):
            payload = encode_frames(frames_of(5, side), recipe)
            with av.open(io.BytesIO(payload)) as container:
                expected = np.stack(rgb_frames(container))
            np.testing.assert_array_equal(decode_video(payload, ext, 5, side, side), expected)
            check_video(payload, ext, 5, side, side)


def test_parameter_sets_are_read_as_the_decoder_reads_them():
    """The SPS reader gives x264's coded (whole macroblocks) and cropped sizes, 4:2:0 and 4:4:4."""
    import av

    for recipe, side, coded in ((RECIPES["lossless"], 36, 48), (RECIPES["reference"], 17, 32), (None, 36, 48)):
        if recipe is None:
            payload = contained(annexb(frames_of(2, side)), "mkv")  # 4:2:0, no recipe of qrobust's
        else:
            payload = encode_frames(frames_of(2, side), recipe)
        with av.open(io.BytesIO(payload)) as container:
            extradata = container.streams.video[0].codec_context.extradata
        sps = extradata[8:8 + int.from_bytes(extradata[6:8], "big")]  # the avcC record's first SPS
        assert sps_size(sps) == (coded, coded, side, side)
    with pytest.raises(ValueError):
        sps_size(b"\x67\x64")  # truncated


class FakePacket:
    """A demuxed packet as the parameter-set check sees it: its bytes, and new extradata riding along."""

    def __init__(self, data: bytes, new_extradata: bytes | None = None):
        self.data, self.side, self.size = data, new_extradata, len(data)

    def __bytes__(self):
        return self.data

    def has_sidedata(self, kind: str) -> bool:
        return kind == "new_extradata" and self.side is not None

    def get_sidedata(self, kind: str) -> bytes:
        return self.side


def test_every_way_a_parameter_set_reaches_the_decoder_is_checked():
    """FFmpeg's H.264 decoder takes parameter sets from the configuration, from a packet's new extradata, from
    a packet that is itself an avcC record, from units inside length-prefixed packets (a start code inside a
    unit begins another unit) and from Annex-B packets: an SPS of another size is refused on each path."""
    def units(raw: bytes) -> dict[int, bytes]:
        return {u[0] & 0x1F: u for u in video._annexb_units(raw)}

    small, big = units(annexb(frames_of(1, CROP))), units(annexb(np.full((1, 1024, 1024, 3), 9, np.uint8)))

    def avcc(sps: bytes, pps: bytes) -> bytes:
        return (bytes([1, sps[1], 0, sps[3], 0xFF, 0xE1]) + len(sps).to_bytes(2, "big") + sps + b"\1"
                + len(pps).to_bytes(2, "big") + pps)

    def sized(*nals: bytes) -> bytes:
        return b"".join(len(n).to_bytes(4, "big") + n for n in nals)

    slice_ = b"\x65\x88\x84" + bytes(range(4, 200))  # no start code inside: a unit as an encoder writes it
    refused = {
        "new extradata": FakePacket(sized(slice_), avcc(big[7], big[8])),
        "an avcC record as a packet": FakePacket(avcc(big[7], big[8])),
        "an SPS unit": FakePacket(sized(big[7], big[8], slice_)),
        "an SPS after a start code inside a unit": FakePacket(sized(slice_ + b"\0\0\1" + big[7])),
    }
    for how, packet in refused.items():
        sets = ParameterSets(CROP, CROP)
        sets.extradata(avcc(small[7], small[8]))
        sets.packet(FakePacket(sized(small[7], slice_)))  # the declared size: fine
        with pytest.raises(VideoError, match="sets frames of 1024x1024 pixels"):
            sets.packet(packet)
    sets = ParameterSets(CROP, CROP)
    sets.extradata(b"\0\0\0\1" + small[7])  # Annex-B configuration: Annex-B packets
    sets.packet(FakePacket(b"\0\0\1" + slice_))
    with pytest.raises(VideoError, match="sets frames of 1024x1024 pixels"):
        sets.packet(FakePacket(b"\0\0\0\1" + big[7]))
    with pytest.raises(VideoError, match="sets frames of 1024x1024 pixels"):
        ParameterSets(CROP, CROP).extradata(avcc(small[7], small[8])[:-len(small[8]) - 3] + b"\1"
                                            + len(big[7]).to_bytes(2, "big") + big[7])  # an SPS in the PPS list
    with pytest.raises(VideoError, match="NAL unit sizes overrun"):
        sets = ParameterSets(CROP, CROP)
        sets.extradata(avcc(small[7], small[8]))
        sets.packet(FakePacket(b"\0\0\1\0" + slice_))


# ---- images ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("payload, message", [
    (png_claiming(5000, 5000), "image of 5000x5000 pixels, the corpus's are 36x36"),
    (png_claiming(12000, 12000), "image of 12000x12000 pixels, the corpus's are 36x36"),  # over Pillow's warning
    (png_claiming(100_000, 100_000), "not a decodable png image: DecompressionBombError"),
])
def test_images_claiming_a_huge_size_are_refused_by_score_and_pack(corpus, tmp_path, capsys, monkeypatch, payload,
                                                                   message):
    from PIL import ImageFile

    def must_not_decode(self):
        raise AssertionError("decoded the pixels of an image of the wrong size")

    member = plant(corpus, IMAGES, 1, payload)
    monkeypatch.setattr(ImageFile.ImageFile, "load", must_not_decode)
    refused_by_score_and_pack(corpus, tmp_path, capsys, IMAGES, f"member {member!r}: {message}")


def test_a_jpeg_header_claiming_a_huge_size_is_refused_from_the_header():
    shape = (CROP, CROP, 3)
    assert decode_member("jpg", jpeg_claiming(CROP, CROP), shape).shape == shape  # the rewrite keeps a JPEG
    for check in (lambda: decode_member("jpg", jpeg_claiming(9000, 9000), shape),
                  lambda: check_payload("jpg", jpeg_claiming(9000, 9000), shape)):
        with pytest.raises((CorpusError, ShardError), match="image of 9000x9000 pixels, the corpus's are 36x36"):
            check()


def test_training_refuses_images_of_another_size_than_the_corpus_declares(corpus, monkeypatch):
    """Training on a corpus's shards: an image whose header claims another size than the manifest's crop is
    skipped as bad (one logged reason, never decoded); the other images train as before."""
    from PIL import ImageFile

    from qrobust.train.data import Loader, open_data

    clean = open_data(corpus / "clean/onecrop", image_size=32)
    assert {it.crop for it in clean.items} == {CROP}
    member = plant(corpus, IMAGES, 1, png_claiming(5000, 5000))
    data = open_data(corpus / "clean/onecrop", image_size=32)
    loaded = ImageFile.ImageFile.load

    def load(self):
        if self.size != (CROP, CROP):
            raise AssertionError("decoded the pixels of an image of the wrong size")
        return loaded(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    loader = Loader(data, 4, train=False)
    labels = torch.cat([y for _, y in loader]).tolist()
    key = member.split(".")[0]
    assert loader.bad == {f"{Path(IMAGES).name}:{key}": "image of 5000x5000 pixels, the corpus's are 36x36"}
    assert len(labels) == len(data) - 1


def test_training_bounds_images_without_a_corpus_even_with_pillows_guard_off(tmp_path, monkeypatch):
    """Shards outside any corpus declare no size: an image claiming more than MAX_SOURCE_PIXELS is refused from
    its header even when Pillow's decompression-bomb limit is switched off (as some code does)."""
    from PIL import Image, ImageFile

    from qrobust.shared.sources import MAX_SOURCE_PIXELS, BadImage, decode_rgb

    def must_not_decode(self):
        raise AssertionError("decoded the pixels of a decompression bomb")

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setattr(ImageFile.ImageFile, "load", must_not_decode)
    with pytest.raises(BadImage, match=f"20000x20000 pixels, more than the {MAX_SOURCE_PIXELS}"):
        decode_rgb(png_claiming(20000, 20000))
    with pytest.raises(BadImage, match="image of 40x40 pixels, the corpus's are 36x36"):
        decode_rgb(png_claiming(40, 40), (CROP, CROP))


def test_benign_corpus_scores_and_packs_as_before(pristine, tmp_path):
    """The bounded readers change nothing for a benign corpus: pack links it byte for byte, and the scores on
    the pack equal those on the original."""
    assert run("pack", pristine, "--out", tmp_path / "packed") == 0
    manifest = json.loads((pristine / "manifest.json").read_text())
    for entry in manifest["variants"].values():
        for shard in entry["shards"]:
            assert (tmp_path / "packed" / shard["name"]).read_bytes() == (pristine / shard["name"]).read_bytes()
    for name, where in (("a", pristine), ("b", tmp_path / "packed")):
        assert run("score", "--corpus", where, "--model", MODEL, "--out", tmp_path / name, "--workers", 0) == 0
    import zarr

    a, b = (zarr.open_group(str(tmp_path / n / "predictions.zarr"), mode="r") for n in "ab")
    for vid in manifest["variants"]:
        np.testing.assert_array_equal(a[vid][...], b[vid][...])
    source = Corpus(str(pristine))
    assert source.payload_shape("sequence/rotate") == (FRAMES, CROP, CROP, 3)


def test_payloads_of_a_few_bytes_are_refused_in_one_line():
    """Truncated members (what a cut shard leaves) reach every decoder: each says no in one line. Some of
    Pillow's format checks fail on a prefix shorter than they read; the training decoder must not."""
    from qrobust.shared.sources import BadImage, decode_rgb

    for first in range(256):
        for tail in (b"", b"\0", b"\xff" * 5):
            payload = bytes([first]) + tail
            with pytest.raises(BadImage) as e:
                decode_rgb(payload)
            assert "\n" not in str(e.value)
            for ext, shape in (("png", (CROP, CROP, 3)), ("jpg", (CROP, CROP, 3)), ("mkv", (FRAMES, CROP, CROP, 3))):
                with pytest.raises(CorpusError):
                    decode_member(ext, payload, shape)
