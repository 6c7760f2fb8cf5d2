"""``summary.json`` (schema ``qrobust.summary/2``): every metric, recomputed from the stored predictions.

Fractions in [0, 1]; ``null`` where a family was not scored. The means of
the paper run over the benchmark's own sets only (:mod:`qrobust.score.comparability`):
mNR and NCI over the 15 ImageNet-C corruptions, mFP and mT5D over ImageNet-P's 10
test perturbations at difficulty 1, mean ACC_s, SNI and SR over the 14 ImageNet-S
variants, WCAR over the paper's five attacks. Whatever else was scored (held-out
corruptions, validation perturbations, other difficulties, extra attacks) is
reported beside them under ``extra`` / ``difficulty`` / ``wcar_extra``, never
averaged in. ``comparability`` says, per family, what the numbers can be put
next to. docs/metrics.md gives every formula with the paper equation or table
it reproduces.

:func:`upgrade` reads a schema 1 summary (qrobust 0.1) into this shape, for
``qrobust report``: what can be recomputed from it is, the rest is flagged.
"""
from __future__ import annotations

import copy
import re

import numpy as np

from qrobust.score import comparability, metrics, uncertainty
from qrobust.score.adversarial import FOOLED, NOT_RUN, ROBUST, SKIPPED
from qrobust.score.comparability import PAPER_ATTACKS
from qrobust.shared.noises import BENCHMARK_CORRUPTIONS, SEQUENCE_PERTURBATIONS, is_noise_sequence

SUMMARY_SCHEMA = "qrobust.summary/2"
OLD_SCHEMAS = ("qrobust.summary/1",)  # read by upgrade()


def _acc(top5: np.ndarray, labels: np.ndarray) -> float:
    return float(metrics.accuracy(top5, labels))


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def compute_summary(predictions: dict[str, np.ndarray], labels: np.ndarray, manifest: dict, model: dict,
                    corpus: dict, env: dict, adversarial: dict | None = None) -> dict:
    """The summary of one model on one corpus from its predictions (variant id -> top-5 array).

    ``adversarial`` holds what the attack outcomes give (``attacks``, ``wcar``,
    ``wcar_basis``, ``wcar_extra``, ``wcar_extra_basis`` and ``checks`` entries;
    see :func:`attack_summary`).
    """
    variants = manifest["variants"]
    clean, square = predictions.get("clean/onecrop"), predictions.get("clean/square")
    acc = _acc(clean, labels) if clean is not None else None
    acc_square = _acc(square, labels) if square is not None else None
    adversarial = copy.deepcopy(adversarial or {})
    checks = {"gradient_masking": [], "warnings": [], **adversarial.pop("checks", {})}
    summary = {
        "schema": SUMMARY_SCHEMA, "model": model,
        "corpus": {**corpus, "provenance": comparability.provenance(manifest, predictions)}, "env": env,
        "clean": {"acc": acc, "acc_square": acc_square},
        "natural": _natural(predictions, labels, variants, acc, len(manifest.get("classes", []))),
        "sequence": _sequence(predictions, variants, comparability.difficulties(manifest)),
        "systematic": _systematic(predictions, labels, acc, acc_square),
        "attacks": {}, "wcar": {}, **adversarial,
        "checks": checks,
    }
    if acc is None:
        checks["warnings"].append("clean/onecrop not scored: ACC and the relative metrics (NCI, SNI, AAI) "
                                  "are missing")
    summary["comparability"] = comparability.assess(summary, manifest)
    if summary["natural"] is not None:  # said next to the value too: a bare mCE invites a wrong comparison
        summary["natural"]["mce_basis"] = summary["comparability"]["mce"]
    return summary


def summarize(store, predictions: dict[str, np.ndarray], manifest: dict, *, model: dict, corpus: dict, env: dict,
              checks: dict | None = None) -> dict:
    """A results store's summary: its finished predictions (:func:`finished_predictions`), its attack outcomes
    and their gradient-masking checks, and ``checks`` the scorer adds (e.g. the input-convention probe)."""
    adversarial = _attack_results(store, predictions)
    extra = dict(checks or {})
    warnings = extra.pop("warnings", [])
    adversarial["checks"] = {**adversarial.get("checks", {}), **extra}
    labels = store.labels[...]
    summary = compute_summary(predictions, labels, manifest, model, corpus, env, adversarial)
    summary["checks"]["warnings"] += warnings
    # every headline number's interval, from per-sample columns kept in the store (report pairs models on them)
    names, x = uncertainty.sample_columns(predictions, labels, manifest["variants"], summary,
                                          _attack_samples(store, summary))
    store.write_samples(names, x)
    summary["intervals"] = uncertainty.intervals(summary, names, x)
    return summary


def _attack_samples(store, summary: dict) -> dict | None:
    """The attack outcomes :func:`~qrobust.score.uncertainty.sample_columns` needs, from the store."""
    jobs = store.attack_jobs()
    if not jobs:
        return None
    outcomes = {j: o for j in jobs if not jobs[j].get("transfer") and (o := store.attack_outcome(j)) is not None
                and not (o < 0).any()}
    worst_cases = {key: {b: [f"{a}/{b}" for a in basis["attacks"]]
                         for b, basis in (summary.get(f"{key}_basis") or {}).items()}
                   for key in ("wcar", "wcar_extra")}
    return {"rows": store.root["attacks"]["rows"][...], "outcomes": outcomes, **worst_cases}


def finished_predictions(store, units: list, manifest: dict) -> dict[str, np.ndarray]:
    """Predictions of every variant whose units are all stored (this run's selection and earlier ones)."""
    out = {}
    for vid in manifest["variants"]:
        ids = [store.unit_id(u.variant, u.index) for u in units if u.variant == vid]
        if ids and all(i in store.done for i in ids):
            out[vid] = store.predictions(vid)
    return out


def _attack_results(store, predictions: dict) -> dict:
    """The attack outcomes' part of the summary (:func:`attack_summary`) and its
    gradient-masking checks, from the store; {} when no attack was run."""
    jobs = store.attack_jobs()
    if not jobs:
        return {}
    from qrobust.score.attacks.checks import masking_warnings

    rows = store.root["attacks"]["rows"][...]
    clean = predictions.get("clean/onecrop")
    correct = clean[rows, 0] == store.labels[...][rows] if clean is not None else None
    out = attack_summary(store, jobs, rows, correct)
    table = out["attacks"]
    out["attacks"] = {a: v for a, v in table.items() if not a.startswith("transfer-")}
    ar = {a: {b: e["ar"] for b, e in by.items() if e["ar"] is not None} for a, by in out["attacks"].items()}
    transfer = {a.removeprefix("transfer-"): {b: e["ar"] for b, e in by.items()}
                for a, by in table.items() if a.startswith("transfer-")}
    zero = store.root["attacks"].attrs.get("zero_grad_share")
    checks = {"zero_grad_share": zero, **({"transfer": transfer} if transfer else {})}
    n = min((e["n"] for by in out["attacks"].values() for e in by.values()), default=len(rows))
    reference_flags = list(store.root["attacks"].attrs.get("reference_flags", []))  # pyautoattack's own checks
    checks["gradient_masking"] = masking_warnings(ar, zero_grad_share=zero, transfer_ar=transfer or None,
                                                  n=n) + reference_flags
    out["checks"] = checks
    return out


def attack_summary(store, jobs_record: dict[str, dict], rows: np.ndarray,
                   clean_correct: np.ndarray | None) -> dict:
    """``attacks[attack][budget]`` and the worst cases per budget, from the stored outcomes.

    AR is the share of an attack's rows not fooled (eq. 3); AAI = (ACC - AR) /
    ACC with ACC the clean accuracy on the same rows (eq. 4). ``wcar[budget]``
    (eq. 5) counts a row robust only if none of the paper's five attacks that
    ran at that budget (:data:`PAPER_ATTACKS`, each stored in full) fooled it,
    on the rows all of them ran on; ``wcar_basis[budget]`` lists those attacks,
    the missing ones and the rows. When other attacks ran too (``slide-l1``,
    ``apgd-l1``, ``square-linf``), ``wcar_extra[budget]`` is the worst case over
    every attack, with its own basis. Transfer attacks are a check, in neither.
    """
    attacks: dict[str, dict] = {}
    by_budget: dict[str, dict[str, np.ndarray]] = {}
    for job_id, rec in sorted(jobs_record.items()):
        outcome = store.attack_outcome(job_id)
        if outcome is None or (outcome < 0).any():
            continue  # not finished: left out rather than computed from part of the rows
        attack, budget = job_id.split("/")
        ran = outcome != NOT_RUN
        cascaded = bool((outcome == SKIPPED).any())
        ar = None if cascaded else float((outcome[ran] == ROBUST).mean())
        acc_here = float(clean_correct[ran].mean()) if clean_correct is not None else None
        entry = {"eps": rec["eps"], "norm": rec["norm"], "n": int(ran.sum()), "ar": ar,
                 "aai": (acc_here - ar) / acc_here if ar is not None and acc_here else None, "params": rec["params"]}
        if cascaded:
            entry["cascade"] = True
        attacks.setdefault(attack, {})[budget] = entry
        if not rec.get("transfer"):
            by_budget.setdefault(budget, {})[attack] = outcome
    out = {"attacks": attacks, "wcar": {}, "wcar_basis": {}, "wcar_extra": {}, "wcar_extra_basis": {}}
    for b, outcomes in by_budget.items():
        paper = {a: o for a, o in outcomes.items() if a in PAPER_ATTACKS}
        if paper:
            out["wcar"][b], n = _worst_case(list(paper.values()))
            out["wcar_basis"][b] = {"attacks": sorted(paper), "n": n,
                                    "missing": [a for a in PAPER_ATTACKS if a not in paper]}
        if set(outcomes) - set(PAPER_ATTACKS):
            out["wcar_extra"][b], n = _worst_case(list(outcomes.values()))
            out["wcar_extra_basis"][b] = {"attacks": sorted(outcomes), "n": n}
    return {k: v for k, v in out.items() if v or k in ("attacks", "wcar")}


def _worst_case(outcomes: list[np.ndarray]) -> tuple[float | None, int]:
    """WCAR over these attacks' outcomes on the rows all of them ran on, and how many rows that is."""
    common = np.logical_and.reduce([o != NOT_RUN for o in outcomes])
    fooled = np.logical_or.reduce([o == FOOLED for o in outcomes])
    return (float((~fooled[common]).mean()) if common.any() else None), int(common.sum())


def _natural(predictions, labels, variants, acc, n_classes):
    """ACC_c per variant (eq. 6), per corruption (mean over severities), mNR (eq. 8) and NCI (eq. 7) over the
    15 benchmark corruptions; the others under ``extra``; mCE and relative mCE against AlexNet (ImageNet-C)."""
    ids = [v for v in predictions if v.startswith("natural/")]
    if not ids:
        return None
    by_variant = {v.split("/", 1)[1]: _acc(predictions[v], labels) for v in ids}
    by_corruption: dict[str, list[float]] = {}
    errors: dict[str, list[tuple[int, float]]] = {}
    for v in ids:
        params, a = variants[v]["params"], by_variant[v.split("/", 1)[1]]
        by_corruption.setdefault(params["corruption"], []).append(a)
        errors.setdefault(params["corruption"], []).append((params["severity"], 1 - a))
    mean_by = {c: float(np.mean(a)) for c, a in by_corruption.items()}
    benchmark = {c: mean_by[c] for c in BENCHMARK_CORRUPTIONS if c in mean_by}
    extra = {c: a for c, a in mean_by.items() if c not in benchmark}
    mnr = float(metrics.mnr(benchmark)) if benchmark else None
    out = {"acc": by_variant, "acc_by_corruption": benchmark, "mnr": mnr,
           "nci": float(metrics.nci(acc, mnr)) if acc and mnr is not None else None,
           "extra": {"acc_by_corruption": extra, "mnr": _mean(extra.values())} if extra else None,
           "mce": None, "relative_mce": None}
    # mCE is relative to AlexNet on ImageNet: only for a 1000-class corpus with all 5 severities of the 15
    complete = {c: [e for _, e in sorted(es)] for c, es in errors.items()
                if c in metrics.ALEXNET_ERR and sorted(s for s, _ in es) == [1, 2, 3, 4, 5]}
    if n_classes == 1000 and set(complete) == set(metrics.ALEXNET_ERR):
        out["mce"] = float(metrics.mce(complete))
        if acc is not None:
            out["relative_mce"] = float(metrics.relative_mce(complete, 1 - acc))
    return out


def _flips(top5: np.ndarray, noise: bool, stride: int) -> tuple[float, float]:
    return (float(metrics.flip_probability(top5[..., 0], noise=noise, difficulty=stride)),
            float(metrics.top5_distance(top5, noise=noise, difficulty=stride)))


def _sequence(predictions, variants, difficulties):
    """FP (eq. 9, ImageNet-P ``test.py``) and T5D per perturbation at difficulty 1, mFP and mT5D over the 10
    test perturbations; validation perturbations under ``extra``; each other difficulty d under
    ``difficulty[d]``: the noise perturbations' own difficulty-d videos, the others' difficulty-1 videos
    compared at frame stride d, as ``test.py`` does."""
    ids = [v for v in predictions if v.startswith("sequence/")]
    if not ids:
        return None
    videos = {(variants[v]["params"]["perturbation"], variants[v]["params"]["difficulty"]): v for v in ids}
    # the manifest says which are noise sequences (corpora from before it did: the catalogue's flag)
    noisy = {variants[v]["params"]["perturbation"]: variants[v]["params"].get(
        "noise", is_noise_sequence(variants[v]["params"]["perturbation"])) is True for v in ids}

    def level(d: int) -> dict:
        fp, t5d = {}, {}
        for p in dict.fromkeys(p for p, _ in videos):
            noise = noisy[p]
            vid = videos.get((p, d) if noise else (p, 1))
            if vid is None or (not noise and predictions[vid].shape[1] <= d):
                continue
            fp[p], t5d[p] = _flips(predictions[vid], noise, 1 if noise else d)
        test = [p for p in SEQUENCE_PERTURBATIONS if p in fp]
        rest = [p for p in fp if p not in test]
        return {"fp": {p: fp[p] for p in test}, "mfp": _mean(fp[p] for p in test),
                "t5d": {p: t5d[p] for p in test}, "mt5d": _mean(t5d[p] for p in test),
                "extra": {"fp": {p: fp[p] for p in rest}, "mfp": _mean(fp[p] for p in rest),
                          "t5d": {p: t5d[p] for p in rest}, "mt5d": _mean(t5d[p] for p in rest)} if rest else None}

    out = level(1)
    out["difficulty"] = {str(d): level(d) for d in difficulties if d != 1} or None
    return out


def _systematic(predictions, labels, acc, acc_square):
    """ACC_s per variant (eq. 10), their mean, SNI = (ACC - mean ACC_s) / ACC with ACC the one-crop clean
    accuracy (eq. 11, as Table 9 prints it), and SR, their sample standard deviation (eq. 12, ddof=1, as
    Table 10 prints it). ``sni_square`` is the same drop relative to the square-resize reference."""
    ids = [v for v in predictions if v.startswith("systematic/")]
    if not ids:
        return None
    by_variant = {v.split("/", 1)[1]: _acc(predictions[v], labels) for v in ids}
    mean = float(np.mean(list(by_variant.values())))
    return {"acc": by_variant, "mean": mean,
            "sni": float(metrics.sni(acc, mean)) if acc else None,
            "sni_square": float(metrics.sni(acc_square, mean)) if acc_square else None,
            "sr": float(metrics.sr(list(by_variant.values()))) if len(by_variant) > 1 else None}


# --- reading summaries of schema 1 -------------------------------------------------

_DIFFICULTY = re.compile(r"(.+_noise)_([23])")


def upgrade(old: dict) -> dict:
    """A schema 1 summary in this schema's shape, with what can be recomputed from it recomputed.

    Schema 1 divided SNI by the square-crop accuracy, averaged held-out
    corruptions and validation perturbations into mNR and mFP, and ran a
    sparse L1 attack under the name ``pgd-l1`` (now ``slide-l1``), whose
    worst case is not the paper's WCAR: SNI, mNR, NCI, mFP and mT5D are
    recomputed from the stored aggregates, that attack is renamed, its WCAR
    moves to ``wcar_extra``, and ``comparability`` says so. Per-sample
    numbers (bootstrap, paired tests) need the results folder rescored.
    """
    s = copy.deepcopy(old)
    s["schema"] = SUMMARY_SCHEMA
    acc = (s.get("clean") or {}).get("acc")
    nat = s.get("natural")
    if isinstance(nat, dict) and isinstance(nat.get("acc_by_corruption"), dict):
        by = nat["acc_by_corruption"]
        benchmark = {c: by[c] for c in BENCHMARK_CORRUPTIONS if c in by}
        extra = {c: v for c, v in by.items() if c not in benchmark}
        nat.update(acc_by_corruption=benchmark, mnr=_mean(benchmark.values()),
                   extra={"acc_by_corruption": extra, "mnr": _mean(extra.values())} if extra else None)
        nat["nci"] = float(metrics.nci(acc, nat["mnr"])) if acc and nat["mnr"] is not None else None
    seq = s.get("sequence")
    if isinstance(seq, dict) and isinstance(seq.get("fp"), dict) and isinstance(seq.get("t5d"), dict):
        levels: dict[int, dict] = {}
        for name in seq["fp"]:
            m = _DIFFICULTY.fullmatch(name)
            p, d = (m.group(1), int(m.group(2))) if m else (name, 1)
            levels.setdefault(d, {})[p] = (seq["fp"][name], seq["t5d"].get(name))

        def level(values):
            test = [p for p in SEQUENCE_PERTURBATIONS if p in values]
            rest = [p for p in values if p not in test]
            pick = lambda names, i: {p: values[p][i] for p in names}  # noqa: E731
            part = lambda names: {"fp": pick(names, 0), "mfp": _mean(values[p][0] for p in names),  # noqa: E731
                                  "t5d": pick(names, 1), "mt5d": _mean(values[p][1] for p in names)}
            return {**part(test), "extra": part(rest) if rest else None}

        seq.clear()
        seq.update(level(levels.pop(1, {})))
        seq["difficulty"] = {str(d): level(v) for d, v in sorted(levels.items())} or None
    sys_ = s.get("systematic")
    if isinstance(sys_, dict) and sys_.get("mean") is not None:
        sys_["sni_square"] = sys_.get("sni")
        sys_["sni"] = float(metrics.sni(acc, sys_["mean"])) if acc else None
    attacks = s.get("attacks") if isinstance(s.get("attacks"), dict) else {}
    if "pgd-l1" in attacks:  # schema 1's pgd-l1 was the sparse attack, not ART's
        attacks["slide-l1"] = attacks.pop("pgd-l1")
    s["wcar_extra"], s["wcar"] = s.get("wcar") or {}, {}
    s["wcar_basis"] = {}
    old_note = ("recomputed from a summary of qrobust 0.1 (schema 1), which recorded neither how the corpus was "
                "made nor which variants it covered: rescore to check comparability")
    l1_note = ("qrobust 0.1 (schema 1) ran a sparse L1 attack as pgd-l1 (shown as slide-l1) and its WCAR covered "
               "it (shown as extra worst case, not the paper's WCAR): rescore for the paper's PGD-L1 and WCAR")
    s["comparability"] = {k: {"comparable": False, "note": l1_note if k == "attacks" else old_note}
                          for k in ("clean", "natural", "mce", "sequence", "systematic", "attacks")}
    s["comparability"]["wcar"] = {b: {"comparable": False, "note": l1_note} for b in s["wcar_extra"]}
    if isinstance(nat, dict):
        nat["mce_basis"] = s["comparability"]["mce"]
    return s
