"""`qrobust generate` / `qrobust verify` end to end on real photos."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import make_class_folder, save_jpeg, write_suite
from qrobust.generate.natural import corrupt
from qrobust.cli import main
from qrobust.shared.manifest import load_manifest
from qrobust.shared.verify import verify_corpus
from qrobust.shared.preprocess import onecrop
from qrobust.shared.seeding import sample_seed
from qrobust.shared.sources import load_rgb


def run(*args) -> int:
    return main(["-q", *map(str, args)])


def shard_hashes(corpus: Path) -> dict:
    return {s["name"]: s["sha256"] for v in load_manifest(corpus)["variants"].values() for s in v["shards"]}


def read_shard(path: Path) -> list[tuple[str, int, np.ndarray]]:
    """(key, label, pixels) of every sample, decoded independently of qrobust."""
    out, members = [], {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    for key, d in members.items():
        payload = d.get("jpg") or d.get("png")
        out.append((key, int(d["cls"]), np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))))
    return out


@pytest.fixture(scope="module")
def robustmq_corpus(tmp_path_factory):
    """The paper's suite at 224 px on two real photos of two classes."""
    tmp = tmp_path_factory.mktemp("robustmq")
    src = tmp / "src"
    for name in ("astronaut", "chelsea"):
        from qrobust.shared.demo_data import photo
        save_jpeg(src / f"n0000000{len(name)}" / f"{name}.JPEG", photo(name).convert("RGB"))
    assert run("generate", "--suite", "robustmq", "--source", src, "--out", tmp / "corpus", "--workers", 2) == 0
    return src, tmp / "corpus"


def test_robustmq_writes_101_variants_that_verify(robustmq_corpus, capsys):
    src, corpus = robustmq_corpus
    manifest = load_manifest(corpus)
    assert len(manifest["variants"]) == 101
    assert sum(v.startswith("sequence/") for v in manifest["variants"]) == 10
    assert sum(v.startswith("systematic/") for v in manifest["variants"]) == 14
    assert all(v["count"] == 2 for v in manifest["variants"].values())
    assert manifest["samples"]["count"] == 2 and manifest["rejected"] == []
    assert manifest["geometry"] == {"resize": 256, "crop": 224}
    assert {"numpy", "Pillow", "imagecorruptions", "opencv", "qrobust"} <= set(manifest["versions"])
    assert run("verify", corpus) == 0
    assert "OK" in capsys.readouterr().out


def test_shards_hold_the_reference_pixels(robustmq_corpus):
    src, corpus = robustmq_corpus
    manifest = load_manifest(corpus)
    clean = read_shard(corpus / manifest["variants"]["clean/onecrop"]["shards"][0]["name"])
    keys = [k for k, _, _ in clean]
    assert keys == ["astronaut", "chelsea"] and [c for _, c, _ in clean] == [1, 0]
    base = onecrop(load_rgb(src / "n00000009" / "astronaut.JPEG"), 256, 224)
    assert np.array_equal(clean[0][2], base)  # PNG: lossless
    glass = read_shard(corpus / manifest["variants"]["natural/glass_blur-2"]["shards"][0]["name"])
    expected = corrupt(base, "glass_blur", 2, sample_seed(0, "natural/glass_blur-2", "astronaut"))
    buf = io.BytesIO()
    Image.fromarray(expected).save(buf, format="JPEG", quality=85, optimize=True)
    assert np.array_equal(glass[0][2], np.asarray(Image.open(buf)))  # the q85 JPEG of the reference output


def test_second_run_does_nothing(robustmq_corpus):
    src, corpus = robustmq_corpus
    before = {p: p.stat().st_mtime_ns for p in corpus.rglob("*.tar")}
    manifest = (corpus / "manifest.json").read_bytes()
    assert run("generate", "--suite", "robustmq", "--source", src, "--out", corpus, "--workers", 2) == 0
    assert {p: p.stat().st_mtime_ns for p in corpus.rglob("*.tar")} == before
    assert (corpus / "manifest.json").read_bytes() == manifest


def test_workers_do_not_change_bytes(tmp_path, class_folder, small_suite):
    for n in (1, 2):
        assert run("generate", "--suite", small_suite, "--source", class_folder, "--out", tmp_path / f"w{n}",
                   "--workers", n) == 0
    assert shard_hashes(tmp_path / "w1") == shard_hashes(tmp_path / "w2")
    assert (tmp_path / "w1" / "manifest.json").read_text() == (tmp_path / "w2" / "manifest.json").read_text()
    assert len(shard_hashes(tmp_path / "w1")) == 12 * 3  # 12 variants x 3 shards of 2 samples


def test_killed_run_resumes_to_identical_bytes(tmp_path, class_folder):
    suite = write_suite(tmp_path / "s.toml", corruptions=("glass_blur", "zoom_blur", "fog"), severities=(1, 2, 3),
                        shard=1)
    args = ["generate", "--suite", suite, "--source", class_folder, "--workers", 2]
    assert run(*args, "--out", tmp_path / "ref") == 0
    out = tmp_path / "killed"
    for attempt in range(3):  # kill at different points, then finish
        proc = subprocess.Popen([sys.executable, "-m", "qrobust", "-q", *map(str, args), "--out", out],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 60
        target = 3 + 8 * attempt
        while time.time() < deadline and len(list(out.rglob("*.tar"))) < target and proc.poll() is None:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert run(*args, "--out", out) == 0
    assert not list(out.rglob("*.partial*"))
    assert shard_hashes(out) == shard_hashes(tmp_path / "ref")
    assert (out / "manifest.json").read_text() == (tmp_path / "ref" / "manifest.json").read_text()


def test_bad_inputs_are_converted_or_rejected(tmp_path, small_suite, capsys):
    src = make_class_folder(tmp_path / "src", per_class=1, names=("astronaut", "coffee"))
    from qrobust.shared.demo_data import photo
    rgb = photo("chelsea").convert("RGB").resize((90, 60))
    save_jpeg(src / "coffee" / "cmyk.jpg", rgb.convert("CMYK"))
    save_jpeg(src / "coffee" / "gray.jpg", rgb.convert("L"))
    rgb.convert("RGBA").save(src / "coffee" / "rgba.png")
    good = (src / "astronaut" / "astronaut_0.jpg").read_bytes()
    (src / "astronaut" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (src / "astronaut" / "empty.jpg").write_bytes(b"")
    (src / "astronaut" / "text.jpg").write_text("definitely not a jpeg")
    (src / "astronaut" / "readme.md").write_text("notes")
    out = tmp_path / "out"
    assert run("generate", "--suite", small_suite, "--source", src, "--out", out, "--workers", 2) == 0
    manifest = load_manifest(out)
    rejected = {Path(r["path"]).name: r["reason"] for r in manifest["rejected"]}
    assert set(rejected) == {"truncated.jpg", "empty.jpg", "text.jpg", "readme.md"}
    assert rejected["empty.jpg"] == "empty file" and "not a readable image" in rejected["text.jpg"]
    assert "truncated" in rejected["truncated.jpg"]
    assert manifest["samples"]["count"] == 5  # 2 photos + cmyk, gray, rgba converted
    clean = read_shard(out / manifest["variants"]["clean/onecrop"]["shards"][0]["name"])
    assert [k for k, _, _ in clean] == ["astronaut_0", "cmyk"]
    assert all(v["count"] == 5 for v in manifest["variants"].values())
    assert run("verify", out) == 0
    capsys.readouterr()
    assert run("generate", "--suite", small_suite, "--source", src, "--out", tmp_path / "strict", "--strict") == 2
    assert "--strict" in capsys.readouterr().err


def local_paths(manifest: dict, *folders: Path) -> list[str]:
    """The strings of a manifest (keys too) that are absolute paths or hold one of ``folders``: a corpus is
    shared, and what it records of the machine that made it is nobody else's business."""
    import tempfile

    names = {str(f) for f in (*folders, Path.home(), Path(tempfile.gettempdir())) if str(f) != "/"}
    found: list[str] = []

    def walk(value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(k)
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and (os.path.isabs(value) or any(n in value for n in names)):
            found.append(value)

    walk(manifest)
    return found


def test_manifest_holds_no_local_path(tmp_path, small_suite, monkeypatch, caplog):
    """The source folder by its name, the label file and every rejected input (and the paths in its reason)
    relative to it; the log lines, which stay on the machine, keep full paths."""
    import logging

    real_home = Path.home()
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    root = make_class_folder(home / "data" / "val", per_class=1, names=("astronaut", "coffee"))
    (root / "coffee" / "astronaut_0.png").write_bytes((root / "astronaut" / "astronaut_0.jpg").read_bytes())
    (root / "stray.jpg").write_bytes(b"")  # an image outside any class folder
    (root / "astronaut" / "empty.jpg").write_bytes(b"")  # rejected when decoding
    elsewhere = make_class_folder(tmp_path / "elsewhere", per_class=1, names=("chelsea",)) / "chelsea"
    (root / "coffee" / "a").symlink_to(elsewhere)  # listed once, through the first link
    (root / "coffee" / "b").symlink_to(elsewhere)  # a link loop whose real path lies outside the source
    with caplog.at_level(logging.WARNING, logger="qrobust"):
        assert run("generate", "--suite", small_suite, "--source", "~/data/val", "--out", tmp_path / "c",
                   "--only", "clean/onecrop", "--workers", 1) == 0
    manifest = load_manifest(tmp_path / "c")
    assert local_paths(manifest, tmp_path, home, real_home) == []
    assert manifest["source"]["root"] == "val" and manifest["source"]["label_file"] is None
    assert {r["path"]: r["reason"] for r in manifest["rejected"]} == {
        "astronaut/empty.jpg": "empty file",
        "coffee/astronaut_0.png": "duplicate key 'astronaut_0' (also astronaut/astronaut_0.jpg)",
        "coffee/b": "folder link loop (already listed as coffee/a)",
        "stray.jpg": "image outside any class folder"}
    assert manifest["samples"]["count"] == 3 and verify_corpus(tmp_path / "c") == []
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rejected ")]
    assert f"rejected {root.resolve() / 'coffee' / 'astronaut_0.png'}: duplicate key 'astronaut_0' (also " \
           f"{root.resolve() / 'astronaut' / 'astronaut_0.jpg'})" in logged
    # a flat folder with a label file elsewhere: the file by its name
    flat = home / "flat"
    flat.mkdir()
    for name in ("a.jpg", "b.jpg", "unlisted.jpg"):
        (flat / name).write_bytes((root / "astronaut" / "astronaut_0.jpg").read_bytes())
    (home / "lists").mkdir()
    (home / "lists" / "val.txt").write_text("a.jpg n01\nb.jpg n02\n")
    assert run("generate", "--suite", small_suite, "--source", "~/flat", "--labels", "~/lists/val.txt",
               "--out", tmp_path / "f", "--only", "clean/onecrop", "--workers", 1) == 0
    manifest = load_manifest(tmp_path / "f")
    assert local_paths(manifest, tmp_path, home, real_home) == []
    assert manifest["source"]["label_file"] == "val.txt" and manifest["source"]["root"] == "flat"
    assert manifest["rejected"] == [{"path": "unlisted.jpg", "reason": "missing label: not listed in val.txt"}]


def test_rerun_into_a_corpus_with_local_paths_resumes(tmp_path, class_folder, small_suite):
    """A corpus written before manifests left out local paths: same plan, so a rerun resumes (building
    nothing) and rewrites its manifest without them."""
    out = tmp_path / "c"
    args = ("generate", "--suite", small_suite, "--source", class_folder, "--out", out, "--only", "clean/*")
    assert run(*args) == 0
    manifest = load_manifest(out)
    old = dict(manifest, source=dict(manifest["source"], root=str(class_folder.resolve())),
               rejected=[{"path": str(class_folder.resolve() / "x" / "y.jpg"), "reason": "empty file"}])
    old.pop("card")
    (out / "manifest.json").write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    (out / "README.md").unlink()
    assert verify_corpus(out) == []
    tars = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    assert run(*args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")} == tars
    assert load_manifest(out) == manifest and local_paths(manifest, tmp_path) == []
    assert verify_corpus(out) == []


def test_verify_names_every_mismatch(tmp_path, class_folder, small_suite, capsys):
    out = tmp_path / "c"
    assert run("generate", "--suite", small_suite, "--source", class_folder, "--out", out, "--workers", 2) == 0
    shards = sorted(out.rglob("*.tar"))
    flipped, truncated, missing = shards[0], shards[1], shards[2]
    data = bytearray(flipped.read_bytes())
    data[700] ^= 0x01
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-1024])
    missing.unlink()
    (shards[3].parent / "extra-000099.tar").write_bytes(b"")
    capsys.readouterr()
    assert run("verify", out) == 1
    text = capsys.readouterr().out
    rel = lambda p: p.relative_to(out).as_posix()  # noqa: E731
    assert f"{rel(flipped)}: sha256 mismatch" in text
    assert f"{rel(truncated)}: " in text and "bytes, manifest says" in text
    assert f"{rel(missing)}: missing" in text
    assert "extra-000099.tar: extra file" in text
    assert len(verify_corpus(out)) == 4


def test_verify_detects_reordered_samples_and_edited_manifest(tmp_path, class_folder, small_suite):
    out = tmp_path / "c"
    assert run("generate", "--suite", small_suite, "--source", class_folder, "--out", out, "--workers", 1) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["variants"]["natural/fog-1"]
    shard = out / entry["shards"][0]["name"]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:  # swap the two samples, same size
        for m, data in members[2:] + members[:2]:
            tar.addfile(m, io.BytesIO(data))
    entry["shards"][0]["bytes"] = shard.stat().st_size
    manifest["variants"]["natural/fog-3"]["count"] += 1  # an edit by hand
    (out / "manifest.json").write_text(json.dumps(manifest))
    problems = "\n".join(verify_corpus(out))
    assert "out of key order" in problems and "natural/fog-3: shards hold" in problems


def test_rerun_with_other_settings_is_refused(tmp_path, class_folder, small_suite, capsys):
    out = tmp_path / "c"
    assert run("generate", "--suite", small_suite, "--source", class_folder, "--out", out, "--only", "clean/*") == 0
    assert len(load_manifest(out)["variants"]) == 2
    assert run("generate", "--suite", small_suite, "--source", class_folder, "--out", out, "--seed", 3) == 2
    assert "other settings (suite differ)" in capsys.readouterr().err
    # the same settings with another --only add variants to the same corpus
    assert run("generate", "--suite", small_suite, "--source", class_folder, "--out", out,
               "--only", "natural/fog-*") == 0
    assert sorted(load_manifest(out)["variants"]) == ["clean/onecrop", "clean/square", "natural/fog-1",
                                                      "natural/fog-3"]


def test_limit_and_per_class(tmp_path, class_folder, small_suite):
    out = tmp_path / "c"
    assert run("generate", "--suite", small_suite, "--source", class_folder, "--out", out, "--per-class", 1,
               "--limit", 2, "--only", "clean/onecrop") == 0
    clean = read_shard(out / "clean/onecrop/onecrop-000000.tar")
    assert [(k, c) for k, c, _ in clean] == [("astronaut_0", 0), ("chelsea_0", 1)]


def test_rerun_rebuilds_damaged_shards_and_never_blesses_them(tmp_path, class_folder, small_suite, caplog):
    out = tmp_path / "c"
    args = ["generate", "--suite", small_suite, "--source", class_folder, "--out", out, "--workers", 1]
    assert run(*args) == 0
    good = shard_hashes(out)
    shards = sorted(out.rglob("*.tar"))
    data = bytearray(shards[0].read_bytes())
    data[700] ^= 0x01
    shards[0].write_bytes(bytes(data))
    shards[1].write_bytes(shards[1].read_bytes()[:1000])
    assert run(*args) == 0
    assert shard_hashes(out) == good and verify_corpus(out) == []
    assert sum("rebuilding" in r.message for r in caplog.records) == 2


def test_settings_are_checked_even_without_the_state_folder(tmp_path, class_folder, small_suite, capsys):
    import shutil

    out = tmp_path / "c"
    assert run("generate", "--suite", small_suite, "--source", class_folder, "--out", out) == 0
    shutil.rmtree(out / ".qrobust")
    assert run("generate", "--suite", small_suite, "--source", class_folder, "--out", out, "--seed", 9) == 2
    assert "other settings" in capsys.readouterr().err
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "thesis.pdf").write_bytes(b"%PDF")
    assert run("generate", "--suite", small_suite, "--source", class_folder, "--out", stranger) == 2
    assert "not empty and holds no qrobust corpus" in capsys.readouterr().err
    assert (stranger / "thesis.pdf").exists()


def test_one_generate_per_corpus_folder(tmp_path, class_folder, small_suite, capsys):
    import fcntl

    out = tmp_path / "c"
    (out / ".qrobust").mkdir(parents=True)
    with open(out / ".qrobust" / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert run("generate", "--suite", small_suite, "--source", class_folder, "--out", out) == 2
    assert "another `qrobust generate` (a whole run, or --part runs) or import is writing" in capsys.readouterr().err


def test_verify_detects_edited_labels_and_swapped_shards(tmp_path, class_folder, small_suite):
    out = tmp_path / "c"
    assert run("generate", "--suite", small_suite, "--source", class_folder, "--out", out, "--workers", 1) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["classes"] = manifest["classes"][::-1]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert any("edited by hand" in p for p in verify_corpus(out))
    manifest["classes"] = manifest["classes"][::-1]
    first, second = (out / "natural/fog-1/fog-1-000000.tar"), (out / "natural/fog-1/fog-1-000001.tar")
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    entry = manifest["variants"]["natural/fog-1"]["shards"]
    for s in entry[:2]:
        s["bytes"], s["sha256"], s["keys_sha256"] = (out / s["name"]).stat().st_size, None, None
    (out / "manifest.json").write_text(json.dumps(manifest))
    problems = "\n".join(verify_corpus(out))
    assert "natural/fog-1: its samples differ from the corpus's sample list" in problems


@pytest.mark.parametrize("table, message", [
    ('[natural]\ncorruptions = ["fog"]\nseverites = [3]', "unknown keys in \\[natural\\]: severites"),
    ('[natural]\ncorruptions = ["fog"]\n', "crop 16 is below 32"),
])
def test_suite_mistakes_stop_before_any_work(tmp_path, class_folder, table, message):
    from qrobust.generate.run import generate
    from qrobust.shared.errors import QrobustError

    suite = tmp_path / "s.toml"
    suite.write_text(f'name = "s"\n[geometry]\nresize = 20\ncrop = 16\n{table}\n')
    with pytest.raises(QrobustError, match=message):
        generate(str(suite), str(class_folder), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_sequences_and_systematic_in_the_corpus(tmp_path, class_folder, small_suite, capsys, monkeypatch):
    from qrobust.generate.sequences import render_sequence
    from qrobust.generate.systematic import render_systematic
    from qrobust.shared.preprocess import resize_shorter
    from qrobust.shared.video import decode_frames

    out = tmp_path / "c"
    assert run("generate", "--suite", small_suite, "--source", class_folder, "--out", out, "--workers", 2) == 0
    manifest = load_manifest(out)
    entry = manifest["variants"]["sequence/gaussian_noise"]
    assert entry["encoding"]["codec"] == "libx264rgb" and entry["encoding"]["format"] == "lossless"
    assert {"av", "libavcodec", "libswscale"} <= set(manifest["versions"])
    with tarfile.open(out / entry["shards"][0]["name"]) as tar:
        payload = tar.extractfile("astronaut_0.mkv").read()
    assert manifest["variants"]["sequence/gaussian_noise"]["params"]["frames"] == 31
    source = class_folder / "astronaut" / "astronaut_0.jpg"
    expected = render_sequence(resize_shorter(load_rgb(source), 40), 36, "gaussian_noise", 1,
                               sample_seed(7, "sequence/gaussian_noise", "astronaut_0"))
    np.testing.assert_array_equal(decode_frames(payload, expected_frames=31), expected)
    ffmpeg = read_shard(out / manifest["variants"]["systematic/decode-ffmpeg"]["shards"][0]["name"])
    np.testing.assert_array_equal(ffmpeg[0][2], render_systematic(source.read_bytes(), "ffmpeg", "pil-bilinear", 40, 36))
    square = read_shard(out / manifest["variants"]["clean/square"]["shards"][0]["name"])
    np.testing.assert_array_equal(square[0][2], render_systematic(source.read_bytes(), "pil", "pil-bilinear", 40, 36))
    # verify --check-env flags an installation whose pixel-deciding libraries differ from the corpus's
    capsys.readouterr()
    assert run("verify", out, "--check-env") == 0
    from qrobust.generate import run as generate_run
    from qrobust.shared import versions

    installed = versions.library_versions()
    other = lambda: dict(installed, libswscale="99.0.0")  # noqa: E731
    monkeypatch.setattr(versions, "library_versions", other)  # what verify --check-env asks
    monkeypatch.setattr(generate_run, "library_versions", other)  # what generate asks before resuming
    assert run("verify", out) == 0
    assert run("verify", out, "--check-env") == 1
    assert f"environment: libswscale: corpus built with {installed['libswscale']}, installed 99.0.0" in \
        capsys.readouterr().out
    # and generate does not resume it with them: the shards would mix two libraries' output
    assert run("generate", "--suite", small_suite, "--source", class_folder, "--out", out) == 2
    assert "(versions differ)" in capsys.readouterr().err
    # hand-edited versions are an edited manifest
    monkeypatch.undo()
    manifest_json = json.loads((out / "manifest.json").read_text())
    manifest_json["versions"]["x264"] = "core 1"
    (out / "manifest.json").write_text(json.dumps(manifest_json))
    assert any("edited by hand" in p for p in verify_corpus(out))


def test_reference_sequence_encoding_needs_its_encoder(tmp_path, class_folder, small_suite, monkeypatch, capsys):
    import av

    real = av.codec.Codec

    def no_x264(name, mode="r"):
        if name.startswith("libx264"):
            raise av.error.FFmpegError(0, "no such codec")
        return real(name, mode)

    monkeypatch.setattr(av.codec, "Codec", no_x264)
    assert run("generate", "--suite", small_suite, "--source", class_folder, "--out", tmp_path / "c",
               "--sequence-encoding", "reference", "--only", "sequence/*") == 2
    err = capsys.readouterr().err
    assert "no libx264 encoder" in err and "--sequence-encoding lossless" in err


def test_shard_bytes_equal_webdataset_tarwriter(tmp_path):
    """The shard writer writes its tars itself (importing webdataset imports torch, over a second per
    worker): byte for byte what webdataset.TarWriter(encoder=False, mtime=0) wrote before."""
    import webdataset as wds

    from qrobust.generate.writer import ShardFile

    rng = np.random.default_rng(0)
    samples = [("a", 0, "png", rng.bytes(1000)), ("b\u00e9t\u00e9", 12, "jpg", rng.bytes(512)),  # pax header
               ("c" * 120, 3, "mp4", b""), ("d", 7, "mkv", rng.bytes(10240 - 1536)), ("e", 999, "npy", rng.bytes(1))]
    for n in range(1, len(samples) + 1):  # archives ending at different offsets in tarfile's 10240-byte record
        reference = io.BytesIO()
        writer = wds.TarWriter(reference, encoder=False, mtime=0, user="qrobust", group="qrobust")
        for key, label, ext, payload in samples[:n]:
            writer.write({"__key__": key, "cls": str(label).encode(), ext: payload})
        writer.close()
        shard = ShardFile(tmp_path / f"s{n}.tar")
        for key, label, ext, payload in samples[:n]:
            shard.add(key, label, ext, payload)
        summary = shard.publish()
        assert (tmp_path / f"s{n}.tar").read_bytes() == reference.getvalue(), n
        assert summary["count"] == n


def test_plan_splits_the_heaviest_groups_and_runs_longest_first(tmp_path):
    from qrobust.generate.run import job_cost, plan_jobs
    from qrobust.shared.manifest import shard_name
    from qrobust.shared.sources import SourceSample
    from qrobust.shared.suites import load_suite

    suite = load_suite(str(write_suite(tmp_path / "s.toml", corruptions=("fog", "glass_blur"), severities=(1, 2, 3),
                                       shard=4)))
    variants = list(suite.variants)
    by_id = {v.id: v for v in variants}
    samples = [SourceSample(f"k{i:02d}", f"/x/{i}.jpg", i % 3, 100) for i in range(12)]
    expected = {(v.id, i): samples[4 * i:4 * i + 4] for v in variants for i in range(3)}

    def shards(planned):
        out = {}
        for j in planned:
            for vid in j.group:
                assert (vid, j.shard) not in out  # every shard is written by exactly one job
                out[(vid, j.shard)] = list(j.samples)
        return out

    one = plan_jobs(suite, variants, samples, workers=1)
    two = plan_jobs(suite, variants, samples, workers=2)
    assert shards(one) == shards(two) == expected
    # next to the sequences the natural groups are small: whole (one decode for three severities)
    assert len(two) == len(one) and {len(j.group) for j in two if j.group[0].startswith("natural/")} == {3}
    natural = [v for v in variants if v.family == "natural"]  # alone, a group would hold up one worker: split
    assert {len(j.group) for j in plan_jobs(suite, natural, samples, workers=1)} == {3}
    split = plan_jobs(suite, natural, samples, workers=2)
    assert {len(j.group) for j in split} == {1} and shards(split) == {k: s for k, s in expected.items()
                                                                      if k[0].startswith("natural/")}
    costs = [job_cost(j, by_id) for j in two]
    assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1]
    assert two[0].group[0].startswith("sequence/gaussian_noise")  # the most expensive runs first
    # shards already on disk cost (almost) nothing: they go last
    built = {shard_name(vid, 0) for vid in by_id if vid.startswith("sequence/")}
    resumed = plan_jobs(suite, variants, samples, workers=2, built=lambda vid, i: shard_name(vid, i) in built)
    assert shards(resumed) == expected
    assert all(j.group[0].startswith("sequence/") and j.shard == 0 for j in resumed[-2:])


def test_split_jobs_do_not_change_bytes(tmp_path, class_folder):
    """A natural-only suite: with two workers each severity is a job of its own, with one they share one."""
    from qrobust.generate.run import plan_jobs
    from qrobust.shared.sources import open_source
    from qrobust.shared.suites import load_suite

    suite_path = write_suite(tmp_path / "s.toml", corruptions=("glass_blur", "fog"), severities=(1, 2, 3), shard=6)
    text = suite_path.read_text()
    suite_path.write_text(text[:text.index("[sequence]")])  # natural and clean only
    suite = load_suite(str(suite_path))
    samples = open_source(class_folder).samples
    assert len(plan_jobs(suite, list(suite.variants), samples, workers=2)) > \
        len(plan_jobs(suite, list(suite.variants), samples, workers=1))
    for n in (1, 2):
        assert run("generate", "--suite", suite_path, "--source", class_folder, "--out", tmp_path / f"w{n}",
                   "--workers", n) == 0
    assert shard_hashes(tmp_path / "w1") == shard_hashes(tmp_path / "w2")
    assert (tmp_path / "w1" / "manifest.json").read_bytes() == (tmp_path / "w2" / "manifest.json").read_bytes()
