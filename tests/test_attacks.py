"""Adversarial attacks: budgets, seeding, strength against reference implementations, the L1 x box
projection, model freezing, parameters and the gradient-masking checks (CPU, offline).

The model is ``tiny_cnn`` trained for a second on 32x32 crops of four real
photographs (scikit-image's camera, brick, grass, gravel), so attacks have
something real to fool. Budgets are the RobustART ones rescaled to 3x32x32
with ``at_shape`` (Linf unchanged, L2 x sqrt(d/d_ref), L1 x d/d_ref).
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from qrobust.score.attacks import (ATTACKS, BUDGET_NAMES, REFERENCE_SHAPE, AttackError, at_shape, attack_params,
                                   batch_seed, budget_scale, frozen, resolved_params, run_attack)
from qrobust.score.attacks.checks import masking_warnings, zero_gradient_share
from qrobust.score.attacks.l1 import project_l1_box
from qrobust.shared.demo_data import photo
from qrobust.shared.errors import QrobustError
from qrobust.shared.models import build_model
from qrobust.shared.registry import UnknownNameError

CLASSES = ("camera", "brick", "grass", "gravel")
SHAPE = (3, 32, 32)
OURS = ("fgsm-linf", "pgd-linf", "pgd-l2", "pgd-l1", "slide-l1")
RANDOM_START = ("pgd-linf", "pgd-l2", "pgd-l1", "slide-l1")
# cheaper settings for the expensive reference attacks where a test checks properties, not strength
QUICK = {"autoattack-linf": {"n_iter": 10, "n_queries": 100}, "square-linf": {"n_queries": 300},
         "apgd-l1": {"n_iter": 20}}


# ---------------------------------------------------------------- data and model

def photo_crops(per_class: int, seed: int, size: int = 32, side: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``size`` crops (random flips) of each class photo resized to ``side`` on its shorter side."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for label, name in enumerate(CLASSES):
        image = photo(name).convert("RGB")
        scale = side / min(image.size)
        a = np.asarray(image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR),
                       dtype=np.float32) / 255
        for _ in range(per_class):
            top, left = rng.integers(0, a.shape[0] - size + 1), rng.integers(0, a.shape[1] - size + 1)
            crop = a[top:top + size, left:left + size]
            xs.append((crop[:, ::-1] if rng.random() < 0.5 else crop).transpose(2, 0, 1).copy())
            ys.append(label)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def fit_tiny_cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``(model, x_test, y_test)``: tiny_cnn trained on 320 crops, 64 held-out crops (16 per class)."""
    x_train, y_train = photo_crops(80, seed=0)
    x_test, y_test = photo_crops(16, seed=1)
    model = build_model("tiny_cnn", len(CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    with torch.random.fork_rng(devices=[]):
        for _ in range(150):
            idx = torch.randint(0, len(x_train), (64,), generator=g)
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    assert accuracy(model, x_test, y_test) >= 0.75  # chance is 0.25
    return model, x_test, y_test


@pytest.fixture(scope="session")
def trained():
    return fit_tiny_cnn()


def seeds_for(n: int, offset: int = 0) -> torch.Tensor:
    return torch.arange(offset, offset + n, dtype=torch.int64) * 7919 + 13


def robust_accuracy(model, name, x, y, budget, params=None, seeds=None) -> float:
    eps, merged = at_shape(name, budget, SHAPE, params)
    x_adv = run_attack(name, model, x, y, eps, seeds=seeds_for(len(x)) if seeds is None else seeds, params=merged)
    return accuracy(model, x_adv, y)


def sizes(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    d = (x_adv - x).flatten(1)
    return {"linf": d.abs().amax(1), "l2": d.norm(dim=1), "l1": d.abs().sum(1)}[norm]


# ---------------------------------------------------------------- registry and parameters

def test_registry_holds_the_robustart_settings():
    assert ATTACKS.names() == ["apgd-l1", "autoattack-linf", "fgsm-linf", "pgd-l1", "pgd-l2", "pgd-linf",
                               "slide-l1", "square-linf"]
    linf = {"small": 0.5 / 255, "middle": 2 / 255, "large": 8 / 255}
    for name in ("fgsm-linf", "pgd-linf", "autoattack-linf", "square-linf"):
        assert ATTACKS.get(name).budgets == linf and ATTACKS.get(name).norm == "linf"
    assert ATTACKS.get("pgd-l2").budgets == {"small": 0.5, "middle": 2.0, "large": 8.0}
    for name in ("pgd-l1", "slide-l1", "apgd-l1"):
        assert ATTACKS.get(name).budgets == {"small": 100.0, "middle": 400.0, "large": 1600.0}
    assert attack_params("pgd-linf") == {"steps": 20, "rel_step": 0.075, "random_start": True, "keep_best": False}
    # ART's ProjectedGradientDescentPyTorch(norm=1, eps_step=120, max_iter=20, num_random_init=1), as RobustART ran it
    assert attack_params("pgd-l1") == {"steps": 20, "step_size": 120.0, "random_start": True, "keep_best": False}
    assert attack_params("slide-l1") == {"steps": 20, "step_size": 120.0, "sparsity": 0.99, "random_start": True,
                                         "keep_best": False}
    assert ATTACKS.get("pgd-l1").size_params == ATTACKS.get("slide-l1").size_params == ("step_size",)
    assert attack_params("fgsm-linf") == {}
    assert not ATTACKS.get("square-linf").white_box
    costs = {n: ATTACKS.get(n).cost for n in ATTACKS}
    assert costs["fgsm-linf"] < costs["pgd-linf"] < costs["apgd-l1"] < costs["square-linf"] < costs["autoattack-linf"]
    assert REFERENCE_SHAPE == (3, 224, 224) and BUDGET_NAMES == ("small", "middle", "large")


def test_importing_attacks_does_not_import_pyautoattack():
    code = ("import sys, qrobust.score.attacks as a; a.ATTACKS.get('autoattack-linf'); "
            "print('pyautoattack' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_budgets_scale_with_the_input_size():
    assert budget_scale("linf", SHAPE) == 1.0
    assert budget_scale("l2", (3, 112, 112)) == pytest.approx(0.5)
    eps, params = at_shape("pgd-l1", "large", (3, 112, 112))
    assert eps == pytest.approx(400.0) and params["step_size"] == pytest.approx(30.0)
    assert at_shape("pgd-l2", "middle", REFERENCE_SHAPE)[0] == 2.0
    with pytest.raises(AttackError, match="budgets: small, middle, large"):
        at_shape("pgd-l2", "huge", SHAPE)


@pytest.mark.parametrize("shape", [(3, 112, 112), (3, 64, 64), REFERENCE_SHAPE])
@pytest.mark.parametrize("rule", ["dims", "none"])
@pytest.mark.parametrize("config", [{}, {"step_size": 50.0}, {"steps": 3, "budgets": {"large": 300.0}},
                                    {"step_size": 7.5, "budgets": {"small": 2.0}}])
def test_the_scorer_plans_attacks_with_at_shape(shape, rule, config):
    """One scaling rule: the scorer's jobs equal at_shape's (eps, params) for every override.

    Registered values are rescaled; values a user gives (an eps, a step size) are taken as given."""
    from qrobust.score.adversarial import plan_jobs

    overrides = {k: v for k, v in config.items() if k != "budgets"}
    for name in ("pgd-l1", "pgd-l2", "pgd-linf"):
        cfg = {name: config} if name == "pgd-l1" else {}
        for job in plan_jobs([name], list(BUDGET_NAMES), shape, config=cfg, rule=rule):
            given = config.get("budgets", {}).get(job.budget) if name == "pgd-l1" else None
            eps, params = at_shape(name, job.budget, shape, overrides if name == "pgd-l1" else None,
                                   rule=rule, eps=given)
            assert (job.eps, job.params) == (eps, params)
            scale = budget_scale(ATTACKS.get(name).norm, shape, rule)
            assert job.eps == (given if given is not None else ATTACKS.get(name).budgets[job.budget] * scale)
            if name == "pgd-l1":
                assert job.params["step_size"] == config.get("step_size", 120.0 * scale)


def test_attack_params_reject_unknown_keys_and_wrong_types():
    assert attack_params("pgd-linf", {"steps": 5, "rel_step": 1})["rel_step"] == 1.0  # an int is a number
    with pytest.raises(QrobustError, match=r"no parameter 'step'.*steps \(int\), rel_step \(number\)") as err:
        attack_params("pgd-linf", {"step": 5})
    assert "\n" not in str(err.value)
    for bad in ({"steps": "20"}, {"steps": 2.5}, {"random_start": 1}, {"rel_step": True}, {"rel_step": float("nan")}):
        with pytest.raises(QrobustError, match="must be"):
            attack_params("pgd-linf", bad)
    with pytest.raises(QrobustError, match="has no parameter 'eps'"):
        attack_params("fgsm-linf", {"eps": 0.1})
    with pytest.raises(UnknownNameError, match="Did you mean pgd-linf"):
        attack_params("pgd-lnf")
    with pytest.raises(UnknownNameError, match="unknown attack 'cw-l2'"):
        run_attack("cw-l2", nn.Identity(), torch.zeros(1, 3, 4, 4), torch.zeros(1, dtype=torch.long), 0.1,
                   seeds=torch.zeros(1, dtype=torch.int64))


def test_run_attack_validates_its_inputs(trained):
    model, x, y = trained
    x, y, s = x[:2], y[:2], seeds_for(2)
    with pytest.raises(AttackError, match=r"in \[0, 1\]"):
        run_attack("fgsm-linf", model, x * 2, y, 0.1, seeds=s)
    with pytest.raises(AttackError, match="seeds must be"):
        run_attack("fgsm-linf", model, x, y, 0.1, seeds=s[:1])
    with pytest.raises(AttackError, match="labels must be"):
        run_attack("fgsm-linf", model, x, y.float(), 0.1, seeds=s)
    with pytest.raises(AttackError, match="eps"):
        run_attack("fgsm-linf", model, x, y, -0.1, seeds=s)
    with pytest.raises(QrobustError, match="steps must be >= 1"):
        run_attack("pgd-linf", model, x, y, 0.1, seeds=s, params={"steps": 0})
    with torch.inference_mode(), pytest.raises(AttackError, match="inference_mode"):
        run_attack("fgsm-linf", model, x, y, 0.1, seeds=s)
    with torch.inference_mode():  # tensors made under inference mode are fine once outside it
        xi, yi = x.clone(), y.clone()
    inferred = run_attack("fgsm-linf", model, xi, yi, 0.1, seeds=s)
    assert torch.equal(inferred, run_attack("fgsm-linf", model, x, y, 0.1, seeds=s))
    assert torch.equal(run_attack("pgd-linf", model, x, y, 0.0, seeds=s), x)
    wide = run_attack("pgd-linf", model, x.double(), y, 8 / 255, seeds=s)  # computed in fp32, returned as given
    assert wide.dtype == torch.float64 and (wide - x.double()).abs().max() <= 8 / 255 + 1e-7


# ---------------------------------------------------------------- budgets, range, seeding

@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_budget_is_kept_and_seeds_reproduce(trained, name):
    model, x, y = trained
    x, y, norm = x[::8], y[::8], ATTACKS.get(name).norm  # 8 images, 2 per class
    s = seeds_for(len(x))
    for budget in BUDGET_NAMES:
        eps, params = at_shape(name, budget, SHAPE, QUICK.get(name))
        x_adv = run_attack(name, model, x, y, eps, seeds=s, params=params)
        assert x_adv.dtype == x.dtype and x_adv.shape == x.shape and not x_adv.requires_grad
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        if norm == "linf":
            assert (x_adv - x).abs().max() <= eps  # exact in fp32
        else:
            assert sizes(x_adv, x, norm).max() <= eps * (1 + 1e-6)
        assert torch.equal(run_attack(name, model, x, y, eps, seeds=s, params=params), x_adv)
        if name in OURS:  # the raw attack keeps the budget by itself (run_attack's safety net is not needed)
            with frozen(model):
                raw = ATTACKS.get(name).run(model, x, y, eps, s, **params)
            slack = 1e-7 if norm == "linf" else eps * 1e-6  # linf: x + eps rounds to within an ulp
            assert raw.min() >= 0 and raw.max() <= 1 and sizes(raw, x, norm).max() <= eps + slack
        if name in RANDOM_START:
            other = run_attack(name, model, x, y, eps, seeds=s + 1, params=params)
            assert not torch.equal(other, x_adv)
            fixed = run_attack(name, model, x, y, eps, seeds=s, params={**params, "random_start": False})
            assert not torch.equal(fixed, x_adv)


@pytest.mark.parametrize("name", OURS)
def test_a_samples_result_does_not_depend_on_its_batch(trained, name):
    model, x, y = trained
    x, y, s = x[::11][:6], y[::11][:6], seeds_for(6)
    eps, params = at_shape(name, "large", SHAPE)
    whole = run_attack(name, model, x, y, eps, seeds=s, params=params)
    pairs = torch.cat([run_attack(name, model, x[i:i + 2], y[i:i + 2], eps, seeds=s[i:i + 2], params=params)
                       for i in (0, 2, 4)])
    assert (whole - pairs).abs().max() <= 1e-6
    reordered = run_attack(name, model, x.flip(0), y.flip(0), eps, seeds=s.flip(0), params=params).flip(0)
    assert (whole - reordered).abs().max() <= 1e-6


@pytest.mark.parametrize("name", RANDOM_START)
def test_keep_best_is_never_weaker_than_the_final_iterate(trained, name):
    model, x, y = trained
    eps, params = at_shape(name, "middle", SHAPE)
    final = run_attack(name, model, x, y, eps, seeds=seeds_for(len(x)), params=params)
    best = run_attack(name, model, x, y, eps, seeds=seeds_for(len(x)), params={**params, "keep_best": True})
    with torch.no_grad():
        fooled_final, fooled_best = model(final).argmax(1) != y, model(best).argmax(1) != y
    assert torch.all(fooled_best | ~fooled_final)  # same trajectory: a sample fooled at the end stays fooled
    assert sizes(best, x, ATTACKS.get(name).norm).max() <= eps * (1 + 1e-6)


def test_the_reference_attacks_seed_per_batch():
    s = torch.tensor([5, 6, 7])
    assert batch_seed(s) == batch_seed(s.clone()) and batch_seed(s) != batch_seed(s.flip(0))
    assert 0 <= batch_seed(torch.tensor([-1, 2**62])) < 2**63


# ---------------------------------------------------------------- strength

@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attacks_fool_the_model_more_as_the_budget_grows(trained, name):
    model, x, y = trained
    n = len(x)
    # fewer iterations/queries for the reference attacks: the full ones take minutes here (see the 8-image test)
    params = {"autoattack-linf": {"n_iter": 20, "n_queries": 300}, "square-linf": {"n_queries": 300},
              "apgd-l1": {"n_iter": 25}}.get(name)
    if name == "autoattack-linf":
        x, y, n = x[::4], y[::4], len(x[::4])
    clean = accuracy(model, x, y)
    ar = [robust_accuracy(model, name, x, y, b, params) for b in BUDGET_NAMES]
    assert ar[2] < clean - 0.1, (name, clean, ar)
    assert ar[0] <= clean + 1e-9
    assert all(later <= earlier + 1 / n for earlier, later in zip(ar, ar[1:])), (name, ar)


def test_ours_at_least_as_strong_as_torchattacks(trained):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = trained
    n = len(x)
    for budget in BUDGET_NAMES:
        eps, _ = at_shape("pgd-linf", budget, SHAPE)
        eps2, _ = at_shape("pgd-l2", budget, SHAPE)
        theirs = {"fgsm-linf": torchattacks.FGSM(model, eps=eps),
                  "pgd-linf": torchattacks.PGD(model, eps=eps, alpha=0.075 * eps, steps=20, random_start=True),
                  "pgd-l2": torchattacks.PGDL2(model, eps=eps2, alpha=0.075 * eps2, steps=20, random_start=True)}
        for name, attack in theirs.items():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                ref = accuracy(model, attack(x, y), y)
            ours = robust_accuracy(model, name, x, y, budget)
            assert ours <= ref + 1 / n, (name, budget, ours, ref)


def test_slide_l1_is_stronger_than_pgd_l1(trained):
    """The sparse steps and the exact projection (slide-l1) beat ART's dense L1 PGD (pgd-l1), with its own
    random start, without one, and at a larger step size; by far at the middle budget."""
    model, x, y = trained
    n = len(x)
    slide, dense = [], []
    for budget in BUDGET_NAMES:
        slide.append(robust_accuracy(model, "slide-l1", x, y, budget))
        eps, _ = at_shape("pgd-l1", budget, SHAPE)
        dense.append(min(robust_accuracy(model, "pgd-l1", x, y, budget, variant)
                         for variant in ({}, {"random_start": False}, {"step_size": 0.3 * eps})))
    assert all(s <= d for s, d in zip(slide, dense)), (slide, dense)
    assert slide[1] < dense[1] - 0.2, (slide, dense)  # the sparse steps matter


@pytest.fixture(scope="module")
def standard_autoattack(trained):
    """Full standard AutoAttack-Linf (100 iterations, 5000 Square queries) on 8 images at the middle budget."""
    model, x, y = trained
    x, y = x[1::8], y[1::8]
    eps, _ = at_shape("autoattack-linf", "middle", SHAPE)
    return run_attack("autoattack-linf", model, x, y, eps, seeds=seeds_for(8)), x, y, eps


def test_autoattack_standard_is_at_least_as_strong_as_pgd(trained, standard_autoattack):
    model, *_ = trained
    x_adv, x, y, eps = standard_autoattack
    assert (x_adv - x).abs().max() <= eps and 0 <= x_adv.min() and x_adv.max() <= 1
    aa = accuracy(model, x_adv, y)
    pgd = accuracy(model, run_attack("pgd-linf", model, x, y, eps, seeds=seeds_for(8)), y)
    assert aa <= pgd + 1 / 8, (aa, pgd)
    assert aa < accuracy(model, x, y)


def test_autoattack_on_models_with_few_classes(trained, caplog):
    model, x, y = trained
    assert resolved_params("autoattack-linf", num_classes=4)["n_target_classes"] == 3
    assert resolved_params("autoattack-linf", num_classes=1000)["n_target_classes"] == 9
    three = resolved_params("autoattack-linf", num_classes=3)
    assert three["n_target_classes"] == 2 and three["attacks"] == ["apgd-ce", "fab-t", "square"]
    assert resolved_params("autoattack-linf", {"attacks": ["square"]}, num_classes=3)["attacks"] == ["square"]

    class FirstThree(nn.Module):  # the trained model restricted to 3 classes: DLR-targeted cannot run
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, t):
            return self.model(t)[:, :3]

    keep = y < 3
    x3, y3 = x[keep][::6], y[keep][::6]
    eps, _ = at_shape("autoattack-linf", "large", SHAPE)
    with caplog.at_level("WARNING"):
        x_adv = run_attack("autoattack-linf", FirstThree(), x3, y3, eps, seeds=seeds_for(len(x3)),
                           params=QUICK["autoattack-linf"])
    assert accuracy(FirstThree(), x_adv, y3) < accuracy(FirstThree(), x3, y3)
    assert "target classes" not in caplog.text  # the reference's too-many-targets warning did not fire


def test_reference_attacks_leave_the_callers_rng_and_stdout_alone(trained, capsys):
    model, x, y = trained
    x, y = x[:4], y[:4]
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    previous = sys.gettrace()

    def tracer(frame, event, arg):  # a debugger or coverage tool; AutoAttack's check_dynamic resets it
        return None

    sys.settrace(tracer)
    try:
        for name in ("square-linf", "apgd-l1", "autoattack-linf"):
            eps, params = at_shape(name, "large", SHAPE, QUICK[name])
            run_attack(name, model, x, y, eps, seeds=seeds_for(4), params=params)
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(previous)
    assert torch.equal(torch.rand(3), expected)
    assert capsys.readouterr().out == ""


def test_apgd_l1_takes_channels_last_inputs(trained):
    model, x, y = trained
    x = x[:4].contiguous(memory_format=torch.channels_last)
    eps, params = at_shape("apgd-l1", "large", SHAPE, QUICK["apgd-l1"])
    x_adv = run_attack("apgd-l1", model, x, y[:4], eps, seeds=seeds_for(4), params=params)
    assert sizes(x_adv, x, "l1").max() <= eps * (1 + 1e-6)


# ---------------------------------------------------------------- L1 x box projection

def reference_projection(delta, x, eps):
    from pyautoattack.autopgd_base import L1_projection

    return delta + L1_projection(x, delta, eps)


@pytest.mark.parametrize("d, eps, scale", [(7, 0.5, 0.3), (3072, 5.0, 0.1), (3072, 30.0, 0.05),
                                           (150528, 100.0, 0.01), (64, 100.0, 0.3)])
def test_l1_box_projection_matches_the_reference(d, eps, scale):
    g = torch.Generator().manual_seed(d)
    x = torch.rand(6, d, generator=g)
    x[:, : d // 5] = 0  # pixels at the box faces
    x[:, d // 5: 2 * d // 5] = 1
    delta = torch.randn(6, d, generator=g) * scale
    delta[:, ::9] = 0
    ours = project_l1_box(delta, x, eps)
    assert (ours - reference_projection(delta, x, eps)).abs().max() <= 1e-5
    assert ours.abs().sum(1).max() <= eps * (1 + 1e-6)
    assert (x + ours).min() >= 0 and (x + ours).max() <= 1


def test_l1_box_projection_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 5, 5, generator=g)
    delta = torch.randn(4, 3, 5, 5, generator=g)
    p = project_l1_box(delta, x, 2.0)
    assert p.shape == delta.shape and p.dtype == delta.dtype
    assert torch.allclose(p.abs().flatten(1).sum(1), torch.full((4,), 2.0), atol=1e-5)  # far point: on the sphere
    assert torch.allclose(project_l1_box(p, x, 2.0), p, atol=1e-6)  # idempotent
    inside = delta * 0.01  # a feasible point stays put
    inside = (x + inside).clamp(0, 1) - x
    assert torch.allclose(project_l1_box(inside, x, 2.0), inside, atol=1e-7)
    big = project_l1_box(delta, x, 1e6)  # no L1 constraint: the box clip
    assert torch.allclose(big, (x + delta).clamp(0, 1) - x, atol=1e-6)
    radii = torch.tensor([0.5, 1.0, 2.0, 4.0])  # per-sample radii
    per = project_l1_box(delta, x, radii)
    for i, r in enumerate(radii.tolist()):
        assert torch.allclose(per[i], project_l1_box(delta[i:i + 1], x[i:i + 1], r)[0], atol=1e-6)
    assert project_l1_box(torch.tensor([[0.5, -0.5]]), torch.tensor([[0.9, 0.5]]), 0.4)[0].tolist() == \
        pytest.approx([0.1, -0.3])


def test_l1_box_projection_is_the_closest_feasible_point():
    """Against brute force: a projection p onto a convex set C satisfies <v - p, q - p> <= 0 for all q in C;
    and it is no farther from v than the best of many feasible points, and than scipy's constrained minimum."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(0)
    for trial in range(20):
        d = int(rng.integers(2, 5))
        x = rng.choice([0.0, 1.0, 0.3, 0.8], size=d) if trial % 2 else rng.random(d)
        v = rng.normal(0, 0.8, d)
        eps = float(rng.uniform(0.1, 1.5))
        p = project_l1_box(torch.from_numpy(v[None]), torch.from_numpy(x[None]), eps)[0].numpy()
        assert np.abs(p).sum() <= eps + 1e-9 and np.all(x + p >= -1e-12) and np.all(x + p <= 1 + 1e-12)
        q = rng.uniform(-x, 1 - x, size=(20000, d))  # random box points, shrunk into the L1 ball
        q *= np.minimum(1, eps / np.abs(q).sum(1, keepdims=True))
        assert ((v - p) * (q - p)).sum(1).max() <= 1e-9
        assert np.linalg.norm(v - p) <= np.linalg.norm(v - q, axis=1).min() + 1e-9
        split = minimize(lambda z: 0.5 * np.sum((z[:d] - z[d:] - v) ** 2), np.zeros(2 * d), method="SLSQP",
                         bounds=[(0, 1 - xi) for xi in x] + [(0, xi) for xi in x],
                         constraints=[{"type": "ineq", "fun": lambda z: eps - z.sum()}], options={"ftol": 1e-12})
        assert np.linalg.norm(v - p) <= np.linalg.norm(v - (split.x[:d] - split.x[d:])) + 1e-6


def test_sparse_step_moves_the_top_k_movable_coordinates():
    from qrobust.score.attacks.l1 import sparse_step

    x_adv = torch.full((2, 1, 2, 4), 0.5)
    grad = torch.tensor([[-9.0, 8.0, 3.0, -2.0, 1.0, 0.5, 0.0, 0.1],
                         [-9.0, 8.0, 3.0, -2.0, 1.0, 0.5, 0.0, 0.1]]).view(2, 1, 2, 4)
    x_adv.view(2, -1)[0, :2] = torch.tensor([0.0, 1.0])  # sample 0: the two largest push out of the box
    step = sparse_step(x_adv, grad, k=3, step_size=1.5).view(2, -1)
    assert step[0].tolist() == pytest.approx([0, 0, 0.5, -0.5, 0.5, 0, 0, 0])
    assert step[1].tolist() == pytest.approx([-0.5, 0.5, 0.5, 0, 0, 0, 0, 0])
    few = sparse_step(x_adv, torch.zeros_like(grad).index_fill_(3, torch.tensor([1]), 1.0), k=5, step_size=1.0)
    assert few.abs().view(2, -1).sum(1).tolist() == pytest.approx([1.0, 1.0])  # fewer nonzero gradients than k


# ---------------------------------------------------------------- frozen models

def test_frozen_sets_and_restores_modes_and_grads(trained):
    model = build_model("tiny_cnn", 3).train()
    fixed = next(model.parameters())
    fixed.requires_grad_(False)
    model.net[0].eval()  # a mixed train/eval state is restored as it was
    with frozen(model):
        assert not model.training and not any(m.training for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())
    assert model.training and not model.net[0].training and model.net[1].training
    assert not fixed.requires_grad and all(p.requires_grad for p in list(model.parameters())[1:])
    with pytest.raises(RuntimeError, match="boom"), frozen(model):
        raise RuntimeError("boom")
    assert model.training and all(p.requires_grad for p in list(model.parameters())[1:])


def test_no_attack_changes_the_model(trained):
    model, x, y = trained
    model.train()  # BatchNorm would update its running statistics in train mode
    try:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        for name in ATTACKS:
            eps, params = at_shape(name, "large", SHAPE, QUICK.get(name))
            run_attack(name, model, x[:4], y[:4], eps, seeds=seeds_for(4), params=params)
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert model.training and all(p.requires_grad for p in model.parameters())
    finally:
        model.eval()


def test_fake_quant_observers_do_not_move_during_an_attack(trained):
    from torch.ao.quantization import FakeQuantize

    model, x, y = trained
    quantized = nn.Sequential(FakeQuantize(), model).eval()
    with torch.no_grad():
        quantized(x)  # calibrate once
    before = {k: v.clone() for k, v in quantized.state_dict().items()}
    run_attack("pgd-linf", quantized, x[:8], y[:8], 8 / 255, seeds=seeds_for(8))
    assert all(torch.equal(before[k], v) for k, v in quantized.state_dict().items())
    assert quantized[0].observer_enabled.item() == 1


# ---------------------------------------------------------------- gradient-masking checks

CLEAN_TABLE = {
    "fgsm-linf": {"small": 0.60, "middle": 0.40, "large": 0.20},
    "pgd-linf": {"small": 0.55, "middle": 0.30, "large": 0.05},
    "autoattack-linf": {"small": 0.50, "middle": 0.25, "large": 0.00},
    "square-linf": {"small": 0.58, "middle": 0.35, "large": 0.10},
    "pgd-l2": {"small": 0.70, "middle": 0.45, "large": None},
}


def test_masking_warnings_are_silent_on_a_clean_table():
    assert masking_warnings(CLEAN_TABLE, zero_grad_share=0.01, transfer_ar={"pgd-linf": {"small": 0.9}}, n=100) == []


@pytest.mark.parametrize("change, kwargs, expected", [
    ({"pgd-linf": {"middle": 0.45}}, {}, "pgd-linf weaker than fgsm-linf at middle: robust accuracy 0.4500 > 0.4000"),
    ({"pgd-l2": {"middle": 0.75}}, {}, "pgd-l2 robust accuracy rises with the budget: small 0.7000 -> middle 0.7500"),
    ({"square-linf": {"large": 0.0}}, {}, "square-linf (black-box) beats pgd-linf at large"),
    ({"square-linf": {"small": 0.45}}, {}, "square-linf (black-box) beats autoattack-linf at small"),
    ({}, {"transfer_ar": {"pgd-linf": {"middle": 0.10}}}, "pgd-linf transferred from the float surrogate beats"),
    ({}, {"zero_grad_share": 0.75}, "75.0% of input-gradient coordinates are exactly zero: gradients may be masked"),
])
def test_masking_warnings_fire_for_each_sign(change, kwargs, expected):
    table = {a: dict(row) for a, row in CLEAN_TABLE.items()}
    for attack, row in change.items():
        table[attack].update(row)
    warnings = masking_warnings(table, **kwargs)
    assert len(warnings) >= 1 and any(expected in w for w in warnings), warnings
    assert all("\n" not in w for w in warnings)


def test_masking_warnings_allow_one_sample_of_slack():
    table = {"fgsm-linf": {"small": 0.50}, "pgd-linf": {"small": 0.51, "middle": 0.52}}
    assert len(masking_warnings(table)) == 2  # weaker than FGSM, and rising
    assert masking_warnings(table, n=50) == []  # 0.01 and 0.02 are within one sample of 50 (0.02)
    assert len(masking_warnings(table, n=200)) == 2
    assert masking_warnings(table, tol=0.05) == []


def test_zero_gradient_share(trained):
    model, x, y = trained
    assert zero_gradient_share(model, x[:8], y[:8]) < 0.05
    model.train()
    try:
        zero_gradient_share(model, x[:8], y[:8])
        assert model.training  # frozen() gave the mode back
    finally:
        model.eval()

    class Rounds(nn.Module):  # rounding to 8 bits: the gradient is exactly zero everywhere
        def forward(self, t):
            return model(torch.round(t * 255) / 255)

    share = zero_gradient_share(Rounds(), x[:8], y[:8])
    assert share == 1.0
    assert "gradients may be masked" in masking_warnings({}, zero_grad_share=share)[0]
    # and the attacks see it: FGSM cannot move, PGD only moves by its random start
    assert torch.equal(run_attack("fgsm-linf", Rounds(), x[:8], y[:8], 8 / 255, seeds=seeds_for(8)), x[:8])


def test_random_starts_drawn_on_threads_equal_the_serial_draws(monkeypatch):
    """random_draws runs the per-sample CPU generators on several threads and finishes the arithmetic on
    the CPU; the starts must be the serial, device-side computation's bit for bit (the old code, kept
    here as the oracle)."""
    from qrobust.score.attacks import sample_generators
    from qrobust.score.attacks.l1 import l1_start, project_l1_box
    from qrobust.score.attacks.pgd import l2_start, linf_start

    def serial(seeds, shape, draw):
        return torch.stack([draw(g, tuple(shape)) for g in sample_generators(seeds)])

    def old_l2(g, shape):
        direction = torch.randn(shape, generator=g, dtype=torch.float64)
        radius = torch.rand((), generator=g, dtype=torch.float64)
        return direction * (radius / direction.norm().clamp_min(1e-300))

    x = torch.rand(7, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    x[6] = x[5]
    seeds = torch.tensor([5, 1, 99, 12345678901, 0, 7, 7])
    eps = 0.3
    size = x[0].numel()

    def old_l1(g, shape):
        spacings = -torch.log1p(-torch.rand(size + 1, generator=g, dtype=torch.float64))
        signs = torch.rand(size, generator=g, dtype=torch.float64) < 0.5
        point = spacings[:size] / spacings.sum()
        return torch.where(signs, -point, point).reshape(shape)

    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    monkeypatch.setattr("qrobust.score.attacks.pgd.PARALLEL_DRAWS", 1)  # threads even for this small batch
    try:
        got = [linf_start(x, eps, seeds), l2_start(x, eps, seeds), l1_start(x, eps, seeds)]
    finally:
        torch.set_num_threads(threads)
    noise = serial(seeds, x.shape[1:], lambda g, s: torch.rand(s, generator=g))
    assert torch.equal(got[0], (x + (2 * noise.to(x.dtype) - 1) * eps).clamp(0, 1))
    assert torch.equal(got[1], (x + (serial(seeds, x.shape[1:], old_l2) * eps).to(x.dtype)).clamp(0, 1))
    delta = (serial(seeds, x.shape[1:], old_l1) * eps).to(x.dtype)
    assert torch.equal(got[2], (x + project_l1_box(delta, x, eps)).clamp(0, 1))
    assert torch.equal(got[1][5], got[1][6])  # same seed, same start, whatever its place in the batch
