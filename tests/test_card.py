"""The dataset card (``README.md``): Hugging Face ``datasets`` loads every variant of a corpus by config name,
with its samples, labels and order as in the shards; the card is deterministic, recorded in the manifest and
checked by ``verify``; corpora written before cards were still verify and score."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import small_corpus, tar_members
from qrobust.cli import main
from qrobust.shared.card import CARD_NAME, build_card, card_record, config_name, variant_of
from qrobust.shared.manifest import ManifestError, load_manifest, parse_manifest, plan_digest, plan_of
from qrobust.shared.verify import extra_files, verify_corpus

VARIANTS = "clean/onecrop,natural/fog-1,sequence/rotate"  # png, jpg and lossless H.264 (mkv) payloads


def run(*args) -> int:
    return main(["-q", *map(str, args)])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """6 samples of 3 classes, 2 per shard (3 shards a variant)."""
    return small_corpus(tmp_path_factory.mktemp("card"), VARIANTS)


@pytest.fixture
def copy(corpus, tmp_path) -> Path:
    return Path(shutil.copytree(corpus, tmp_path / "corpus"))


def shard_samples(corpus: Path, vid: str) -> list[tuple[str, int, str, bytes]]:
    """(key, label, payload type, payload bytes) of every sample of a variant, in shard order."""
    out = []
    for shard in load_manifest(corpus)["variants"][vid]["shards"]:
        members = tar_members(corpus / shard["name"])
        for (label_info, label), (payload_info, payload) in zip(members[::2], members[1::2]):
            key, ext = payload_info.name.split(".", 1)
            assert label_info.name == f"{key}.cls"
            out.append((key, int(label), ext, payload))
    return out


@pytest.fixture
def hf(tmp_path, monkeypatch):
    """The real ``datasets`` client, offline, with every cache under ``tmp_path``."""
    for name, value in (("HF_HOME", tmp_path / "hf"), ("HF_DATASETS_CACHE", tmp_path / "hf" / "datasets"),
                        ("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, str(value))
    import datasets

    # read from the environment when datasets is first imported: set here too, should it have been already
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    monkeypatch.setattr(datasets.config, "HF_MODULES_CACHE", tmp_path / "hf" / "modules")

    def load(corpus: Path, config: str):
        return datasets.load_dataset(str(corpus), config, split="train", cache_dir=str(tmp_path / "hf" / "cache"))

    return datasets, load


def test_config_names_are_valid_for_datasets_and_map_back():
    from datasets.naming import INVALID_WINDOWS_CHARACTERS_IN_PATH
    from qrobust.shared.suites import load_suite

    ids = [v.id for v in load_suite("robustmq").variants] + ["natural/my.corruption+x-3", "sequence/a--b"]
    names = [config_name(vid) for vid in ids]
    assert config_name("natural/fog-3") == "natural--fog-3"
    assert len(set(names)) == len(ids) and [variant_of(n) for n in names] == ids
    assert not [n for n in names if set(n) & set(INVALID_WINDOWS_CHARACTERS_IN_PATH)]


def test_datasets_loads_image_and_sequence_variants_by_config_name(corpus, hf):
    datasets, load = hf
    manifest = load_manifest(corpus)
    for vid, member in (("natural/fog-1", "jpg"), ("clean/onecrop", "png"), ("sequence/rotate", "mkv")):
        ds = load(corpus, config_name(vid))
        expected = shard_samples(corpus, vid)
        assert {ext for *_, ext, _ in expected} == {member}
        assert list(ds.features) == ["__key__", member, "cls"]
        assert ds.features["cls"].names == manifest["classes"]
        assert ds["__key__"] == [key for key, *_ in expected]  # shard order
        assert ds["cls"] == [label for _, label, *_ in expected]
        assert [ds.features["cls"].int2str(c) for c in ds["cls"]] == \
            [manifest["classes"][label] for _, label, *_ in expected]
        kind = datasets.Image if member in ("jpg", "png") else datasets.Video
        assert isinstance(ds.features[member], kind)
        raw = ds.cast_column(member, kind(decode=False))  # the payloads as stored: the shards' bytes
        assert [row[member]["bytes"] for row in raw] == [data for *_, data in expected]
        if kind is datasets.Image:
            assert ds[0][member].size == (36, 36)


def test_sequence_frames_decode_as_qrobust_decodes_them(corpus, hf):
    pytest.importorskip("torchcodec")  # datasets decodes videos with torchcodec (and the FFmpeg libraries)
    import numpy as np
    from qrobust.shared.video import decode_frames

    _, load = hf
    ds = load(corpus, "sequence--rotate")
    for row, (*_, data) in zip(ds, shard_samples(corpus, "sequence/rotate")):
        frames = row["mkv"][:].data.permute(0, 2, 3, 1).numpy()
        assert np.array_equal(frames, decode_frames(data))


def test_card_is_recorded_deterministic_and_free_of_local_paths(corpus, tmp_path):
    manifest = load_manifest(corpus)
    text = (corpus / CARD_NAME).read_text()
    assert manifest["card"] == card_record(text) == {"name": CARD_NAME, "bytes": len(text.encode()),
                                                     "sha256": manifest["card"]["sha256"]}
    assert build_card(manifest) == text  # from the manifest alone (its card entry aside)
    assert build_card({k: v for k, v in manifest.items() if k != "card"}) == text
    head, body = text.split("\n---\n", 1)
    assert head.startswith("---\n") and "configs:" in head and "dataset_info:" in head
    for vid in manifest["variants"]:
        assert f'- config_name: "{config_name(vid)}"' in head and f'path: "{vid}/*.tar"' in head
    assert head.count("names: &classes") == 1 and head.count("names: *classes") == 2
    assert "load_dataset" in body and "Licence" in body and "torchcodec" in body
    assert str(corpus.parent) not in text and str(Path.home()) + "/" not in text
    # the same images in other folders make the same corpus: the same manifest and card, byte for byte
    other = small_corpus(tmp_path / "elsewhere", VARIANTS)
    assert (other / CARD_NAME).read_bytes() == (corpus / CARD_NAME).read_bytes()
    assert (other / "manifest.json").read_bytes() == (corpus / "manifest.json").read_bytes()


def test_verify_checks_the_card(copy):
    assert verify_corpus(copy) == []
    assert CARD_NAME not in extra_files(copy, load_manifest(copy))
    card = copy / CARD_NAME
    text = card.read_text()
    card.write_text(text.replace("qrobust corpus", "Qrobust corpus"))  # same size, other bytes
    assert verify_corpus(copy) == [f"{CARD_NAME}: sha256 mismatch (content changed)"]
    assert verify_corpus(copy, rehash=False) == []  # --size-only
    card.write_text(text + "more\n")
    assert verify_corpus(copy, rehash=False) == [f"{CARD_NAME}: {len(text) + 5} bytes, manifest says {len(text)}"]
    card.unlink()
    assert verify_corpus(copy) == [f"{CARD_NAME}: missing"]
    assert run("verify", copy) == 1


def test_a_card_entry_naming_another_file_is_refused(corpus):
    manifest = load_manifest(corpus)
    for card in ({"name": "../README.md", "bytes": 1, "sha256": "x"}, {"name": CARD_NAME, "bytes": -1, "sha256": "x"},
                 {"name": CARD_NAME, "bytes": 1}, [CARD_NAME], "README.md"):
        with pytest.raises(ManifestError, match="card"):
            parse_manifest(json.dumps(dict(manifest, card=card)).encode(), "manifest.json")


def test_corpus_written_before_cards_verifies_scores_and_resumes(corpus, copy, tmp_path):
    """A corpus of an earlier qrobust: no card, no card entry, the source's absolute path in the manifest."""
    suite, src = corpus.parent / "small.toml", corpus.parent / "src"  # what the fixture made it from
    manifest = json.loads((copy / "manifest.json").read_text())
    old = {k: v for k, v in manifest.items() if k != "card"}
    old["source"] = dict(old["source"], root=str(src.resolve()))
    (copy / "manifest.json").write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    (copy / CARD_NAME).unlink()
    assert plan_digest(plan_of(old)) == old["plan_sha256"] == manifest["plan_sha256"]
    assert verify_corpus(copy) == []
    assert run("score", "--corpus", copy, "--model", "tiny_cnn", "--out", tmp_path / "results",
               "--only", "clean/onecrop", "--workers", 0) == 0
    (copy / CARD_NAME).write_text("a file the manifest does not list\n")
    assert verify_corpus(copy) == [f"{CARD_NAME}: extra file not in the manifest"]
    (copy / CARD_NAME).unlink()
    # a rerun of generate resumes it (nothing to build) and gives it a card: the corpus made today
    tars = {p: p.stat().st_mtime_ns for p in copy.rglob("*.tar")}
    assert run("generate", "--suite", suite, "--source", src, "--out", copy, "--workers", 2, "--only", VARIANTS) == 0
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*.tar")} == tars
    assert (copy / "manifest.json").read_text() == json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    assert verify_corpus(copy) == []
