"""The RobustMQ metrics (paper section 3.2) and their extras (mCE, top-5 distance, intervals); docs/metrics.md.

Plain functions on numbers and numpy arrays. Accuracies and errors are
fractions in [0, 1], never percentages. Bad input raises ``MetricError``, a
``ValueError`` whose message says what was wrong.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence, Union

import numpy as np

from qrobust.shared.errors import QrobustError

Values = Union[Mapping[str, float], Sequence[float], np.ndarray]


class MetricError(QrobustError, ValueError):
    """Input a metric cannot be computed from (wrong shape, empty, no baseline)."""


# AlexNet top-1 error per corruption, severities 1..5 (hendrycks/robustness
# issue 10; the same numbers are in timm and AugMix). Baseline of mCE.
ALEXNET_ERR: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (.69528, .82542, .93554, .98138, .99452),
    "shot_noise": (.71224, .85108, .93574, .98182, .99146),
    "impulse_noise": (.78374, .89808, .94870, .98720, .99548),
    "defocus_blur": (.65624, .73202, .85036, .91364, .94714),
    "glass_blur": (.64308, .75054, .88806, .91622, .93344),
    "motion_blur": (.58430, .70048, .82108, .89750, .92638),
    "zoom_blur": (.70008, .76992, .80784, .84198, .87198),
    "snow": (.71726, .88392, .86468, .91870, .94952),
    "frost": (.61390, .79734, .88790, .89942, .93430),
    "fog": (.67474, .76050, .84378, .87260, .94500),
    "brightness": (.45140, .48502, .54048, .62166, .72440),
    "contrast": (.64548, .76150, .88874, .97760, .99270),
    "elastic_transform": (.52596, .70116, .55686, .64076, .80554),
    "pixelate": (.52218, .54620, .73728, .87092, .91262),
    "jpeg_compression": (.51002, .54718, .57294, .65458, .74778),
}
ALEXNET_CLEAN_ERR = 0.43478  # torchvision AlexNet IMAGENET1K_V1


def _values(values: Values, what: str, at_least: int = 1) -> np.ndarray:
    """A mapping's values or a sequence as a 1-D float array of ``at_least`` or more items."""
    if isinstance(values, Mapping):
        values = list(values.values())
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or arr.size < at_least:
        raise MetricError(f"{what} needs a flat list of at least {at_least} numbers, got shape {arr.shape}")
    return arr


def accuracy(preds, labels) -> float:
    """Top-1 accuracy: the fraction of samples whose prediction equals the label.

    ``preds`` is (N,) top-1 class ids or (N, k) top-k ids, best first (column 0
    is used); ``labels`` is (N,). Raises MetricError on empty or mismatched shapes.
    """
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.ndim == 2:
        preds = preds[:, 0]
    if preds.ndim != 1 or labels.shape != preds.shape or preds.size == 0:
        raise MetricError(f"accuracy needs (N,) or (N, k) predictions and (N,) labels, N > 0; "
                          f"got {np.shape(preds)} and {labels.shape}")
    return float(np.mean(preds == labels))


def _relative_drop(acc, other):
    """(acc - other) / acc, elementwise; nan where acc == 0 (a model that is never right)."""
    acc, other = np.asarray(acc, dtype=float), np.asarray(other, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(acc == 0, np.nan, (acc - other) / np.where(acc == 0, 1.0, acc))
    return float(out) if out.ndim == 0 else out


def aai(acc, ar):
    """Adversarial Attack Impact, AAI = (ACC - AR) / ACC (eq. 4); lower is more robust.

    Numbers or arrays (broadcast). Returns nan where ACC == 0.
    """
    return _relative_drop(acc, ar)


def nci(acc, acc_c):
    """Natural Corruption Impact, NCI = (ACC - ACC_c) / ACC (eq. 7); nan where ACC == 0."""
    return _relative_drop(acc, acc_c)


def sni(acc, acc_s):
    """Systematic Noise Impact, SNI = (ACC - ACC_s) / ACC (eq. 11); nan where ACC == 0.

    The paper's tables give SNI of the mean ACC_s: ``sni(acc, np.mean(acc_s))``.
    """
    return _relative_drop(acc, acc_s)


def mnr(acc_by_corruption: Values) -> float:
    """Mean Natural Robustness, mNR = mean of ACC_c over corruptions (eq. 8).

    Takes a mapping corruption -> accuracy or a sequence. Raises MetricError if empty.
    """
    return float(np.mean(_values(acc_by_corruption, "mnr")))


def sr(acc_by_variant: Values) -> float:
    """Systematic Robustness, SR = sample standard deviation (ddof=1) of ACC_s (eq. 12).

    Takes a mapping variant -> accuracy or a sequence of at least 2 values (the
    paper uses the 14 decode/resize variants; ddof=1 reproduces its Table 10).
    """
    return float(np.std(_values(acc_by_variant, "sr", at_least=2), ddof=1))


def wcar(fooled) -> float:
    """Worst-Case Adversarial Robustness (eq. 5): fraction of samples no attack fooled.

    ``fooled`` is a bool array (attacks, samples), or a list of per-attack 1-D
    bool arrays, True where that attack's output was misclassified (samples
    already wrong when clean count as fooled). Raises MetricError on other shapes.
    """
    try:
        arr = np.asarray(fooled)
    except ValueError as e:  # ragged list of arrays
        raise MetricError(f"wcar: every attack must cover the same samples ({e})") from None
    if arr.ndim != 2 or arr.size == 0 or arr.dtype != bool:
        raise MetricError(f"wcar needs a non-empty bool array (attacks, samples), got {arr.dtype} {arr.shape}")
    return float(1.0 - np.mean(arr.any(axis=0)))


def _frame_pairs(frames: int, noise: bool, difficulty: int):
    """Indices (earlier, later) of the frame pairs compared in ImageNet-P test.py.

    Noise: every frame j >= 1 against frame 0 (difficulty only picks the noise
    level of the data). Otherwise frame j against j + d: the reference walks
    frames[i::d] consecutively for each offset i < d, which is the same set.
    """
    if isinstance(difficulty, bool) or not isinstance(difficulty, (int, np.integer)) or difficulty < 1:
        raise MetricError(f"difficulty must be an integer >= 1, got {difficulty!r}")
    step = 1 if noise else int(difficulty)
    if frames <= step:
        raise MetricError(f"{frames} frames per video leave no pair to compare at stride {step}")
    if noise:
        return np.zeros(frames - 1, dtype=int), np.arange(1, frames)
    return np.arange(frames - step), np.arange(step, frames)


def flip_probability(preds, noise: bool, difficulty: int = 1) -> float:
    """Flip Probability (eq. 9; ImageNet-P ``test.py``): the mean over videos of :func:`flips_per_video`."""
    return float(np.mean(flips_per_video(preds, noise, difficulty)))


def flips_per_video(preds, noise: bool, difficulty: int = 1) -> np.ndarray:
    """Per video, the fraction of its frame pairs whose top-1 differs (the terms of FP, eq. 9).

    ``preds`` is an int array (videos, frames) of top-1 class ids; pairs as in
    ``_frame_pairs``. Returns (videos,) floats. Raises MetricError for bad
    shapes or difficulty.
    """
    preds = np.asarray(preds)
    if preds.ndim != 2 or preds.shape[0] == 0:
        raise MetricError(f"flip_probability needs predictions shaped (videos, frames), got {preds.shape}")
    earlier, later = _frame_pairs(preds.shape[1], noise, difficulty)
    return np.mean(preds[:, earlier] != preds[:, later], axis=1)


def top5_distance(top5, noise: bool, difficulty: int = 1) -> float:
    """Mean top-5 distance (ImageNet-P ``test.py``, mode 'top5'): the mean over videos of
    :func:`top5_distance_per_video`."""
    return float(np.mean(top5_distance_per_video(top5, noise, difficulty)))


def top5_distance_per_video(top5, noise: bool, difficulty: int = 1) -> np.ndarray:
    """Per video, the mean top-5 distance of its frame pairs (ImageNet-P ``test.py``, mode 'top5').

    ``top5`` is an int array (videos, frames, 5) of class ids, best first. For a
    pair (earlier, later): T5D = sum_{i=1..5} |i - min(sigma(i), 6)|, sigma(i)
    the 1-based rank in the later top-5 of the earlier frame's i-th class (6 if
    absent). Same pairs as ``flip_probability``; returns (videos,) means.
    Negative ids mean "no class" (a model with fewer than 5 classes) and
    never match. Raises MetricError for bad shapes, repeated ids or difficulty.
    """
    top5 = np.asarray(top5)
    if top5.ndim != 3 or top5.shape[0] == 0 or top5.shape[2] != 5:
        raise MetricError(f"top5_distance needs class ids shaped (videos, frames, 5), got {top5.shape}")
    ordered = np.sort(top5, axis=2)
    if np.any((np.diff(ordered, axis=2) == 0) & (ordered[..., 1:] >= 0)):
        raise MetricError("top5_distance: a frame's top-5 repeats a class id")
    earlier, later = _frame_pairs(top5.shape[1], noise, difficulty)
    a, b = top5[:, earlier, :], top5[:, later, :]          # (videos, pairs, 5)
    match = (a[..., :, None] == b[..., None, :]) & (a[..., :, None] >= 0)  # [.., i, j]: a's i-th is b's j-th
    sigma = np.where(match.any(axis=-1), match.argmax(axis=-1) + 1, 6)
    dist = np.abs(np.arange(1, 6) - sigma).sum(axis=-1)    # (videos, pairs)
    return np.mean(dist, axis=1)


def _corruption_errors(err, baseline, clean_err, baseline_clean_err) -> float:
    """Mean over corruptions of sum_s (E - clean) / sum_s (E_base - base_clean)."""
    if not isinstance(err, Mapping) or not err:
        raise MetricError("mCE needs a non-empty mapping corruption -> 5 errors (severities 1..5)")
    ces = []
    for name, errors in err.items():
        if name not in baseline:
            raise MetricError(f"no baseline error for corruption {name!r}; known: {', '.join(sorted(baseline))}")
        e, b = np.asarray(errors, dtype=float), np.asarray(baseline[name], dtype=float)
        if e.shape != (5,) or b.shape != (5,):
            raise MetricError(f"{name!r}: need 5 errors (severities 1..5), got {e.shape} and baseline {b.shape}")
        denom = float(np.sum(b - baseline_clean_err))
        if denom <= 0:
            raise MetricError(f"{name!r}: baseline errors do not exceed the baseline clean error")
        ces.append(float(np.sum(e - clean_err)) / denom)
    return float(np.mean(ces))


def mce(err_by_corruption_severity: Mapping[str, Sequence[float]],
        baseline: Mapping[str, Sequence[float]] = ALEXNET_ERR) -> float:
    """Mean Corruption Error (Hendrycks & Dietterich): mean over the given corruptions of
    CE_c = sum_s E_{s,c} / sum_s E^AlexNet_{s,c}.

    ``err_by_corruption_severity``: corruption -> 5 top-1 errors (severities 1..5).
    Raises MetricError for a corruption without a baseline or not 5 errors.
    """
    return _corruption_errors(err_by_corruption_severity, baseline, 0.0, 0.0)


def relative_mce(err_by_corruption_severity: Mapping[str, Sequence[float]], clean_err: float,
                 baseline: Mapping[str, Sequence[float]] = ALEXNET_ERR,
                 baseline_clean_err: float = ALEXNET_CLEAN_ERR) -> float:
    """Relative mCE: mean over corruptions of
    sum_s (E_{s,c} - E_clean) / sum_s (E^AlexNet_{s,c} - E^AlexNet_clean).

    Same input and errors as ``mce``; ``clean_err`` is the model's clean top-1 error.
    """
    return _corruption_errors(err_by_corruption_severity, baseline, clean_err, baseline_clean_err)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion successes / n (z = 1.96: 95%).

    p = k/n; center = (p + z^2/2n) / (1 + z^2/n);
    half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2). Returns (low, high) in
    [0, 1]. Raises MetricError unless 0 <= successes <= n and n > 0.
    """
    if n <= 0 or not 0 <= successes <= n:
        raise MetricError(f"wilson_interval needs 0 <= successes <= n and n > 0, got {successes}/{n}")
    p, z2 = successes / n, z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)
