"""Training recipes: what decides a run, the defaults per architecture, and the learning-rate schedule.

:class:`Recipe` holds every setting that decides a training run (all of it is
recorded in the checkpoint metadata); :func:`qat_recipe` and :func:`fp_recipe`
give the defaults for an architecture; :func:`lr_at` is the schedule the
recipe's ``lr``, ``warmup_lr`` and ``warmup_epochs`` describe (the loop only
counts the steps). :class:`TrainError` is here too, as the recipe is the first
thing that can refuse a run; the loop and the checkpoint writers raise it as well.

Apart from :mod:`qrobust.train.loop` because choosing and checking a recipe
needs no part of the loop: the command layer builds one from its options before
any training starts. The per-architecture settings come from each
architecture's definition (:class:`~qrobust.shared.architectures.ArchDef`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass

from qrobust.shared.architectures import ARCHITECTURES
from qrobust.shared.errors import QrobustError

log = logging.getLogger("qrobust.train")


class TrainError(QrobustError, ValueError):
    """Training cannot go on as asked (mismatched state file, diverged loss, bad recipe)."""


@dataclass
class Recipe:
    """Everything that decides a training run; all of it is recorded in the checkpoint metadata."""

    epochs: int
    batch_size: int  # global: split over DDP ranks
    lr: float  # peak learning rate, reached after the warmup
    warmup_epochs: float
    warmup_lr: float = 1e-4  # the linear warmup starts here
    momentum: float = 0.9  # SGD momentum (Adam: beta1 stays 0.9)
    nesterov: bool = True
    weight_decay: float = 1e-4  # conv / linear weights
    bn_weight_decay: float = 0.0  # BatchNorm (and other norm) weights and biases
    label_smoothing: float = 0.1
    image_size: int = 224
    seed: int = 0
    workers: int = 2  # data loader processes per rank (does not change the result)
    optimizer: str = "sgd"  # "sgd" | "adam" (adam for tiny models trained from scratch)
    pact_alpha_decay: float = 1e-4  # L2 penalty on PACT's alpha (PACT paper)

    def __post_init__(self):
        problems = []
        if self.epochs < 0:
            problems.append(f"epochs {self.epochs} < 0")
        if self.batch_size < 1:
            problems.append(f"batch_size {self.batch_size} < 1")
        if not self.lr > 0:
            problems.append(f"lr {self.lr} is not positive")
        if self.warmup_epochs < 0 or self.warmup_lr < 0:
            problems.append("warmup_epochs and warmup_lr must be >= 0")
        if self.optimizer not in ("sgd", "adam"):
            problems.append(f"optimizer {self.optimizer!r} is not 'sgd' or 'adam'")
        if self.image_size < 8:
            problems.append(f"image_size {self.image_size} < 8")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label_smoothing {self.label_smoothing} not in [0, 1)")
        if self.workers < 0:
            problems.append(f"workers {self.workers} < 0")
        if problems:
            raise TrainError("bad recipe: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainError(f"unknown recipe fields: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**d)


def qat_recipe(arch: str, bits: int) -> Recipe:
    """The quantization-aware fine-tuning recipe for an architecture (MQBench "academic" configs).

    From a pretrained float model: SGD Nesterov, momentum 0.9, label smoothing
    0.1, cosine learning rate with a linear warmup from 1e-4, 100 epochs, no
    weight decay on BatchNorm; peak lr 0.004 and weight decay 1e-4 for
    ResNet-18/50 and RegNetX-600MF, lr 0.01 and weight decay 1e-5 for
    MobileNetV2; batch 512 (ResNet-50: 256). The warmup length is not pinned by
    the configs we follow: one epoch is our choice.

    MQBench publishes a recipe for 4 bits only. For 2, 6 and 8 bits there is no
    public recipe; we use the 4-bit one unchanged, so the bit width is the only
    difference between the models of a grid.

    The small test architectures (``tiny_cnn``, ``tiny_resnet``) get the demo's
    recipe instead: Adam, lr 1e-3, batch 64, 8 epochs, half an epoch of warmup,
    weight decay 5e-4, 64 px images.
    """
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise TrainError(f"bits must be an integer from 1 to 16, not {bits!r}")
    known = ARCHITECTURES.find(arch)  # its definition carries lr, weight decay and batch size
    if known is not None and known.tiny:
        return Recipe(epochs=8, batch_size=64, lr=1e-3, warmup_epochs=0.5, optimizer="adam", weight_decay=5e-4,
                      image_size=64, workers=0)
    if known is None:
        log.warning("no QAT recipe for %s: using the ResNet-18 one (lr 0.004, batch 512, 100 epochs)", arch)
        known = ARCHITECTURES.get("resnet18")
    return Recipe(epochs=100, batch_size=known.qat_batch_size, lr=known.qat_lr, warmup_epochs=1,
                  weight_decay=known.qat_weight_decay, workers=min(8, os.cpu_count() or 1))


def fp_recipe(arch: str) -> Recipe:
    """A recipe for training a float model from scratch.

    Tiny architectures: Adam, lr 3e-3, batch 64, 30 epochs, 64 px (the demo's).
    Others: the usual ImageNet recipe, SGD Nesterov lr 0.1 at batch 256,
    weight decay 1e-4, 90 cosine epochs after 5 warmup epochs, label smoothing 0.1.
    """
    known = ARCHITECTURES.find(arch)
    if known is not None and known.tiny:
        return Recipe(epochs=30, batch_size=64, lr=3e-3, warmup_epochs=1, optimizer="adam", weight_decay=5e-4,
                      image_size=64, workers=0)
    return Recipe(epochs=90, batch_size=256, lr=0.1, warmup_epochs=5, weight_decay=1e-4,
                  workers=min(8, os.cpu_count() or 1))


def lr_at(step: int, total_steps: int, warmup_steps: int, recipe: Recipe) -> float:
    """Linear warmup from ``warmup_lr`` to ``lr`` over ``warmup_steps``, then cosine decay to 0."""
    if step < warmup_steps:
        return recipe.warmup_lr + (recipe.lr - recipe.warmup_lr) * step / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * recipe.lr * (1.0 + math.cos(math.pi * min(1.0, t)))
