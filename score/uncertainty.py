"""Every headline number with a confidence interval, and paired comparisons between models.

RobustMQ's conclusions rest on differences of tenths of a point between
models; none of its references reports an uncertainty. qrobust stores every
model's prediction for every sample, so the sampling uncertainty of a number
can be estimated from the data already on disk:

* **Per-sample columns** (:func:`sample_columns`): one value per corpus row for
  each base quantity -- right or wrong on a variant, a video's flip probability
  and top-5 distance, robust or fooled under an attack job, robust under every
  attack of a budget -- NaN where the quantity is not defined for that row (a
  row the attack did not run on). Every headline number is a function of the
  columns' means (:func:`headline`, the same formulas as
  :mod:`qrobust.score.summary`; a test checks they agree).
* **Paired bootstrap over samples** (:func:`resample_means`): each resample
  draws N rows with replacement, and that one draw weights every column, so
  the correlation between the variants (and attacks) of the same image is
  kept. Vectorised: a chunk of resamples is a (resamples x N) count matrix
  times the (N x columns) matrix. Seeded; the same seed gives two models
  scored on the same corpus the same draws, so differences between them are
  paired too (:func:`compare`).
* **Intervals** are percentile intervals at :data:`LEVEL`; an exact McNemar
  test (:func:`mcnemar`) accompanies differences of accuracies.
* **Sample size** (:func:`required_samples`): how many images a corpus needs
  to detect a given difference, from the observed variance of the paired
  per-sample differences.

docs/metrics.md ("Uncertainty") says what the intervals mean and do not mean.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from qrobust.score import metrics
from qrobust.shared.noises import is_noise_sequence

METHOD = "percentile bootstrap over samples, one resampling of the rows for every variant and attack"
RESAMPLES = 1000
LEVEL = 0.95
SEED = 0
CHUNK = 50  # resamples per matrix product: memory is CHUNK x N weights


# --- per-sample columns ----------------------------------------------------------

def sample_columns(predictions: dict[str, np.ndarray], labels: np.ndarray, variants: dict, summary: dict,
                   attacks: dict | None = None) -> tuple[list[str], np.ndarray]:
    """``(names, X)``: X is (N, columns) float32 with one value per corpus row, NaN where undefined.

    ``predictions`` and ``variants`` as for :func:`~qrobust.score.summary.compute_summary`; ``summary``
    says which sequence levels were computed; ``attacks`` is ``{"rows": corpus rows attacked, "outcomes":
    {job id: outcome per attacked row}, "wcar": {budget: [job ids]}, "wcar_extra": {budget: [job ids]}}``
    (outcome codes of :mod:`qrobust.score.adversarial`).
    """
    from qrobust.score.adversarial import FOOLED, NOT_RUN, ROBUST, SKIPPED

    n = len(labels)
    names, cols = [], []

    def add(name: str, values) -> None:
        names.append(name)
        cols.append(np.asarray(values, dtype=np.float32))

    for vid in sorted(predictions):
        family = vid.split("/", 1)[0]
        if family in ("clean", "natural", "systematic"):
            add(f"acc:{vid}", predictions[vid][:, 0] == labels)
    seq = summary.get("sequence") or {}
    levels = {"1": seq, **(seq.get("difficulty") or {})}
    videos = {(variants[v]["params"]["perturbation"], variants[v]["params"]["difficulty"]): v
              for v in predictions if v.startswith("sequence/")}
    for d, level in levels.items():
        d = int(d)
        for p in [*(level.get("fp") or {}), *((level.get("extra") or {}).get("fp") or {})]:
            noise = _noisy(variants, videos, p)
            top5 = predictions[videos[(p, d) if noise else (p, 1)]]
            stride = 1 if noise else d
            add(f"fp:{p}:{d}", metrics.flips_per_video(top5[..., 0], noise, stride))
            add(f"t5d:{p}:{d}", metrics.top5_distance_per_video(top5, noise, stride))
    if attacks:
        rows = np.asarray(attacks["rows"])
        clean = predictions.get("clean/onecrop")

        def on_rows(values, ran) -> np.ndarray:
            full = np.full(n, np.nan, dtype=np.float32)
            full[rows[ran]] = values[ran]
            return full

        for job, outcome in sorted(attacks["outcomes"].items()):
            ran = outcome != NOT_RUN
            if (outcome == SKIPPED).any():
                continue  # a cascade skipped rows: no per-attack AR to give an interval for
            add(f"robust:{job}", on_rows((outcome == ROBUST).astype(np.float32), ran))
            if clean is not None:
                add(f"clean_on:{job}", on_rows((clean[rows, 0] == labels[rows]).astype(np.float32), ran))
        for key in ("wcar", "wcar_extra"):
            for budget, jobs in (attacks.get(key) or {}).items():
                outcomes = [attacks["outcomes"][j] for j in jobs]
                common = np.logical_and.reduce([o != NOT_RUN for o in outcomes])
                fooled = np.logical_or.reduce([o == FOOLED for o in outcomes])
                add(f"{key}:{budget}", on_rows((~fooled).astype(np.float32), common))
    return names, (np.stack(cols, axis=1) if cols else np.zeros((n, 0), np.float32))


def _noisy(variants: dict, videos: dict, perturbation: str) -> bool:
    vid = next(v for (p, _), v in videos.items() if p == perturbation)
    return variants[vid]["params"].get("noise", is_noise_sequence(perturbation)) is True


# --- resampling ------------------------------------------------------------------

def bootstrap_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, n) float32: how often each row is drawn in each resample (n draws with replacement)."""
    draws = rng.integers(0, n, size=(resamples, n))
    draws += (np.arange(resamples) * n)[:, None]
    return np.bincount(draws.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float32)


def resample_means(x: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, columns): each column's mean over its defined rows in every bootstrap resample.

    Every column is weighted by the same draw of rows in a resample (paired);
    a seed gives the same draws for any matrix of the same number of rows.
    """
    n, k = x.shape
    defined = ~np.isnan(x)
    values = np.where(defined, x, 0).astype(np.float32)
    weights = defined.astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, k), dtype=np.float64)
    for start in range(0, resamples, CHUNK):
        counts = bootstrap_counts(n, min(CHUNK, resamples - start), rng)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:start + len(counts)] = (counts @ values) / (counts @ weights)
    return out


def column_means(x: np.ndarray) -> np.ndarray:
    """(columns,): each column's mean over its defined rows (the point estimate)."""
    with np.errstate(invalid="ignore"):
        return np.nanmean(x.astype(np.float64), axis=0) if x.size else np.zeros(x.shape[1])


# --- headline numbers as functions of the column means ----------------------------

def headline(summary: dict, mean: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """``{path: value}`` for every headline number of ``summary``, computed from the column means.

    ``mean(name)`` gives a column's mean (an array over resamples, or a 0-d
    array for the point estimate); the formulas are the summary's. Paths are
    dotted summary keys, e.g. ``natural.mnr``, ``natural.acc.fog-3``,
    ``attacks.pgd-linf.small.ar``, ``wcar.small``.
    """
    out: dict[str, np.ndarray] = {}
    clean = summary["clean"]
    acc = mean("acc:clean/onecrop") if clean.get("acc") is not None else None
    if acc is not None:
        out["clean.acc"] = acc
    if clean.get("acc_square") is not None:
        out["clean.acc_square"] = mean("acc:clean/square")
    nat = summary.get("natural")
    if nat:
        accs = {k: mean(f"acc:natural/{k}") for k in nat["acc"]}
        out.update({f"natural.acc.{k}": v for k, v in accs.items()})
        by = {}
        for k, v in accs.items():
            by.setdefault(k.rpartition("-")[0], {})[int(k.rpartition("-")[2])] = v
        bench = {c: np.mean(list(by[c].values()), axis=0) for c in nat["acc_by_corruption"]}
        out.update({f"natural.acc_by_corruption.{c}": v for c, v in bench.items()})
        if nat.get("mnr") is not None:
            mnr = out["natural.mnr"] = np.mean(list(bench.values()), axis=0)
            if nat.get("nci") is not None and acc is not None:
                out["natural.nci"] = (acc - mnr) / acc
        extra = (nat.get("extra") or {}).get("acc_by_corruption") or {}
        if extra:
            means = {c: np.mean(list(by[c].values()), axis=0) for c in extra}
            out.update({f"natural.extra.acc_by_corruption.{c}": v for c, v in means.items()})
            out["natural.extra.mnr"] = np.mean(list(means.values()), axis=0)
        if nat.get("mce") is not None:
            errors = {c: [1 - by[c][s] for s in range(1, 6)] for c in metrics.ALEXNET_ERR}
            out["natural.mce"] = _ce(errors, 0.0, 0.0)
            if nat.get("relative_mce") is not None and acc is not None:
                out["natural.relative_mce"] = _ce(errors, 1 - acc, metrics.ALEXNET_CLEAN_ERR)
    seq = summary.get("sequence")
    if seq:
        levels = [("1", seq, "sequence"),
                  *((d, lv, f"sequence.difficulty.{d}") for d, lv in (seq.get("difficulty") or {}).items())]
        for d, level, prefix in levels:
            for part, pre in ((level, prefix), (level.get("extra") or {}, f"{prefix}.extra")):
                for key in ("fp", "t5d"):
                    vals = {p: mean(f"{key}:{p}:{d}") for p in (part.get(key) or {})}
                    out.update({f"{pre}.{key}.{p}": v for p, v in vals.items()})
                    if vals and part.get(f"m{key}") is not None:
                        out[f"{pre}.m{key}"] = np.mean(list(vals.values()), axis=0)
    sys_ = summary.get("systematic")
    if sys_:
        accs = {v: mean(f"acc:systematic/{v}") for v in sys_["acc"]}
        out.update({f"systematic.acc.{v}": a for v, a in accs.items()})
        stacked = np.stack(list(accs.values()))
        mean_s = out["systematic.mean"] = stacked.mean(axis=0)
        if sys_.get("sr") is not None:
            out["systematic.sr"] = stacked.std(axis=0, ddof=1)
        if sys_.get("sni") is not None and acc is not None:
            out["systematic.sni"] = (acc - mean_s) / acc
        if sys_.get("sni_square") is not None:
            square = mean("acc:clean/square")
            out["systematic.sni_square"] = (square - mean_s) / square
    for attack, by_budget in (summary.get("attacks") or {}).items():
        for budget, entry in by_budget.items():
            if entry.get("ar") is None:
                continue
            ar = out[f"attacks.{attack}.{budget}.ar"] = mean(f"robust:{attack}/{budget}")
            if entry.get("aai") is not None:
                clean_here = mean(f"clean_on:{attack}/{budget}")
                out[f"attacks.{attack}.{budget}.aai"] = (clean_here - ar) / clean_here
    for key in ("wcar", "wcar_extra"):
        for budget, value in (summary.get(key) or {}).items():
            if value is not None:
                out[f"{key}.{budget}"] = mean(f"{key}:{budget}")
    return out


def _ce(errors: dict[str, list], clean_err, baseline_clean_err):
    """mCE (clean errors 0) or relative mCE over the 15, elementwise over resamples."""
    ces = [sum(e - clean_err for e in errs) / sum(b - baseline_clean_err for b in metrics.ALEXNET_ERR[c])
           for c, errs in errors.items()]
    return np.mean(ces, axis=0)


def resampled(summary: dict, names: list[str], x: np.ndarray, resamples: int = RESAMPLES,
              seed: int = SEED) -> dict[str, np.ndarray]:
    """``{path: (resamples,) values}`` of every headline number (see :func:`headline`)."""
    means = resample_means(x, resamples, seed)
    index = {name: i for i, name in enumerate(names)}
    with np.errstate(divide="ignore", invalid="ignore"):  # a resample where ACC is 0: NCI/SNI/AAI undefined
        return headline(summary, lambda name: means[:, index[name]])


def point(summary: dict, names: list[str], x: np.ndarray) -> dict[str, float]:
    """``{path: value}`` of every headline number from the full columns (equals the summary's values)."""
    means = column_means(x)
    index = {name: i for i, name in enumerate(names)}
    with np.errstate(divide="ignore", invalid="ignore"):
        return {k: float(v) for k, v in headline(summary, lambda name: means[index[name]]).items()}


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> list[float | None]:
    """``[low, high]`` of the bootstrap values at ``level``; None bounds where a resample had no data."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        return [None, None]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def intervals(summary: dict, names: list[str], x: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED,
              level: float = LEVEL) -> dict:
    """The summary's ``intervals`` entry: the method and, per headline path, ``[low, high]``."""
    draws = resampled(summary, names, x, resamples, seed)
    return {"method": METHOD, "resamples": resamples, "level": level, "seed": seed, "samples": int(x.shape[0]),
            "values": {path: percentile_interval(v, level) for path, v in sorted(draws.items())}}


# --- comparing two models ------------------------------------------------------------

def compare(a: tuple[dict, list[str], np.ndarray], b: tuple[dict, list[str], np.ndarray], paths: list[str],
            resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict[str, dict]:
    """``{path: {"difference", "low", "high", "significant"}}`` of model a minus model b.

    Each of ``a`` and ``b`` is ``(summary, names, X)`` of one model on the same
    rows; the same seed draws the same rows for both, so each resample's
    difference is paired. ``significant``: the interval excludes 0.
    """
    (sa, na, xa), (sb, nb, xb) = a, b
    if xa.shape[0] != xb.shape[0]:
        raise ValueError(f"the models were scored on {xa.shape[0]} and {xb.shape[0]} samples: not paired")
    da, db = resampled(sa, na, xa, resamples, seed), resampled(sb, nb, xb, resamples, seed)
    pa, pb = point(sa, na, xa), point(sb, nb, xb)
    out = {}
    for path in paths:
        if path in da and path in db:
            low, high = percentile_interval(da[path] - db[path], level)
            out[path] = {"difference": pa[path] - pb[path], "low": low, "high": high,
                         "significant": low is not None and (low > 0 or high < 0)}
    return out


def mcnemar(a_right: np.ndarray, b_right: np.ndarray) -> dict:
    """Exact McNemar test of two classifiers' paired right/wrong outcomes (rows where both are defined).

    b = rows only ``a`` gets right, c = rows only ``b`` gets right; under the
    null each discordant row is a fair coin: p = min(1, 2 P[Bin(b + c, 1/2) <= min(b, c)]).
    """
    a, b = np.asarray(a_right, dtype=float), np.asarray(b_right, dtype=float)
    both = ~(np.isnan(a) | np.isnan(b))
    a, b = a[both] > 0.5, b[both] > 0.5
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"only_a": only_a, "only_b": only_b, "p": p}


def required_samples(differences: np.ndarray, delta: float, level: float = LEVEL, power: float = 0.8) -> int | None:
    """Samples needed to detect a mean paired difference of ``delta`` (two-sided, at ``level``, with ``power``),
    from per-sample differences: n = ((z_{1-alpha/2} + z_power) sd / delta)^2. None without variance."""
    from statistics import NormalDist

    d = np.asarray(differences, dtype=np.float64)
    d = d[~np.isnan(d)]
    if d.size < 2 or not delta > 0:
        return None
    sd = float(d.std(ddof=1))
    if sd == 0:
        return None
    z = NormalDist().inv_cdf(1 - (1 - level) / 2) + NormalDist().inv_cdf(power)
    return int(math.ceil((z * sd / delta) ** 2))
