"""A model's logits turned into ranks: the one check every scored or attacked batch passes, and its error.

NaN and infinities have no rank (``topk`` and ``argmax`` put NaN first), and
logits of another width mean class ids that are not the corpus's: either would
give metrics that look fine and mean nothing, so the run stops with one line
naming the first sample. Predictions (:func:`top5`) and attack outcomes use
the same check.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from qrobust.score.results import TOPK
from qrobust.shared.errors import QrobustError


class ModelOutputError(QrobustError, ValueError):
    """A model's logits cannot be ranked: NaN or infinite values, or not one score per class."""


def checked(logits, n: int, num_classes: int | None, at: Callable[[int], str], what: str = "batch"):
    """``logits`` if they are (n, ``num_classes``) and finite; else :class:`ModelOutputError`.

    ``at(i)`` describes row ``i`` of the batch for the message; ``what`` names the batch.
    """
    import torch

    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != n \
            or (num_classes is not None and logits.shape[1] != num_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelOutputError(f"returned logits of shape {shape} for a {what} of {n} at {at(0)}; expected "
                               f"({n}, {num_classes or 'classes'}): one score per class of the corpus")
    finite = torch.isfinite(logits).all(dim=1)
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0, 0])
        raise ModelOutputError(f"returned NaN or infinite logits for {int((~finite).sum())} of {n} samples of the "
                               f"{what} at {at(0)}, first {at(first)}; NaN/inf have no rank, so no prediction, "
                               "outcome or metric is recorded (a quantizer overflow? check the model on this input)")
    return logits


def top5(model, pixels: np.ndarray, batch_size: int, device: str, num_classes: int | None = None,
         where: Callable[[int], str] | None = None) -> np.ndarray:
    """Top-5 class ids of uint8 (n, H, W, 3) images, in batches, padded with -1 below 5 classes.

    Every batch's logits pass :func:`checked`; ``where(i)`` describes row ``i`` of ``pixels``.
    """
    import torch

    def at(i: int) -> str:
        return where(i) if where is not None else f"row {i}"

    out = []
    for i in range(0, len(pixels), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(pixels[i:i + batch_size])).to(device)
        batch = batch.permute(0, 3, 1, 2).float().div_(255)
        logits = checked(model(batch), len(batch), num_classes, lambda j, i=i: at(i + j))
        ids = logits.topk(min(TOPK, logits.shape[1]), dim=1).indices.to(torch.int32).cpu().numpy()
        if ids.shape[1] < TOPK:  # fewer than 5 classes: pad with -1 (no class)
            ids = np.pad(ids, ((0, 0), (0, TOPK - ids.shape[1])), constant_values=-1)
        out.append(ids)
    return np.concatenate(out)
