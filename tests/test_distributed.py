"""`qrobust score` across processes (torchrun; gloo on CPU, 2 ranks): the same results as one process.

Every rank scores its share of the (variant, shard) units and attack batches
into its own part (OUT/parts/rank-R-of-W); rank 0 merges them. The results
folder must equal one process's array for array, progress and summary.json.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import fitted_checkpoint, small_corpus
from qrobust.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # as each torchrun rank runs (OMP_NUM_THREADS=1)

ATTACKS = ("--attacks", "fgsm-linf,pgd-linf", "--budgets", "small,large", "--attack-set", "pgd-linf.steps=3")


def run(*args) -> int:
    return main(["-q", *map(str, args)])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """12 photos, 4 per shard: 4 variants x 3 shards = 12 units (images and a 31-frame sequence)."""
    return small_corpus(tmp_path_factory.mktemp("dist-corpus"), "clean/*,natural/*,sequence/rotate", per_class=4,
                        shard=4)


@pytest.fixture(scope="module")
def checkpoint(corpus, tmp_path_factory) -> Path:
    """tiny_cnn fitted to the clean images: right on most, so attacks fool some and not others."""
    return fitted_checkpoint(corpus, tmp_path_factory.mktemp("dist-ckpt") / "tiny.safetensors")  # 30 steps: fitted,
    # not saturated: 8/255 PGD fools some, 0.5/255 none


def score_args(corpus, checkpoint, out, *extra) -> list[str]:
    return ["score", "--corpus", str(corpus), "--model", str(checkpoint), "--out", str(out), "--workers", "0",
            "--batch-size", "5", *map(str, extra)]


@pytest.fixture(scope="module")
def reference(corpus, checkpoint, tmp_path_factory) -> Path:
    """One process: the results every distributed run must reproduce."""
    out = tmp_path_factory.mktemp("dist-ref") / "r"
    assert run(*score_args(corpus, checkpoint, out, *ATTACKS, "--transfer-from", checkpoint)) == 0
    return out


def torchrun(*args, quiet: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 -m qrobust score ...``, as a user runs it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "qrobust",
           *(["-q"] if quiet else []), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def _arrays(path: Path) -> dict:
    import zarr

    root = zarr.open_group(str(path / "predictions.zarr"), mode="r")
    out = {"/": dict(root.attrs)}
    for name, node in root.members(max_depth=None):
        if isinstance(node, zarr.Array):
            out[name] = (node.dtype, node.chunks, node[...])
        else:
            out[name + "/"] = dict(node.attrs)
    return out


def assert_same_results(expected: Path, got: Path) -> None:
    """Every array (dtype, chunks, values), group attribute, progress, identity and summary.json is equal."""
    want, have = _arrays(expected), _arrays(got)
    assert sorted(have) == sorted(want)
    for name, value in want.items():
        if isinstance(value, tuple):
            assert have[name][:2] == value[:2], name
            np.testing.assert_array_equal(have[name][2], value[2], err_msg=name)
        else:
            assert have[name] == value, name
    for name in ("progress.json", "results.json", "summary.json"):
        assert json.loads((got / name).read_text()) == json.loads((expected / name).read_text()), name
    assert not (got / "parts").exists()  # merged and removed


def test_torchrun_equals_one_process(corpus, checkpoint, reference, tmp_path):
    out = tmp_path / "r"
    done = torchrun(*score_args(corpus, checkpoint, out, *ATTACKS, "--transfer-from", checkpoint))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("summary.json") == 1  # rank 0 reports, once
    assert_same_results(reference, out)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["attacks"]) == {"fgsm-linf", "pgd-linf"} and summary["checks"]["zero_grad_share"] is not None
    assert set(summary["checks"]["transfer"]["pgd-linf"]) == {"small", "large"}
    # a merged folder is an ordinary one: one process finds everything done and changes nothing
    progress = (out / "progress.json").read_text()
    assert run(*score_args(corpus, checkpoint, out, *ATTACKS, "--transfer-from", checkpoint)) == 0
    assert (out / "progress.json").read_text() == progress
    assert_same_results(reference, out)


def _parts(out: Path) -> dict[str, set]:
    return {p.name: set(json.loads((p / "progress.json").read_text()))
            for p in sorted((out / "parts").iterdir()) if (p / "progress.json").is_file()}


def test_a_damaged_shard_stops_every_rank_and_a_rerun_resumes(corpus, checkpoint, reference, tmp_path):
    """A user error on one rank is a one-line error on every rank; the units done are kept and the
    rerun (same number of processes) scores only the rest."""
    manifest = json.loads((corpus / "manifest.json").read_text())
    # units in plan order: clean/onecrop 0-2, clean/square 3-5, ...; rank 1 gets the odd ones
    shard = corpus / manifest["variants"]["clean/square"]["shards"][0]["name"]
    good = shard.read_bytes()
    out = tmp_path / "r"
    try:
        shard.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # same size, another sha256
        failed = torchrun(*score_args(corpus, checkpoint, out, *ATTACKS, "--transfer-from", checkpoint))
    finally:
        shard.write_bytes(good)
    assert failed.returncode != 0
    err = failed.stderr  # the two ranks' lines can interleave: counted, not split into lines
    assert err.count("qrobust score: error:") == 2 and err.count("sha256 differs") == 2, err[-3000:]
    assert err.count("error: rank 1 of 2 stopped: clean/square/") == 1  # rank 0 says which rank stopped
    assert err.count("Traceback") == err.count("raise ChildFailedError(")  # only torchrun's own report
    parts = _parts(out)
    assert sorted(parts) == ["rank-0-of-2", "rank-1-of-2"]
    assert len(parts["rank-0-of-2"]) == 6 and parts["rank-1-of-2"] == {"clean/onecrop#1"}
    resumed = torchrun(*score_args(corpus, checkpoint, out, *ATTACKS, "--transfer-from", checkpoint), quiet=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "merged the parts of an interrupted distributed run" in resumed.stderr
    assert "5 of 12 units to score" in resumed.stderr
    assert_same_results(reference, out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, argv: list[str], stop_rank: int, log_dir: str) -> None:
    """One rank, started by torch.multiprocessing.spawn with torchrun's environment; ``stop_rank`` stops at
    its second attack with a user error. Records the rows each rank wrote and its exit status."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from qrobust.score import attacks as attack_pkg
    from qrobust.score.adversarial import AttackConfigError
    from qrobust.score.results import ResultsStore

    real_attack, calls, written = attack_pkg.run_attack, [], []

    def stopping(*args, **kw):
        calls.append(1)
        if rank == stop_rank and len(calls) == 2:
            raise AttackConfigError("stopped by the test")
        return real_attack(*args, **kw)

    real_write = ResultsStore.write

    def write(self, variant, start, top5, labels, keys=None):
        written.append((variant, int(start), len(top5)))
        return real_write(self, variant, start, top5, labels, keys)

    attack_pkg.run_attack = stopping
    ResultsStore.write = write
    code = main(["-q", *argv, "--distributed"])
    Path(log_dir, f"rank-{rank}.json").write_text(json.dumps({"code": code, "written": written,
                                                              "threads": _native_threads()}))


def _native_threads() -> list[str]:
    """This process's native thread names (Linux; empty elsewhere)."""
    tasks = Path("/proc/self/task")
    return sorted((t / "comm").read_text().strip() for t in tasks.iterdir()) if tasks.is_dir() else []


def test_interrupted_cascade_resumes_in_one_process(corpus, checkpoint, tmp_path):
    """Stopped in the attacks, with --cascade: the parts hold disjoint units, every sample was scored once,
    and one process (another world size) merges them and finishes: the same as one process throughout."""
    import importlib

    import torch.multiprocessing as mp

    # pytest imports this file as `tests.test_distributed` (importlib mode), which spawned processes cannot
    # import; by its plain name it is importable there (tests/ is on the path they inherit)
    rank_main = importlib.import_module("test_distributed")._rank
    ref = tmp_path / "ref"
    assert run(*score_args(corpus, checkpoint, ref, *ATTACKS, "--cascade")) == 0
    out, logs = tmp_path / "r", tmp_path / "logs"
    logs.mkdir()
    argv = score_args(corpus, checkpoint, out, *ATTACKS, "--cascade")
    mp.spawn(rank_main, args=(2, _free_port(), argv, 1, str(logs)), nprocs=2, join=True)
    ranks = [json.loads((logs / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["code"] for r in ranks] == [2, 2]
    # the process group was freed, gloo's threads with it: none is left to die in interpreter shutdown
    assert not [t for r in ranks for t in r["threads"] if "gloo" in t]
    rows = [(v, start + i) for r in ranks for v, start, n in r["written"] for i in range(n)]
    assert len(rows) == len(set(rows)) == 4 * 12  # every sample of every variant, by one rank only
    parts = _parts(out)
    units = [{u for u in p if not u.startswith("attack/")} for p in parts.values()]
    assert not units[0] & units[1] and len(units[0] | units[1]) == 12
    batches = [{u for u in p if u.startswith("attack/")} for p in parts.values()]
    assert not batches[0] & batches[1]
    assert {u.rpartition("#")[2] for u in batches[0]} == {"0", "2"}  # 3 attack batches of 5 rows: 0, 2 | 1
    assert {u.rpartition("#")[2] for u in batches[1]} == {"1"} and len(batches[1]) == 1  # stopped at its 2nd
    assert run(*score_args(corpus, checkpoint, out, *ATTACKS, "--cascade")) == 0
    assert_same_results(ref, out)
    skipped = sum((a[2] == 2).sum() for name, a in _arrays(out).items() if name.endswith("/outcome"))
    assert skipped > 0  # the cascade did skip rows


def test_environment_errors_are_one_line(corpus, checkpoint, tmp_path, monkeypatch, capsys, caplog):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    base = score_args(corpus, checkpoint, tmp_path / "r", "--only", "clean/onecrop")
    # --distributed without torchrun: one process, said so
    assert main(["-q", *base, "--distributed"]) == 0
    assert "--distributed without torchrun" in caplog.text
    assert (tmp_path / "r" / "summary.json").is_file()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["-q", *base, "--distributed"]) == 2
    err = capsys.readouterr().err.strip()
    assert "RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT unset" in err and "torchrun" in err and "\n" not in err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    assert main(["-q", *base, "--device", "cuda:1"]) == 2  # under torchrun without --distributed too
    err = capsys.readouterr().err.strip()
    assert "--device cuda:1 under torchrun" in err and "\n" not in err
    monkeypatch.setenv("RANK", "2")
    assert main(["-q", *base]) == 2
    assert "RANK=2 is not a rank of a world of 2" in capsys.readouterr().err


def test_split_gives_every_unit_to_exactly_one_rank(monkeypatch):
    from qrobust.score.distributed import Context

    items = list(range(11))
    shares = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        shares.append(Context(rank, 3, "cpu").split(items))
    assert sorted(sum(shares, [])) == items
    assert [len(s) for s in shares] == [4, 4, 3]
