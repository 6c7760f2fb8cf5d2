"""``summary.json`` (schema ``qrobust.summary/1``): every metric, recomputed from the stored predictions.

Fractions in [0, 1]; ``null`` where a family was not scored. The schema is in
the README and pinned by a test; never computed from running counters.
"""
from __future__ import annotations

import numpy as np

from qrobust.score import metrics

SUMMARY_SCHEMA = "qrobust.summary/1"


def _acc(top5: np.ndarray, labels: np.ndarray) -> float:
    return float(metrics.accuracy(top5, labels))


def compute_summary(predictions: dict[str, np.ndarray], labels: np.ndarray, manifest: dict, model: dict,
                    corpus: dict, env: dict) -> dict:
    """The summary of one model on one corpus from its predictions (variant id -> top-5 array)."""
    variants = manifest["variants"]
    clean = predictions.get("clean/onecrop")
    square = predictions.get("clean/square")
    acc = _acc(clean, labels) if clean is not None else None
    acc_square = _acc(square, labels) if square is not None else None
    summary = {
        "schema": SUMMARY_SCHEMA, "model": model, "corpus": corpus, "env": env,
        "clean": {"acc": acc, "acc_square": acc_square},
        "natural": _natural(predictions, labels, variants, acc, len(manifest.get("classes", []))),
        "sequence": _sequence(predictions, variants),
        "systematic": _systematic(predictions, labels, acc_square),
        "attacks": {}, "wcar": {},
        "checks": {"gradient_masking": [], "warnings": []},
    }
    if acc is None:
        summary["checks"]["warnings"].append("clean/onecrop not scored: ACC and the relative metrics are missing")
    if summary["systematic"] is not None and acc_square is None:
        summary["checks"]["warnings"].append("clean/square not scored: SNI (relative to it) is missing")
    return summary


def _natural(predictions, labels, variants, acc, n_classes):
    ids = [v for v in predictions if v.startswith("natural/")]
    if not ids:
        return None
    by_variant = {v.split("/", 1)[1]: _acc(predictions[v], labels) for v in ids}
    by_corruption: dict[str, list[float]] = {}
    for v in ids:
        by_corruption.setdefault(variants[v]["params"]["corruption"], []).append(by_variant[v.split("/", 1)[1]])
    acc_by_corruption = {c: float(np.mean(a)) for c, a in by_corruption.items()}
    mnr = float(metrics.mnr(acc_by_corruption))
    out = {"acc": by_variant, "acc_by_corruption": acc_by_corruption, "mnr": mnr,
           "nci": float(metrics.nci(acc, mnr)) if acc else None, "mce": None, "relative_mce": None}
    # mCE is relative to AlexNet on ImageNet: only for a 1000-class corpus with all 5 severities
    errors = {c: [] for c in by_corruption}
    for v in ids:
        errors[variants[v]["params"]["corruption"]].append((variants[v]["params"]["severity"],
                                                             1 - by_variant[v.split("/", 1)[1]]))
    complete = {c: [e for _, e in sorted(es)] for c, es in errors.items() if len(es) == 5}
    # mCE is over the 15 benchmark corruptions, whatever else was scored (the released ImageNet-C also has
    # 4 held-out ones: speckle_noise, gaussian_blur, spatter, saturate)
    standard = {c: e for c, e in complete.items() if c in metrics.ALEXNET_ERR}
    if n_classes == 1000 and set(standard) == set(metrics.ALEXNET_ERR):
        out["mce"] = float(metrics.mce(standard))
        if acc is not None:
            out["relative_mce"] = float(metrics.relative_mce(standard, 1 - acc))
    return out


def _sequence(predictions, variants):
    ids = [v for v in predictions if v.startswith("sequence/")]
    if not ids:
        return None
    fp, t5d = {}, {}
    for v in ids:
        top5 = predictions[v]
        noise = "noise" in variants[v]["params"]["perturbation"]
        name = v.split("/", 1)[1]
        fp[name] = float(metrics.flip_probability(top5[..., 0], noise=noise))
        t5d[name] = float(metrics.top5_distance(top5, noise=noise))
    base = [v.split("/", 1)[1] for v in ids if variants[v]["params"]["difficulty"] == 1]
    return {"fp": fp, "mfp": float(np.mean([fp[n] for n in base])) if base else None,
            "t5d": t5d, "mt5d": float(np.mean([t5d[n] for n in base])) if base else None}


def _systematic(predictions, labels, reference_acc):
    ids = [v for v in predictions if v.startswith("systematic/")]
    if not ids:
        return None
    acc = {v.split("/", 1)[1]: _acc(predictions[v], labels) for v in ids}
    mean = float(np.mean(list(acc.values())))
    return {"acc": acc, "mean": mean,
            "sni": float(metrics.sni(reference_acc, mean)) if reference_acc else None,
            "sr": float(metrics.sr(list(acc.values()))) if len(acc) > 1 else None}
