"""Integrity: `qrobust verify` names every kind of damage, and `qrobust score` refuses a damaged corpus
unless the damaged variant is left out with --exclude."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from helpers import small_corpus, tar_members as members
from qrobust.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FOG1 = "natural/fog-1"
SHARD0, SHARD1 = "natural/fog-1/fog-1-000000.tar", "natural/fog-1/fog-1-000001.tar"


def run(*args) -> int:
    return main(["-q", *map(str, args)])


class ConstantModel(torch.nn.Module):
    """Class 0 for everything: scoring is cheap and only the corpus checks matter here."""

    qrobust_normalizes_input = True

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        logits = torch.zeros(x.shape[0], self.num_classes)
        logits[:, 0] = 1
        return logits


def constant_model(num_classes: int = 3):
    return ConstantModel(num_classes)


MODEL = "test_integrity:constant_model"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """6 samples, 2 per shard: clean/onecrop, clean/square, natural/fog-1, natural/fog-3 (12 shards)."""
    return small_corpus(tmp_path_factory.mktemp("integrity"), "clean/*,natural/*", severities=(1, 3))


@pytest.fixture
def corpus(pristine, tmp_path) -> Path:
    copy = tmp_path / "corpus"
    shutil.copytree(pristine, copy)
    return copy


# ---- damage ------------------------------------------------------------------------------------------


def write_members(path: Path, items) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in items:
            info = tarfile.TarInfo(info.name) if isinstance(info, str) else info
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def edit_manifest(corpus: Path, edit) -> None:
    manifest = json.loads((corpus / "manifest.json").read_text())
    edit(manifest)
    (corpus / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


def rehash(corpus: Path, *names: str) -> None:
    """Record the shards' present size and sha256 in the manifest, as someone covering their tracks would
    (the keys digest is left alone)."""
    def edit(manifest):
        for entry in manifest["variants"].values():
            for shard in entry["shards"]:
                if shard["name"] in names:
                    data = (corpus / shard["name"]).read_bytes()
                    shard["bytes"], shard["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    edit_manifest(corpus, edit)


def flip_byte(corpus):
    data = bytearray((corpus / SHARD1).read_bytes())
    data[600] ^= 0xFF
    (corpus / SHARD1).write_bytes(bytes(data))


def truncate(corpus):
    (corpus / SHARD1).write_bytes((corpus / SHARD1).read_bytes()[:-1536])


def remove(corpus):
    (corpus / SHARD1).unlink()


def extra_shard(corpus):
    shutil.copy(corpus / SHARD0, corpus / "natural/fog-1/fog-1-000003.tar")


def reorder(corpus, cover_tracks=True):
    items = members(corpus / SHARD0)
    write_members(corpus / SHARD0, items[2:] + items[:2])  # second sample first
    if cover_tracks:
        rehash(corpus, SHARD0)


def reorder_stale_hash(corpus):
    reorder(corpus, cover_tracks=False)


def duplicate_adjacent(corpus):
    items = members(corpus / SHARD0)
    write_members(corpus / SHARD0, items[:2] + items[:2])  # the first sample twice, the second gone
    rehash(corpus, SHARD0)


def duplicate_from_other_shard(corpus):
    items = members(corpus / SHARD0)
    write_members(corpus / SHARD0, items[:2] + members(corpus / SHARD1)[:2])
    rehash(corpus, SHARD0)


def swap_shards(corpus):
    a, b = (corpus / SHARD0).read_bytes(), (corpus / SHARD1).read_bytes()
    (corpus / SHARD0).write_bytes(b)
    (corpus / SHARD1).write_bytes(a)
    rehash(corpus, SHARD0, SHARD1)


def edit_params(corpus):
    edit_manifest(corpus, lambda m: m["variants"][FOG1]["params"].update(severity=5))


def edit_count(corpus):
    edit_manifest(corpus, lambda m: m["variants"][FOG1].update(count=7))


def edit_sha(corpus):
    edit_manifest(corpus, lambda m: m["variants"][FOG1]["shards"][1].update(sha256="0" * 64))


def edit_classes(corpus):
    edit_manifest(corpus, lambda m: m.update(classes=m["classes"][::-1]))


def edit_seed(corpus):
    edit_manifest(corpus, lambda m: m.update(seed=m["seed"] + 1))


# (damage, what verify prints, what score says) -- variant-level damage names the file and can be excluded
VARIANT_DAMAGE = [
    (flip_byte, f"{SHARD1}: sha256 mismatch", f"{SHARD1}: sha256 differs from the manifest"),
    (truncate, f"{SHARD1}: 8704 bytes, manifest says 10240", f"{SHARD1}: 8704 bytes, manifest says 10240"),
    (remove, f"{SHARD1}: missing", f"{SHARD1}: missing"),
    (extra_shard, "natural/fog-1/fog-1-000003.tar: extra file not in the manifest",
     "natural/fog-1/fog-1-000003.tar: extra file not in the manifest"),
    (reorder, f"{SHARD0}: sample 'astronaut_0' out of key order (after 'astronaut_1')",
     f"{SHARD0}: sample 'astronaut_0' out of key order (after 'astronaut_1')"),
    (reorder_stale_hash, f"{SHARD0}: sha256 mismatch", f"{SHARD0}: sha256 differs"),
    (duplicate_adjacent, f"{SHARD0}: member 'astronaut_0.cls' appears twice (a duplicated sample)",
     f"{SHARD0}: member 'astronaut_0.cls' appears twice"),
    (duplicate_from_other_shard, f"{SHARD0}: sample keys differ from the manifest's",
     f"{SHARD0}: sample keys differ from the manifest's"),
    (swap_shards, f"{SHARD0}: sample keys differ from the manifest's",
     f"{SHARD0}: sample keys differ from the manifest's"),
    (edit_params, f"manifest.json: variant {FOG1}: params differ from the suite spec's (edited by hand)",
     f"manifest.json: variant {FOG1}: params differ from the suite spec's (edited by hand)"),
    (edit_count, f"{FOG1}: shards hold 6 samples, manifest says 7", f"{FOG1}: shards hold 6 samples, manifest says 7"),
    (edit_sha, f"{SHARD1}: sha256 mismatch", f"{SHARD1}: sha256 differs"),
]


def test_intact_corpus_verifies_and_scores(corpus, tmp_path, capsys):
    assert run("verify", corpus) == 0
    assert run("score", "--corpus", corpus, "--model", MODEL, "--out", tmp_path / "r", "--workers", 0) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert set(summary["natural"]["acc"]) == {"fog-1", "fog-3"}


@pytest.mark.parametrize("damage, verify_says, score_says", VARIANT_DAMAGE, ids=[d[0].__name__ for d in VARIANT_DAMAGE])
def test_damaged_variant_is_named_refused_and_can_be_excluded(corpus, tmp_path, capsys, damage, verify_says,
                                                              score_says):
    damage(corpus)
    capsys.readouterr()
    assert run("verify", corpus) == 1
    out = capsys.readouterr().out
    assert f"MISMATCH {verify_says}" in out, out
    # every problem is confined to fog-1: the other variants verify clean
    assert all(FOG1 in line for line in out.splitlines() if line.startswith("MISMATCH")), out

    for workers in (0, 2):
        assert run("score", "--corpus", corpus, "--model", MODEL, "--out", tmp_path / f"refused{workers}",
                   "--workers", workers) == 2
        err = capsys.readouterr().err
        assert score_says in err and f"--exclude {FOG1}" in err and err.count("\n") == 1, err

    # the way on: leave the damaged variant out
    assert run("score", "--corpus", corpus, "--model", MODEL, "--out", tmp_path / "rest", "--workers", 0,
               "--exclude", FOG1) == 0
    summary = json.loads((tmp_path / "rest" / "summary.json").read_text())
    assert set(summary["natural"]["acc"]) == {"fog-3"} and summary["clean"]["acc"] is not None


@pytest.mark.parametrize("damage, says", [
    (edit_classes, "manifest.json: edited by hand (suite, source, classes"),
    (edit_seed, "manifest.json: edited by hand (seed 8, the suite spec says 7)"),
])
def test_manifest_edited_as_a_whole_is_refused_with_no_way_round(corpus, tmp_path, capsys, damage, says):
    damage(corpus)
    capsys.readouterr()
    assert run("verify", corpus) == 1
    assert f"MISMATCH {says}" in capsys.readouterr().out
    for extra in ([], ["--exclude", "natural/*"], ["--only", "clean/onecrop"]):
        assert run("score", "--corpus", corpus, "--model", MODEL, "--out", tmp_path / "r", *extra) == 2
        err = capsys.readouterr().err
        assert says in err and "regenerate the corpus or restore its manifest" in err and err.count("\n") == 1
    assert not (tmp_path / "r" / "progress.json").exists()


def test_refusal_lists_every_damaged_variant(corpus, tmp_path, capsys):
    remove(corpus)
    (corpus / "clean/square/square-000002.tar").unlink()
    capsys.readouterr()
    assert run("score", "--corpus", corpus, "--model", MODEL, "--out", tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert "(and 1 more)" in err and "`--exclude clean/square,natural/fog-1` scores the rest" in err
    assert run("score", "--corpus", corpus, "--model", MODEL, "--out", tmp_path / "r",
               "--exclude", "clean/square,natural/fog-1") == 0


def test_exclude_mistakes_are_errors(corpus, tmp_path, capsys):
    assert run("score", "--corpus", corpus, "--model", MODEL, "--out", tmp_path / "r",
               "--exclude", "natural/fgo-*") == 2
    assert "--exclude 'natural/fgo-*' matches no variant" in capsys.readouterr().err
    assert run("score", "--corpus", corpus, "--model", MODEL, "--out", tmp_path / "r", "--only", "clean/*",
               "--exclude", "clean/*") == 2
    assert "leave no variant to score" in capsys.readouterr().err
    assert run("score", "--corpus", corpus, "--model", MODEL, "--out", tmp_path / "r", "--attacks", "fgsm-linf",
               "--exclude", "clean/onecrop") == 2
    assert "attacks start from clean/onecrop, which --exclude leaves out" in capsys.readouterr().err


def test_size_only_verify_still_finds_size_damage(corpus, capsys):
    truncate(corpus)
    extra_shard(corpus)
    capsys.readouterr()
    assert run("verify", corpus, "--size-only") == 1
    out = capsys.readouterr().out
    assert f"{SHARD1}: 8704 bytes" in out and "fog-1-000003.tar: extra file" in out


def test_no_verify_still_checks_sizes_structure_and_keys(corpus, tmp_path, capsys):
    swap_shards(corpus)
    edit_manifest(corpus, lambda m: [s.update(sha256="0" * 64) for s in m["variants"][FOG1]["shards"]])
    capsys.readouterr()
    assert run("score", "--corpus", corpus, "--model", MODEL, "--out", tmp_path / "r", "--no-verify",
               "--only", FOG1, "--workers", 0) == 2
    assert f"{SHARD0}: sample keys differ from the manifest's" in capsys.readouterr().err


@pytest.mark.parametrize("name, text", [("results.json", "{not json"), ("progress.json", '{"a": 1}'),
                                        ("progress.json", "[" * 10000)])
def test_damaged_results_folder_is_named(corpus, tmp_path, capsys, name, text):
    out = tmp_path / "r"
    assert run("score", "--corpus", corpus, "--model", MODEL, "--out", out, "--only", "clean/onecrop") == 0
    (out / name).write_text(text)
    capsys.readouterr()
    assert run("score", "--corpus", corpus, "--model", MODEL, "--out", out, "--only", "clean/onecrop") == 2
    err = capsys.readouterr().err
    assert f"{out / name}: " in err and err.count("\n") == 1, err
