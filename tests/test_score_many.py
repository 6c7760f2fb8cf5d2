"""Several models in one `qrobust score` pass: each model's results folder is byte-identical to scoring it
alone, an interrupted pass resumes to the same bytes, a model whose logits go bad is dropped with one line
while the others finish, and the models' folder names never collide."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qrobust.cli import main
from qrobust.score.run import expand_models, folder_names
from tests.helpers import make_class_folder, write_suite

ONLY = ["clean/*", "natural/fog-1", "sequence/rotate", "systematic/resize-opencv-area"]
ATTACK = ["--attacks", "fgsm-linf", "--budgets", "small"]


def tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A corpus with a variant of every family, three checkpoints, and each scored alone (the oracle)."""
    from qrobust.shared.models import ModelSpec, build_model, save_checkpoint

    tmp = tmp_path_factory.mktemp("many")
    src = make_class_folder(tmp / "src", per_class=2)
    suite = write_suite(tmp / "small.toml", corruptions=("fog",), severities=(1,), shard=2)
    assert main(["-q", "generate", "--suite", str(suite), "--source", str(src), "--out", str(tmp / "corpus"),
                 "--workers", "2", *[a for v in ONLY for a in ("--only", v)]]) == 0
    models = tmp / "models"
    models.mkdir()
    for seed, arch in enumerate(("tiny_cnn", "tiny_resnet", "tiny_cnn")):
        torch.manual_seed(seed)
        spec = ModelSpec(arch=arch, num_classes=3)
        save_checkpoint(build_model(spec).eval(), spec, models / f"m{seed}-{arch}.safetensors")
    alone = tmp / "alone"
    for ckpt in sorted(models.iterdir()):
        assert main(["-q", "score", "--corpus", str(tmp / "corpus"), "--model", str(ckpt), "--out",
                     str(alone / ckpt.name.removesuffix(".safetensors")), "--workers", "0", "--batch-size", "2",
                     *ATTACK]) == 0
    return tmp / "corpus", models, alone


def score_args(corpus: Path, models, out: Path) -> list[str]:
    return ["score", "--corpus", str(corpus), *[a for m in models for a in ("--model", str(m))], "--out", str(out),
            "--workers", "0", "--batch-size", "2", *ATTACK]


def test_many_models_in_one_pass_equal_each_scored_alone(setup, tmp_path, capsys):
    corpus, models, alone = setup
    assert main(["-q", *score_args(corpus, [models], tmp_path / "all")]) == 0  # a folder of checkpoints
    names = sorted(p.name for p in (tmp_path / "all").iterdir())
    assert names == sorted(p.name for p in alone.iterdir())
    for name in names:
        assert tree(tmp_path / "all" / name) == tree(alone / name), name
    out = capsys.readouterr().out
    assert all(f"{tmp_path / 'all'}/{name}/summary.json" in out for name in names)


def test_a_model_list_and_repeated_models_give_the_same_folders(setup, tmp_path):
    corpus, models, alone = setup
    ckpts = sorted(models.iterdir())
    listed = tmp_path / "models.txt"
    listed.write_text("# the grid\n" + "\n".join(str(c) for c in ckpts[:2]) + "\n\n")
    assert main(["-q", *score_args(corpus, [f"@{listed}"], tmp_path / "a")]) == 0
    assert main(["-q", *score_args(corpus, ckpts[1:], tmp_path / "a")]) == 0  # resumes two, adds the third
    for ckpt in ckpts:
        name = ckpt.name.removesuffix(".safetensors")
        assert tree(tmp_path / "a" / name) == tree(alone / name), name


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "qrobust", "-q", *map(str, args)]


def test_an_interrupted_many_model_pass_resumes_to_the_same_bytes(setup, tmp_path):
    corpus, models, alone = setup
    out = tmp_path / "all"
    args = _cli(*score_args(corpus, [models], out))
    interrupted = 0
    for wait_for in (1, 3, 6):  # kill once the pass has finished this many units (of any model)
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            done = sum(len(json.loads((p / "progress.json").read_text())) for p in out.glob("*")
                       if (p / "progress.json").is_file())  # written atomically: never half a list
            if done >= wait_for:
                os.killpg(proc.pid, signal.SIGKILL)
                interrupted += 1
                break
            time.sleep(0.02)
        proc.wait()
    assert interrupted >= 1, "the kills should interrupt the pass"
    subprocess.run(args, check=True)
    for ckpt in sorted(models.iterdir()):
        name = ckpt.name.removesuffix(".safetensors")
        assert tree(out / name) == tree(alone / name), name


def nan_model():
    """A model whose logits are NaN: it must be dropped from the pass, not stop the others."""

    class NaNModel(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 3), float("nan"))

    return NaNModel()


def test_a_bad_model_in_the_middle_stops_alone_with_one_line(setup, tmp_path, capsys):
    corpus, models, alone = setup
    ckpts = sorted(models.iterdir())
    out = tmp_path / "all"
    capsys.readouterr()
    code = main(["-q", *score_args(corpus, [ckpts[0], "test_score_many:nan_model", ckpts[2]], out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "nan_model" in err[0] and "NaN" in err[0], err
    for ckpt in (ckpts[0], ckpts[2]):  # the others finished, as if scored alone
        name = ckpt.name.removesuffix(".safetensors")
        assert tree(out / name) == tree(alone / name), name
    assert not (out / "test_score_many-nan_model" / "summary.json").exists()


def test_folder_names_are_readable_and_never_collide(tmp_path):
    names = folder_names(["a/lsq-4.safetensors", "b/lsq-4.safetensors", "resnet18", "pkg.mod:build",
                          "resnet18:IMAGENET1K_V1"])
    assert names[2:] == ["resnet18", "pkg.mod-build", "resnet18-IMAGENET1K_V1"]
    assert names[0].startswith("lsq-4-") and names[1].startswith("lsq-4-") and names[0] != names[1]
    assert folder_names(["x/lsq-4.safetensors", "resnet18"]) == ["lsq-4", "resnet18"]
    with pytest.raises(Exception, match="listed twice"):
        folder_names(["resnet18", "resnet18"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="without checkpoints"):
        expand_models([str(tmp_path / "empty")])
    assert expand_models(["resnet18"]) == (["resnet18"], False)
    assert expand_models(["resnet18", "tiny_cnn"]) == (["resnet18", "tiny_cnn"], True)


def test_weights_with_many_models_is_one_line(setup, tmp_path, capsys):
    corpus, models, _ = setup
    capsys.readouterr()
    assert main(["-q", *score_args(corpus, [models], tmp_path / "x"), "--weights", "w.pth"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--weights" in err[0], err
