"""FGSM in Linf (Goodfellow et al.): one signed-gradient step of size eps, no random start (RobustART)."""
from __future__ import annotations

import torch
from torch import nn

from qrobust.score.attacks.pgd import loss_grad, model_dtype


def fgsm_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
              seeds: torch.Tensor) -> torch.Tensor:
    """``clip(x + eps * sign(grad), 0, 1)``; deterministic, so ``seeds`` are unused.

    Coordinates with an exactly zero gradient do not move (``sign(0) = 0``), as
    in torchattacks and ART.
    """
    grad, _, _ = loss_grad(model, x, y, model_dtype(model))
    return (x + eps * grad.sign()).clamp(0, 1)
