"""PGD in Linf and L2 (Madry et al.), as configured by RobustART, plus the pieces every attack shares.

Shared pieces: the loss gradient (cross-entropy summed over the batch, so
per-sample gradients are independent), per-sample random starts drawn from
per-sample CPU generators, and the optional best-iterate bookkeeping.

Step: ``alpha = rel_step * eps`` (RobustART: 0.075 eps, 20 steps). Random
start: uniform in the Linf ball (each coordinate U[-eps, eps]); in the L2 ball,
a uniform random direction at a radius uniform in [0, eps] (as torchattacks;
not uniform by volume, as ART's, which in high dimension puts the start on
the sphere, spending the budget on noise: on the test model that start was
worse by ~4 samples in 64 at every seed tried). Both clipped to [0, 1]. PGD returns the final iterate, as RobustART and
torchattacks do; ``keep_best=True`` returns, per sample, the first
misclassified iterate with the highest loss (or the highest-loss one if none
is misclassified).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.score.attacks import sample_generators


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter or buffer (float32 if none)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def loss_grad(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor,
              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad, logits, per-sample loss)`` of cross-entropy at ``x_adv`` (grad in fp32, all detached)."""
    xg = x_adv.detach().requires_grad_(True)
    logits = model(xg.to(dtype)).float()
    loss = F.cross_entropy(logits, y, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), xg)
    return grad.detach(), logits.detach(), loss.detach()


def random_draws(seeds: torch.Tensor, shape, draw: Callable[[torch.Generator, tuple], torch.Tensor],
                 device) -> torch.Tensor:
    """``draw(generator, shape)`` once per sample from its own generator, stacked (N, *shape) on ``device``.

    The draws come from per-sample CPU generators, so a sample's random start is
    the same on every device and in every batch. They are serial per generator
    but independent across samples: with several torch threads, the samples are
    drawn on that many threads (torch releases the GIL), which on a GPU run was
    most of a PGD batch's time when done one after another. ``draw`` should
    finish its arithmetic on the CPU (in the dtype the attack needs) so that only
    the result crosses to ``device``.
    """
    generators = sample_generators(seeds)
    shape = tuple(shape)
    first = draw(generators[0], shape) if generators else torch.empty(shape)
    # each draw lands in its row of one buffer (pinned for a GPU: a faster copy, no stacking pass)
    out = torch.empty((len(generators), *shape), dtype=first.dtype,
                      pin_memory=torch.device(device).type == "cuda" and torch.cuda.is_available())
    if generators:
        out[0] = first

    def fill(i: int) -> None:
        out[i] = draw(generators[i], shape)

    rest = range(1, len(generators))
    if len(rest) > 1 and torch.get_num_threads() > 1 and len(generators) * math.prod(shape) >= PARALLEL_DRAWS:
        list(_draw_pool().map(fill, rest))
    else:
        for i in rest:
            fill(i)
    return out.to(device, non_blocking=True)


PARALLEL_DRAWS = 1 << 20  # below about a million numbers per batch, threads cost more than they save
_pool: list[ThreadPoolExecutor] = []


def _draw_pool() -> ThreadPoolExecutor:
    """One pool for the process (starting threads per batch cost ~2 ms), as wide as torch's thread count."""
    if not _pool:
        _pool.append(ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="qrobust-draws"))
    return _pool[0]


def linf_start(x: torch.Tensor, eps: float, seeds: torch.Tensor) -> torch.Tensor:
    """``x`` plus per-sample uniform noise in [-eps, eps], clipped to [0, 1]."""
    noise = random_draws(seeds, x.shape[1:], lambda g, s: torch.rand(s, generator=g).to(x.dtype), x.device)
    return (x + (2 * noise - 1) * eps).clamp(0, 1)


def l2_start(x: torch.Tensor, eps: float, seeds: torch.Tensor) -> torch.Tensor:
    """``x`` plus a per-sample random direction at a radius uniform in [0, eps], clipped to [0, 1]."""

    def draw(g, shape):  # float64 on the CPU, then x's dtype: the same rounding wherever x lives
        direction = torch.randn(shape, generator=g, dtype=torch.float64)
        radius = torch.rand((), generator=g, dtype=torch.float64)
        return (direction * (radius / direction.norm().clamp_min(1e-300)) * eps).to(x.dtype)

    return (x + random_draws(seeds, x.shape[1:], draw, x.device)).clamp(0, 1)


class BestIterate:
    """Per-sample best iterate: misclassified beats correct, then higher loss wins."""

    def __init__(self):
        self.x = self.fooled = self.loss = None

    def update(self, x_adv, logits, loss, y) -> None:
        fooled = logits.argmax(1) != y
        if self.x is None:
            self.x, self.fooled, self.loss = x_adv.clone(), fooled, loss
            return
        better = (fooled & ~self.fooled) | ((fooled == self.fooled) & (loss > self.loss))
        self.x = torch.where(better.view(-1, *[1] * (x_adv.dim() - 1)), x_adv, self.x)
        self.fooled = torch.where(better, fooled, self.fooled)
        self.loss = torch.where(better, loss, self.loss)


def iterate(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, steps: int, keep_best: bool,
            step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``steps`` times ``x_adv = step(x_adv, grad)``; the final iterate, or the best one if ``keep_best``."""
    dtype = model_dtype(model)
    best = BestIterate() if keep_best else None
    for _ in range(steps):
        grad, logits, loss = loss_grad(model, x_adv, y, dtype)
        if best is not None:
            best.update(x_adv, logits, loss, y)
        x_adv = step(x_adv, grad).detach()
    if best is None:
        return x_adv
    with torch.no_grad():
        logits = model(x_adv.to(dtype)).float()
    best.update(x_adv, logits, F.cross_entropy(logits, y, reduction="none"), y)
    return best.x


def _check(steps: int, rel_step: float) -> None:
    from qrobust.score.attacks import AttackError

    if steps < 1:
        raise AttackError(f"steps must be >= 1, not {steps}")
    if not rel_step > 0:
        raise AttackError(f"rel_step must be > 0, not {rel_step}")


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seeds: torch.Tensor, *,
             steps: int = 20, rel_step: float = 0.075, random_start: bool = True,
             keep_best: bool = False) -> torch.Tensor:
    """Linf PGD: ``steps`` signed-gradient steps of ``rel_step * eps``, projected on the ball and [0, 1]."""
    _check(steps, rel_step)
    alpha = rel_step * eps
    lo, hi = x - eps, x + eps

    def step(x_adv, grad):
        return torch.minimum(torch.maximum(x_adv + alpha * grad.sign(), lo), hi).clamp(0, 1)

    start = linf_start(x, eps, seeds) if random_start else x.clone()
    return iterate(model, start, y, steps, keep_best, step)


def _l2_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *[1] * (t.dim() - 1))


def pgd_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seeds: torch.Tensor, *,
           steps: int = 20, rel_step: float = 0.075, random_start: bool = True,
           keep_best: bool = False) -> torch.Tensor:
    """L2 PGD: ``steps`` normalized-gradient steps of ``rel_step * eps``, projected on the ball and [0, 1]."""
    _check(steps, rel_step)
    alpha = rel_step * eps

    def step(x_adv, grad):
        x_new = x_adv + alpha * grad / (_l2_norm(grad) + 1e-12)
        delta = x_new - x
        delta = delta * torch.clamp(eps / (_l2_norm(delta) + 1e-12), max=1.0)
        return (x + delta).clamp(0, 1)

    start = l2_start(x, eps, seeds) if random_start else x.clone()
    return iterate(model, start, y, steps, keep_best, step)
