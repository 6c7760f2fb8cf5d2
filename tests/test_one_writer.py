"""One writer per results folder: a second `score` is refused while one holds the folder, `report` does not
read a folder mid-write, and the writer clears what a killed zarr write left inside the store."""
from __future__ import annotations

import fcntl
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from qrobust.cli import main
from qrobust.score.results import LOCK, ResultsError, check_folder
from tests.helpers import fitted_checkpoint, small_corpus


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("writer")
    corpus = small_corpus(tmp, "clean/*", shard=4)
    checkpoint = fitted_checkpoint(corpus, tmp / "tiny.safetensors")
    return corpus, checkpoint


def score(corpus: Path, checkpoint: Path, out: Path, *extra: str) -> int:
    return main(["-q", "score", "--corpus", str(corpus), "--model", str(checkpoint), "--out", str(out),
                 "--workers", "0", *extra])


def test_second_writer_is_refused_and_the_first_loses_nothing(setup, tmp_path, capsys):
    corpus, checkpoint = setup
    out = tmp_path / "res"
    assert score(corpus, checkpoint, out, "--only", "clean/onecrop") == 0
    before = json.loads((out / "progress.json").read_text())
    with open(out / LOCK, "a+") as held:  # another run holding the folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        assert score(corpus, checkpoint, out, "--only", "clean/square") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another `qrobust score` is writing" in err[0] and str(out) in err[0], err
        assert json.loads((out / "progress.json").read_text()) == before  # the refused run wrote nothing
        assert main(["-q", "report", str(out), "--out", str(tmp_path / "report")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is writing it" in err[0], err
        with pytest.raises(ResultsError, match="is writing it"):  # nor is it checked against its digests mid-write
            check_folder(out)
    assert score(corpus, checkpoint, out, "--only", "clean/square") == 0  # released: it runs
    done = json.loads((out / "progress.json").read_text())
    assert set(before) < set(done) and any(u.startswith("clean/square") for u in done)
    assert main(["-q", "report", str(out), "--out", str(tmp_path / "report")]) == 0
    assert check_folder(out) == []


def test_a_link_as_the_lock_is_refused(setup, tmp_path, capsys):
    corpus, checkpoint = setup
    out, victim = tmp_path / "res", tmp_path / "victim.txt"
    victim.write_text("keep")
    out.mkdir()
    (out / LOCK).symlink_to(victim)
    assert score(corpus, checkpoint, out) == 2
    assert "is a link" in capsys.readouterr().err
    assert victim.read_text() == "keep"


def test_a_lock_that_is_a_fifo_or_a_folder_is_refused_without_blocking(setup, tmp_path, capsys):
    import os

    corpus, checkpoint = setup
    for kind in ("fifo", "folder"):
        out = tmp_path / kind
        out.mkdir()
        os.mkfifo(out / LOCK) if kind == "fifo" else (out / LOCK).mkdir()
        assert score(corpus, checkpoint, out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(out / LOCK) in err[0], err
        assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing else written


def test_partial_zarr_writes_of_a_killed_run_are_cleared(setup, tmp_path):
    corpus, checkpoint = setup
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert score(corpus, checkpoint, ref) == 0
    assert score(corpus, checkpoint, out) == 0
    chunk = next(p for p in (out / "predictions.zarr").rglob("c/*") if p.is_file())
    # what zarr leaves when killed between writing a chunk's temporary file and renaming it
    left = chunk.with_name(f"{chunk.name}.{'0123456789abcdef' * 2}.partial")
    left.write_bytes(b"half")
    keep = chunk.with_name(f"{chunk.name}.notes.partial")  # not zarr's pattern: not ours to remove
    keep.write_bytes(b"x")
    assert score(corpus, checkpoint, out) == 0
    assert not left.exists() and keep.exists()
    keep.unlink()
    for name in ("clean/onecrop", "labels"):
        np.testing.assert_array_equal(zarr.open_group(str(out / "predictions.zarr"), mode="r")[name][...],
                                      zarr.open_group(str(ref / "predictions.zarr"), mode="r")[name][...])
