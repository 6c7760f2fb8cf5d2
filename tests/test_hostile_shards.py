"""Hostile corpora: pickles in shards, object npy, absurd sizes, path traversal, links, FIFOs, pipe: URLs,
manifests nested without end; and output folders holding links for ``pack`` and ``import``.

Each is refused with a clear error naming the file (and member); nothing executes, nothing outside the
corpus is read, nothing outside an output folder is written. Where a test plants content in a shard it also
rewrites the manifest's size and sha256 to match, so the hash check passes and the reader itself must refuse.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from helpers import MEAN_MODEL, small_corpus
from helpers import tar_members as members
from qrobust.score.stream import Corpus, CorpusError, decode_member, decode_npy, iter_samples
from qrobust.cli import main
from qrobust.shared.manifest import ManifestError, load_manifest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHARD = "clean/onecrop/onecrop-000000.tar"
CROP = 36


def run(*args) -> int:
    return main(["-q", *map(str, args)])


MODEL = MEAN_MODEL


class Exploit:
    """Unpickling this creates the marker file: proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return small_corpus(tmp_path_factory.mktemp("hostile"), "clean/*", severities=(1,))


@pytest.fixture
def corpus(pristine, tmp_path) -> Path:
    copy = tmp_path / "corpus"
    shutil.copytree(pristine, copy)
    return copy


def tar_bytes(items) -> bytes:
    """A tar of (name or TarInfo, data) items, as a hostile writer would make it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in items:
            info = tarfile.TarInfo(info) if isinstance(info, str) else info
            if info.isfile():
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buf.getvalue()


def plant(corpus: Path, data: bytes, name: str = SHARD) -> None:
    """Replace a shard and record its new size and sha256 in the manifest (covering the tracks)."""
    (corpus / name).write_bytes(data)
    manifest = json.loads((corpus / "manifest.json").read_text())
    for entry in manifest["variants"].values():
        for shard in entry["shards"]:
            if shard["name"] == name:
                shard["bytes"], shard["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (corpus / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


def refused(corpus: Path, tmp_path: Path, capsys, *needles: str) -> str:
    """Score and verify the corpus: both must refuse, naming every needle, in one line."""
    capsys.readouterr()
    assert run("score", "--corpus", corpus, "--model", MODEL, "--out", tmp_path / "r", "--workers", 0) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(n in err for n in needles), err
    assert run("verify", corpus) == 1
    out = capsys.readouterr().out
    assert any(all(n in line for n in needles) for line in out.splitlines() if line.startswith("MISMATCH")), out
    return err


def pickled_object_npy(marker: Path) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([Exploit(marker)], dtype=object), allow_pickle=True)
    return buf.getvalue()


def test_the_payloads_are_live(tmp_path):
    """The planted payloads really execute when unpickled (so the tests below can fail)."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(Exploit(marker)))
    assert marker.exists()
    marker.unlink()
    np.load(io.BytesIO(pickled_object_npy(marker)), allow_pickle=True)
    assert marker.exists()


@pytest.mark.parametrize("ext", ["pickle", "pyd", "pth"])
@pytest.mark.parametrize("how", ["replaces the image", "joins the sample"])
def test_pickle_members_are_refused_unread(corpus, tmp_path, capsys, ext, how):
    marker = tmp_path / "marker"
    items = members(corpus / SHARD)
    evil = (f"astronaut_0.{ext}", pickle.dumps(Exploit(marker)))
    if how == "replaces the image":
        items[1] = evil
    else:
        items.insert(2, evil)
    plant(corpus, tar_bytes(items))
    refused(corpus, tmp_path, capsys, SHARD, f"astronaut_0.{ext}", f"type {ext!r} is refused")
    with pytest.raises(CorpusError, match=f"{SHARD}: member 'astronaut_0.{ext}'"):
        list(iter_samples(SHARD, (corpus / SHARD).read_bytes()))
    assert not marker.exists()


def test_object_npy_is_refused_before_numpy_reads_it(corpus, tmp_path, capsys):
    marker = tmp_path / "marker"
    items = members(corpus / SHARD)
    items[1] = ("astronaut_0.npy", pickled_object_npy(marker))
    plant(corpus, tar_bytes(items))
    capsys.readouterr()
    assert run("score", "--corpus", corpus, "--model", MODEL, "--out", tmp_path / "r", "--workers", 0) == 2
    err = capsys.readouterr().err
    assert f"{SHARD}: member 'astronaut_0.npy': npy of dtype object holds Python objects (a pickle); refused" in err
    assert not marker.exists()
    with pytest.raises(CorpusError, match="holds Python objects"):
        decode_npy(pickled_object_npy(marker))
    assert not marker.exists()


def test_uint8_npy_payload_scores_like_the_png(corpus, tmp_path):
    """npy is a decoder qrobust names (DESIGN: 'npy without pickle'): a uint8 array of the same pixels is
    read, so the refusals above are about the content, not the extension."""
    from PIL import Image

    assert run("score", "--corpus", corpus, "--model", MODEL, "--out", tmp_path / "png", "--only", "clean/onecrop") == 0
    items = members(corpus / SHARD)
    for i in (1, 3):
        pixels = np.asarray(Image.open(io.BytesIO(items[i][1])).convert("RGB"))
        buf = io.BytesIO()
        np.save(buf, pixels, allow_pickle=False)
        items[i] = (items[i][0].name.replace(".png", ".npy"), buf.getvalue())
    plant(corpus, tar_bytes(items))
    assert run("verify", corpus) == 0
    assert run("score", "--corpus", corpus, "--model", MODEL, "--out", tmp_path / "npy", "--only", "clean/onecrop") == 0
    png, npy = (json.loads((tmp_path / n / "summary.json").read_text())["clean"] for n in ("png", "npy"))
    import zarr

    stored = [zarr.open_group(str(tmp_path / n / "predictions.zarr"), mode="r")["clean/onecrop"][...]
              for n in ("png", "npy")]
    np.testing.assert_array_equal(*stored)
    assert png == npy


@pytest.mark.parametrize("array, message", [
    (np.zeros((CROP, CROP, 3), np.float32), "dtype float32"),
    (np.zeros((CROP, CROP), np.uint8), "shape (36, 36)"),
    (np.zeros((CROP, CROP, 3), np.uint8, order="F").T, "shape (3, 36, 36)"),
])
def test_npy_other_than_the_corpus_payload_is_refused(array, message):
    buf = io.BytesIO()
    np.save(buf, array)
    with pytest.raises(CorpusError, match=message.replace("(", r"\(").replace(")", r"\)")):
        decode_npy(buf.getvalue(), (CROP, CROP, 3))
    truncated = buf.getvalue()[:-10]
    with pytest.raises(CorpusError):
        decode_npy(truncated)


def set_header_size(data: bytes, member_index: int, size_field: bytes) -> bytes:
    """Rewrite the size field of the n-th header of a USTAR tar (fixing its checksum)."""
    data = bytearray(data)
    offset = 0
    for _ in range(member_index):
        size = int(data[offset + 124:offset + 136].rstrip(b"\0 ") or b"0", 8)
        offset += 512 + (size + 511) // 512 * 512
    data[offset + 124:offset + 136] = size_field
    data[offset + 148:offset + 156] = b" " * 8
    data[offset + 148:offset + 156] = b"%06o\0 " % sum(data[offset:offset + 512])
    return bytes(data)


@pytest.mark.parametrize("member_index", [1, 3])
@pytest.mark.parametrize("field, claimed", [(b"77777777777\0", 8 * 2 ** 30 - 1),
                                            (b"\x80" + b"\0" * 3 + (2 ** 62).to_bytes(8, "big"), 2 ** 62)])
def test_header_claiming_a_huge_size_is_refused(corpus, tmp_path, capsys, member_index, field, claimed):
    items = members(corpus / SHARD)
    name = items[member_index][0].name
    plant(corpus, set_header_size((corpus / SHARD).read_bytes(), member_index, field))
    refused(corpus, tmp_path, capsys, SHARD, f"member {name!r} claims {claimed} bytes, beyond the end of the shard")


def test_a_shard_far_bigger_than_the_manifest_says_is_not_read(corpus, tmp_path, capsys):
    import tracemalloc

    shard = corpus / SHARD
    with open(shard, "r+b") as f:  # 1 GiB (sparse): a member grown far beyond the manifest's byte count
        f.truncate(2 ** 30)
    source = Corpus(str(corpus))
    tracemalloc.start()
    with pytest.raises(CorpusError, match=f"{SHARD}: larger than the manifest's"):
        source.shard_bytes(source.manifest["variants"]["clean/onecrop"]["shards"][0])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * 2 ** 20  # read at most the manifest's size + 1, never the gigabyte
    capsys.readouterr()
    assert run("score", "--corpus", corpus, "--model", MODEL, "--out", tmp_path / "r") == 2
    assert f"{SHARD}: {2 ** 30} bytes, manifest says" in capsys.readouterr().err


@pytest.mark.parametrize("name, message", [
    ("../astronaut_0.png", "not a plain file name"), ("/tmp/astronaut_0.png", "not a plain file name"),
    ("sub/astronaut_0.png", "not a plain file name"), ("..\\astronaut_0.png", "not a plain file name"),
    (".astronaut_0.png", "not a plain file name"), ("astronaut_0\n.png", "has control characters"),
    ("a" * 2000 + ".png", "has an empty or overlong name")])
def test_path_member_names_are_refused(corpus, tmp_path, capsys, name, message):
    items = members(corpus / SHARD)
    items[1] = (name, items[1][1])
    if len(name) > 100:  # a long name needs a pax header
        items[1] = (tarfile.TarInfo(name), items[1][1])
        data = io.BytesIO()
        with tarfile.open(fileobj=data, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for info, payload in items:
                info = tarfile.TarInfo(info) if isinstance(info, str) else info
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        plant(corpus, data.getvalue())
    else:
        plant(corpus, tar_bytes(items))
    refused(corpus, tmp_path, capsys, SHARD, f"member {name!r}"[:60], message)
    assert not (corpus.parent / "astronaut_0.png").exists() and not Path("/tmp/astronaut_0.png").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE])
def test_members_that_are_not_regular_files_are_refused(corpus, tmp_path, capsys, kind):
    items = members(corpus / SHARD)
    link = tarfile.TarInfo("astronaut_0.png")
    link.type, link.linkname = kind, "/etc/passwd"
    items[1] = (link, b"")
    plant(corpus, tar_bytes(items))
    refused(corpus, tmp_path, capsys, SHARD, "member 'astronaut_0.png' is not a regular file")


@pytest.mark.parametrize("label, message", [(b"7", "label 7, the corpus has 3 classes"),
                                            (b"-1", "not a non-negative integer label"),
                                            ("\u0661".encode(), "not a non-negative integer label"),
                                            (b"1" * 5000, "not a non-negative integer label")])
def test_labels_must_be_classes_of_the_corpus(corpus, tmp_path, capsys, label, message):
    items = members(corpus / SHARD)
    items[0] = (items[0][0].name, label)
    plant(corpus, tar_bytes(items))
    capsys.readouterr()
    assert run("score", "--corpus", corpus, "--model", MODEL, "--out", tmp_path / "r", "--workers", 0) == 2
    err = capsys.readouterr().err
    assert f"{SHARD}: member 'astronaut_0.cls'" in err and message in err


def png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("payload, message", [
    (png_claiming(5000, 5000), "image of 5000x5000 pixels, the corpus's are 36x36"),
    (png_claiming(100_000, 100_000), "not a decodable png image: DecompressionBombError"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 36 36\n", "not a decodable png image"),
])
def test_images_are_checked_before_decoding(corpus, tmp_path, capsys, payload, message):
    items = members(corpus / SHARD)
    items[1] = (items[1][0].name, payload)
    plant(corpus, tar_bytes(items))
    capsys.readouterr()
    assert run("score", "--corpus", corpus, "--model", MODEL, "--out", tmp_path / "r", "--workers", 0) == 2
    err = capsys.readouterr().err
    assert f"{SHARD}: member 'astronaut_0.png': {message}" in err, err


def test_jpeg_disguised_as_png_is_refused():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (CROP, CROP)).save(buf, format="JPEG")
    with pytest.raises(CorpusError, match="not a decodable png image"):
        decode_member("png", buf.getvalue(), (CROP, CROP, 3))
    assert decode_member("jpg", buf.getvalue(), (CROP, CROP, 3)).shape == (CROP, CROP, 3)


@pytest.mark.parametrize("frames, size, message", [(31, CROP, None), (31, 64, "video of 64x64 pixels"),
                                                   (40, CROP, "video of more than the corpus's 31 frames"),
                                                   (30, CROP, "holds 30 frames, expected 31")])
def test_videos_are_checked_before_decoding(frames, size, message):
    from qrobust.shared.video import RECIPES, encode_frames

    payload = encode_frames(np.zeros((frames, size, size, 3), np.uint8), RECIPES["lossless"])
    shape = (31, CROP, CROP, 3)
    if message is None:
        assert decode_member("mkv", payload, shape).shape == shape
    else:
        with pytest.raises(CorpusError, match=message):
            decode_member("mkv", payload, shape)


def test_playlists_disguised_as_videos_open_nothing(tmp_path):
    """FFmpeg is held to the container the extension names: an HLS playlist pointing at a file outside the
    corpus (a valid video) is no video."""
    from qrobust.shared.video import RECIPES, encode_frames

    outside = tmp_path / "outside.mkv"
    outside.write_bytes(encode_frames(np.zeros((31, CROP, CROP, 3), np.uint8), RECIPES["lossless"]))
    playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:40\n#EXTINF:31.0,\nfile:{outside}\n#EXT-X-ENDLIST\n".encode()
    for ext in ("mkv", "mp4"):
        with pytest.raises(CorpusError, match=f"not a decodable {ext} video"):
            decode_member(ext, playlist, (31, CROP, CROP, 3))


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/passwd", "http://elsewhere/x.tar", "pipe:cat /etc/passwd",
                                  "file:///etc/passwd", "clean/onecrop/../../../etc/passwd",
                                  "clean/onecrop/onecrop-000007.tar"])
def test_manifest_shard_names_cannot_leave_the_corpus(corpus, tmp_path, capsys, name):
    manifest = json.loads((corpus / "manifest.json").read_text())
    manifest["variants"]["clean/onecrop"]["shards"][0]["name"] = name
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    for command in (["verify", corpus], ["score", "--corpus", corpus, "--model", MODEL, "--out", tmp_path / "r"]):
        assert run(*command) == 2
        err = capsys.readouterr().err
        assert "clean/onecrop" in err and repr(name)[:40] in err and err.count("\n") == 1, err
    with pytest.raises(ManifestError):
        load_manifest(corpus)


@pytest.mark.parametrize("vid", ["../../etc", "clean/../../x", "clean/", "/clean/x", "natural/a:b"])
def test_variant_ids_cannot_make_paths(corpus, capsys, vid):
    from qrobust.shared.manifest import shard_name

    manifest = json.loads((corpus / "manifest.json").read_text())
    entry = manifest["variants"].pop("clean/square")
    entry["family"] = vid.split("/")[0]
    entry["shards"] = [dict(s, name=shard_name(vid, i)) for i, s in enumerate(entry["shards"])]
    manifest["variants"][vid] = entry
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError):
        load_manifest(corpus)
    with pytest.raises(CorpusError):
        Corpus(str(corpus))


def test_shard_linked_out_of_the_corpus_is_refused(corpus, tmp_path, capsys):
    """A symbolic link to a file outside, with the very bytes the manifest expects: refused all the same."""
    outside = tmp_path / "elsewhere.tar"
    shutil.move(corpus / SHARD, outside)
    (corpus / SHARD).symlink_to(outside)
    capsys.readouterr()
    assert run("verify", corpus) == 1
    assert f"MISMATCH {SHARD}: resolves outside the corpus" in capsys.readouterr().out
    assert run("score", "--corpus", corpus, "--model", MODEL, "--out", tmp_path / "r") == 2
    assert f"{SHARD}: resolves outside the corpus" in capsys.readouterr().err
    source = Corpus(str(corpus))
    with pytest.raises(CorpusError, match="resolves outside the corpus"):
        source.shard_bytes(source.manifest["variants"]["clean/onecrop"]["shards"][0])


def test_fifo_shard_or_manifest_is_refused_without_blocking(corpus, tmp_path, capsys):
    (corpus / SHARD).unlink()
    os.mkfifo(corpus / SHARD)
    capsys.readouterr()
    assert run("verify", corpus) == 1
    assert f"MISMATCH {SHARD}: not a regular file" in capsys.readouterr().out
    assert run("score", "--corpus", corpus, "--model", MODEL, "--out", tmp_path / "r") == 2
    assert f"{SHARD}: not a regular file" in capsys.readouterr().err
    source = Corpus(str(corpus))
    with pytest.raises(CorpusError, match="not a regular file"):
        source.shard_bytes(source.manifest["variants"]["clean/onecrop"]["shards"][0])
    (corpus / "manifest.json").unlink()
    os.mkfifo(corpus / "manifest.json")
    for command in (["verify", corpus], ["score", "--corpus", corpus, "--model", MODEL, "--out", tmp_path / "r"]):
        assert run(*command) == 2
        assert "manifest.json is not a regular file" in capsys.readouterr().err


def test_pipe_and_foreign_corpus_locations_are_refused(corpus, tmp_path, capsys):
    marker = tmp_path / "marker"
    for location, message in ((f"pipe:touch {marker}", "is a shell pipe"),
                              (f"PIPE:touch {marker} http://x/", "is a shell pipe"),
                              (f"simplecache::file://{corpus}", "chained URLs are refused"),
                              (f"file://{corpus}", "scheme 'file' is not one qrobust reads"),
                              ("ftp://example.org/corpus", "scheme 'ftp'")):
        assert run("score", "--corpus", location, "--model", MODEL, "--out", tmp_path / "r") == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (location, err)
    assert run("verify", f"pipe:touch {marker}") == 2
    assert not marker.exists()


def test_manifest_too_large_is_refused_unread(corpus, capsys):
    with open(corpus / "manifest.json", "r+b") as f:
        f.truncate(2 ** 30)  # sparse
    assert run("verify", corpus) == 2
    assert "larger than 64 MiB" in capsys.readouterr().err
    with pytest.raises(CorpusError, match="larger than 64 MiB"):
        Corpus(str(corpus))


def nested(levels: int):
    value: list = []
    for _ in range(levels):
        value = [value]
    return value


def test_a_manifest_nested_too_deep_is_refused_in_one_line(corpus, tmp_path, capsys):
    """A key no check reads, nested 600 deep: JSON parses it, but copying or walking it recursively fails deep
    inside (pack copies the manifest). Every reader refuses it in one line, exit 2, naming the manifest."""
    manifest = json.loads((corpus / "manifest.json").read_text())
    manifest["extra"] = nested(600)
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    for command in (["pack", corpus, "--out", tmp_path / "packed"], ["verify", corpus],
                    ["score", "--corpus", corpus, "--model", MODEL, "--out", tmp_path / "r", "--workers", 0]):
        assert run(*command) == 2, command
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "manifest.json: JSON nested deeper than 32 levels" in err, (command, err)
    assert not (tmp_path / "packed" / "manifest.json").exists()


def test_pack_writes_nothing_through_a_link_in_its_out(corpus, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "packed"
    out.mkdir()
    (out / "clean").symlink_to(elsewhere, target_is_directory=True)
    capsys.readouterr()
    assert run("pack", corpus, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {out} is not empty" in err
    assert not list(elsewhere.iterdir()) and (out / "clean").is_symlink()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A released ImageNet-C tree (made in its layout) and a finished import of it."""
    from qrobust.generate.release_import import import_release
    from test_import import make_c

    tmp = tmp_path_factory.mktemp("imported")
    tree = make_c(tmp / "ImageNet-C", corruptions=("fog",), severities=(1,))
    out = tmp / "c"
    import_release("imagenet-c", str(tree), str(out), workers=1, progress=False, samples_per_shard=2)
    return tree, out


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.is_symlink(), p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("where", ["a shard", "a variant folder", "the state folder", "a partial file"])
def test_import_writes_nothing_through_a_link_in_its_out(imported, tmp_path, capsys, where):
    """An --out holding a link, as an interrupted import handed over could: a shard linked to a file outside,
    a variant folder or .qrobust linked to a folder outside, a link named like a partial file. The import
    is refused in one line naming the link, before it writes, removes or reads anything through it."""
    tree, done = imported
    out = tmp_path / "c"
    shutil.copytree(done, out, symlinks=True)
    (out / "manifest.json").unlink()  # interrupted: the shards are checked and kept or rebuilt
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "precious.tar"
    victim.write_bytes(b"not a shard: rebuilding it would overwrite it")
    if where == "a shard":
        link = out / "natural/fog-1/fog-1-000000.tar"
        link.unlink()
        link.symlink_to(victim)
    elif where == "a variant folder":
        link = out / "natural/fog-1"
        shutil.move(link, outside / "fog-1")
        link.symlink_to(outside / "fog-1", target_is_directory=True)
    elif where == "the state folder":
        link = out / ".qrobust"
        shutil.move(link, outside / "state")
        link.symlink_to(outside / "state", target_is_directory=True)
    else:
        link = out / "natural/fog-1/fog-1-000000.tar.partial-host-1"
        link.symlink_to(victim)
    before = snapshot(outside)
    capsys.readouterr()
    assert run("import", "imagenet-c", tree, "--out", out, "--workers", 1) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(link) in err and "link" in err, err
    assert snapshot(outside) == before and link.is_symlink()
    assert not (out / "manifest.json").exists()


def test_import_rebuilds_a_kept_shard_whose_payloads_break_the_geometry(imported, tmp_path, caplog):
    """A shard left in --out with the right keys but a payload whose header claims another size (no manifest
    records its sha256 yet) is rebuilt from the released files, not kept."""
    from qrobust.generate.release_import import import_release

    tree, done = imported
    out = tmp_path / "c"
    shutil.copytree(done, out)
    (out / "manifest.json").unlink()
    name = "natural/fog-1/fog-1-000000.tar"
    items = members(out / name)
    released = bytearray(items[1][1])  # the released JPEG, its frame header (SOF0) claiming 9000 x 9000
    sof = released.index(b"\xff\xc0")
    released[sof + 5:sof + 9] = struct.pack(">HH", 9000, 9000)
    items[1] = (items[1][0].name, bytes(released))
    (out / name).write_bytes(tar_bytes(items))
    import_release("imagenet-c", str(tree), str(out), workers=1, progress=False, samples_per_shard=2)
    assert (out / name).read_bytes() == (done / name).read_bytes()
    assert f"rebuilding {out / name}: member {items[1][0]!r}: image of 9000x9000 pixels, the corpus's are 32x32" \
        in caplog.text
    assert (out / "manifest.json").read_bytes() == (done / "manifest.json").read_bytes()


def test_import_refuses_a_released_video_that_changes_size_mid_stream(tmp_path, capsys):
    """Probing a released file reads its container; the parameter sets inside the stream are checked as the
    file is written into its shard: one line naming the file, exit 2."""
    from test_bounded_decoders import annexb, contained
    from test_import import make_p

    tree = make_p(tmp_path / "ImageNet-P", perturbations=("rotate",), size=64, frames=4)
    victim = sorted(tree.rglob("*.mp4"))[1]
    frames = np.zeros((3, 64, 64, 3), np.uint8)
    victim.write_bytes(contained(annexb(frames) + annexb(np.zeros((1, 512, 512, 3), np.uint8)), "mp4", 64, 64))
    capsys.readouterr()
    assert run("import", "imagenet-p", tree, "--out", tmp_path / "p", "--workers", 1) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(victim) in err, err
    assert "a parameter set in the stream sets frames of 512x512 pixels" in err
    assert not (tmp_path / "p" / "manifest.json").exists()
