"""Generation beyond one process: --part I/N (job arrays), --finalize, and the Dask executor.

Each way of running must write the very corpus a single local run writes, file for file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_class_folder, write_suite
from qrobust.cli import main
from qrobust.shared.verify import verify_corpus

ONLY = "clean/*,natural/gaussian_noise-*,natural/fog-*,sequence/rotate,systematic/*"


def run(*args) -> int:
    return main(["-q", *map(str, args)])


def tree(folder: Path) -> dict[str, bytes]:
    """Every file of a corpus by relative path (the run's state folder left out)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] != ".qrobust"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Sources (6 photos, 3 classes), a suite of 3 shards per variant, and the corpus of one local run."""
    tmp = tmp_path_factory.mktemp("scaling")
    source = make_class_folder(tmp / "src", per_class=2)
    suite = write_suite(tmp / "small.toml")
    reference = tmp / "reference"
    assert run("generate", "--suite", suite, "--source", source, "--out", reference, "--only", ONLY,
               "--workers", 2) == 0
    return suite, source, tree(reference)


def generate(setup, out: Path, *extra) -> int:
    suite, source, _ = setup
    return run("generate", "--suite", suite, "--source", source, "--out", out, "--only", ONLY, *extra)


def records(out: Path) -> dict[str, set[str]]:
    """Shard names each part recorded, by part."""
    found = {}
    for path in (out / ".qrobust" / "parts").glob("part-*.json"):
        record = json.loads(path.read_text())
        found[record["part"]] = {f"{vid}/{idx}" for vid, idx, _ in record["shards"]}
    return found


def test_parts_build_disjoint_shards_and_the_last_writes_the_corpus(setup, tmp_path):
    out = tmp_path / "corpus"
    shards = lambda: {p.relative_to(out).as_posix() for p in out.glob("*/*/*.tar")}  # noqa: E731
    assert generate(setup, out, "--part", "1/3", "--workers", 1) == 0
    after_one = shards()
    assert after_one and not (out / "manifest.json").exists()
    assert generate(setup, out, "--part", "2/3", "--workers", 2) == 0
    assert not (out / "manifest.json").exists()
    assert shards() > after_one
    assert generate(setup, out, "--part", "3/3", "--workers", 1) == 0
    assert tree(out) == setup[2]  # byte-identical to the single run, manifest included
    assert verify_corpus(out) == []
    by_part = records(out)
    assert set(by_part) == {"1/3", "2/3", "3/3"}
    assert all(by_part.values())  # every part had work
    assert not by_part["1/3"] & by_part["2/3"] and not by_part["1/3"] & by_part["3/3"] \
        and not by_part["2/3"] & by_part["3/3"]
    assert len(set().union(*by_part.values())) == len(shards())
    # a part run again finds its shards and changes nothing
    assert generate(setup, out, "--part", "2/3") == 0
    assert tree(out) == setup[2]


def test_parts_running_at_once_in_one_folder(setup, tmp_path):
    """A job array: parts start together and share the folder (and its lock, shared)."""
    suite, source, reference = setup
    out = tmp_path / "corpus"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-m", "qrobust", "-q", "generate", "--suite", str(suite), "--source",
                               str(source), "--out", str(out), "--only", ONLY, "--part", f"{i}/4", "--workers", "1"],
                              env=env, stderr=subprocess.PIPE, text=True) for i in range(1, 5)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    assert (out / "manifest.json").exists()  # each part records before it looks: the last sees every record
    assert tree(out) == reference


def test_finalize_names_the_missing_part_then_writes_the_manifest(setup, tmp_path, capsys):
    out = tmp_path / "corpus"
    for part in ("1/3", "3/3"):
        assert generate(setup, out, "--part", part, "--workers", 1) == 0
    capsys.readouterr()
    assert generate(setup, out, "--finalize") == 2
    err = capsys.readouterr().err
    assert "not built yet" in err and "--part 2/3" in err and "3/3" not in err.split("--part")[1]
    assert not (out / "manifest.json").exists()
    assert generate(setup, out, "--part", "2/3", "--workers", 1) == 0  # the last part writes the manifest
    assert tree(out) == setup[2]
    # --finalize rewrites the same manifest, also for a shard no record lists (its part died after publishing it)
    (out / "manifest.json").unlink()
    (out / ".qrobust" / "parts" / "part-00002-of-00003.json").unlink()
    assert generate(setup, out, "--finalize") == 0
    assert tree(out) == setup[2]


def test_parts_and_finalize_resume_a_corpus_with_local_paths(setup, tmp_path):
    """A corpus written before manifests left out local paths and corpora had cards: a part run again,
    and --finalize, resume it (the plan holds no path) and write the corpus a run writes today."""
    out = tmp_path / "corpus"
    for part in ("1/2", "2/2"):
        assert generate(setup, out, "--part", part, "--workers", 1) == 0

    def make_old() -> None:
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["source"]["root"] = str(setup[1].resolve())
        manifest.pop("card")
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        (out / "README.md").unlink()
        assert verify_corpus(out) == []

    make_old()
    assert generate(setup, out, "--part", "2/2", "--workers", 1) == 0
    assert tree(out) == setup[2]
    make_old()
    assert generate(setup, out, "--finalize") == 0
    assert tree(out) == setup[2]


def test_finalize_rebuilds_nothing_and_refuses_a_shard_of_the_wrong_size(setup, tmp_path, capsys):
    out = tmp_path / "corpus"
    for part in ("1/2", "2/2"):
        assert generate(setup, out, "--part", part, "--workers", 1) == 0
    (out / "manifest.json").unlink()
    victim = sorted(out.glob("natural/*/*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[:-512])  # truncated after its part recorded it
    capsys.readouterr()
    assert generate(setup, out, "--finalize") == 2
    assert victim.relative_to(out).as_posix() in capsys.readouterr().err
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("args, message", [
    (("--part", "0/3"), "1 <= I <= N"), (("--part", "4/3"), "1 <= I <= N"), (("--part", "two"), "I/N"),
    (("--part", "1/2", "--finalize"), "without --part"),
    (("--scheduler", "tcp://127.0.0.1:1"), "--executor dask"),
])
def test_bad_scaling_arguments(setup, tmp_path, capsys, args, message):
    assert generate(setup, tmp_path / "corpus", *args) == 2
    assert message in capsys.readouterr().err


def test_a_whole_run_waits_for_no_part_and_parts_share_the_folder(tmp_path):
    from qrobust.generate.outdir import locked as _locked
    from qrobust.shared.errors import QrobustError as GenerateError

    with _locked(tmp_path, shared=True), _locked(tmp_path, shared=True):  # two parts side by side
        with pytest.raises(GenerateError, match="--part runs"):
            with _locked(tmp_path, shared=False):
                pass
    with _locked(tmp_path):
        with pytest.raises(GenerateError, match="another"):
            with _locked(tmp_path):
                pass
        with pytest.raises(GenerateError, match="without --part"):
            with _locked(tmp_path, shared=True):
                pass


def test_dask_executor_writes_the_same_corpus(setup, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) \
            as cluster:
        out = tmp_path / "corpus"
        assert generate(setup, out, "--executor", "dask", "--scheduler", cluster.scheduler_address) == 0
        assert tree(out) == setup[2]
        # a scheduler file (dask scheduler --scheduler-file, dask-jobqueue, dask-mpi) works the same way
        (tmp_path / "scheduler.json").write_text(json.dumps({"type": "Scheduler",
                                                            "address": cluster.scheduler_address}))
        (out / "manifest.json").unlink()
        for shard in list(out.glob("natural/fog-*/*.tar"))[:2]:
            shard.unlink()
        assert generate(setup, out, "--executor", "dask", "--scheduler", tmp_path / "scheduler.json") == 0
        assert tree(out) == setup[2]


def test_dask_with_no_worker_yet_and_a_relative_out(setup, tmp_path, monkeypatch):
    """An adaptive cluster has no worker until tasks wait (dask-jobqueue's ``adapt``); a relative --out means
    the client's folder, whatever the workers' working directory."""
    distributed = pytest.importorskip("distributed")
    (tmp_path / "workers").mkdir()
    (tmp_path / "client").mkdir()
    monkeypatch.chdir(tmp_path / "workers")  # where the workers start
    with distributed.LocalCluster(n_workers=0, threads_per_worker=1, processes=True, dashboard_address=None) \
            as cluster:
        cluster.adapt(minimum=0, maximum=2)
        monkeypatch.chdir(tmp_path / "client")
        assert generate(setup, "corpus", "--executor", "dask", "--scheduler", cluster.scheduler_address) == 0
    assert tree(tmp_path / "client" / "corpus") == setup[2]
    assert not (tmp_path / "workers" / "corpus").exists()


def test_shards_the_workers_wrote_elsewhere_give_no_manifest(setup, tmp_path, monkeypatch, capsys):
    """Workers on another file system report shards this folder does not hold: no manifest is written."""
    from qrobust.generate import executors

    out = tmp_path / "corpus"
    real_run = executors.LocalExecutor.run

    def run_elsewhere(self, fn, calls, progress, results, errors, sizes=None):
        real_run(self, fn, calls, progress, results, errors, sizes)
        if fn.__name__ == "run_job":
            next(out.glob("clean/onecrop/*.tar")).unlink()  # reported, but not here

    monkeypatch.setattr(executors.LocalExecutor, "run", run_elsewhere)
    assert generate(setup, out, "--workers", 1) == 2
    err = capsys.readouterr().err
    assert "not in" in err and "at that same path" in err and not (out / "manifest.json").exists()


def test_a_scheduler_file_is_waited_for_and_checked(setup, tmp_path, monkeypatch, capsys):
    """A scheduler file not written yet (scheduler starting) is waited for; one naming no address is one line."""
    distributed = pytest.importorskip("distributed")
    import threading

    from qrobust.generate import executors

    monkeypatch.setattr(executors, "SCHEDULER_FILE_WAIT", 1)
    for text in ("", "{bad", "{}"):
        (tmp_path / "sched.json").write_text(text)
        assert generate(setup, tmp_path / "c", "--executor", "dask", "--scheduler", tmp_path / "sched.json") == 2
        assert "names no scheduler address" in capsys.readouterr().err
    assert generate(setup, tmp_path / "c", "--executor", "dask", "--scheduler", tmp_path / "absent.json") == 2
    assert "absent.json: does not exist (after 1 s)" in capsys.readouterr().err
    monkeypatch.setattr(executors, "SCHEDULER_FILE_WAIT", 60)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) \
            as cluster:
        late = tmp_path / "late.json"
        timer = threading.Timer(1.5, lambda: late.write_text(json.dumps({"address": cluster.scheduler_address})))
        timer.start()
        assert generate(setup, tmp_path / "c", "--executor", "dask", "--scheduler", late, "--only", "clean/*") == 0
    assert verify_corpus(tmp_path / "c") == []


def test_dask_parts_and_errors_name_the_extra(setup, tmp_path, capsys, monkeypatch):
    """Without Dask installed, --executor dask says which extra to install."""
    import builtins

    real_import = builtins.__import__

    def no_dask(name, *args, **kw):
        if name == "distributed" or name.startswith("distributed."):
            raise ImportError(name)
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_dask)
    assert generate(setup, tmp_path / "corpus", "--executor", "dask") == 2
    assert "qrobust[dask]" in capsys.readouterr().err


def test_a_part_that_saw_other_sources_never_makes_a_corpus(setup, tmp_path, capsys):
    """A part whose source scan differs (a read error on its node) cuts other shards: refused, never mixed."""
    suite, source, _ = setup
    src = tmp_path / "src"
    import shutil

    shutil.copytree(source, src)
    out = tmp_path / "corpus"
    args = ["generate", "--suite", suite, "--source", src, "--out", out, "--only", "clean/*", "--workers", 1]
    assert run(*args, "--part", "1/2") == 0
    victim = sorted(src.rglob("*.jpg"))[1]
    victim.write_bytes(b"\0" * victim.stat().st_size)  # same name, size and label: same source fingerprint
    (out / ".qrobust" / "scan.json").unlink()  # as if part 2 scanned on its own, at the same time
    capsys.readouterr()
    assert run(*args, "--part", "2/2") == 2
    assert "saw other usable samples" in capsys.readouterr().err
    assert not (out / "manifest.json").exists()


def test_the_first_recorded_scan_binds_the_parts(tmp_path):
    from qrobust.generate.run import GenerateError, _read_scan, _record_scan

    cache = tmp_path / "scan.json"
    _record_scan(cache, {"n": 3}, {"a": "unreadable"}, binding=True)
    _record_scan(cache, {"n": 3}, {"a": "unreadable"}, binding=True)  # the same scan: fine
    with pytest.raises(GenerateError, match="differs"):
        _record_scan(cache, {"n": 3}, {}, binding=True)
    assert _read_scan(cache, {"n": 3}) == {"a": "unreadable"} and not list(tmp_path.glob("*.partial*"))
    cache.write_text("{not json")
    with pytest.raises(GenerateError, match="unreadable"):
        _read_scan(cache, {"n": 3})


def test_partial_files_of_lost_workers_are_cleared_before_the_manifest(setup, tmp_path, monkeypatch):
    """A Dask worker killed mid-shard leaves its partial file; the task ran again elsewhere. The corpus
    must still verify (no extra file)."""
    from qrobust.generate import executors

    out = tmp_path / "corpus"
    real_run = executors.LocalExecutor.run

    def run_losing_a_worker(self, fn, calls, *a, **kw):
        if fn.__name__ == "run_job":
            stray = out / "clean" / "onecrop" / "onecrop-000001.tar.partial-lostnode-4242"
            stray.parent.mkdir(parents=True, exist_ok=True)
            stray.write_bytes(b"half a shard")
        return real_run(self, fn, calls, *a, **kw)

    monkeypatch.setattr(executors.LocalExecutor, "run", run_losing_a_worker)
    assert generate(setup, out, "--workers", 1) == 0
    assert not list(out.rglob("*.partial*")) and verify_corpus(out) == []
    assert tree(out) == setup[2]


def test_a_dask_worker_with_other_pixel_libraries_is_refused(tmp_path):
    from qrobust.generate import jobs
    from qrobust.shared.errors import QrobustError
    from qrobust.shared.suites import load_suite

    suite = load_suite(str(write_suite(tmp_path / "s.toml")))
    with pytest.raises(QrobustError, match=r"Pillow \S+ \(the run: 0.0.1\)"):
        jobs.on_cluster((suite, str(tmp_path), (), {"Pillow": "0.0.1"}), "scan", [])
    assert jobs.on_cluster((suite, str(tmp_path), (), {}), "scan", []) == {}


def test_a_broken_part_record_is_one_line(setup, tmp_path, capsys):
    out = tmp_path / "corpus"
    assert generate(setup, out, "--part", "1/2", "--workers", 1) == 0
    record = next((out / ".qrobust" / "parts").glob("part-*.json"))
    data = json.loads(record.read_text())
    data["shards"][0][0] = 1  # a variant id that is no string
    record.write_text(json.dumps(data))
    capsys.readouterr()
    assert generate(setup, out, "--finalize") == 2
    err = capsys.readouterr().err
    assert "unreadable part record" in err and "Traceback" not in err


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    from qrobust.generate.outdir import locked

    def no_locks(*a):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with locked(tmp_path, shared=True):
        pass
    assert "cannot lock" in caplog.text and "ENOLCK" in caplog.text
