"""Results and corpus folders handed over by someone else: nothing is written, merged or deleted through a link
or outside the folder, a folder holding what qrobust never writes is refused (not tidied), and predictions or a
summary edited after they were written are named and refused, by `score` and by :func:`check_folder`.

Each refusal is one line on stderr and exit status 2, and leaves every file where it was."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from helpers import fitted_checkpoint, make_class_folder, small_corpus, write_suite
from qrobust.cli import main
from qrobust.score.results import DIGESTS, ResultsError, check_folder
from qrobust.shared.files import partial_path, remove_dead_partials, write_atomic

ATTACK = ("--attacks", "fgsm-linf", "--budgets", "small")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A corpus (2 variants x 2 shards), a fitted model, and one finished results folder with an attack."""
    tmp = tmp_path_factory.mktemp("integrity")
    corpus = small_corpus(tmp, "clean/*", shard=4)
    checkpoint = fitted_checkpoint(corpus, tmp / "tiny.safetensors")
    reference = tmp / "reference"
    assert score(corpus, checkpoint, reference) == 0
    return corpus, checkpoint, reference


def score(corpus: Path, checkpoint: Path, out: Path, *extra: str, attack: bool = True) -> int:
    return main(["-q", "score", "--corpus", str(corpus), "--model", str(checkpoint), "--out", str(out),
                 "--workers", "0", "--batch-size", "2", *(ATTACK if attack else ()), *extra])


def tree(folder: Path) -> dict[str, str]:
    """sha256 of every plain file below ``folder`` (links not followed), and each link's target."""
    out = {}
    for top, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = Path(top, name)
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def copy(reference: Path, to: Path) -> Path:
    shutil.copytree(reference, to, symlinks=True)
    return to


def outside(tmp_path: Path) -> Path:
    """A folder outside every results folder, with a file the runs must never touch."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    return folder


# --- links and foreign entries ------------------------------------------------------------------------------

def test_a_parts_link_to_an_outside_folder_is_refused_and_nothing_there_is_deleted(setup, tmp_path, capsys):
    corpus, checkpoint, reference = setup
    out, away = copy(reference, tmp_path / "r"), outside(tmp_path)
    copy(reference, away / "rank-0-of-2")  # looks like a part: a merge would delete it
    (out / "parts").symlink_to(away, target_is_directory=True)
    before, theirs = tree(out), tree(away)
    capsys.readouterr()
    assert score(corpus, checkpoint, out) == 2
    line = one_line(capsys)
    assert str(out / "parts") in line and "a link" in line
    assert tree(away) == theirs and tree(out) == before


def test_a_part_that_is_a_link_is_refused_and_its_target_kept(setup, tmp_path, capsys):
    corpus, checkpoint, reference = setup
    out, away = copy(reference, tmp_path / "r"), outside(tmp_path)
    (out / "parts").mkdir()
    (out / "parts" / "rank-0-of-2").symlink_to(away, target_is_directory=True)
    before, theirs = tree(out), tree(away)
    capsys.readouterr()
    assert score(corpus, checkpoint, out) == 2
    assert "rank-0-of-2" in one_line(capsys)
    assert tree(away) == theirs and tree(out) == before


@pytest.mark.parametrize("entry", ["parts/notes.txt", "parts/rank-2-of-2/", "parts/rank-01-of-2/",
                                   "parts/backup/", "parts/rank-0-of-2/notes.txt", "parts/rank-0-of-2/parts/"])
def test_a_parts_folder_holding_what_qrobust_never_writes_is_refused_not_cleaned(setup, tmp_path, capsys, entry):
    """A part is deleted once merged, so anything in parts/ that is not a rank's own output stops the run."""
    corpus, checkpoint, reference = setup
    out = copy(reference, tmp_path / "r")
    (out / "parts" / "rank-0-of-2").mkdir(parents=True)
    path = out / entry
    if entry.endswith("/"):
        path.mkdir(parents=True, exist_ok=True)
        (path / "mine.txt").write_text("mine")
    else:
        path.write_text("mine")
    before = tree(out)
    capsys.readouterr()
    assert score(corpus, checkpoint, out) == 2
    line = one_line(capsys)
    assert "parts" in line and ("refuses" in line or "not something qrobust writes" in line), line
    assert tree(out) == before


@pytest.mark.parametrize("where", ["predictions.zarr/labels/c", "predictions.zarr/clean/onecrop/c/0/0",
                                   "summary.json", "progress.json", "predictions.zarr/labels/c/0.{hex}.partial",
                                   "predictions.zarr/attacks/fgsm-linf"])
def test_a_link_anywhere_in_a_results_folder_is_refused_before_anything_is_written(setup, tmp_path, capsys, where):
    corpus, checkpoint, reference = setup
    out, away = copy(reference, tmp_path / "r"), outside(tmp_path)
    link = out / where.format(hex="0123456789abcdef" * 2)
    if link.is_dir():  # a folder of the store, copied outside and linked in its place
        shutil.copytree(link, away / "copy")
        shutil.rmtree(link)
        link.symlink_to(away / "copy", target_is_directory=True)
    else:
        if link.exists():
            shutil.copy(link, away / "copy")
            link.unlink()
        else:  # a zarr partial's name: the writer clears those, but never a link by that name
            (away / "copy").write_bytes(b"x")
        link.symlink_to(away / "copy")
    before, theirs = tree(out), tree(away)
    capsys.readouterr()
    assert score(corpus, checkpoint, out) == 2
    line = one_line(capsys)
    assert str(link) in line and "a link" in line, line
    assert tree(out) == before and tree(away) == theirs  # nothing written, renamed or cleared, here or there
    with pytest.raises(ResultsError, match="a link"):
        check_folder(out)


def test_a_fifo_in_a_results_folder_is_refused_without_blocking(setup, tmp_path, capsys):
    corpus, checkpoint, reference = setup
    out = copy(reference, tmp_path / "r")
    chunk = out / "predictions.zarr" / "labels" / "c" / "1"
    chunk.unlink()
    os.mkfifo(chunk)  # a reader would wait on it for ever
    capsys.readouterr()
    assert score(corpus, checkpoint, out) == 2
    assert "a FIFO" in one_line(capsys)
    with pytest.raises(ResultsError, match="a FIFO"):
        check_folder(out)


@pytest.mark.parametrize("name", ["summary.json", "progress.json", "predictions.zarr", ".lock"])
def test_an_own_name_as_the_wrong_kind_of_entry_is_one_line(setup, tmp_path, capsys, name):
    corpus, checkpoint, reference = setup
    out = copy(reference, tmp_path / "r")
    path = out / name
    if path.is_dir():
        shutil.rmtree(path)
        path.write_text("x")
    else:
        path.unlink(missing_ok=True)
        path.mkdir()
    capsys.readouterr()
    assert score(corpus, checkpoint, out) == 2
    assert str(path) in one_line(capsys)


def test_write_atomic_replaces_a_link_never_its_target(tmp_path):
    away = outside(tmp_path)
    target = tmp_path / "summary.json"
    target.symlink_to(away / "keep.txt")
    write_atomic(target, "new")
    assert not target.is_symlink() and target.read_text() == "new"
    assert (away / "keep.txt").read_text() == "keep"
    # a link planted under the name of this process's partial file is not written through either
    planted = partial_path(tmp_path / "progress.json")
    planted.symlink_to(away / "keep.txt")
    write_atomic(tmp_path / "progress.json", "[]")
    assert (tmp_path / "progress.json").read_text() == "[]" and (away / "keep.txt").read_text() == "keep"
    assert not os.path.lexists(planted)


def test_dead_partials_are_removed_but_never_a_link_of_that_name(tmp_path):
    away = outside(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = partial_path(tmp_path / "x").name.removeprefix("x.partial-").removesuffix(f"-{os.getpid()}")
    stale = tmp_path / f"progress.json.partial-{host}-{int(dead.stdout)}"
    stale.write_text("{")
    link = tmp_path / f"summary.json.partial-{host}-{int(dead.stdout)}"
    link.symlink_to(away / "keep.txt")
    assert remove_dead_partials(tmp_path) == 1
    assert not stale.exists() and link.is_symlink() and (away / "keep.txt").read_text() == "keep"


# --- output locations ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("place", ["inside", "same", "holds"])
def test_an_out_inside_the_corpus_or_holding_it_is_refused(setup, tmp_path, capsys, place):
    corpus, checkpoint, _ = setup
    mine = tmp_path / "corpus"
    shutil.copytree(corpus, mine)
    before = tree(mine)
    out = {"inside": mine / "clean" / "results", "same": mine, "holds": tmp_path}[place]
    link = tmp_path / "via-link"  # the same place reached through a link is the same place
    link.symlink_to(out.parent if place == "inside" else out, target_is_directory=True)
    for given in (out, link / out.name if place == "inside" else link):
        capsys.readouterr()
        assert score(mine, checkpoint, given) == 2
        assert "corpus folder" in one_line(capsys)
    assert tree(mine) == before and not (mine / "clean" / "results").exists()


def test_an_out_that_is_a_file_or_a_dangling_link_is_one_line(setup, tmp_path, capsys):
    corpus, checkpoint, _ = setup
    (tmp_path / "file").write_text("x")
    capsys.readouterr()
    assert score(corpus, checkpoint, tmp_path / "file") == 2
    assert "exists and is not a folder" in one_line(capsys)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert score(corpus, checkpoint, tmp_path / "dangling") == 2
    line = one_line(capsys)
    assert "is a link to" in line and "does not exist" in line and str(tmp_path / "nowhere") in line
    assert not (tmp_path / "nowhere").exists()


def test_the_api_without_out_uses_and_removes_a_folder_of_its_own(setup, tmp_path, monkeypatch):
    import tempfile

    import qrobust
    from qrobust.shared.errors import QrobustError

    corpus, checkpoint, reference = setup
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    summary = qrobust.evaluate(checkpoint, corpus, batch_size=2, attacks=list(ATTACK[1:2]), budgets=["small"])
    assert summary == json.loads((reference / "summary.json").read_text())
    assert list(tmp_path.iterdir()) == []  # the temporary results folder is gone
    with pytest.raises(QrobustError, match="corpus folder"):
        qrobust.evaluate(checkpoint, corpus, corpus / "results")
    assert not (corpus / "results").exists()


# --- digests -------------------------------------------------------------------------------------------------

def edit_chunk(out: Path, array: str, row: int = 0) -> None:
    """Change one stored value through zarr, as someone editing the predictions would."""
    node = zarr.open_group(str(out / "predictions.zarr"), mode="a")[array]
    values = node[...]
    flat = values.reshape(len(values), -1)
    flat[row, 0] = flat[row, 0] + 1 if flat[row, 0] < 1 else flat[row, 0] - 1
    node[...] = flat.reshape(values.shape)


def edit_json(path: Path, change) -> None:
    """Change a JSON file the way a hand edit would, keeping qrobust's formatting."""
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


@pytest.mark.parametrize("edit, named", [
    (lambda out: edit_chunk(out, "clean/onecrop", 5), "array clean/onecrop"),
    (lambda out: edit_chunk(out, "attacks/fgsm-linf/small/outcome"), "array attacks/fgsm-linf/small/outcome"),
    (lambda out: edit_chunk(out, "labels", 1), "array labels"),
    (lambda out: (out / "predictions.zarr" / "clean" / "square" / "c" / "1" / "0").unlink(), "array clean/square"),
    (lambda out: edit_json(out / "summary.json", lambda s: s["clean"].update(acc=s["clean"]["acc"] / 2)),
     "summary.json"),
    (lambda out: (out / "progress.json").write_text(json.dumps(json.loads((out / "progress.json").read_text())[1:])),
     "progress.json"),
])
def test_results_edited_after_they_were_written_are_named_and_refused(setup, tmp_path, capsys, edit, named):
    corpus, checkpoint, reference = setup
    out = copy(reference, tmp_path / "r")
    edit(out)
    before = tree(out)
    capsys.readouterr()
    assert score(corpus, checkpoint, out) == 2  # never built upon
    line = one_line(capsys)
    assert named in line and DIGESTS in line, line
    assert tree(out) == before
    with pytest.raises(ResultsError, match=named):
        check_folder(out)
    with pytest.raises(ResultsError, match=named):
        check_folder(out / "summary.json")  # as report is given a folder, or its summary


def test_check_folder_passes_a_finished_folder_and_warns_where_it_cannot_check(setup, tmp_path):
    _, _, reference = setup
    assert check_folder(reference) == []
    old = copy(reference, tmp_path / "old")
    (old / DIGESTS).unlink()  # as a qrobust that recorded no digests left it
    warnings = check_folder(old)
    assert len(warnings) == 1 and "cannot be checked" in warnings[0] and str(old) in warnings[0]
    unfinished = copy(reference, tmp_path / "unfinished")  # a later run opened it and was killed
    record = json.loads((unfinished / DIGESTS).read_text())
    record["files"] = {k: v for k, v in record["files"].items() if "/c/" in k and "/columns/" not in k}
    (unfinished / DIGESTS).write_text(json.dumps(record))
    warnings = check_folder(unfinished)
    assert len(warnings) == 1 and "did not finish" in warnings[0]


@pytest.mark.parametrize("edit, named", [
    (lambda out: edit_chunk(out, "clean/onecrop", 5), "array clean/onecrop"),
    (lambda out: edit_json(out / "summary.json", lambda s: s["clean"].update(acc=s["clean"]["acc"] / 2)),
     "summary.json"),
])
def test_report_refuses_results_edited_after_the_fact_naming_what(setup, tmp_path, capsys, edit, named):
    _, _, reference = setup
    out = copy(reference, tmp_path / "r")
    edit(out)
    capsys.readouterr()
    assert main(["-q", "report", str(out), "--out", str(tmp_path / "report")]) == 2
    line = one_line(capsys)
    assert named in line and DIGESTS in line, line
    assert not (tmp_path / "report" / "index.html").exists()  # no page shows the edited numbers


def test_report_says_where_a_summary_cannot_be_checked(setup, tmp_path, caplog):
    _, _, reference = setup
    old = copy(reference, tmp_path / "old-model")
    (old / DIGESTS).unlink()  # as a qrobust that recorded no digests left it
    assert main(["report", str(old), "--out", str(tmp_path / "report")]) == 0
    assert "cannot be checked against its predictions" in caplog.text  # the log: stderr
    page = (tmp_path / "report" / "index.html").read_text()
    findings = (tmp_path / "report" / "findings.txt").read_text()
    for text in (page, findings):
        assert "old-model: scored by a qrobust that recorded no digests" in text
        assert str(tmp_path) not in text  # the folder by its name, not a local path
    caplog.clear()
    assert main(["report", str(reference), "--out", str(tmp_path / "report2")]) == 0
    assert "cannot be checked" not in caplog.text


@pytest.mark.parametrize("files", [{"../reference/summary.json": None}, {"/etc/hostname": None}, ["x"],
                                   {"summary.json": 3}])
def test_a_malformed_digest_record_is_refused_and_reads_nothing_outside(setup, tmp_path, capsys, files):
    corpus, checkpoint, reference = setup
    out = copy(reference, tmp_path / "r")
    (out / DIGESTS).write_text(json.dumps({"schema": "qrobust.digests/1", "files": files}))
    with pytest.raises(ResultsError, match="not a record of digests"):
        check_folder(out)
    capsys.readouterr()
    assert score(corpus, checkpoint, out) == 2
    assert DIGESTS in one_line(capsys)


def test_a_rerun_and_a_resumed_run_keep_the_digests_byte_identical(setup, tmp_path):
    """The record holds no time or order of events: a run in two steps (another --only first), and a rerun
    of a finished folder, write the very digests.json one run writes."""
    corpus, checkpoint, reference = setup
    out = tmp_path / "r"
    assert score(corpus, checkpoint, out, "--only", "clean/square", attack=False) == 0
    assert check_folder(out) == []
    assert score(corpus, checkpoint, out) == 0
    assert tree(out) == tree(reference)
    assert score(corpus, checkpoint, out) == 0
    assert tree(out) == tree(reference)


def test_an_old_folder_without_digests_is_taken_as_it_is_and_checked_from_then_on(setup, tmp_path, caplog):
    corpus, checkpoint, reference = setup
    out = copy(reference, tmp_path / "r")
    (out / DIGESTS).unlink()
    assert score(corpus, checkpoint, out) == 0
    assert "recorded no digests" in caplog.text
    assert tree(out) == tree(reference)  # the digests of what it found equal what one run records
    edit_chunk(out, "clean/square")
    with pytest.raises(ResultsError, match="array clean/square"):
        check_folder(out)


def test_a_part_edited_after_its_rank_wrote_it_is_not_merged(setup, tmp_path, capsys):
    """A part of an interrupted distributed run is checked against its own digests before it is merged;
    an intact one is merged and deleted, and the folder ends as one run leaves it."""
    corpus, checkpoint, reference = setup
    for edited in (True, False):
        out = tmp_path / f"r-{edited}"
        part = out / "parts" / "rank-0-of-2"
        part.mkdir(parents=True)
        shutil.copy(reference / "results.json", out)  # rank 0 made the folder, then the ranks wrote parts
        for name in ("results.json", "progress.json", "predictions.zarr"):  # what a rank leaves, all units done
            (shutil.copytree if name.endswith(".zarr") else shutil.copy)(reference / name, part / name)
        record = json.loads((reference / DIGESTS).read_text())
        record["files"] = {k: v for k, v in record["files"].items()  # a part records its units' chunks only
                           if "/c/" in k and "/columns/" not in k}
        (part / DIGESTS).write_text(json.dumps(record))
        if edited:
            edit_chunk(part, "clean/onecrop", 2)
        capsys.readouterr()
        code = score(corpus, checkpoint, out)
        if edited:
            assert code == 2
            line = one_line(capsys)
            assert str(part) in line and "array clean/onecrop" in line, line
            assert part.is_dir() and not (out / "summary.json").exists()  # kept, not merged
        else:
            assert code == 0 and not (out / "parts").exists()
            for name in ("clean/onecrop", "attacks/fgsm-linf/small/outcome"):
                np.testing.assert_array_equal(zarr.open_group(str(out / "predictions.zarr"), mode="r")[name][...],
                                              zarr.open_group(str(reference / "predictions.zarr"), mode="r")[name][...])
            assert tree(out) == tree(reference)  # merged, the digests of the folder one run writes
            assert check_folder(out) == []


# --- corpus folders ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen-links")
    return make_class_folder(tmp / "src", per_class=1), write_suite(tmp / "s.toml")


def generate(sources, out: Path) -> int:
    src, suite = sources
    return main(["-q", "generate", "--suite", str(suite), "--source", str(src), "--out", str(out),
                 "--only", "clean/onecrop", "--workers", "1"])


@pytest.mark.parametrize("where", ["clean", ".qrobust", ".qrobust/lock", "manifest.json"])
def test_generate_refuses_an_out_holding_a_link(sources, tmp_path, capsys, where):
    """A shard, the plan, the lock or the manifest written through a link would land outside --out."""
    away = outside(tmp_path)
    (away / "onecrop-000000.tar.partial-deadhost-1").write_bytes(b"a killed run's, or someone's")
    out = tmp_path / "corpus"
    out.mkdir()
    link = out / where
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(away if where in ("clean", ".qrobust") else away / "absent",
                    target_is_directory=where in ("clean", ".qrobust"))
    theirs = tree(away)
    capsys.readouterr()
    assert generate(sources, out) == 2
    line = one_line(capsys)
    assert str(link) in line and "a link" in line, line
    assert tree(away) == theirs and not (away / "absent").exists()


def test_generate_into_a_dangling_link_is_one_line(sources, tmp_path, capsys):
    out = tmp_path / "corpus"
    out.symlink_to(tmp_path / "nowhere")
    capsys.readouterr()
    assert generate(sources, out) == 2
    line = one_line(capsys)
    assert "is a link to" in line and "does not exist" in line
    assert not (tmp_path / "nowhere").exists()


def test_remove_partials_follows_no_link_and_removes_only_files(tmp_path):
    from qrobust.generate.outdir import remove_partials

    away = outside(tmp_path)
    theirs = away / "x.tar.partial-host-1"
    theirs.write_bytes(b"theirs")
    out = tmp_path / "corpus"
    (out / "clean" / "onecrop").mkdir(parents=True)
    (out / "natural").symlink_to(away, target_is_directory=True)
    ours = out / "clean" / "onecrop" / "onecrop-000000.tar.partial-host-1"
    ours.write_bytes(b"half")
    named = out / "clean" / "onecrop" / "onecrop-000001.tar.partial-host-2"
    named.symlink_to(theirs)
    remove_partials(out)
    assert not ours.exists() and named.is_symlink() and theirs.read_bytes() == b"theirs"
    remove_partials(out, ["natural/x.tar"])  # a shard name that leads through the link
    assert theirs.read_bytes() == b"theirs"
