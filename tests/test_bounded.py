"""Bounded JSON: too large or too deep is one line naming the input; qrobust's own files are well inside."""
from __future__ import annotations

import json

import pytest

from helpers import small_corpus
from qrobust.shared.bounded import BoundsError, depth, load_json


def test_deep_nesting_is_refused_without_recursion_error(tmp_path):
    for n in (40, 5000, 200_000):  # past the limit; past Python's recursion limit; far past it
        path = tmp_path / f"deep{n}.json"
        path.write_text("[" * n + "]" * n)
        with pytest.raises(BoundsError, match=rf"deep{n}\.json: JSON nested deeper than 32 levels"):
            load_json(path)
    assert load_json(b"[[[1]]]") == [[[1]]] and depth({"a": [{"b": 1}]}, 32) == 3


def test_size_is_checked_before_parsing(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps(["x" * 100] * 20))
    with pytest.raises(BoundsError, match="big.json: .* bytes, more than the 1000"):
        load_json(path, max_bytes=1000)
    with pytest.raises(BoundsError, match="summary: more than the 1000 bytes"):
        load_json(path.read_bytes(), "summary", max_bytes=1000)
    with pytest.raises(ValueError):
        load_json(b"{not json")


def test_qrobust_own_files_are_well_inside_the_bounds(tmp_path):
    corpus = small_corpus(tmp_path, "*", shard=4)
    manifest = load_json(corpus / "manifest.json")
    assert depth(manifest, 32) <= 16
