"""Gradient-masking checks (Carlini et al. 2019, "On evaluating adversarial robustness"; AutoAttack's flags).

A model whose gradients are masked (quantization's straight-through
estimators are zero outside the clip range, for example) looks robust to
gradient attacks without being robust. Signs, each checked by
:func:`masking_warnings` on a table of robust accuracies:

* iterative PGD weaker than single-step FGSM at the same budget;
* robust accuracy rising with the budget;
* the black-box Square attack beating a white-box attack;
* a transfer attack (adversarial examples made on a float surrogate) beating
  the white-box attack on the model itself;
* many input-gradient coordinates exactly zero (:func:`zero_gradient_share`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from qrobust.score.attacks import BUDGET_NAMES, frozen

ZERO_GRAD_LIMIT = 0.5
WHITE_BOX_VS_SQUARE = ("autoattack-linf", "pgd-linf")


def zero_gradient_share(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of the input-gradient coordinates of the cross-entropy (summed over the batch) that are exactly 0.

    Runs under :func:`~qrobust.score.attacks.frozen`; ``x`` in [0, 1].

    >>> zero_gradient_share(model, x, y)  # doctest: +SKIP
    0.0
    """
    from qrobust.score.attacks.pgd import loss_grad, model_dtype

    if x.numel() == 0:
        return 0.0
    with frozen(model), torch.enable_grad():
        grad, _, _ = loss_grad(model, x.detach().float().contiguous(), y.to(x.device, torch.long),
                               model_dtype(model))
    return float((grad == 0).float().mean())


def _value(table: dict, attack: str, budget: str) -> float | None:
    v = table.get(attack, {}).get(budget)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _budgets(row: dict) -> list[str]:
    """The row's budgets: the standard ones in order, then any others in their given order."""
    return [b for b in BUDGET_NAMES if b in row] + [b for b in row if b not in BUDGET_NAMES]


def masking_warnings(ar: dict, *, zero_grad_share: float | None = None, transfer_ar: dict | None = None,
                     tol: float = 0.0, n: int | None = None) -> list[str]:
    """One-line warnings about signs of gradient masking in a robust-accuracy table.

    ``ar`` is ``{attack: {budget: robust accuracy}}`` (missing or non-finite
    values are skipped); ``transfer_ar`` the same for adversarial examples
    transferred from a float surrogate; ``zero_grad_share`` from
    :func:`zero_gradient_share`. A difference counts only beyond ``tol``, and
    beyond one sample (``1 / n``) when ``n`` is given. An empty list means no
    sign was found.

    >>> masking_warnings({"fgsm-linf": {"small": 0.5}, "pgd-linf": {"small": 0.7}})
    ['pgd-linf weaker than fgsm-linf at small: robust accuracy 0.7000 > 0.5000 (gradient masking?)']
    """
    tol = max(tol, 1.0 / n if n else 0.0)
    out = []
    for b in _budgets(ar.get("pgd-linf", {})):
        pgd, fgsm = _value(ar, "pgd-linf", b), _value(ar, "fgsm-linf", b)
        if pgd is not None and fgsm is not None and pgd > fgsm + tol:
            out.append(f"pgd-linf weaker than fgsm-linf at {b}: robust accuracy {pgd:.4f} > {fgsm:.4f} "
                       f"(gradient masking?)")
    for attack, row in ar.items():
        seen = [(b, _value(ar, attack, b)) for b in BUDGET_NAMES if b in row]
        seen = [(b, v) for b, v in seen if v is not None]
        for (b1, v1), (b2, v2) in zip(seen, seen[1:]):
            if v2 > v1 + tol:
                out.append(f"{attack} robust accuracy rises with the budget: {b1} {v1:.4f} -> {b2} {v2:.4f} "
                           f"(gradient masking?)")
    for white in WHITE_BOX_VS_SQUARE:
        for b in _budgets(ar.get("square-linf", {})):
            square, wb = _value(ar, "square-linf", b), _value(ar, white, b)
            if square is not None and wb is not None and square < wb - tol:
                out.append(f"square-linf (black-box) beats {white} at {b}: robust accuracy {square:.4f} < "
                           f"{wb:.4f} (gradient masking?)")
    for attack, row in (transfer_ar or {}).items():
        for b in _budgets(row):
            tr, wb = _value(transfer_ar, attack, b), _value(ar, attack, b)
            if tr is not None and wb is not None and tr < wb - tol:
                out.append(f"{attack} transferred from the float surrogate beats {attack} on the model at {b}: "
                           f"robust accuracy {tr:.4f} < {wb:.4f} (gradient masking?)")
    if zero_grad_share is not None and zero_grad_share > ZERO_GRAD_LIMIT:
        out.append(f"{zero_grad_share:.1%} of input-gradient coordinates are exactly zero: "
                   f"gradients may be masked")
    return out
