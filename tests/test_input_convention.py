"""A user's model sees what the README promises: RGB in [0, 1], unless --normalize imagenet asks for more.

The models are a third-party architecture (timm's ``test_efficientnet``), fitted to the corpus's clean
photos: one written as the README asks (it normalizes inside, with timm's own statistics), one bare net
that expects normalized inputs, as most published classifiers do. Loaded by the scorer as
``test_input_convention:<function>`` (pytest puts tests/ on sys.path).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import small_corpus
from qrobust.cli import main

timm = pytest.importorskip("timm")
ARCH = "test_efficientnet"  # a small timm model; its pretrained config carries the ImageNet mean/std


class SelfNormalizing(torch.nn.Module):
    """A user's model written as the README asks: [0, 1] RGB in, its own normalization inside."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.net = timm.create_model(ARCH, num_classes=num_classes)
        cfg = self.net.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def self_normalizing(num_classes: int = 3) -> torch.nn.Module:
    return SelfNormalizing(num_classes)


def bare(num_classes: int = 3) -> torch.nn.Module:
    """The same net without its normalization: it expects ImageNet-normalized inputs."""
    return timm.create_model(ARCH, num_classes=num_classes)


def run(*args) -> int:
    return main(["-q", *map(str, args)])


def clean_images(corpus: Path) -> tuple[torch.Tensor, np.ndarray]:
    from qrobust.score.stream import Corpus, read_unit
    from qrobust.score.run import plan_units

    source = Corpus(str(corpus))
    units, _ = plan_units(source.manifest, ["clean/onecrop"], None)
    pieces = [p for u in units for p in read_unit(source, u, True, 64)]
    pixels = np.concatenate([p.pixels for p in pieces])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255, np.concatenate([p.labels for p in pieces])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """(corpus, weights of the self-normalizing model, weights of the bare net, clean images, labels)."""
    tmp = tmp_path_factory.mktemp("convention")
    corpus = small_corpus(tmp, "clean/*", shard=4)
    x, y = clean_images(corpus)
    torch.manual_seed(0)
    model = SelfNormalizing(3)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(40):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), torch.from_numpy(y).long()).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert (model(x).argmax(1).numpy() == y).all()  # fitted: right on every clean image
    torch.save(model.state_dict(), tmp / "self_normalizing.pt")
    torch.save(model.net.state_dict(), tmp / "bare.pt")
    return corpus, tmp / "self_normalizing.pt", tmp / "bare.pt", x, y


def score(corpus, model, weights, out, *extra) -> dict:
    assert run("score", "--corpus", corpus, "--model", model, "--weights", weights, "--out", out,
               "--workers", 0, *extra) == 0
    return json.loads((Path(out) / "summary.json").read_text())


def test_a_callable_that_normalizes_inside_scores_as_a_plain_forward(fitted, tmp_path):
    corpus, weights, _, x, y = fitted
    s = score(corpus, "test_input_convention:self_normalizing", weights, tmp_path / "r")
    from qrobust.shared.models import load_model

    model, spec, _ = load_model("test_input_convention:self_normalizing", weights=weights)
    with torch.no_grad():
        plain = float((model(x).argmax(1).numpy() == y).mean())  # the images as they are, no wrapper
    assert s["clean"]["acc"] == plain == 1.0
    assert s["model"]["normalize"] == spec.normalize == "none"
    probe = s["checks"]["input_convention"]  # the other convention, tried on the clean images, does worse
    assert probe["as_scored"] == "none" and probe["acc"] == 1.0 and probe["acc_other"] < 1.0 and probe["n"] == 6
    assert not s["checks"]["warnings"]


def test_a_net_that_expects_normalized_inputs_is_caught_and_scored_with_normalize_imagenet(fitted, tmp_path, capsys):
    corpus, _, weights, x, y = fitted
    s = score(corpus, "test_input_convention:bare", weights, tmp_path / "r")
    assert s["clean"]["acc"] < 0.5
    probe = s["checks"]["input_convention"]
    assert probe == {"as_scored": "none", "acc": s["clean"]["acc"], "other": "imagenet", "acc_other": 1.0, "n": 6}
    assert any("--normalize imagenet" in w for w in s["checks"]["warnings"])
    assert "--normalize imagenet" in capsys.readouterr().err  # said on the terminal too
    # the folder belongs to one convention: another is refused, not mixed in
    assert run("score", "--corpus", corpus, "--model", "test_input_convention:bare", "--weights", weights,
               "--out", tmp_path / "r", "--normalize", "imagenet") == 2
    assert "holds results of another model" in capsys.readouterr().err
    s = score(corpus, "test_input_convention:bare", weights, tmp_path / "n", "--normalize", "imagenet")
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    from qrobust.shared.models import load_model

    net, _, _ = load_model("test_input_convention:bare", weights=weights)  # default: the net as it is
    with torch.no_grad():
        plain = float((net((x - mean) / std).argmax(1).numpy() == y).mean())
    assert s["clean"]["acc"] == plain == 1.0 and s["model"]["normalize"] == "imagenet"
    assert not s["checks"]["warnings"] and s["checks"]["input_convention"]["other"] == "none"


def test_normalizing_twice_is_caught(fitted, tmp_path):
    corpus, weights, _, _, _ = fitted
    s = score(corpus, "test_input_convention:self_normalizing", weights, tmp_path / "r", "--normalize", "imagenet")
    assert s["clean"]["acc"] < 0.9 and s["checks"]["input_convention"]["acc_other"] == 1.0
    assert any("rescore with --normalize none" in w for w in s["checks"]["warnings"])


def test_registered_architectures_refuse_another_convention(fitted, tmp_path, capsys):
    corpus = fitted[0]
    assert run("score", "--corpus", corpus, "--model", "tiny_cnn", "--out", tmp_path / "r", "--normalize",
               "none") == 2
    assert "registered architecture" in capsys.readouterr().err
