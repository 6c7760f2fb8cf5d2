"""White-box (and one black-box) adversarial attacks, by name, with RobustART budgets.

Every attack is an :class:`AttackDef` in the :data:`ATTACKS` registry::

    >>> from qrobust.score.attacks import ATTACKS, run_attack
    >>> ATTACKS.names("pgd-*")
    ['pgd-l1', 'pgd-l2', 'pgd-linf']
    >>> a = ATTACKS.get("pgd-linf")
    >>> a.norm, a.budgets["large"] == 8 / 255, a.defaults["steps"]
    ('linf', True, 20)
    >>> x_adv = run_attack("pgd-linf", model, x, y, a.budgets["small"], seeds=seeds)  # doctest: +SKIP

Conventions, shared by all attacks:

* models take RGB in [0, 1] and normalize inside, so budgets are pixel units;
  budgets are defined for :data:`REFERENCE_SHAPE` (3x224x224); :func:`at_shape`
  rescales a budget (and the attack's size parameters) to another input size
  (L2 by sqrt of the dimension ratio, L1 by the ratio, Linf unchanged), and
  takes values a user gives (an eps, a step size) as given;
* the loss is cross-entropy on the logits summed over the batch, so each
  sample's gradient is its own;
* ``seeds`` is an int64 tensor of per-sample seeds; our own attacks draw a
  sample's random start from ``torch.Generator("cpu").manual_seed(seed)``, so
  a sample's adversarial example does not depend on its batch companions.
  The reference attacks from ``pyautoattack`` draw per batch from the global
  RNG; they get :func:`batch_seed` of the batch's seeds (and the caller's RNG
  state is restored afterwards);
* samples the model already misclassifies are attacked too (our attacks) or
  returned unchanged (``pyautoattack``, which only attacks correct points);
  the scorer counts them as fooled either way;
* computation is fp32 on ``x.device``; the result is detached, in [0, 1],
  within the budget and has ``x``'s dtype and device.

``pyautoattack`` is imported only when one of its attacks runs.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from qrobust.shared.errors import QrobustError
from qrobust.shared.registry import Registry

log = logging.getLogger("qrobust.attacks")

BUDGET_NAMES = ("small", "middle", "large")
REFERENCE_SHAPE = (3, 224, 224)  # budgets below are defined for this input size
NORMS = ("linf", "l2", "l1")


class AttackError(QrobustError, ValueError):
    """Bad attack arguments: parameters, budget, inputs, labels or seeds."""


@dataclass(frozen=True)
class AttackDef:
    """One attack: how to run it, its budgets and its default hyper-parameters.

    ``run(model, x, y, eps, seeds, **params) -> x_adv`` is the raw attack; call
    it through :func:`run_attack`, which validates, freezes the model and
    checks the budget. ``budgets`` are at :data:`REFERENCE_SHAPE` in [0, 1]
    pixel units. ``cost`` is a rough count of forward+backward passes per
    image, for cheapest-first cascades. ``size_params`` name parameters that
    are lengths in the attack's norm (rescaled by :func:`at_shape` like the
    budget); ``resolve(params, num_classes)`` gives the parameters the attack
    will really use for a model with that many classes (for the record).
    """

    name: str
    norm: str
    run: Callable
    budgets: dict
    defaults: dict
    cost: float
    white_box: bool = True
    size_params: tuple = ()
    resolve: Callable | None = None


ATTACKS: Registry[AttackDef] = Registry("attack")


# ---------------------------------------------------------------- parameters

def _type_ok(default, value) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and math.isfinite(value)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    return isinstance(value, type(default))


def _type_name(default) -> str:
    if isinstance(default, (list, tuple)):
        return "list of str"
    return {bool: "bool", int: "int", float: "number", str: "str"}.get(type(default), type(default).__name__)


def attack_params(name: str, overrides: dict | None = None) -> dict:
    """The attack's default hyper-parameters merged with ``overrides``.

    >>> attack_params("pgd-linf", {"steps": 50})["steps"]
    50

    Raises :class:`~qrobust.shared.registry.UnknownNameError` for an unknown
    attack and :class:`AttackError` (a ``QrobustError``) for an unknown key or a
    value of the wrong type, with a one-line message naming the valid keys.
    """
    attack = ATTACKS.get(name)
    params = dict(attack.defaults)
    for key, value in (overrides or {}).items():
        valid = ", ".join(f"{k} ({_type_name(v)})" for k, v in attack.defaults.items()) or "none"
        if key not in attack.defaults:
            raise AttackError(f"{name} has no parameter {key!r}; valid parameters: {valid}")
        default = attack.defaults[key]
        if not _type_ok(default, value):
            raise AttackError(f"{name} parameter {key!r} must be {_type_name(default)}, not {value!r}; "
                              f"valid parameters: {valid}")
        if isinstance(default, float):
            value = float(value)
        elif isinstance(default, (list, tuple)):
            value = list(value)
        params[key] = value
    return params


def resolved_params(name: str, params: dict | None = None, num_classes: int | None = None) -> dict:
    """The parameters ``name`` really runs with on a model with ``num_classes`` classes.

    Equal to :func:`attack_params` except where an attack adapts itself, e.g.
    AutoAttack's number of target classes on models with fewer than 10 classes.

    >>> resolved_params("autoattack-linf", num_classes=4)["n_target_classes"]
    3
    """
    attack = ATTACKS.get(name)
    merged = attack_params(name, params)
    if attack.resolve is not None and num_classes is not None:
        merged = attack.resolve(merged, num_classes)
    return merged


SCALE_RULES = ("dims", "none")  # how a reference budget follows the input size; see budget_scale


def budget_scale(norm: str, shape, rule: str = "dims") -> float:
    """Factor that maps a budget at :data:`REFERENCE_SHAPE` to inputs of ``shape`` (C, H, W).

    ``rule="dims"`` keeps the per-pixel size of a perturbation: Linf 1, L2
    sqrt(d / d_ref), L1 d / d_ref; ``rule="none"`` is 1 for every norm.

    >>> round(budget_scale("l1", (3, 112, 112)), 4), budget_scale("l1", (3, 112, 112), "none")
    (0.25, 1.0)
    """
    if norm not in NORMS:
        raise AttackError(f"unknown norm {norm!r}; one of {', '.join(NORMS)}")
    if rule not in SCALE_RULES:
        raise AttackError(f"budget scale rule {rule!r} is not one of {', '.join(SCALE_RULES)}")
    if rule == "none":
        return 1.0
    ratio = math.prod(shape) / math.prod(REFERENCE_SHAPE)
    return {"linf": 1.0, "l2": math.sqrt(ratio), "l1": ratio}[norm]


def at_shape(name: str, budget: str, shape, overrides: dict | None = None, *, rule: str = "dims",
             eps: float | None = None) -> tuple[float, dict]:
    """``(eps, params)`` for running ``name`` at budget ``budget`` on inputs of ``shape`` (C, H, W).

    The one place where budgets meet input sizes (the scorer plans its jobs
    with it). What the registry defines for :data:`REFERENCE_SHAPE` -- the
    budget and the attack's size parameters (``AttackDef.size_params``, e.g.
    pgd-l1's absolute ``step_size``) -- is rescaled with :func:`budget_scale`
    under ``rule``. What the caller gives is taken as given, at ``shape``: an
    ``eps``, and any size parameter in ``overrides``.

    >>> eps, params = at_shape("pgd-l1", "large", (3, 112, 112))
    >>> eps, params["step_size"]
    (400.0, 30.0)
    >>> at_shape("pgd-l1", "large", (3, 112, 112), {"step_size": 50.0}, eps=300.0)[1]["step_size"]
    50.0
    """
    attack = ATTACKS.get(name)
    if budget not in attack.budgets:
        raise AttackError(f"{name} has no budget {budget!r}; budgets: {', '.join(attack.budgets)}")
    scale = budget_scale(attack.norm, tuple(shape), rule)
    params = attack_params(name, overrides)
    for key in attack.size_params:
        if key not in (overrides or {}):
            params[key] = params[key] * scale
    if eps is None:
        eps = attack.budgets[budget] * scale
    return float(eps), params


# ---------------------------------------------------------------- model state

@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode, ``requires_grad=False`` on every parameter, and fake-quant observers off, for the duration.

    Restores every module's training flag, every parameter's ``requires_grad``
    and every ``FakeQuantize`` observer flag afterwards, also on error. (Torch's
    ``FakeQuantize`` keeps updating its observer in ``eval()``, so an attack
    would otherwise silently change a quantized model.)

    >>> with frozen(model):  # doctest: +SKIP
    ...     x_adv = attack(model, x, y)
    """
    from torch.ao.quantization import FakeQuantizeBase

    modules = list(model.modules())  # one walk of the module tree (it is most of this context's cost)
    modes = [(m, m.training) for m in modules]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    observers = [(m, m.observer_enabled.clone()) for m in modules
                 if isinstance(m, FakeQuantizeBase) and torch.is_tensor(getattr(m, "observer_enabled", None))]
    try:
        model.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        for m, _ in observers:
            m.observer_enabled.fill_(0)
        yield model
    finally:
        for m, flag in observers:
            m.observer_enabled.copy_(flag)
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag


# ---------------------------------------------------------------- seeds

def batch_seed(seeds: torch.Tensor) -> int:
    """One 63-bit seed for a whole batch: blake2b of the per-sample seeds (int64, little-endian, in order).

    Used by the reference (``pyautoattack``) attacks, whose randomness is per
    batch: the same samples in the same order give the same seed; any other
    batch composition gives a different one.

    >>> batch_seed(torch.tensor([1, 2, 3])) == batch_seed(torch.tensor([1, 2, 3]))
    True
    """
    data = torch.as_tensor(seeds).detach().to("cpu", torch.int64).contiguous().numpy().astype("<i8").tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def sample_generators(seeds: torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per sample, seeded with that sample's seed."""
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds.tolist()]


# ---------------------------------------------------------------- running

def _check_inputs(x, y, eps, seeds) -> torch.Tensor:
    if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
        raise AttackError(f"attack inputs must be a float tensor (N, C, H, W), not "
                          f"{type(x).__name__}{tuple(x.shape) if torch.is_tensor(x) else ''}")
    n = x.shape[0]
    if not torch.is_tensor(y) or y.shape != (n,) or y.is_floating_point() or y.dtype == torch.bool:
        raise AttackError(f"labels must be an integer tensor of shape ({n},), "
                          f"not {getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
        raise AttackError(f"budget eps must be a finite number >= 0, not {eps!r}")
    seeds = torch.as_tensor(seeds)
    if seeds.shape != (n,) or seeds.is_floating_point() or seeds.dtype == torch.bool:
        raise AttackError(f"seeds must be an integer tensor of shape ({n},) (one per sample), "
                          f"not {seeds.dtype} {tuple(seeds.shape)}")
    if n:
        lo, hi = (v.item() for v in torch.aminmax(x.detach()))
        if not (lo >= 0 and hi <= 1):  # also false for NaN, which aminmax propagates
            raise AttackError(f"attack inputs must lie in [0, 1] (models normalize inside); got [{lo:.4g}, {hi:.4g}]")
    return seeds.to("cpu", torch.int64)


def _enforce_budget(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Clip to [0, 1] and, only where fp rounding pushed a point past the budget, pull it back in.

    Linf: ``x + eps`` rounded in fp32 can sit half an ulp outside the ball, so
    such coordinates step one ulp toward ``x``. L2/L1 points over
    ``eps * (1 + 1e-6)`` are rescaled toward ``x`` (this does not happen
    with our attacks; it guards the reference ones).
    """
    x_adv = x_adv.clamp(0, 1)
    if norm == "linf":
        for _ in range(4):
            d = (x_adv - x).abs_()
            if not bool(d.amax() > eps):  # one reduction in the usual case: nothing over
                break
            x_adv = torch.where(d > eps, torch.nextafter(x_adv, x), x_adv)
        return x_adv
    d = (x_adv - x).double().flatten(1)
    size = d.abs().sum(1) if norm == "l1" else d.norm(dim=1)
    over = size > eps * (1 + 1e-6)
    if over.any():
        log.debug("%d adversarial examples over the %s budget %g by fp rounding; rescaled",
                  int(over.sum()), norm, eps)
        factor = torch.where(over, eps / size, torch.ones_like(size)).view(-1, *[1] * (x.dim() - 1))
        x_adv = (x + (x_adv - x).double() * factor).to(x.dtype).clamp(0, 1)
    return x_adv


def run_attack(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
               seeds, params: dict | None = None) -> torch.Tensor:
    """Adversarial examples for ``(x, y)`` within ``eps`` of attack ``name`` (detached, x's device and dtype).

    Validates the arguments, merges ``params`` into the defaults
    (:func:`attack_params`), runs in fp32 under :func:`frozen` and with
    gradients enabled, and guarantees the result is in [0, 1] and within the
    budget (up to fp32 rounding for L2/L1: ``<= eps * (1 + 1e-6)``).

    >>> x_adv = run_attack("fgsm-linf", model, x, y, 8 / 255, seeds=torch.arange(len(x)))  # doctest: +SKIP

    Raises :class:`~qrobust.shared.registry.UnknownNameError` for an unknown
    attack and :class:`AttackError` for bad parameters, inputs outside
    [0, 1], labels or seeds of the wrong shape, or a negative budget.
    """
    attack = ATTACKS.get(name)
    merged = attack_params(name, params)
    if torch.is_inference_mode_enabled():
        raise AttackError("attacks need gradients: call run_attack outside torch.inference_mode()")
    seeds = _check_inputs(x, y, eps, seeds)
    if x.shape[0] == 0 or eps == 0:
        return x.detach().clone()
    # a fresh NCHW copy: the reference L1/L2 APGD fails on channels_last, and tensors made under
    # torch.inference_mode() (a decoding pipeline's) cannot take part in autograd
    x32 = x.detach().to(torch.float32).clone(memory_format=torch.contiguous_format)
    y = y.detach().to(x.device, torch.long).clone()
    with frozen(model), torch.enable_grad():
        x_adv = attack.run(model, x32, y, float(eps), seeds, **merged)
    x_adv = _enforce_budget(x_adv.detach().to(torch.float32), x32, float(eps), attack.norm)
    return x_adv.to(x.dtype)


def _register() -> None:
    from . import autoattack, fgsm, l1, pgd

    linf = {"small": 0.5 / 255, "middle": 2 / 255, "large": 8 / 255}
    ATTACKS.add("fgsm-linf", AttackDef("fgsm-linf", "linf", fgsm.fgsm_linf, dict(linf), {}, cost=2))
    ATTACKS.add("pgd-linf", AttackDef(
        "pgd-linf", "linf", pgd.pgd_linf, dict(linf),
        {"steps": 20, "rel_step": 0.075, "random_start": True, "keep_best": False}, cost=40))
    ATTACKS.add("pgd-l2", AttackDef(
        "pgd-l2", "l2", pgd.pgd_l2, {"small": 0.5, "middle": 2.0, "large": 8.0},
        {"steps": 20, "rel_step": 0.075, "random_start": True, "keep_best": False}, cost=40))
    l1_budgets = {"small": 100.0, "middle": 400.0, "large": 1600.0}
    # pgd-l1 is ART <= 1.17.1's L1 PGD with RobustART's settings (the paper's); slide-l1 is the stronger L1 PGD
    ATTACKS.add("pgd-l1", AttackDef(
        "pgd-l1", "l1", l1.pgd_l1, dict(l1_budgets),
        {"steps": 20, "step_size": 120.0, "random_start": True, "keep_best": False},
        cost=40, size_params=("step_size",)))
    ATTACKS.add("slide-l1", AttackDef(
        "slide-l1", "l1", l1.slide_l1, dict(l1_budgets),
        {"steps": 20, "step_size": 120.0, "sparsity": 0.99, "random_start": True, "keep_best": False},
        cost=40, size_params=("step_size",)))
    ATTACKS.add("apgd-l1", AttackDef(
        "apgd-l1", "l1", autoattack.apgd_l1, dict(l1_budgets),
        {"n_iter": 100, "n_restarts": 1, "use_largereps": False}, cost=200))
    ATTACKS.add("autoattack-linf", AttackDef(
        "autoattack-linf", "linf", autoattack.autoattack_linf, dict(linf),
        {"version": "standard", "attacks": [], "n_iter": 100, "n_queries": 5000, "n_target_classes": 9},
        cost=8000, resolve=autoattack.resolve_autoattack))
    ATTACKS.add("square-linf", AttackDef(
        "square-linf", "linf", autoattack.square_linf, dict(linf),
        {"n_queries": 5000, "p_init": 0.8}, cost=5000, white_box=False))


_register()
