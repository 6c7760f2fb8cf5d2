"""Crashes: SIGKILL at random points during generation and scoring, and a full disk.

Each kill must leave nothing torn under a final name (every published shard
is byte-identical to the uninterrupted run's; every stored prediction equals
the uninterrupted run's), and the rerun must end byte-identical to the
uninterrupted run. A write that fails for lack of space (RLIMIT_FSIZE makes
the kernel refuse the write, as a full disk does) must stop the run with one
line, publish no half-written shard, and a rerun with space must finish the
same corpus.
"""
from __future__ import annotations

import hashlib
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import make_class_folder, write_suite

KILL_SEED = 20261126
KILLS = 5


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "qrobust", "-q", *map(str, args)]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path (``skip``: top-level names left out)."""
    return {str(p.relative_to(folder)): sha(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] not in skip}


def timed_run(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def kill_at(args: list[str], seconds: float) -> bool:
    """Start ``args`` in its own process group and SIGKILL the whole group after ``seconds``;
    True if it was still running (a real interruption)."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("crash")
    src = make_class_folder(tmp / "src", per_class=2)
    suite = write_suite(tmp / "s.toml", corruptions=("glass_blur", "zoom_blur", "fog"), severities=(1, 3), shard=1)
    return src, suite


def test_generation_killed_at_random_points_ends_byte_identical(source, tmp_path):
    src, suite = source
    args = ["generate", "--suite", suite, "--source", src, "--workers", 2]
    seconds = timed_run(cli(*args, "--out", tmp_path / "ref"))
    ref = tree(tmp_path / "ref", skip=(".qrobust",))
    out = tmp_path / "killed"
    rng = random.Random(KILL_SEED)
    interrupted = 0
    for _ in range(KILLS):
        interrupted += kill_at(cli(*args, "--out", out), rng.uniform(0.3, seconds))
        got = tree(out, skip=(".qrobust",)) if out.exists() else {}
        published = {k: v for k, v in got.items() if ".partial" not in k}
        # whatever carries a final name is complete: equal to the uninterrupted run's file
        assert {k: ref.get(k) for k in published} == published
    assert interrupted >= 2, "the kills should interrupt the run, not find it finished"
    subprocess.run(cli(*args, "--out", out), check=True)
    assert tree(out, skip=(".qrobust",)) == ref  # no partial left, every shard and the manifest identical


@pytest.fixture(scope="module")
def scoring(tmp_path_factory, source) -> tuple[Path, Path]:
    from qrobust.shared.models import ModelSpec, build_model, save_checkpoint

    src, suite = source
    tmp = tmp_path_factory.mktemp("crash-score")
    subprocess.run(cli("generate", "--suite", suite, "--source", src, "--out", tmp / "corpus", "--workers", 2),
                   check=True)
    torch.manual_seed(0)
    spec = ModelSpec(arch="tiny_resnet", num_classes=3)
    path = tmp / "tiny_resnet.safetensors"
    save_checkpoint(build_model(spec).eval(), spec, path)
    return tmp / "corpus", path


def stored_values(results: Path) -> dict[str, np.ndarray]:
    """Every array of a results store, read through zarr (a torn chunk would fail to decode here)."""
    import zarr

    root = zarr.open_group(str(results / "predictions.zarr"), mode="r")
    return {path: np.asarray(node[...]) for path, node in root.members(max_depth=None)
            if isinstance(node, zarr.Array)}


def test_scoring_killed_at_random_points_ends_byte_identical(scoring, tmp_path):
    corpus, checkpoint = scoring
    args = ["score", "--corpus", corpus, "--model", checkpoint, "--workers", 0, "--batch-size", 1,
            "--attacks", "fgsm-linf", "--budgets", "small"]
    seconds = timed_run(cli(*args, "--out", tmp_path / "ref"))
    ref_files = tree(tmp_path / "ref")
    ref_values = stored_values(tmp_path / "ref")
    out = tmp_path / "killed"
    rng = random.Random(KILL_SEED)
    interrupted = 0
    for _ in range(KILLS):
        interrupted += kill_at(cli(*args, "--out", out), rng.uniform(0.5, seconds))
        if not (out / "predictions.zarr").is_dir():
            continue
        for name, values in stored_values(out).items():
            written = values != (-1 if values.dtype.kind in "iuf" else "")  # the fill value: not scored yet
            np.testing.assert_array_equal(values[written], ref_values[name][written], err_msg=name)
    assert interrupted >= 2, "the kills should interrupt the run, not find it finished"
    subprocess.run(cli(*args, "--out", out), check=True)
    got_files = tree(out)
    assert sorted(got_files) == sorted(ref_files)
    differ = sorted(k for k in ref_files if got_files[k] != ref_files[k])
    assert differ == [], differ


def _limited(max_bytes: int):
    def preexec():  # the kernel refuses writes past max_bytes (EFBIG), as a full disk refuses them (ENOSPC)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return preexec


def test_generation_out_of_space_fails_cleanly_and_resumes(source, tmp_path):
    src, suite = source
    args = ["generate", "--suite", suite, "--source", src, "--workers", 2]
    subprocess.run(cli(*args, "--out", tmp_path / "ref"), check=True, stdout=subprocess.DEVNULL)
    ref = tree(tmp_path / "ref", skip=(".qrobust",))
    largest = max((tmp_path / "ref" / name).stat().st_size for name in ref if name.endswith(".tar"))
    out = tmp_path / "full"
    proc = subprocess.run(cli(*args, "--out", out), capture_output=True, text=True,
                          preexec_fn=_limited(largest // 2))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and "error" in lines[0] and ("space" in lines[0] or "too large" in lines[0]), lines
    left = {p.name for p in out.rglob("*") if p.is_file()}
    assert not [n for n in left if ".partial" in n], left  # the half-written shard is gone
    got = tree(out, skip=(".qrobust",))
    assert {k: ref.get(k) for k in got} == got  # every shard published before the failure is whole
    assert "manifest.json" not in got
    subprocess.run(cli(*args, "--out", out), check=True, stdout=subprocess.DEVNULL)
    assert tree(out, skip=(".qrobust",)) == ref


def test_scoring_out_of_space_fails_cleanly_and_resumes(scoring, tmp_path):
    corpus, checkpoint = scoring
    args = ["score", "--corpus", corpus, "--model", checkpoint, "--workers", 0, "--batch-size", 1]
    subprocess.run(cli(*args, "--out", tmp_path / "ref"), check=True, stdout=subprocess.DEVNULL)
    ref = tree(tmp_path / "ref")
    out = tmp_path / "full"
    # progress.json grows with every unit scored: half its final size runs out in mid-run
    limit = (tmp_path / "ref" / "progress.json").stat().st_size // 2
    proc = subprocess.run(cli(*args, "--out", out), capture_output=True, text=True, preexec_fn=_limited(limit))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "rerun" in lines[0], lines
    assert not [p for p in out.rglob("*") if ".partial" in p.name or p.name.endswith(".tmp")]
    subprocess.run(cli(*args, "--out", out), check=True, stdout=subprocess.DEVNULL)
    assert tree(out) == ref
