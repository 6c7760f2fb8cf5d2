"""The reference attacks from ``pyautoattack`` (fra31/auto-attack on PyPI): AutoAttack-Linf, Square, L1-APGD.

``pyautoattack`` is imported inside the run functions only. Around every call:

* seeding: its randomness is per batch, from the global torch RNG, so the
  batch gets one seed, :func:`~qrobust.score.attacks.batch_seed` of its
  per-sample seeds (same samples in the same order -> same seed), and the
  caller's RNG state (CPU, and the CUDA device in use) is restored afterwards;
* quiet: its logger is replaced by ours (``qrobust.attacks.autoattack``: its
  progress lines are dropped, its sanity-check warnings -- randomized or
  dynamic defense, probabilities instead of logits, Square beating the
  white-box attacks -- are passed on as warnings) and stdout is swallowed;
* its ``check_dynamic`` calls ``sys.settrace(None)``, which would switch off a
  debugger or coverage tracer: the previous trace function is put back;
* models with fewer than 10 classes: AutoAttack's targeted attacks use
  ``min(n_target_classes, n_classes - 1)`` targets, and APGD-T (whose
  targeted DLR loss reads the 4th-largest logit) is left out below 4 classes
  (:func:`resolve_autoattack`).
"""
from __future__ import annotations

import contextlib
import io
import logging
import sys

import torch
from torch import nn

from qrobust.score.attacks import AttackError, batch_seed

log = logging.getLogger("qrobust.attacks.autoattack")

STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
AA_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
VERSIONS = ("standard", "plus", "rand")
_VERSION_ATTACKS = {"standard": list(STANDARD_ATTACKS),
                    "plus": ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"],
                    "rand": ["apgd-ce", "apgd-dlr"]}


class _Forward(nn.Module):
    """Feeds the model its own dtype and hands fp32 logits back (the reference attacks work in fp32)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()


class _Relay(logging.Handler):
    """Passes the reference's warnings on to our logger; its info/debug chatter is dropped."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            log.warning("pyautoattack: %s", record.getMessage())


def _private_logger() -> logging.Logger:
    quiet = logging.Logger("qrobust.attacks.autoattack.reference")  # not in the global registry
    quiet.addHandler(_Relay())
    quiet.propagate = False
    return quiet


@contextlib.contextmanager
def _reference_call(x: torch.Tensor, seeds: torch.Tensor):
    """Restore the caller's RNG and trace function and swallow stdout around a reference call; yields the seed."""
    devices = [x.device] if x.device.type == "cuda" else []
    tracer = sys.gettrace()
    try:
        with torch.random.fork_rng(devices=devices), contextlib.redirect_stdout(io.StringIO()):
            yield batch_seed(seeds)
    finally:
        if sys.gettrace() is not tracer:
            sys.settrace(tracer)


def _forward(model: nn.Module) -> nn.Module:
    from qrobust.score.attacks.pgd import model_dtype

    return _Forward(model, model_dtype(model))


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).shape[-1])


def resolve_autoattack(params: dict, num_classes: int) -> dict:
    """AutoAttack's parameters as run on a model with ``num_classes`` classes.

    ``attacks`` becomes the explicit list (the version's own when empty), with
    APGD-T removed below 4 classes; ``n_target_classes`` becomes
    ``min(n_target_classes, num_classes - 1)``.
    """
    if num_classes < 2:
        raise AttackError(f"AutoAttack needs a model with at least 2 classes, not {num_classes}")
    params = dict(params)
    attacks = list(params["attacks"]) or list(_VERSION_ATTACKS[params["version"]])
    if num_classes < 4:  # the targeted DLR loss needs the 4 largest logits
        attacks = [a for a in attacks if a != "apgd-t"]
    params["attacks"] = attacks
    params["n_target_classes"] = min(params["n_target_classes"], num_classes - 1)
    return params


def _check_aa(params: dict) -> None:
    if params["version"] not in VERSIONS:
        raise AttackError(f"autoattack-linf version must be one of {', '.join(VERSIONS)}, not {params['version']!r}")
    unknown = sorted(set(params["attacks"]) - set(AA_ATTACKS))
    if unknown:
        raise AttackError(f"autoattack-linf attacks {unknown} unknown; choose from {', '.join(AA_ATTACKS)}")
    for key in ("n_iter", "n_queries", "n_target_classes"):
        if params[key] < 1:
            raise AttackError(f"autoattack-linf {key} must be >= 1, not {params[key]}")


def _set_iterations(apgd, n_iter: int) -> None:
    """Change a reference APGD's iterations after construction (its schedule is derived in __init__)."""
    apgd.n_iter = apgd.n_iter_orig = n_iter
    apgd.n_iter_2 = max(int(0.22 * n_iter), 1)
    apgd.n_iter_min = max(int(0.06 * n_iter), 1)
    apgd.size_decr = max(int(0.03 * n_iter), 1)


def autoattack_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seeds: torch.Tensor, *,
                    version: str = "standard", attacks: list | None = None, n_iter: int = 100,
                    n_queries: int = 5000, n_target_classes: int = 9) -> torch.Tensor:
    """Reference AutoAttack-Linf (``pyautoattack.AutoAttack``), standard version by default.

    Standard: APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5000
    queries), each on the points still robust. ``attacks`` (empty = the
    version's list), ``n_iter`` (APGD, APGD-T and FAB; reference 100) and
    ``n_queries`` (Square) change the run, e.g. for quick tests; see
    :func:`resolve_autoattack` for models with fewer than 10 classes.
    """
    from pyautoattack import AutoAttack

    params = {"version": version, "attacks": list(attacks or []), "n_iter": n_iter, "n_queries": n_queries,
              "n_target_classes": n_target_classes}
    _check_aa(params)
    params = resolve_autoattack(params, _num_classes(model, x))
    with _reference_call(x, seeds) as seed:
        chatter = logging.getLogger("auto-attack")  # its constructor logs before we can swap its logger
        was_disabled, chatter.disabled = chatter.disabled, True
        try:
            aa = AutoAttack(_forward(model), norm="Linf", eps=eps, version=version, device=x.device, seed=seed)
        finally:
            chatter.disabled = was_disabled
        aa.verbose = False
        aa.logger = aa.apgd.logger = aa.apgd_targeted.logger = _private_logger()
        aa.attacks_to_run = params["attacks"]
        aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = params["n_target_classes"]
        if n_iter != 100:
            _set_iterations(aa.apgd, n_iter)
            _set_iterations(aa.apgd_targeted, n_iter)
            aa.fab.n_iter = n_iter
        aa.square.n_queries = n_queries
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=len(x))
    return x_adv


def square_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seeds: torch.Tensor, *,
                n_queries: int = 5000, p_init: float = 0.8) -> torch.Tensor:
    """Reference Square Attack Linf alone (black-box; AutoAttack's settings: margin loss, one restart).

    Only points the model classifies correctly are attacked; the rest come back unchanged.
    """
    from pyautoattack.square import SquareAttack

    if n_queries < 1 or not 0 < p_init <= 1:
        raise AttackError(f"square-linf needs n_queries >= 1 and 0 < p_init <= 1; got {n_queries}, {p_init}")
    with _reference_call(x, seeds) as seed:
        square = SquareAttack(_forward(model), p_init=p_init, n_queries=n_queries, eps=eps, norm="Linf",
                              n_restarts=1, seed=seed, verbose=False, device=x.device, resc_schedule=False)
        with torch.no_grad():
            return square.perturb(x, y)


def apgd_l1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seeds: torch.Tensor, *,
            n_iter: int = 100, n_restarts: int = 1, use_largereps: bool = False) -> torch.Tensor:
    """Reference L1-APGD on cross-entropy (``pyautoattack.autopgd_base.APGDAttack(norm='L1')``).

    Inputs go in as contiguous NCHW (the reference's ``.view`` fails on
    channels_last). ``use_largereps=True`` is AutoAttack-L1's schedule (eps
    3x, 2x, 1x). Only correctly classified points are attacked; failed points
    come back unchanged.
    """
    from pyautoattack.autopgd_base import APGDAttack

    if n_iter < 1 or n_restarts < 1:
        raise AttackError(f"apgd-l1 needs n_iter >= 1 and n_restarts >= 1; got {n_iter}, {n_restarts}")
    with _reference_call(x, seeds) as seed:
        apgd = APGDAttack(_forward(model), norm="L1", eps=eps, n_iter=n_iter, n_restarts=n_restarts, seed=seed,
                          loss="ce", device=x.device, use_largereps=use_largereps, logger=_private_logger())
        return apgd.perturb(x.contiguous(), y)
