"""pgd-l1 against ART 1.17.1's ProjectedGradientDescentPyTorch(norm=1), the L1 PGD RobustART ran (CPU, offline).

RobustART builds, for the RobustMQ paper's L1 numbers::

    PyTorchClassifier(model, nn.CrossEntropyLoss(), clip_values=(0, 1), preprocessing=(mean, std), ...)
    ProjectedGradientDescentPyTorch(norm=1, eps=eps, eps_step=120, max_iter=20, num_random_init=1, batch_size=16)

ART 1.18 changed the L1 step (one coordinate per step); pgd-l1 follows 1.17.1,
the last release with the dense step, so these tests run only against it.
The model is test_attacks' tiny_cnn trained on photo crops (64 held-out
crops at 3x32x32); ART gets its inner net and the normalization as ART
preprocessing, which is what ``Normalized`` does inside. Budgets and the step
size are RobustART's rescaled to 3x32x32 with ``at_shape``.
"""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from qrobust.score.attacks import BUDGET_NAMES, at_shape, frozen, run_attack
from qrobust.score.attacks.l1 import l1_ball_draws, l1_start
from test_attacks import SHAPE, accuracy, fit_tiny_cnn, seeds_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ART at batch_size=1 runs the same fp32 operations on the same net as pgd-l1 on one sample (its batch-mean
# loss is then the sample's loss): a few ulps apart at most (pgd-l1's last point may also move one ulp to stay
# in the budget). 1e-6 is 8 ulps at 1.0; seen: 6e-8 (one ulp) at every budget, with and without random start.
ONE_BY_ONE = 1e-6
# pgd-l1 on the whole batch of 64: the convolutions round differently at another batch size (1e-7), and where
# a trajectory meets a kink (a ReLU switching, a pixel reaching the box) the two paths part by more. Seen: one
# sample in 64 at 9.5e-5, the rest within an ulp or two. 1e-3 is a third of a coordinate's mean move at the
# middle budget (eps / d = 2.7e-3): loose, but the predictions must agree too.
BATCHED = 1e-3


@pytest.fixture(scope="module")
def art():
    """ART's modules. ART 1.17.1 imports ``pkg_resources`` (only for ``packaging``), absent from this venv: a
    stand-in serves the import and leaves ``sys.modules`` again afterwards."""
    import packaging.version

    missing = "pkg_resources" not in sys.modules
    if missing:
        stub = types.ModuleType("pkg_resources")
        stub.packaging = packaging
        sys.modules["pkg_resources"] = stub
    try:
        art = pytest.importorskip("art")
        if art.__version__ != "1.17.1":
            pytest.skip(f"pgd-l1 follows ART 1.17.1's dense L1 step; ART {art.__version__} is installed")
        from art.attacks.evasion import ProjectedGradientDescentPyTorch
        from art.attacks.evasion.projected_gradient_descent import projected_gradient_descent_pytorch
        from art.estimators.classification import PyTorchClassifier
        from art.utils import random_sphere
    finally:
        if missing:
            sys.modules.pop("pkg_resources", None)
    return types.SimpleNamespace(PGD=ProjectedGradientDescentPyTorch, Classifier=PyTorchClassifier,
                                 pgd_module=projected_gradient_descent_pytorch, random_sphere=random_sphere)


@pytest.fixture(scope="module")
def trained():
    return fit_tiny_cnn()


def art_pgd_l1(art, model, x, y, budget, *, num_random_init, batch_size):
    """RobustART's PGD-L1 call on ``model`` (a ``Normalized`` net) at ``budget``, rescaled to the input size."""
    eps, params = at_shape("pgd-l1", budget, SHAPE)
    classifier = art.Classifier(model=model.net, loss=nn.CrossEntropyLoss(), input_shape=SHAPE,
                                nb_classes=model.net[-1].out_features, clip_values=(0.0, 1.0),
                                preprocessing=(model.mean.numpy().reshape(3, 1, 1), model.std.numpy().reshape(3, 1, 1)),
                                device_type="cpu")
    attack = art.PGD(classifier, norm=1, eps=eps, eps_step=params["step_size"], max_iter=params["steps"],
                     num_random_init=num_random_init, batch_size=batch_size, verbose=False)
    with frozen(model):  # eval mode, as ART sets it; and no parameter gradients left behind
        return torch.from_numpy(attack.generate(x.numpy(), y.numpy()))


def ours(model, x, y, budget, seeds, **params):
    eps, merged = at_shape("pgd-l1", budget, SHAPE, params)
    return run_attack("pgd-l1", model, x, y, eps, seeds=seeds, params=merged)


def one_by_one(model, x, y, budget, seeds, **params):
    return torch.cat([ours(model, x[i:i + 1], y[i:i + 1], budget, seeds[i:i + 1], **params) for i in range(len(x))])


@pytest.mark.parametrize("budget", BUDGET_NAMES)
def test_pgd_l1_gives_arts_examples_without_a_random_start(art, trained, budget):
    model, x, y = trained
    seeds = seeds_for(len(x))
    theirs = art_pgd_l1(art, model, x, y, budget, num_random_init=0, batch_size=1)
    single = one_by_one(model, x, y, budget, seeds, random_start=False)
    batched = ours(model, x, y, budget, seeds, random_start=False)
    assert (single - theirs).abs().max() <= ONE_BY_ONE
    assert (batched - theirs).abs().max() <= BATCHED
    assert accuracy(model, batched, y) == accuracy(model, theirs, y)
    eps, _ = at_shape("pgd-l1", budget, SHAPE)
    assert (theirs - x).abs().flatten(1).sum(1).min() > 0.5 * eps  # the points did move


@pytest.mark.parametrize("budget", BUDGET_NAMES)
def test_pgd_l1_gives_arts_examples_from_the_same_random_start(art, trained, budget, monkeypatch):
    """ART's random start (numpy's random_sphere) replaced by pgd-l1's draws: the same examples, so the start is
    used as ART uses it (clipped into [0, 1], at the first step only)."""
    model, x, y = trained
    seeds = seeds_for(len(x))
    eps, _ = at_shape("pgd-l1", budget, SHAPE)
    draws = iter(l1_ball_draws(x, eps, seeds).double().numpy())

    def same_start(n, m, radius, norm):
        assert (n, m, radius, norm) == (1, x[0].numel(), eps, 1)
        return next(draws).reshape(1, m)

    monkeypatch.setattr(art.pgd_module, "random_sphere", same_start)
    theirs = art_pgd_l1(art, model, x, y, budget, num_random_init=1, batch_size=1)
    assert next(draws, None) is None  # one start per sample
    single = one_by_one(model, x, y, budget, seeds)
    assert (single - theirs).abs().max() <= ONE_BY_ONE
    batched = ours(model, x, y, budget, seeds)
    assert (batched - theirs).abs().max() <= BATCHED
    assert accuracy(model, batched, y) == accuracy(model, theirs, y)


def test_pgd_l1_robust_accuracy_equals_arts_with_its_own_random_starts(art, trained):
    """RobustART's exact call (numpy's random starts, batch_size=16) and pgd-l1 (per-sample starts) leave the
    same robust accuracy: means over 4 draws of the starts within one sample of 64. (A single draw moves the
    count by about one sample at the large budget on this model, either way.)"""
    model, x, y = trained
    n = len(x)
    for budget in BUDGET_NAMES:
        theirs, mine = [], []
        for draw in range(4):
            np_state = np.random.get_state()  # ART draws its starts from numpy's global RNG
            np.random.seed(draw)
            try:
                adv = art_pgd_l1(art, model, x, y, budget, num_random_init=1, batch_size=16)
            finally:
                np.random.set_state(np_state)
            theirs.append(accuracy(model, adv, y) * n)
            mine.append(accuracy(model, ours(model, x, y, budget, seeds_for(n, 1000 * draw)), y) * n)
        assert abs(np.mean(mine) - np.mean(theirs)) <= 1, (budget, mine, theirs)


def test_the_l1_random_start_is_arts(art):
    """l1_ball_draws has random_sphere(norm=1)'s law (uniform in the L1 ball: radius eps * U^(1/d), coordinates
    |delta_i| / eps ~ Beta(1, d)); and for such a point the box projection of slide-l1's start equals ART's clip."""
    from scipy import stats

    d, eps, n = 3 * 8 * 8, 5.0, 400
    x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mine = l1_ball_draws(x, eps, seeds_for(n)).double().flatten(1).numpy()
    rng_state = np.random.get_state()
    np.random.seed(0)
    try:
        theirs = art.random_sphere(n, d, eps, 1)
    finally:
        np.random.set_state(rng_state)
    for sample in (mine, theirs):
        radius = np.abs(sample).sum(1) / eps
        assert stats.kstest(radius ** d, "uniform").pvalue > 1e-3  # U = (r / eps)^d
        assert stats.kstest(np.abs(sample[:, :7]).ravel() / eps, stats.beta(1, d).cdf).pvalue > 1e-3
        assert abs((sample > 0).mean() - 0.5) < 0.01
    assert stats.ks_2samp(np.abs(mine).sum(1), np.abs(theirs).sum(1)).pvalue > 1e-3
    clipped = (x + l1_ball_draws(x, eps, seeds_for(n))).clamp(0, 1)
    assert (l1_start(x, eps, seeds_for(n)) - clipped).abs().max() <= 1e-6
