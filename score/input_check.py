"""Catch a user's model scored under the wrong input convention.

qrobust gives every model RGB in [0, 1]; a ``module:callable`` model either
normalizes itself (``normalize="none"``, the default) or asks qrobust to apply
ImageNet mean/std (``normalize="imagenet"``). Get it wrong and every number is
wrong without an error: a pretrained ImageNet classifier fed unnormalized
images, or normalized twice, scores a few percent. So the first
:data:`PROBE_SAMPLES` clean images are run again under the other convention
(a few hundred forward passes, once per run); if that is much better -- at
least :data:`MUCH_BETTER` more accurate, with at most half the errors -- the
summary carries a warning that names the option to use. The probe's figures
are kept in ``checks.input_convention`` either way.
"""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("qrobust.score")

PROBE_SAMPLES = 256    # clean/onecrop images run under the other convention
MUCH_BETTER = 0.1      # the other convention must be this much more accurate (and halve the errors) for a warning


def other_convention(net, spec, device):
    """``(name, model)``: the model under the convention it was not scored with (the same weights)."""
    from qrobust.shared.architectures import Normalized

    if spec.normalize == "imagenet":
        return "none", net.net
    return "imagenet", Normalized(net).to(device)


def probe(net, spec, source, units, predictions: dict, labels: np.ndarray, device: str, verify: bool) -> dict:
    """Run a callable's first clean images under its other convention.

    Returns the summary's checks: ``{"input_convention": {...}}`` with both
    accuracies, plus ``{"warnings": [...]}`` when the other convention is much
    better; {} when clean/onecrop was not scored.
    """
    import torch

    from qrobust.score.stream import read_unit

    clean = predictions.get("clean/onecrop")
    if clean is None:
        return {}
    other, alt = other_convention(net, spec, device)
    rows, right = 0, 0
    with torch.inference_mode():
        for unit in sorted((u for u in units if u.variant == "clean/onecrop"), key=lambda u: u.start):
            for piece in read_unit(source, unit, verify, PROBE_SAMPLES):
                take = min(len(piece.keys), PROBE_SAMPLES - rows)
                x = torch.from_numpy(np.ascontiguousarray(piece.pixels[:take])).to(device)
                pred = alt(x.permute(0, 3, 1, 2).float().div_(255)).argmax(1).cpu().numpy()
                right += int((pred == piece.labels[:take]).sum())
                rows += take
                if rows == PROBE_SAMPLES:
                    break
            if rows == PROBE_SAMPLES:
                break
    if not rows:
        return {}
    as_scored = float(np.mean(clean[:rows, 0] == labels[:rows]))
    alt_acc = right / rows
    out = {"input_convention": {"as_scored": spec.normalize, "acc": as_scored, "other": other,
                                "acc_other": alt_acc, "n": rows}}
    if alt_acc >= as_scored + MUCH_BETTER and 1 - alt_acc <= (1 - as_scored) / 2:
        what = {"none": "RGB in [0, 1] as they are", "imagenet": "ImageNet mean/std normalization"}
        message = (f"input convention: clean accuracy {as_scored:.1%} on the first {rows} images with "
                   f"{what[spec.normalize]}, {alt_acc:.1%} with {what[other]}; the model seems to expect the "
                   f"latter: rescore with --normalize {other} into a new --out")
        out["warnings"] = [message]
        log.warning("%s: %s", spec.name, message)
    return out
