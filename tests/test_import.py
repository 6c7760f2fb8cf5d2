"""`qrobust import`: released ImageNet-C / ImageNet-P trees (made here, in the released layout, at a small
size) become corpora whose shards hold the files' bytes unchanged, that verify and score."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import tar_members
from test_generate import local_paths
from qrobust.generate.release_import import ReleaseError, import_release
from qrobust.cli import main
from qrobust.shared.manifest import load_manifest, manifest_problems
from qrobust.shared.verify import verify_corpus

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WNIDS = ("n01443537", "n01440764", "n02102040")  # not in sorted order: labels are sorted-wnid indices
LABEL = {w: i for i, w in enumerate(sorted(WNIDS))}
# H.264 in mp4 as ImageNet-P was released (fast settings: the bytes, not the quality, matter here)
MP4 = {"container": "mp4", "ext": "mp4", "codec": "libx264", "pix_fmt": "yuv420p", "fps": 1,
       "options": {"preset": "ultrafast", "threads": "1"}}


def run(*args) -> int:
    return main(["-q", *map(str, args)])


def jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def mp4(frames: np.ndarray) -> bytes:
    from qrobust.shared.video import encode_frames

    return encode_frames(frames, MP4)


def stem(i: int) -> str:
    return f"ILSVRC2012_val_{i:08d}"


def make_c(root: Path, corruptions=("fog", "gaussian_noise"), severities=(1, 2), per_class=2, size=32) -> Path:
    """ROOT/<corruption>/<severity>/<wnid>/<stem>.JPEG of random pixels; sample i is in class i // per_class."""
    rng = np.random.default_rng(0)
    for c in corruptions:
        for s in severities:
            for i, w in enumerate(WNIDS):
                for n in range(per_class):
                    path = root / c / str(s) / w / f"{stem(i * per_class + n)}.JPEG"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(jpeg(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
    return root


def make_p(root: Path, perturbations=("rotate", "gaussian_noise_2"), per_class=2, size=64, frames=4) -> Path:
    """ROOT/<perturbation>/<wnid>/<stem>.mp4 of random frames."""
    rng = np.random.default_rng(1)
    for p in perturbations:
        for i, w in enumerate(WNIDS):
            for n in range(per_class):
                path = root / p / w / f"{stem(i * per_class + n)}.mp4"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(mp4(rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)))
    return root


@pytest.fixture(scope="module")
def tree_c(tmp_path_factory) -> Path:
    return make_c(tmp_path_factory.mktemp("release") / "ImageNet-C")


@pytest.fixture(scope="module")
def tree_p(tmp_path_factory) -> Path:
    return make_p(tmp_path_factory.mktemp("release") / "ImageNet-P")


def samples(corpus: Path, vid: str) -> list[tuple[str, int, str, bytes]]:
    """(key, label, payload extension, payload bytes) of every sample of a variant, in order."""
    manifest = json.loads((corpus / "manifest.json").read_text())
    out = []
    for shard in manifest["variants"][vid]["shards"]:
        members = tar_members(corpus / shard["name"])
        for (label, cls), (payload, data) in zip(members[::2], members[1::2]):
            key, ext = payload.name.split(".", 1)
            assert label.name == f"{key}.cls"
            out.append((key, int(cls), ext, data))
    return out


def assert_valid(corpus: Path) -> dict:
    manifest = load_manifest(corpus)
    assert manifest_problems(manifest) == []
    assert verify_corpus(corpus) == []
    return manifest


def test_imagenet_c_keeps_the_released_bytes(tree_c, tmp_path):
    out = tmp_path / "c"
    manifest = import_release("imagenet-c", str(tree_c), str(out), workers=1, progress=False, samples_per_shard=4)
    assert_valid(out)
    assert sorted(manifest["variants"]) == ["natural/fog-1", "natural/fog-2", "natural/gaussian_noise-1",
                                            "natural/gaussian_noise-2"]
    entry = manifest["variants"]["natural/gaussian_noise-2"]
    assert entry["params"] == {"corruption": "gaussian_noise", "severity": 2}
    assert entry["encoding"] == {"format": "jpg", "as_released": True}
    assert [s["count"] for s in entry["shards"]] == [4, 2]  # 6 samples, 4 per shard
    assert manifest["classes"] == sorted(WNIDS) and manifest["rejected"] == []
    assert manifest["suite"]["spec"]["geometry"]["crop"] == 32 and manifest["samples"]["count"] == 6
    # no local path: the release folder by its name
    assert manifest["imported_from"] == {"kind": "imagenet-c", "root": tree_c.resolve().name, "classes": None}
    assert manifest["source"]["root"] == tree_c.resolve().name
    assert manifest["versions"]["Pillow"]
    for vid in manifest["variants"]:
        corruption, severity = vid.split("/")[1].rsplit("-", 1)
        got = samples(out, vid)
        assert [k for k, *_ in got] == [stem(i) for i in range(6)]
        for key, label, ext, data in got:
            wnid = WNIDS[int(key[-8:]) // 2]
            assert ext == "jpg" and label == LABEL[wnid]
            assert data == (tree_c / corruption / severity / wnid / f"{key}.JPEG").read_bytes()


def test_imagenet_p_keeps_the_released_videos(tree_p, tmp_path):
    out = tmp_path / "p"
    manifest = import_release("imagenet-p", str(tree_p), str(out), workers=1, progress=False)
    assert_valid(out)
    assert manifest["variants"]["sequence/gaussian_noise_2"]["params"] == \
        {"perturbation": "gaussian_noise", "difficulty": 2, "frames": 4, "noise": True}
    assert manifest["variants"]["sequence/rotate"]["params"] == \
        {"perturbation": "rotate", "difficulty": 1, "frames": 4, "noise": False}
    assert manifest["suite"]["spec"]["geometry"]["crop"] == 64
    for key, label, ext, data in samples(out, "sequence/rotate"):
        wnid = WNIDS[int(key[-8:]) // 2]
        assert ext == "mp4" and label == LABEL[wnid]
        assert data == (tree_p / "rotate" / wnid / f"{key}.mp4").read_bytes()


def test_bad_files_are_rejected_from_every_variant(tree_c, tmp_path):
    tree = shutil.copytree(tree_c, tmp_path / "tree")
    fog1 = tree / "fog" / "1"
    (tree / "gaussian_noise" / "2" / WNIDS[0] / f"{stem(0)}.JPEG").unlink()               # missing from one
    truncated = fog1 / WNIDS[0] / f"{stem(1)}.JPEG"
    truncated.write_bytes(truncated.read_bytes()[:300])                                  # truncated
    (fog1 / WNIDS[1] / f"{stem(2)}.JPEG").write_bytes(b"<html>not found</html>")         # not a JPEG
    (fog1 / WNIDS[2] / f"{stem(4)}.JPEG").write_bytes(jpeg(np.zeros((30, 32, 3), np.uint8)))  # other size
    (fog1 / WNIDS[2] / "notes.txt").write_text("x")                                      # no sample
    (tree / "README").write_text("x")
    out = tmp_path / "c"
    manifest = import_release("imagenet-c", str(tree), str(out), workers=1, progress=False)
    assert_valid(out)
    reasons = {r["path"]: r["reason"] for r in manifest["rejected"]}  # relative to the release folder
    assert set(reasons) == {f"gaussian_noise/2/{WNIDS[0]}/{stem(0)}.JPEG", f"fog/1/{WNIDS[0]}/{stem(1)}.JPEG",
                            f"fog/1/{WNIDS[1]}/{stem(2)}.JPEG", f"fog/1/{WNIDS[2]}/{stem(4)}.JPEG",
                            f"fog/1/{WNIDS[2]}/notes.txt", "README"}
    assert "missing" in reasons[f"gaussian_noise/2/{WNIDS[0]}/{stem(0)}.JPEG"]
    assert "truncated" in reasons[f"fog/1/{WNIDS[0]}/{stem(1)}.JPEG"]
    assert "not a JPEG" in reasons[f"fog/1/{WNIDS[1]}/{stem(2)}.JPEG"]
    assert "32x30 pixels" in reasons[f"fog/1/{WNIDS[2]}/{stem(4)}.JPEG"]
    assert all("\n" not in r for r in reasons.values())
    assert local_paths(manifest, tmp_path, tree, tree.resolve()) == [] and manifest["source"]["root"] == "tree"
    kept = [stem(3), stem(5)]
    assert manifest["samples"]["count"] == 2
    for vid in manifest["variants"]:
        assert [k for k, *_ in samples(out, vid)] == kept
    # --strict stops at the first unusable file, before writing any shard
    with pytest.raises(ReleaseError, match="--strict: .*README"):
        import_release("imagenet-c", str(tree), str(tmp_path / "strict"), workers=1, progress=False, strict=True)
    (tree / "README").unlink()
    (fog1 / WNIDS[2] / "notes.txt").unlink()
    shutil.copy(tree_c / "gaussian_noise" / "2" / WNIDS[0] / f"{stem(0)}.JPEG",
                tree / "gaussian_noise" / "2" / WNIDS[0] / f"{stem(0)}.JPEG")
    assert run("import", "imagenet-c", tree, "--out", tmp_path / "strict2", "--strict") == 2
    assert not list((tmp_path / "strict2").rglob("*.tar"))


def test_bad_videos_are_rejected(tree_p, tmp_path):
    tree = shutil.copytree(tree_p, tmp_path / "tree")
    rotate = tree / "rotate"
    rng = np.random.default_rng(2)
    (rotate / WNIDS[0] / f"{stem(0)}.mp4").write_bytes(mp4(rng.integers(0, 256, (3, 64, 64, 3), np.uint8)))
    (rotate / WNIDS[1] / f"{stem(2)}.mp4").write_bytes(mp4(rng.integers(0, 256, (4, 48, 48, 3), np.uint8)))
    (rotate / WNIDS[2] / f"{stem(4)}.mp4").write_bytes(jpeg(np.zeros((64, 64, 3), np.uint8)))
    truncated = rotate / WNIDS[2] / f"{stem(5)}.mp4"
    truncated.write_bytes(truncated.read_bytes()[:-200])
    manifest = import_release("imagenet-p", str(tree), str(tmp_path / "p"), workers=1, progress=False)
    assert_valid(tmp_path / "p")
    reasons = {Path(r["path"]).name: r["reason"] for r in manifest["rejected"]}
    assert set(reasons) == {f"{stem(i)}.mp4" for i in (0, 2, 4, 5)}
    assert "3 frames" in reasons[f"{stem(0)}.mp4"] and "48x48" in reasons[f"{stem(2)}.mp4"]
    assert "not an mp4" in reasons[f"{stem(4)}.mp4"]
    assert manifest["samples"]["count"] == 2
    assert [k for k, *_ in samples(tmp_path / "p", "sequence/gaussian_noise_2")] == [stem(1), stem(3)]


def test_resume_and_rerun_give_identical_bytes(tree_c, tmp_path):
    out = tmp_path / "c"
    import_release("imagenet-c", str(tree_c), str(out), workers=1, progress=False, samples_per_shard=4)
    files = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
             and ".qrobust" not in p.parts}
    # an interrupted run: one shard missing, a partial file left, no manifest yet
    (out / "natural/fog-2/fog-2-000001.tar").unlink()
    (out / "manifest.json").unlink()
    (out / "natural/fog-1/fog-1-000000.tar.partial-host-1").write_bytes(b"half")
    import_release("imagenet-c", str(tree_c), str(out), workers=2, progress=False, samples_per_shard=4)
    assert not list(out.rglob("*.partial-*"))
    import_release("imagenet-c", str(tree_c), str(out), workers=1, progress=False, samples_per_shard=4)  # again
    again = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
             and ".qrobust" not in p.parts}
    assert again == files
    # other settings into the same folder are refused, as is a folder holding something else
    with pytest.raises(ReleaseError, match="other settings"):
        import_release("imagenet-c", str(tree_c), str(out), limit=2, workers=1, progress=False, samples_per_shard=4)
    assert run("import", "imagenet-c", tree_c, "--out", out) == 2  # another shard size
    with pytest.raises(ReleaseError, match="import of other variants.*another --only"):
        import_release("imagenet-c", str(tree_c), str(out), only=["natural/fog-*"], workers=1, progress=False,
                       samples_per_shard=4)
    # damaged state files are one line saying what to delete, never a traceback
    state = out / ".qrobust"
    plan = (state / "import.json").read_text()
    (state / "import.json").write_text('{"trunc')
    with pytest.raises(ReleaseError, match="import.json: unreadable; delete it"):
        import_release("imagenet-c", str(tree_c), str(out), workers=1, progress=False, samples_per_shard=4)
    (state / "import.json").write_text(plan)
    (out / "manifest.json").unlink()
    probe = json.loads((state / "probe.json").read_text())
    (state / "probe.json").write_text(json.dumps({k: v for k, v in probe.items() if k != "crop"}))
    with pytest.raises(ReleaseError, match="probe.json: not a probe record; delete it"):
        import_release("imagenet-c", str(tree_c), str(out), workers=1, progress=False, samples_per_shard=4)
    (state / "probe.json").unlink()
    import_release("imagenet-c", str(tree_c), str(out), workers=1, progress=False, samples_per_shard=4)
    assert {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
            and ".qrobust" not in p.parts} == files
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert run("import", "imagenet-c", tree_c, "--out", tmp_path / "full") == 2


def test_rerun_into_an_import_with_local_paths_resumes(tree_c, tmp_path):
    """An import written before manifests left out local paths: a rerun resumes (every shard kept) and
    rewrites its manifest without them; packing it keeps none either."""
    out = tmp_path / "c"
    manifest = import_release("imagenet-c", str(tree_c), str(out), only=["natural/fog-1"], workers=1,
                              progress=False)
    old = dict(manifest, source=dict(manifest["source"], root=str(tree_c.resolve())),
               imported_from=dict(manifest["imported_from"], root=str(tree_c.resolve())),
               rejected=[{"path": str(tree_c.resolve() / "fog" / "1" / "x.JPEG"), "reason": "empty file"}])
    old.pop("card")
    (out / "manifest.json").write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    (out / "README.md").unlink()
    assert verify_corpus(out) == []
    assert run("pack", out, "--out", tmp_path / "small", "--limit", 2) == 0
    packed = assert_valid(tmp_path / "small")
    assert local_paths(packed, tmp_path, tree_c.parent) == []
    assert packed["rejected"] == [{"path": "fog/1/x.JPEG", "reason": "empty file"}]
    assert packed["imported_from"]["root"] == packed["source"]["root"] == "ImageNet-C"
    tars = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    assert import_release("imagenet-c", str(tree_c), str(out), only=["natural/fog-1"], workers=1,
                          progress=False) == manifest
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")} == tars
    assert assert_valid(out) == manifest


def test_selection_and_class_list(tree_c, tmp_path, capsys):
    classes = tmp_path / "LOC_synset_mapping.txt"
    classes.write_text("\n".join(f"{w} name of {w}" for w in sorted([*WNIDS, "n00000001", "n09999999"])) + "\n")
    manifest = import_release("imagenet-c", str(tree_c), str(tmp_path / "c"), classes=str(classes),
                              only=["natural/fog-*"], per_class=1, workers=1, progress=False)
    assert_valid(tmp_path / "c")
    assert sorted(manifest["variants"]) == ["natural/fog-1", "natural/fog-2"]
    assert manifest["classes"] == ["n00000001", *sorted(WNIDS), "n09999999"]
    assert manifest["imported_from"]["classes"] == "LOC_synset_mapping.txt"  # by its name: no local path
    assert local_paths(manifest, tmp_path, tree_c.parent) == []
    got = samples(tmp_path / "c", "natural/fog-1")
    assert [(k, label) for k, label, *_ in got] == [(stem(0), 2), (stem(2), 1), (stem(4), 3)]
    manifest = import_release("imagenet-c", str(tree_c), str(tmp_path / "l"), limit=3, workers=1, progress=False)
    assert manifest["samples"]["count"] == 3 and manifest["source"]["selection"] == {"limit": 3, "per_class": None}
    assert run("import", "imagenet-c", tree_c, "--out", tmp_path / "x", "--only", "natural/snow-*") == 2
    assert "matches no variant" in capsys.readouterr().err
    assert run("import", "imagenet-c", tmp_path / "nowhere", "--out", tmp_path / "y") == 2
    # a variant folder holding under half the samples is an incomplete tree, not a reason to drop them all
    tree = shutil.copytree(tree_c, tmp_path / "tree")
    for wnid in WNIDS[:2]:
        shutil.rmtree(tree / "fog" / "2" / wnid)
    with pytest.raises(ReleaseError, match="natural/fog-2 holds 2 samples.*incomplete"):
        import_release("imagenet-c", str(tree), str(tmp_path / "z"), workers=1, progress=False)


def test_score_and_pack_an_imported_corpus(tree_c, tree_p, tmp_path):
    assert run("import", "imagenet-c", tree_c, "--out", tmp_path / "c", "--workers", 2) == 0  # probed in parallel
    assert run("import", "imagenet-p", tree_p, "--out", tmp_path / "p", "--workers", 1) == 0
    assert run("score", "--corpus", tmp_path / "c", "--model", "tiny_cnn", "--out", tmp_path / "rc",
               "--workers", 0) == 0
    natural = json.loads((tmp_path / "rc" / "summary.json").read_text())["natural"]
    assert set(natural["acc"]) == {"fog-1", "fog-2", "gaussian_noise-1", "gaussian_noise-2"}
    assert set(natural["acc_by_corruption"]) == {"fog", "gaussian_noise"} and natural["mnr"] is not None
    assert run("score", "--corpus", tmp_path / "p", "--model", "tiny_cnn", "--out", tmp_path / "rp",
               "--workers", 0) == 0
    sequence = json.loads((tmp_path / "rp" / "summary.json").read_text())["sequence"]
    # difficulty 1 is the benchmark's; gaussian_noise_2 is difficulty 2, beside rotate at frame stride 2
    assert set(sequence["fp"]) == {"rotate"} and sequence["mfp"] == sequence["fp"]["rotate"]
    assert set(sequence["difficulty"]["2"]["fp"]) == {"gaussian_noise", "rotate"}
    # an imported corpus packs like a generated one
    assert run("pack", tmp_path / "c", "--out", tmp_path / "small", "--limit", 2, "--only", "natural/fog-*") == 0
    manifest = assert_valid(tmp_path / "small")
    assert manifest["samples"]["count"] == 2 and manifest["imported_from"]["kind"] == "imagenet-c"
