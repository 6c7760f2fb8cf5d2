"""`qrobust pack`: a subset of a corpus's variants and/or samples, bytes kept, with a manifest that verifies
and a scorer that predicts on it exactly what it predicts on the original."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import small_corpus, tar_members
from test_generate import local_paths
from qrobust.generate.pack import PackError, pack
from qrobust.cli import main
from qrobust.shared.manifest import load_manifest, manifest_problems
from qrobust.shared.verify import verify_corpus

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VARIANTS = ["clean/onecrop", "natural/fog-1", "sequence/rotate"]


def run(*args) -> int:
    return main(["-q", *map(str, args)])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """6 real photos (3 classes, keys astronaut_0, astronaut_1, chelsea_0, ...), 2 per shard, 3 variants."""
    return small_corpus(tmp_path_factory.mktemp("pack"), ",".join(VARIANTS))


def manifest_of(corpus: Path) -> dict:
    return json.loads((corpus / "manifest.json").read_text())


def members(corpus: Path, vid: str) -> list[tuple[str, bytes]]:
    """(member name, bytes) of every member of a variant's shards, in order."""
    return [(info.name, data) for shard in manifest_of(corpus)["variants"][vid]["shards"]
            for info, data in tar_members(corpus / shard["name"])]


def assert_valid(corpus: Path) -> dict:
    manifest = load_manifest(corpus)
    assert manifest_problems(manifest) == []
    assert verify_corpus(corpus) == []
    return manifest


def test_variant_subset_keeps_the_shards(corpus, tmp_path):
    out = tmp_path / "small"
    manifest = pack(str(corpus), str(out), only=["clean/*", "sequence/*"], progress=False)
    assert assert_valid(out) == manifest
    original = manifest_of(corpus)
    assert sorted(manifest["variants"]) == ["clean/onecrop", "sequence/rotate"]
    for vid in manifest["variants"]:
        assert manifest["variants"][vid] == original["variants"][vid]  # same shards, sha256 and all
        for shard in manifest["variants"][vid]["shards"]:
            assert os.path.samefile(out / shard["name"], corpus / shard["name"])  # hard links on one file system
    # the settings digest is kept: `generate` could still add variants to the packed corpus
    assert manifest["plan_sha256"] == original["plan_sha256"] and manifest["samples"] == original["samples"]
    assert manifest["packed_from"]["only"] == ["clean/*", "sequence/*"]
    assert len(manifest["packed_from"]["manifest_sha256"]) == 64
    assert not [p for p in out.rglob("*") if p.is_file() and "partial" in p.name]


def test_packed_manifest_holds_no_local_path_and_its_own_card(corpus, tmp_path):
    """Also when the source corpus was written before manifests left out local paths and had cards."""
    old = tmp_path / "old"
    shutil.copytree(corpus, old)
    source = manifest_of(old)
    root = str(corpus.parent.resolve() / "src")
    source["source"] = dict(source["source"], root=root, label_file=f"{root}/val.txt")
    source["rejected"] = [{"path": f"{root}/n1/a.b.jpg", "reason": f"duplicate key 'a_b' (also {root}/n1/a_b.jpg)"},
                          {"path": "/elsewhere/x.jpg", "reason": "empty file"}]
    source.pop("card")
    (old / "manifest.json").write_text(json.dumps(source, indent=1, sort_keys=True) + "\n")
    (old / "README.md").unlink()
    assert verify_corpus(old) == []
    for name, selection in (("variants", {"only": ["clean/*"]}), ("samples", {"per_class": 1})):
        packed = pack(str(old), str(tmp_path / name), progress=False, **selection)
        assert assert_valid(tmp_path / name) == packed
        assert local_paths(packed, tmp_path, corpus.parent) == []
        assert packed["source"]["root"] == "src" and packed["source"]["label_file"] == "val.txt"
        assert packed["rejected"] == [{"path": "n1/a.b.jpg", "reason": "duplicate key 'a_b' (also n1/a_b.jpg)"},
                                      {"path": "x.jpg", "reason": "empty file"}]
        assert packed["plan_sha256"] == source["plan_sha256"] or name == "samples"  # the plan holds no path
        card = (tmp_path / name / "README.md").read_text()
        assert packed["card"]["bytes"] == len(card.encode()) and "qrobust pack" in card
        configs = card.split("\nconfigs:\n")[1].split("\ndataset_info:\n")[0]
        assert [line for line in configs.splitlines() if line.startswith("- config_name: ")] == \
            [f'- config_name: "{vid.replace("/", "--")}"' for vid in sorted(packed["variants"])]


def test_shards_are_copied_across_file_systems(corpus, tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")  # EXDEV

    monkeypatch.setattr(os, "link", no_link)
    manifest = pack(str(corpus), str(tmp_path / "ex"), exclude=["natural/*"], progress=False)
    assert sorted(manifest["variants"]) == ["clean/onecrop", "sequence/rotate"]
    assert_valid(tmp_path / "ex")
    for shard in manifest["variants"]["clean/onecrop"]["shards"]:
        assert not os.path.samefile(tmp_path / "ex" / shard["name"], corpus / shard["name"])
        assert (tmp_path / "ex" / shard["name"]).read_bytes() == (corpus / shard["name"]).read_bytes()


def test_sample_subset_is_resharded_with_members_unchanged(corpus, tmp_path):
    out = tmp_path / "small"
    manifest = pack(str(corpus), str(out), limit=3, progress=False)
    assert assert_valid(out) == manifest
    original = manifest_of(corpus)
    assert manifest["samples"]["count"] == 3 and sorted(manifest["variants"]) == VARIANTS
    assert manifest["source"]["selection"]["packs"] == [{"limit": 3, "per_class": None}]
    assert manifest["plan_sha256"] != original["plan_sha256"]  # another sample set: not a resumable full corpus
    for vid in VARIANTS:
        shards = manifest["variants"][vid]["shards"]
        assert [s["count"] for s in shards] == [2, 1] and manifest["variants"][vid]["count"] == 3
        # the first shard holds exactly the original first shard's samples: the very same bytes
        assert shards[0]["sha256"] == original["variants"][vid]["shards"][0]["sha256"]
        assert members(out, vid) == members(corpus, vid)[:6]  # 3 samples x (cls, payload), bytes unchanged


def test_per_class_keeps_the_first_samples_of_every_class(corpus, tmp_path):
    out = tmp_path / "small"
    manifest = pack(str(corpus), str(out), only=["natural/*"], per_class=1, progress=False)
    assert_valid(out)
    names = [name for name, _ in members(out, "natural/fog-1")]
    assert names == ["astronaut_0.cls", "astronaut_0.jpg", "chelsea_0.cls", "chelsea_0.jpg", "coffee_0.cls",
                     "coffee_0.jpg"]
    original = dict(members(corpus, "natural/fog-1"))
    assert all(data == original[name] for name, data in members(out, "natural/fog-1"))
    assert [data for name, data in members(out, "natural/fog-1") if name.endswith(".cls")] == [b"0", b"1", b"2"]
    assert manifest["packed_from"]["per_class"] == 1 and manifest["samples"]["count"] == 3
    # a pack of a pack records both selections
    again = pack(str(out), str(tmp_path / "smaller"), limit=1, progress=False)
    assert_valid(tmp_path / "smaller")
    assert again["source"]["selection"]["packs"] == [{"limit": None, "per_class": 1}, {"limit": 1, "per_class": None}]
    assert again["packed_from"]["previous"]["per_class"] == 1


def test_errors(corpus, tmp_path, capsys):
    with pytest.raises(PackError, match="'nope/\\*' matches no variant"):
        pack(str(corpus), str(tmp_path / "a"), only=["nope/*"], progress=False)
    with pytest.raises(PackError, match="leave no variant"):
        pack(str(corpus), str(tmp_path / "a"), only=["clean/*"], exclude=["clean/*"], progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(PackError, match="not empty"):
        pack(str(corpus), str(tmp_path / "full"), progress=False)
    with pytest.raises(PackError, match="local corpus folder"):
        pack("https://example.org/corpus", str(tmp_path / "a"), progress=False)
    # a damaged shard (same size, other bytes) is refused, whether copied or re-sharded, and nothing is left
    damaged = shutil.copytree(corpus, tmp_path / "damaged")
    shard = damaged / manifest_of(damaged)["variants"]["natural/fog-1"]["shards"][1]["name"]
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    for kw in ({}, {"limit": 4}):
        with pytest.raises(PackError, match="sha256 differs.*qrobust verify"):
            pack(str(damaged), str(tmp_path / "b"), progress=False, **kw)
        assert list((tmp_path / "b").iterdir()) == []
    # leaving the damaged variant out packs the rest
    pack(str(damaged), str(tmp_path / "c"), exclude=["natural/*"], limit=4, progress=False)
    assert_valid(tmp_path / "c")
    # a manifest edited by hand is refused before anything is read
    manifest = manifest_of(damaged)
    manifest["seed"] = 99
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackError, match="is damaged: .*edited by hand"):
        pack(str(damaged), str(tmp_path / "d"), exclude=["natural/*"], progress=False)
    # the command line: 0 when packed, 2 with a one-line error otherwise
    capsys.readouterr()
    assert run("pack", corpus, "--out", tmp_path / "e", "--only", "clean/*", "--per-class", 1) == 0
    assert run("pack", corpus, "--out", tmp_path / "e", "--only", "clean/*") == 2
    assert run("pack", corpus, "--out", tmp_path / "f", "--only", "clean/x") == 2
    assert run("pack", corpus, "--out", tmp_path / "g", "--limit", 0) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("qrobust pack: error: ") for line in err)


def test_scores_on_the_pack_equal_those_on_the_original(corpus, tmp_path):
    import zarr

    from qrobust.shared.models import load_model, save_checkpoint

    model, spec, _ = load_model("tiny_cnn", num_classes=3)
    checkpoint = save_checkpoint(model, spec, tmp_path / "tiny.safetensors")
    assert run("pack", corpus, "--out", tmp_path / "small", "--per-class", 1, "--exclude", "natural/*") == 0
    only = ["--only", "clean/*", "--only", "sequence/*"]
    for name in ("corpus", "small"):
        source = corpus if name == "corpus" else tmp_path / "small"
        assert run("score", "--corpus", source, "--model", checkpoint, "--out", tmp_path / f"r-{name}",
                   "--workers", 0, *only) == 0
    rows = [0, 2, 4]  # the first sample of each class
    for vid in ("clean/onecrop", "sequence/rotate"):
        full = zarr.open_group(str(tmp_path / "r-corpus" / "predictions.zarr"), mode="r")[vid][...]
        small = zarr.open_group(str(tmp_path / "r-small" / "predictions.zarr"), mode="r")[vid][...]
        np.testing.assert_array_equal(small, full[rows])
    summary = json.loads((tmp_path / "r-small" / "summary.json").read_text())
    assert summary["corpus"]["samples"] == 3 and summary["sequence"]["fp"]["rotate"] is not None
