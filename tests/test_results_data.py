"""Results as data: xarray opens a results folder's predictions with sample keys, class names and dimension
names; pandas reads the long results table as numbers; two models of one kind stay told apart."""
from __future__ import annotations

import json

import pytest

from helpers import fitted_checkpoint, small_corpus
from qrobust.cli import main

xr = pytest.importorskip("xarray")
pd = pytest.importorskip("pandas")


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    corpus = small_corpus(tmp, "clean/*", shard=4)
    checkpoint = fitted_checkpoint(corpus, tmp / "tiny.safetensors")
    for name in ("a", "b"):
        assert main(["-q", "score", "--corpus", str(corpus), "--model", str(checkpoint), "--out", str(tmp / name),
                     "--workers", "0"]) == 0
    return corpus, tmp


def test_xarray_opens_the_predictions(scored):
    corpus, tmp = scored
    manifest = json.loads((corpus / "manifest.json").read_text())
    tree = xr.open_datatree(tmp / "a" / "predictions.zarr", engine="zarr", consolidated=False)
    keys = [str(k) for k in tree["sample"].values]
    assert len(keys) == 6 and keys == sorted(keys)  # the corpus's keys, in corpus order
    clean = tree["clean"].to_dataset(inherit=True)
    assert clean["onecrop"].dims == ("sample", "rank") and clean["onecrop"].shape == (6, 5)
    first = clean["onecrop"].sel(sample=keys[0]).values  # select by key
    assert first.shape == (5,) and sorted(first[:3]) == [0, 1, 2] and (first[3:] == -1).all()  # 3 classes
    assert tree.attrs["classes"] == manifest["classes"]
    assert "rank 0 is the top-1" in tree.attrs["codes"]["top5"] and "fooled" in tree.attrs["codes"]["outcome"]
    assert tree["columns"].dims == ("sample", "column")


def test_pandas_reads_the_long_table_as_numbers(scored):
    _, tmp = scored
    table = pd.read_csv(tmp / "a" / "results.csv")
    summary = json.loads((tmp / "a" / "summary.json").read_text())
    assert str(table["value"].dtype) == "float64" and str(table["low"].dtype) == "float64"
    acc = table[(table.metric == "acc") & (table.variant == "clean/onecrop")]
    assert len(acc) == 1 and acc["value"].iloc[0] == summary["clean"]["acc"]
    assert acc["low"].iloc[0] == summary["intervals"]["values"]["clean.acc"][0]
    assert set(table["state_sha256"]) == {summary["model"]["state_sha256"]}


def test_two_models_of_one_kind_stay_distinguishable(scored, tmp_path):
    from qrobust.score.report import build_report

    _, tmp = scored
    out = build_report([tmp / "a", tmp / "b"], tmp_path / "report").parent
    clean = (out / "tables" / "clean.md").read_text()
    assert "[a]" in clean and "[b]" in clean  # the same name, told apart by the results folder
    table = pd.read_csv(out / "results.csv")
    assert set(table["results"]) == {"a", "b"}
    page = (out / "index.html").read_text()
    assert "tiny_cnn [a]" in page and "tiny_cnn [b]" in page
    for path in [*out.rglob("*"), tmp / "a" / "summary.json", tmp / "a" / "results.csv"]:  # shared as they are
        if path.is_file():
            assert str(tmp) not in path.read_bytes().decode("utf-8", "replace"), f"{path} names a local path"
