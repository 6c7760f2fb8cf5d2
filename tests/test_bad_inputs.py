"""Bad source inputs: each is converted by the one documented policy or rejected with a one-line reason.

Every input is made here (Pillow, numpy, OpenCV) in tmp_path. The unit tests pin
the decode result or the rejection reason of each; one end-to-end ``generate``
over a folder holding all of them at once checks that the good ones are built,
every bad one is listed in the manifest and the log with its one-line reason,
and that ``strict=True`` stops at the first bad file, naming it.
"""
from __future__ import annotations

import io
import logging
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qrobust.shared import sources
from qrobust.shared.demo_data import photo
from qrobust.shared.preprocess import onecrop
from qrobust.shared.sources import BadImage, SourceError, decode_rgb, load_rgb, open_source

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# --------------------------------------------------------------------------- the inputs

def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def base() -> Image.Image:
    """A real photo, 90x60 (landscape, so a rotation would show in the shape)."""
    return photo("chelsea").convert("RGB").resize((90, 60), Image.BILINEAR)


def jpeg(image: Image.Image | None = None, **kw) -> bytes:
    return encode(base() if image is None else image, "JPEG", quality=90, **kw)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height (a few hundred bytes: a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def truncated_jpeg() -> bytes:
    data = jpeg()
    return data[: len(data) // 2]


def jpeg_bad_header_marker() -> bytes:
    """The APP0 marker right after SOI replaced by FF 01 (TEM, which may not start a segment there)."""
    data = bytearray(jpeg())
    assert data[2:4] == b"\xff\xe0"
    data[2:4] = b"\xff\x01"
    return bytes(data)


def jpeg_reserved_marker() -> bytes:
    """The DQT marker replaced by the reserved FF 02."""
    data = bytearray(jpeg())
    i = data.find(b"\xff\xdb")
    data[i + 1] = 0x02
    return bytes(data)


def jpeg_marker_in_scan() -> bytes:
    """An EOI marker inside the compressed data: libjpeg warns "Corrupt JPEG data" and decodes (grey after it)."""
    data = bytearray(jpeg())
    i = data.find(b"\xff\xda")
    data[i + 40:i + 42] = b"\xff\xd9"
    return bytes(data)


def cmyk_jpeg() -> bytes:
    return encode(base().convert("CMYK"), "JPEG", quality=95)


def gray_jpeg() -> bytes:
    return jpeg(base().convert("L"))


def gray_png() -> bytes:
    return encode(base().convert("L"), "PNG")


def palette_png() -> bytes:
    return encode(base().convert("P"), "PNG")


def rgba_png() -> bytes:
    rgba = base().convert("RGBA")
    rgba.putalpha(0)  # fully transparent: compositing on any background would change every pixel
    return encode(rgba, "PNG")


DEEP = (np.arange(60 * 90, dtype=np.uint32).reshape(60, 90) * 12).astype(np.uint16)


def gray16_png() -> bytes:
    return encode(Image.fromarray(DEEP), "PNG")


def rgb16_png() -> bytes:
    import cv2

    rgb = np.stack([DEEP, DEEP[::-1], 65535 - DEEP], axis=-1)
    ok, buf = cv2.imencode(".png", rgb[..., ::-1])  # OpenCV writes BGR
    assert ok
    return buf.tobytes()


def exif_jpeg(orientation: int = 6) -> bytes:
    """The bytes of ``jpeg()`` plus an EXIF orientation tag (6: rotate 90 degrees to display)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(exif=exif.tobytes())


def tiny_jpeg() -> bytes:
    return jpeg(base().resize((5, 3), Image.BILINEAR))


def eps_file() -> bytes:
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto showpage\n"


# --------------------------------------------------------------------------- unit: decode results

def test_reasons_are_one_line_whatever_they_were_made_from():
    assert str(BadImage("cannot decode:\n  line two\x1b[1m\ttab\x07")) == "cannot decode: line two tab?"
    assert sources.Rejected("p", "a\nb").reason == "a b"
    assert len(str(BadImage("x" * 5000))) <= 300


@pytest.mark.parametrize("make, reason", [
    (lambda: b"", r"^empty file$"),
    (truncated_jpeg, r"^cannot decode: image file is truncated \(\d+ bytes not processed\)$"),
    (jpeg_bad_header_marker, r"^not a readable image: a damaged JPEG file \(no marker found\)$"),
    (jpeg_reserved_marker, r"^not a readable image: a damaged JPEG file \(no marker found\)$"),
    (lambda: png_header_only(30000, 30000), r"^decompression bomb refused: Image size \(900000000 pixels\) exceeds"),
    (lambda: png_header_only(10000, 10000), r"^decompression bomb refused: Image size \(100000000 pixels\) exceeds"),
    (lambda: encode(Image.new("L", (1, 400)), "PNG"), r"^1x400 pixels: one side is over 100 times the other"),
    (lambda: b"definitely not pixels", r"^not a readable image \(format not recognised; accepted: JPEG, PNG"),
    (lambda: encode(Image.new("RGB", (8, 8)), "GIF"), r"^not a readable image: GIF format, not one of JPEG, PNG"),
    (eps_file, r"^not a readable image: EPS format, not one of"),  # never handed to Ghostscript
])
def test_undecodable_inputs_are_rejected_with_their_reason(make, reason):
    with pytest.raises(BadImage, match=reason) as e:
        decode_rgb(make())
    assert "\n" not in str(e.value)


def test_decompression_bomb_is_refused_from_the_header_alone(monkeypatch):
    """Refused before any pixel is decoded: with decoding stubbed out to fail loudly, the reason is still the bomb."""
    from PIL import ImageFile

    def must_not_decode(self):
        raise AssertionError("decoded the pixels of a decompression bomb")

    monkeypatch.setattr(ImageFile.ImageFile, "load", must_not_decode)
    with pytest.raises(BadImage, match="decompression bomb"):
        decode_rgb(png_header_only(20000, 20000))


def test_png_named_jpeg_is_decoded_as_the_png_it_is(tmp_path):
    path = tmp_path / "disguised.JPEG"
    path.write_bytes(encode(base(), "PNG"))
    assert np.array_equal(np.asarray(load_rgb(path)), np.asarray(base()))  # lossless: exactly the pixels


def test_odd_modes_convert_by_the_documented_policy():
    rgb = np.asarray(base())
    cmyk = np.asarray(decode_rgb(cmyk_jpeg()), int)
    assert cmyk.shape == rgb.shape and np.abs(cmyk - rgb).mean() < 6  # not inverted (Adobe CMYK handled)
    for data in (gray_jpeg(), gray_png()):
        g = np.asarray(decode_rgb(data))
        assert g.shape == rgb.shape and (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    assert np.array_equal(np.asarray(decode_rgb(gray_png()))[..., 0], np.asarray(base().convert("L")))
    assert np.array_equal(np.asarray(decode_rgb(palette_png())), np.asarray(base().convert("P").convert("RGB")))
    assert np.array_equal(np.asarray(decode_rgb(rgba_png())), rgb)  # alpha dropped, not composited
    assert np.array_equal(np.asarray(decode_rgb(gray16_png()))[..., 0], (DEEP >> 8).astype(np.uint8))
    deep_rgb = np.asarray(decode_rgb(rgb16_png()))
    assert deep_rgb.dtype == np.uint8
    assert np.array_equal(deep_rgb, (np.stack([DEEP, DEEP[::-1], 65535 - DEEP], -1) >> 8).astype(np.uint8))


def test_marker_inside_the_compressed_data_decodes_as_libjpeg_does():
    data = jpeg_marker_in_scan()
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # what torchvision's loader sees
    assert np.array_equal(np.asarray(decode_rgb(data)), reference)
    assert not np.array_equal(reference, np.asarray(decode_rgb(jpeg())))  # the damage is real


@pytest.mark.parametrize("decoder", ["pil", "opencv", "ffmpeg"])
def test_exif_orientation_is_ignored_by_every_decoder(decoder):
    """One policy for every decode path of the project: pixels as stored, never rotated."""
    from qrobust.generate.systematic import DECODERS

    rotated, plain = exif_jpeg(6), jpeg()
    assert Image.open(io.BytesIO(rotated)).getexif()[0x0112] == 6
    out = DECODERS.get(decoder)(rotated)
    assert out.shape == (60, 90, 3)  # a decoder applying the tag would give 90 x 60
    assert np.array_equal(out, DECODERS.get(decoder)(plain))


def test_the_exif_input_would_be_rotated_by_opencv_defaults():
    """The input of the test above is live: OpenCV's default flags do rotate it (hence IGNORE_ORIENTATION)."""
    import cv2

    assert cv2.imdecode(np.frombuffer(exif_jpeg(6), np.uint8), cv2.IMREAD_COLOR).shape == (90, 60, 3)


def test_training_data_decodes_with_the_same_policy():
    """train/ decodes source images with decode_rgb too (no second decoder to keep in step)."""
    import inspect

    from qrobust.train import data

    assert "decode_rgb" in inspect.getsource(data) and "Image.open" not in inspect.getsource(data)


def test_image_smaller_than_the_crop_is_scaled_up(tmp_path):
    path = tmp_path / "tiny.JPEG"
    path.write_bytes(tiny_jpeg())
    image = load_rgb(path)
    assert image.size == (5, 3)
    assert onecrop(image, 40, 36).shape == (36, 36, 3)


def test_unreadable_file_is_rejected_with_the_os_reason(tmp_path, monkeypatch):
    path = tmp_path / "locked.JPEG"
    path.write_bytes(jpeg())

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(sources, "open", denied, raising=False)  # load_rgb's open, whoever runs the test
    with pytest.raises(BadImage, match=r"^cannot read: Permission denied$"):
        load_rgb(path)


@pytest.mark.skipif(IS_ROOT, reason="root reads a chmod 000 file")
def test_chmod_000_file_is_rejected(tmp_path):
    path = tmp_path / "locked.JPEG"
    path.write_bytes(jpeg())
    path.chmod(0)
    try:
        with pytest.raises(BadImage, match=r"^cannot read: Permission denied$"):
            load_rgb(path)
    finally:
        path.chmod(0o644)


# --------------------------------------------------------------------------- unit: listing

def _reasons(ds) -> dict[str, str]:
    return {Path(r.path).name: r.reason for r in ds.rejected}


def test_labels_missing_unknown_or_contradictory_reject_their_image_only(tmp_path):
    for name in ("a", "b", "c", "d", "e"):
        (tmp_path / f"{name}.JPEG").write_bytes(jpeg())
    (tmp_path / "val.txt").write_text("a.JPEG n1\nb.JPEG n2\nc.JPEG n9\nd.JPEG n1\nd.JPEG n2\n")
    (tmp_path / "classes.txt").write_text("n1 one\nn2 two\n")
    (tmp_path / "README.md").write_text("not a sample, not listed: ignored")
    ds = open_source(tmp_path, classes=tmp_path / "classes.txt")
    assert [(s.key, s.label) for s in ds.samples] == [("a", 0), ("b", 1)]
    assert _reasons(ds) == {
        "c.JPEG": "unknown label 'n9': not in the class list classes.txt (2 classes)",
        "d.JPEG": "listed in val.txt with different labels (n1, n2)",
        "e.JPEG": "missing label: not listed in val.txt",
    }
    # integer labels beyond the class list, and the same line twice (not a contradiction)
    (tmp_path / "val.txt").write_text("a.JPEG 0\nb.JPEG 1\nb.JPEG 1\nc.JPEG 7\n")
    ds = open_source(tmp_path, classes=tmp_path / "classes.txt")
    assert [(s.key, s.label) for s in ds.samples] == [("a", 0), ("b", 1)]
    assert _reasons(ds)["c.JPEG"] == "unknown label '7': not in the class list classes.txt (2 classes)"
    # a class list that knows none of the labels is a mistake of the whole run, not of each image
    (tmp_path / "val.txt").write_text("a.JPEG n7\nb.JPEG n8\n")
    with pytest.raises(SourceError, match="no label of .*val.txt is in the class list"):
        open_source(tmp_path, classes=tmp_path / "classes.txt")


def test_class_folder_outside_the_class_list_rejects_its_images(tmp_path):
    for cls in ("n1", "n3"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        (tmp_path / "src" / cls / f"img_{cls}.JPEG").write_bytes(jpeg())
    (tmp_path / "classes.txt").write_text("n1\nn2\n")
    ds = open_source(tmp_path / "src", classes=tmp_path / "classes.txt")
    assert [s.key for s in ds.samples] == ["img_n1"]
    assert _reasons(ds) == {"img_n3.JPEG": "unknown label: class folder 'n3' is not in the class list classes.txt"}


def test_duplicate_keys_and_dotted_names(tmp_path):
    root = tmp_path / "src"
    for cls, name in (("n1", "same.JPEG"), ("n2", "same.JPEG"), ("n1", "pair.JPEG"), ("n1", "pair.png"),
                      ("n1", "x.y.z.JPEG"), ("n2", "x_y.z.JPEG"), ("n2", "ILSVRC2012_val_00000001.JPEG")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        (root / cls / name).write_bytes(jpeg())
    ds = open_source(root)
    assert [s.key for s in ds.samples] == ["ILSVRC2012_val_00000001", "pair", "same", "x_y_z"]
    reasons = {str(Path(r.path).relative_to(root)): r.reason for r in ds.rejected}
    assert reasons == {
        "n1/pair.png": f"duplicate key 'pair' (also {root / 'n1' / 'pair.JPEG'})",
        "n2/same.JPEG": f"duplicate key 'same' (also {root / 'n1' / 'same.JPEG'})",
        "n2/x_y.z.JPEG": f"duplicate key 'x_y_z' (also {root / 'n1' / 'x.y.z.JPEG'})",
    }


def test_files_that_cannot_be_samples_are_rejected_when_listing(tmp_path, monkeypatch):
    root = tmp_path / "src"
    (root / "n1").mkdir(parents=True)
    (root / "n1" / "good.JPEG").write_bytes(jpeg())
    (root / "n1" / "notes.txt").write_text("a note")
    (root / "n1" / "tab\there.JPEG").write_bytes(jpeg())
    (root / "n1" / "dangling.JPEG").symlink_to(tmp_path / "nowhere.JPEG")
    os.mkfifo(root / "n1" / "fifo.JPEG")  # reading it would block the scan for ever
    (root / "n1" / "loop").symlink_to(root / "n1")  # a link cycle: listed once, not for ever
    (root / "n1" / "big.JPEG").write_bytes(jpeg() + b"\0" * 4096)
    (root / "stray.JPEG").write_bytes(jpeg())
    (root / "n1" / ".hidden.JPEG").write_bytes(b"")  # not part of the dataset (like .DS_Store, ._x.JPEG)
    monkeypatch.setattr(sources, "MAX_SOURCE_BYTES", 4096)
    ds = open_source(root)
    assert [s.key for s in ds.samples] == ["good"]
    reasons = _reasons(ds)
    assert reasons["notes.txt"] == "not an image file extension (.txt)"
    assert reasons["tab\there.JPEG"] == "file name holds control characters (a newline, a tab, ...)"
    assert reasons["dangling.JPEG"] == "broken link: No such file or directory"
    assert reasons["fifo.JPEG"] == "not a regular file (a FIFO, device or socket)"
    assert reasons["loop"].startswith("folder link loop (already listed as ")
    assert reasons["big.JPEG"].startswith("file of ") and "over the 4096 bytes" in reasons["big.JPEG"]
    assert reasons["stray.JPEG"] == "image outside any class folder"
    assert len(reasons) == 7 and all("\n" not in r for r in reasons.values())


def test_name_that_is_not_utf8_is_rejected(tmp_path):
    root = tmp_path / "src"
    (root / "n1").mkdir(parents=True)
    (root / "n1" / "good.JPEG").write_bytes(jpeg())
    try:
        with open(os.path.join(os.fsencode(root / "n1"), b"caf\xe9.JPEG"), "wb") as f:
            f.write(jpeg())
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    ds = open_source(root)
    assert [s.key for s in ds.samples] == ["good"]
    assert [r.reason for r in ds.rejected] == ["file name is not valid UTF-8"]
    ds.fingerprint()  # would raise UnicodeEncodeError on such a key


def test_unlistable_folder_is_recorded(tmp_path, monkeypatch):
    root = tmp_path / "src"
    (root / "n1" / "sub").mkdir(parents=True)
    (root / "n1" / "good.JPEG").write_bytes(jpeg())
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path).endswith("sub"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    ds = open_source(root)
    assert [s.key for s in ds.samples] == ["good"]
    assert [(Path(r.path).name, r.reason) for r in ds.rejected] == [("sub", "cannot list folder: Permission denied")]


# --------------------------------------------------------------------------- end to end

SUITE = """
name = "bad-inputs"
seed = 3
[geometry]
resize = 40
crop = 36
[shards]
samples = 64
[clean]
variants = ["onecrop"]
encoding = "png"
[systematic]
decoders = ["opencv", "ffmpeg"]
resizes = ["opencv-area"]
encoding = "png"
"""
ONLY = ["clean/onecrop", "systematic/decode-*"]  # every decoder of the suite checks every source anyway
CLASSES = ["n01", "n02", "n03"]


def _photo_jpeg(name: str) -> bytes:
    return jpeg(photo(name).convert("RGB").resize((64, 48), Image.BILINEAR))


def bad_source(root: Path) -> tuple[dict[str, int], dict[str, str], list[str]]:
    """A flat ImageNet-style folder (val.txt + class list) holding every bad input next to good images.

    Returns (good key -> label, bad file name -> expected reason (regex), file names rejected when listing)."""
    root.mkdir(parents=True)
    files = {  # name -> (bytes or None, label or None)
        "astronaut.JPEG": (_photo_jpeg("astronaut"), "n01"),
        "coffee.JPEG": (_photo_jpeg("coffee"), "n02"),
        "rocket.JPEG": (_photo_jpeg("rocket"), "n03"),
        # converted
        "disguised_png.JPEG": (encode(base(), "PNG"), "n01"),
        "cmyk.JPEG": (cmyk_jpeg(), "n02"),
        "gray.JPEG": (gray_jpeg(), "n03"),
        "gray_png.png": (gray_png(), "n01"),
        "palette.png": (palette_png(), "n02"),
        "rgba.png": (rgba_png(), "n03"),
        "deep16.png": (gray16_png(), "n01"),
        "deep48.png": (rgb16_png(), "n02"),
        "exif.JPEG": (exif_jpeg(6), "n03"),
        "tiny.JPEG": (tiny_jpeg(), "n01"),
        "dotted.name.v2.JPEG": (jpeg(), "n02"),
        "scan_marker.JPEG": (jpeg_marker_in_scan(), "n03"),
        # rejected when decoding
        "empty.JPEG": (b"", "n01"),
        "truncated.JPEG": (truncated_jpeg(), "n01"),
        "bad_marker.JPEG": (jpeg_bad_header_marker(), "n02"),
        "bomb.png": (png_header_only(30000, 30000), "n03"),
        "thin.png": (encode(Image.new("L", (2, 600)), "PNG"), "n01"),
        "text.JPEG": (b"I am a text file with a JPEG name", "n02"),
        "gif.JPEG": (encode(Image.new("RGB", (40, 40)), "GIF"), "n03"),
        "eps.JPEG": (eps_file(), "n01"),
        # rejected when listing
        "notes.txt": (b"listed in the label file, but no image", "n01"),
        "nolabel.JPEG": (jpeg(), None),
        "unknown_label.JPEG": (jpeg(), "n99"),
        "twice.JPEG": (jpeg(), "n01"),
        "dup.JPEG": (jpeg(), "n01"),
        "dup.png": (encode(base(), "PNG"), "n02"),
        "dotted_name.v2.JPEG": (jpeg(), "n03"),  # key dotted_name_v2, as dotted.name.v2.JPEG's
        "dangling.JPEG": (None, "n01"),
        "fifo.JPEG": (None, "n02"),
    }
    if not IS_ROOT:
        files["locked.JPEG"] = (jpeg(), "n03")
    lines = []
    for name, (data, label) in files.items():
        if data is not None:
            (root / name).write_bytes(data)
        if label is not None:
            lines.append(f"{name} {label}")
    lines.append("twice.JPEG n02")
    (root / "dangling.JPEG").symlink_to(root / "gone.JPEG")
    os.mkfifo(root / "fifo.JPEG")
    if not IS_ROOT:
        (root / "locked.JPEG").chmod(0)
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    try:  # a name that is not UTF-8 (a Latin-1 archive unpacked as is), where the file system allows it
        with open(os.path.join(os.fsencode(root), b"caf\xe9.JPEG"), "wb") as f:
            f.write(jpeg())
    except OSError:
        pass
    kept = list(files)[:15] + ["dup.JPEG"]  # of two files with one key, the first by path is kept
    good = {sources.key_for(Path(n)): CLASSES.index(files[n][1]) for n in kept}
    bad = {
        "empty.JPEG": r"empty file",
        "truncated.JPEG": r"cannot decode: image file is truncated \(\d+ bytes not processed\)",
        "bad_marker.JPEG": r"not a readable image: a damaged JPEG file \(no marker found\)",
        "bomb.png": r"decompression bomb refused: Image size \(900000000 pixels\) exceeds limit of \d+ pixels.*",
        "thin.png": r"2x600 pixels: one side is over 100 times the other .*",
        "text.JPEG": r"not a readable image \(format not recognised; accepted: .*\)",
        "gif.JPEG": r"not a readable image: GIF format, not one of .*",
        "eps.JPEG": r"not a readable image: EPS format, not one of .*",
        "notes.txt": r"not an image file extension \(\.txt\)",
        "nolabel.JPEG": r"missing label: not listed in val\.txt",
        "unknown_label.JPEG": r"unknown label 'n99': not in the class list classes\.txt \(3 classes\)",
        "twice.JPEG": r"listed in val\.txt with different labels \(n01, n02\)",
        "dup.png": r"duplicate key 'dup' \(also dup\.JPEG\)",
        "dotted_name.v2.JPEG": r"duplicate key 'dotted_name_v2' \(also dotted\.name\.v2\.JPEG\)",
        "dangling.JPEG": r"broken link: No such file or directory",
        "fifo.JPEG": r"not a regular file \(a FIFO, device or socket\)",
    }
    listing = ["notes.txt", "nolabel.JPEG", "unknown_label.JPEG", "twice.JPEG", "dup.png", "dotted_name.v2.JPEG",
               "dangling.JPEG", "fifo.JPEG"]
    if not IS_ROOT:
        bad["locked.JPEG"] = r"cannot read: Permission denied"
    if (root / os.fsdecode(b"caf\xe9.JPEG")).exists():
        bad[os.fsdecode(b"caf\xe9.JPEG")] = r"file name is not valid UTF-8"
        listing.append(os.fsdecode(b"caf\xe9.JPEG"))
    return good, bad, listing


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One generate over the folder of bad inputs (clean/onecrop + the OpenCV and FFmpeg decodes)."""
    from qrobust.generate.run import generate

    tmp = tmp_path_factory.mktemp("bad")
    good, bad, listing = bad_source(tmp / "src")
    (tmp / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (tmp / "suite.toml").write_text(SUITE)
    handler = _Capture()
    logging.getLogger("qrobust").addHandler(handler)
    try:
        manifest = generate(str(tmp / "suite.toml"), str(tmp / "src"), str(tmp / "out"),
                            classes=str(tmp / "classes.txt"), only=ONLY, workers=2, progress=False)
    finally:
        logging.getLogger("qrobust").removeHandler(handler)
    return tmp, manifest, good, bad, listing, handler.messages


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _shard(path: Path) -> dict[str, tuple[int, np.ndarray]]:
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return {k: (int(d["cls"]), np.asarray(Image.open(io.BytesIO(d["png"])).convert("RGB")))
            for k, d in members.items()}


def test_generate_builds_the_good_and_lists_every_bad_input_once(built):
    tmp, manifest, good, bad, _, messages = built
    import re

    rejected = {Path(r["path"]).name: r["reason"] for r in manifest["rejected"]}
    assert set(rejected) == set(bad)
    for name, pattern in bad.items():
        assert re.fullmatch(pattern, rejected[name]), (name, rejected[name])
        # the log names full paths (for the person at the terminal); the manifest, paths relative to the source
        logged = [m for m in messages if m.replace(f"{tmp / 'src'}/", "") == f"rejected {name}: {rejected[name]}"]
        assert len(logged) == 1, (name, messages)
    assert all("\n" not in r["reason"] and "\n" not in r["path"] for r in manifest["rejected"])
    assert manifest["samples"]["count"] == len(good) == 16
    assert sorted(manifest["variants"]) == ["clean/onecrop", "systematic/decode-ffmpeg", "systematic/decode-opencv"]
    for vid, entry in manifest["variants"].items():
        samples = _shard(tmp / "out" / entry["shards"][0]["name"])
        assert {k: c for k, (c, _) in samples.items()} == good, vid
        assert all(p.shape == (36, 36, 3) for _, p in samples.values())


def test_converted_inputs_hold_the_policy_pixels(built):
    from qrobust.generate.systematic import render_systematic

    tmp, manifest, _, _, _, _ = built
    clean = _shard(tmp / "out" / manifest["variants"]["clean/onecrop"]["shards"][0]["name"])
    expect = {
        "disguised_png": base(),  # the PNG's own pixels
        "exif": Image.open(io.BytesIO(jpeg())).convert("RGB"),  # not rotated: the twin without the tag
        "rgba": base(),  # alpha dropped
        "deep16": Image.fromarray((DEEP >> 8).astype(np.uint8)).convert("RGB"),
    }
    for key, image in expect.items():
        assert np.array_equal(clean[key][1], onecrop(image, 40, 36)), key
    opencv = _shard(tmp / "out" / manifest["variants"]["systematic/decode-opencv"]["shards"][0]["name"])
    assert np.array_equal(opencv["exif"][1], render_systematic(jpeg(), "opencv", "pil-bilinear", 40, 36))
    ffmpeg = _shard(tmp / "out" / manifest["variants"]["systematic/decode-ffmpeg"]["shards"][0]["name"])
    assert np.array_equal(ffmpeg["exif"][1], render_systematic(jpeg(), "ffmpeg", "pil-bilinear", 40, 36))


def test_strict_stops_at_the_first_bad_file_when_listing(built, tmp_path):
    from qrobust.generate.run import GenerateError, generate

    tmp, manifest, _, _, listing, _ = built
    first = sorted(tmp / "src" / n for n in listing)[0]
    reason = {r["path"]: r["reason"] for r in manifest["rejected"]}[first.name]
    with pytest.raises(GenerateError) as e:
        generate(str(tmp / "suite.toml"), str(tmp / "src"), str(tmp_path / "strict"),
                 classes=str(tmp / "classes.txt"), only=ONLY, strict=True, workers=1, progress=False)
    assert str(e.value) == f"--strict: {first}: {reason}"
    assert not (tmp_path / "strict" / "manifest.json").exists()


def test_strict_stops_at_the_first_file_that_does_not_decode(tmp_path):
    from qrobust.generate.run import GenerateError, generate

    src = tmp_path / "src"
    (src / "n01").mkdir(parents=True)
    (src / "n01" / "astronaut.JPEG").write_bytes(_photo_jpeg("astronaut"))
    (src / "n01" / "truncated.JPEG").write_bytes(truncated_jpeg())
    (src / "n01" / "bomb.png").write_bytes(png_header_only(30000, 30000))
    (tmp_path / "suite.toml").write_text(SUITE)
    with pytest.raises(GenerateError, match=rf"^--strict: {src / 'n01' / 'bomb.png'}: decompression bomb refused"):
        generate(str(tmp_path / "suite.toml"), str(src), str(tmp_path / "out"), only=ONLY, strict=True, workers=1,
                 progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
