"""The Python API: qrobust.evaluate on an in-memory module and on anything --model accepts, through the same
code path as `qrobust score`; a results folder is tied to the model's actual parameters, for every kind of
model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import qrobust
from helpers import fitted_checkpoint, small_corpus
from qrobust.cli import main

# what `changing_callable` builds: a test changes it between two runs, as an edit of the code would
SCALE = {"value": 1.0}


def changing_callable(num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, num_classes))
    with torch.no_grad():
        net[3].weight.mul_(SCALE["value"])
    return net


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    corpus = small_corpus(tmp, "clean/*", shard=3)
    return corpus, fitted_checkpoint(corpus, tmp / "tiny.safetensors")


def clean_images(corpus):
    from qrobust.score.run import Corpus, plan_units
    from qrobust.score.stream import read_unit

    source = Corpus(str(corpus))
    units, _ = plan_units(source.manifest, ["clean/onecrop"], None)
    pieces = [p for u in units for p in read_unit(source, u, True, 64)]
    x = torch.from_numpy(np.concatenate([p.pixels for p in pieces])).permute(0, 3, 1, 2).float() / 255
    return x, np.concatenate([p.labels for p in pieces])


def test_evaluate_an_in_memory_module(setup, tmp_path):
    corpus, checkpoint = setup
    from qrobust.shared.models import load_model

    net, _, _ = load_model(str(checkpoint))  # a module as a notebook would hold it, normalizing inside
    x, y = clean_images(corpus)
    with torch.no_grad():
        plain = float((net(x).argmax(1).numpy() == y).mean())
    summary = qrobust.evaluate(net, corpus)  # two lines: no folder to manage
    assert summary["clean"]["acc"] == plain
    assert summary["model"]["spec"]["source"] == "memory" and summary["model"]["normalize"] == "none"
    assert summary["intervals"]["values"]["clean.acc"][0] <= plain
    # with a folder: the same summary is written there, and a changed module is refused, not mixed in
    kept = qrobust.evaluate(net, corpus, tmp_path / "r")
    assert json.loads((tmp_path / "r" / "summary.json").read_text()) == kept
    with torch.no_grad():
        next(net.parameters()).mul_(1.5)
    with pytest.raises(qrobust_error(), match="model_state_sha256"):
        qrobust.evaluate(net, corpus, tmp_path / "r")
    assert qrobust.evaluate(net, corpus, tmp_path / "r2")["model"]["state_sha256"] != kept["model"]["state_sha256"]


def qrobust_error():
    import qrobust
    from qrobust.shared.errors import QrobustError

    assert qrobust.QrobustError is QrobustError  # what a notebook catches
    return QrobustError


def test_the_api_and_the_command_line_share_one_path(setup, tmp_path):
    corpus, checkpoint = setup
    api = qrobust.evaluate(checkpoint, corpus, tmp_path / "api")
    assert main(["-q", "score", "--corpus", str(corpus), "--model", str(checkpoint), "--out", str(tmp_path / "cli"),
                 "--workers", "0"]) == 0
    cli = json.loads((tmp_path / "cli" / "summary.json").read_text())
    for key in ("clean", "model", "corpus", "intervals", "comparability"):
        assert api[key] == cli[key], key


def test_a_callable_whose_model_changed_is_not_served_stale_results(setup, tmp_path, capsys):
    """The same `module:callable` name, no weights file, other parameters: the folder refuses the new model."""
    corpus, _ = setup
    args = ["-q", "score", "--corpus", str(corpus), "--model", "test_api:changing_callable", "--out",
            str(tmp_path / "r"), "--workers", "0"]
    assert main(args) == 0
    first = json.loads((tmp_path / "r" / "summary.json").read_text())
    import importlib

    scale = importlib.import_module("test_api").SCALE  # the copy the scorer imported by name
    scale["value"] = -3.0
    try:
        assert main(args) == 2
        assert "model_state_sha256" in capsys.readouterr().err
    finally:
        scale["value"] = 1.0
    assert main(args) == 0  # the same model again: its results, resumed
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["model"] == first["model"]


def test_weights_with_a_module_are_refused(setup):
    corpus, _ = setup
    with pytest.raises(qrobust_error(), match="weights go with a model named by a string"):
        qrobust.evaluate(changing_callable(), corpus, weights="x.pth")


def test_import_qrobust_is_light_until_evaluate_is_used():
    import subprocess
    import sys

    code = ("import sys, qrobust; heavy = lambda: any(m in sys.modules for m in ('torch', 'numpy', 'zarr')); "
            "print(heavy(), qrobust.QrobustError.__name__, heavy(), callable(qrobust.evaluate), heavy())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "QrobustError", "False", "True", "True"]
