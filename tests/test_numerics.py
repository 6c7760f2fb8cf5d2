"""Models whose logits cannot be ranked (NaN, inf, not one per class) stop `qrobust score` with one line
naming the model and the first affected sample, instead of producing metrics that mean nothing."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import small_corpus
from qrobust.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(*args) -> int:
    return main(["-q", *map(str, args)])


class Logits(torch.nn.Module):
    """Class 0 for everything, then spoiled: ``value`` put in the rows ``rows`` of every batch, or ``width``
    outputs, or an extra dimension."""

    qrobust_normalizes_input = True

    def __init__(self, value=None, rows=slice(None), width=3, extra_dim=False):
        super().__init__()
        self.value, self.rows, self.width, self.extra_dim = value, rows, width, extra_dim

    def forward(self, x):
        logits = torch.zeros(x.shape[0], self.width)
        logits[:, 0] = 1
        if self.value is not None:
            logits[self.rows, 1] = self.value
        return logits[:, :, None, None] if self.extra_dim else logits


def finite_model():
    return Logits()


def nan_second_row_model():
    return Logits(float("nan"), rows=1)


def inf_model():
    return Logits(float("inf"))


def minus_inf_model():
    return Logits(float("-inf"))


def four_classes_model():
    return Logits(width=4)


def two_classes_model():
    return Logits(width=2)


def image_shaped_model():
    return Logits(extra_dim=True)


class NaNOffTheGrid(torch.nn.Module):
    """Finite (class 0 first) on images of whole 1/255 steps, as decoded; NaN once an attack moves a pixel off them."""

    qrobust_normalizes_input = True

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 0.0, 0.0]))

    def forward(self, x):
        logits = self.w + x.mean(dim=(1, 2, 3))[:, None] * torch.tensor([0.0, 1.0, 0.0])  # a gradient to follow
        off = ((x * 255 - (x * 255).round()).abs().flatten(1).amax(1) > 1e-3)
        return torch.where(off[:, None], torch.full_like(logits, float("nan")), logits)


def nan_under_attack_model():
    return NaNOffTheGrid()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return small_corpus(tmp_path_factory.mktemp("numerics"), "clean/onecrop,sequence/rotate")


def score(corpus, tmp_path, model, *extra) -> int:
    return run("score", "--corpus", corpus, "--model", f"test_numerics:{model}", "--out", tmp_path / model,
               "--workers", 0, *extra)


def test_finite_model_scores(corpus, tmp_path):
    assert score(corpus, tmp_path, "finite_model") == 0
    summary = json.loads((tmp_path / "finite_model" / "summary.json").read_text())
    assert summary["clean"]["acc"] == pytest.approx(1 / 3) and summary["sequence"]["fp"]["rotate"] == 0


@pytest.mark.parametrize("model, first, what", [
    ("nan_second_row_model", "clean/onecrop sample 'astronaut_1' (row 1, shard clean/onecrop/onecrop-000000.tar)",
     "NaN or infinite logits for 1 of 2 samples"),
    ("inf_model", "clean/onecrop sample 'astronaut_0' (row 0, shard clean/onecrop/onecrop-000000.tar)",
     "NaN or infinite logits for 2 of 2 samples"),
    ("minus_inf_model", "clean/onecrop sample 'astronaut_0' (row 0", "NaN or infinite logits"),
])
def test_non_finite_logits_stop_the_run_naming_model_and_sample(corpus, tmp_path, capsys, model, first, what):
    capsys.readouterr()
    assert score(corpus, tmp_path, model, "--only", "clean/onecrop") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"model test_numerics:{model}" in err and what in err, err
    assert f"first {first}" in err, err
    assert not (tmp_path / model / "summary.json").exists()  # no metrics from unrankable logits
    progress = tmp_path / model / "progress.json"
    assert not progress.exists() or "clean/onecrop#0" not in json.loads(progress.read_text())


def test_non_finite_logits_of_a_sequence_name_the_frame(corpus, tmp_path, capsys):
    capsys.readouterr()
    assert score(corpus, tmp_path, "nan_second_row_model", "--only", "sequence/rotate") == 2
    err = capsys.readouterr().err
    assert "first sequence/rotate sample 'astronaut_0', frame 1 (row 0, shard sequence/rotate/rotate-000000.tar)" \
        in err, err


@pytest.mark.parametrize("model, shape", [("four_classes_model", "(2, 4)"), ("two_classes_model", "(2, 2)"),
                                          ("image_shaped_model", "(2, 3, 1, 1)")])
def test_logits_not_one_per_class_stop_the_run(corpus, tmp_path, capsys, model, shape):
    capsys.readouterr()
    assert score(corpus, tmp_path, model) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"model test_numerics:{model}" in err, err
    assert f"returned logits of shape {shape} for a batch of 2 at clean/onecrop sample 'astronaut_0'" in err
    assert "expected (2, 3): one score per class of the corpus" in err
    assert not (tmp_path / model / "summary.json").exists()


def test_top5_finds_the_first_bad_row_across_batches():
    from qrobust.score.logits import ModelOutputError, top5 as _top5

    class NaNAt(torch.nn.Module):
        def forward(self, x):
            logits = x.mean(dim=(1, 2, 3))[:, None] * torch.arange(3.0)
            return torch.where(x[:, 0, 0, 0, None] > 0.5, float("nan"), logits)

    pixels = np.zeros((7, 4, 4, 3), np.uint8)
    assert _top5(NaNAt(), pixels, 2, "cpu", 3).shape == (7, 5)
    pixels[[5, 6], 0, 0, 0] = 255
    with pytest.raises(ModelOutputError, match="for 1 of 2 samples of the batch at row 4, first row 5"):
        _top5(NaNAt(), pixels, 2, "cpu", 3)


def test_non_finite_logits_under_attack_stop_the_run(corpus, tmp_path, capsys):
    capsys.readouterr()
    assert score(corpus, tmp_path, "nan_under_attack_model", "--only", "clean/onecrop", "--attacks", "fgsm-linf",
                 "--budgets", "small") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model test_numerics:nan_under_attack_model" in err, err
    assert "NaN or infinite logits for" in err and "under fgsm-linf/small" in err, err
    assert "first sample 'astronaut_" in err, err
    assert not (tmp_path / "nan_under_attack_model" / "summary.json").exists()
