"""The metrics of qrobust.score.metrics against small cases worked out by hand."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from qrobust.score.metrics import (
    ALEXNET_CLEAN_ERR, ALEXNET_ERR, aai, accuracy, flip_probability, mce, mnr, nci,
    relative_mce, sni, sr, top5_distance, wcar, wilson_interval,
)


# --- accuracy and the relative drops -------------------------------------------------

def test_accuracy_top1_and_topk_uses_column_0():
    labels = np.array([1, 2, 3, 0])
    assert accuracy(np.array([1, 0, 3, 4]), labels) == 0.5
    # Column 0 is [1, 0, 3, 4] -> 2 of 4 right. Column 1 would give 1/4 and
    # "label anywhere in the top-2" 3/4.
    top2 = np.array([[1, 2], [0, 2], [3, 0], [4, 9]])
    assert accuracy(top2, labels) == 0.5


@pytest.mark.parametrize("preds, labels", [
    (np.array([1, 2, 3]), np.array([1, 2])),          # N differs
    (np.array([], dtype=int), np.array([], dtype=int)),  # empty
    (np.zeros((2, 3, 4), int), np.zeros(2, int)),     # 3-D
])
def test_accuracy_rejects_bad_shapes(preds, labels):
    with pytest.raises(ValueError):
        accuracy(preds, labels)


def test_relative_drops():
    assert aai(0.8, 0.2) == pytest.approx(0.75)       # (0.8 - 0.2) / 0.8
    assert nci(0.5, 0.4) == pytest.approx(0.2)        # 0.1 / 0.5
    assert sni(0.7, 0.7) == 0.0
    assert sni(0.5, 0.6) == pytest.approx(-0.2)       # better than clean: negative
    assert isinstance(aai(0.8, 0.2), float)


def test_relative_drop_of_zero_accuracy_is_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(nci(0.0, 0.0))
        out = aai(np.array([0.8, 0.0]), np.array([0.2, 0.0]))
    assert out[0] == pytest.approx(0.75) and math.isnan(out[1])


# --- mNR and SR ------------------------------------------------------------------------

def test_mnr_mapping_and_sequence():
    assert mnr({"fog": 0.2, "snow": 0.4}) == pytest.approx(0.3)
    assert mnr([0.1, 0.2, 0.6]) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        mnr({})


def test_sr_is_sample_standard_deviation():
    # mean 0.2, squared deviations 0.01 + 0.01 = 0.02; / (2 - 1) -> sqrt(0.02).
    # (ddof=0 would give 0.1.)
    assert sr([0.1, 0.3]) == pytest.approx(math.sqrt(0.02))
    assert sr({"pil-bilinear": 0.1, "opencv-area": 0.3}) == pytest.approx(math.sqrt(0.02))
    with pytest.raises(ValueError):
        sr([0.5])


# Table 10 of the paper (ResNet18, percent): ACC, the 14 ACC_s in column order
# (Pillow bilinear, nearest, box, hamming, cubic, lanczos; OpenCV bilinear,
# nearest, area, cubic, lanczos; decoders Pillow, OpenCV, FFmpeg), Mean, SR;
# and the SNI of Table 9 (percent).
TABLE10 = {
    "FP 32": (71.06, [70.21, 69.15, 70.64, 70.73, 70.66, 70.78, 70.82, 69.21, 70.71, 70.53,
                      70.21, 70.21, 70.22, 70.22], 70.31, 0.53, 1.06),
    "LSQ 4": (70.52, [69.82, 64.79, 68.85, 69.57, 69.77, 69.46, 68.71, 64.74, 69.76, 67.01,
                      66.51, 69.82, 69.85, 69.87], 68.47, 1.90, 2.91),
}


@pytest.mark.parametrize("row", sorted(TABLE10))
def test_paper_table10_mean_sr_sni_reproduce(row):
    acc, acc_s, mean, sr_, sni_ = TABLE10[row]
    acc_s = np.array(acc_s) / 100
    half = 0.005 + 1e-9  # printed to 2 decimals (in percent)
    assert len(acc_s) == 14
    assert abs(100 * np.mean(acc_s) - mean) <= half
    assert abs(100 * sr(acc_s) - sr_) <= half
    assert abs(100 * sni(acc / 100, np.mean(acc_s)) - sni_) <= half
    # The population standard deviation does not reproduce the table.
    assert abs(100 * np.std(acc_s) - sr_) > half


# --- WCAR ------------------------------------------------------------------------------

def test_wcar_overlapping_fooled_sets():
    T, F = True, False
    fooled = [np.array([T, F, F, T, F, F]),   # attack A fools samples 0, 3
              np.array([T, T, F, F, F, F]),   # attack B fools 0, 1
              np.array([F, T, F, T, F, F])]   # attack C fools 1, 3
    # Each attack alone leaves 4/6; 6 fools in all but the union is {0, 1, 3}: 3/6 left.
    assert wcar(fooled) == 0.5
    assert wcar(np.stack(fooled)) == 0.5
    assert wcar(np.zeros((2, 4), bool)) == 1.0
    assert wcar(np.ones((1, 4), bool)) == 0.0


@pytest.mark.parametrize("bad", [
    [np.array([True, False]), np.array([True])],   # attacks cover different samples
    np.array([[1, 0], [0, 0]]),                    # not bool
    np.array([True, False]),                       # 1-D: which axis is attacks?
    np.zeros((2, 0), bool),                        # no samples
])
def test_wcar_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        wcar(bad)


# --- flip probability -----------------------------------------------------------------

def test_flip_probability_noise_compares_with_frame_0():
    preds = np.array([[1, 1, 2, 1, 3],
                      [5, 5, 5, 5, 5]])
    # Video 0, frames 1..4 against frame 0 (=1): 1 2 1 3 -> 2 of 4 flip; video 1: 0.
    assert flip_probability(preds, noise=True) == pytest.approx(0.25)
    # Difficulty only picks the noise level: the pairing stays against frame 0.
    assert flip_probability(preds, noise=True, difficulty=3) == pytest.approx(0.25)
    assert flip_probability(preds[:, :3], noise=True, difficulty=3) == pytest.approx(0.25)  # 1 vs 1 2
    # Consecutive frames instead: (1,1) (1,2) (2,1) (1,3) -> 3 of 4; video 1: 0.
    assert flip_probability(preds, noise=False) == pytest.approx(0.375)


def test_flip_probability_stride():
    preds = np.array([[0, 1, 0, 0, 1, 1, 0]])
    # d=1: 01 10 00 01 11 10 -> 4/6.
    assert flip_probability(preds, noise=False) == pytest.approx(4 / 6)
    # d=2: frames (0,2)=00 (1,3)=10 (2,4)=01 (3,5)=01 (4,6)=10 -> 4/5.
    assert flip_probability(preds, noise=False, difficulty=2) == pytest.approx(4 / 5)
    # d=3: frames 0,3,6 -> 00, 00; frames 1,4 -> 11; frames 2,5 -> 01 -> 1/4.
    assert flip_probability(preds, noise=False, difficulty=3) == pytest.approx(1 / 4)


def _fp_by_walking(preds, d):
    """ImageNet-P test.py's walk: per video, for each offset, frames[offset::d] consecutively."""
    per_video = []
    for video in preds:
        flips = [a != b for i in range(d) for a, b in zip(video[i::d], video[i::d][1:])]
        per_video.append(np.mean(flips))
    return np.mean(per_video)


@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_flip_probability_equals_the_offset_walk(d):
    preds = np.random.default_rng(d).integers(0, 3, size=(6, 11))
    assert flip_probability(preds, noise=False, difficulty=d) == pytest.approx(_fp_by_walking(preds, d))


@pytest.mark.parametrize("preds, noise, difficulty", [
    (np.zeros(5, int), False, 1),          # not (videos, frames)
    (np.zeros((0, 5), int), False, 1),     # no videos
    (np.zeros((2, 5), int), False, 0),
    (np.zeros((2, 5), int), False, 1.5),
    (np.zeros((2, 5), int), False, True),
    (np.zeros((2, 3), int), False, 3),     # no pair at stride 3
    (np.zeros((2, 1), int), True, 1),      # noise needs a frame after frame 0
])
def test_flip_probability_rejects_bad_input(preds, noise, difficulty):
    with pytest.raises(ValueError):
        flip_probability(preds, noise=noise, difficulty=difficulty)


# --- top-5 distance ---------------------------------------------------------------------

F0 = [1, 2, 3, 4, 5]
F1 = [2, 1, 3, 4, 9]   # after F0: sigma = 2 1 3 4 6 (class 5 dropped out) -> 1+1+0+0+1 = 3
F2 = [9, 8, 7, 6, 1]   # after F0: sigma = 5 6 6 6 6 -> 4+4+3+2+1 = 14
#                        after F1: classes 2 1 3 4 9 -> sigma 6 5 6 6 1 -> 5+3+3+2+4 = 17


def test_top5_distance_pair_with_a_class_dropping_out():
    assert top5_distance(np.array([[F0, F1]]), noise=False) == 3
    assert top5_distance(np.array([[F0, F0]]), noise=False) == 0
    assert top5_distance(np.array([[F0, [10, 11, 12, 13, 14]]]), noise=False) == 15  # disjoint
    assert top5_distance(np.array([[F0, F2]]), noise=False) == 14


def test_top5_distance_pairing_and_per_video_mean():
    top5 = np.array([[F0, F1, F2],
                     [F0, F0, F0]])
    # Consecutive: video 0 (3 + 17) / 2 = 10, video 1: 0 -> 5.
    assert top5_distance(top5, noise=False) == pytest.approx(5.0)
    # Noise, against frame 0: video 0 (3 + 14) / 2 = 8.5, video 1: 0 -> 4.25.
    assert top5_distance(top5, noise=True) == pytest.approx(4.25)
    # Stride 2: the single pair (F0, F2) = 14 -> 7.
    assert top5_distance(top5, noise=False, difficulty=2) == pytest.approx(7.0)


@pytest.mark.parametrize("top5", [
    np.zeros((2, 3, 4), int),                  # not 5 classes
    np.zeros((2, 3), int),                     # not 3-D
    np.array([[F0, [1, 1, 2, 3, 4]]]),         # repeated class id
])
def test_top5_distance_rejects_bad_input(top5):
    with pytest.raises(ValueError):
        top5_distance(top5, noise=False)


# --- mCE -----------------------------------------------------------------------------

FAKE = {"a": (.5, .5, .5, .5, .5),        # sum 2.5
        "b": (.2, .4, .6, .8, 1.0)}       # sum 3.0


def test_mce_with_a_fake_baseline():
    err = {"a": (.25,) * 5,               # sum 1.25 -> CE 0.5
           "b": (.6,) * 5}                # sum 3.0  -> CE 1.0
    assert mce(err, baseline=FAKE) == pytest.approx(0.75)
    assert mce({"a": err["a"]}, baseline=FAKE) == pytest.approx(0.5)  # only the corruptions given
    # Relative, clean 0.1 vs baseline clean 0.2:
    # a: (1.25 - 5*0.1) / (2.5 - 5*0.2) = 0.75 / 1.5 = 0.5; b: (3.0 - 0.5) / (3.0 - 1.0) = 1.25.
    assert relative_mce(err, 0.1, baseline=FAKE, baseline_clean_err=0.2) == pytest.approx(0.875)


def test_mce_errors_name_the_corruption():
    with pytest.raises(ValueError, match="'c'"):
        mce({"c": (.5,) * 5}, baseline=FAKE)
    with pytest.raises(ValueError, match="'a'"):
        mce({"a": (.5,) * 4}, baseline=FAKE)
    with pytest.raises(ValueError):
        mce({}, baseline=FAKE)
    with pytest.raises(ValueError, match="'a'"):  # baseline never worse than its clean error
        relative_mce({"a": (.5,) * 5}, 0.1, baseline=FAKE, baseline_clean_err=0.6)


def test_alexnet_baseline():
    assert len(ALEXNET_ERR) == 15 and ALEXNET_CLEAN_ERR == 0.43478
    assert all(len(v) == 5 and all(0 < e < 1 for e in v) for v in ALEXNET_ERR.values())
    assert ALEXNET_ERR["glass_blur"][2] == 0.88806 and ALEXNET_ERR["jpeg_compression"][4] == 0.74778
    # AlexNet scores exactly 1 against itself; half its gaussian-noise error gives CE 0.5.
    assert mce(ALEXNET_ERR) == pytest.approx(1.0)
    assert relative_mce(ALEXNET_ERR, ALEXNET_CLEAN_ERR) == pytest.approx(1.0)
    half = {"gaussian_noise": [e / 2 for e in ALEXNET_ERR["gaussian_noise"]]}
    assert mce(half) == pytest.approx(0.5)


# --- Wilson interval ---------------------------------------------------------------------

def test_wilson_interval_known_values():
    # 50/100: center 0.5, half = 1.96/1.038416 * sqrt(0.0025 + 0.00009604) = 0.096170.
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.403830, abs=1e-5) and high == pytest.approx(0.596170, abs=1e-5)
    # 0/10: half equals center = (1.96^2/20) / (1 + 1.96^2/10) = 0.19208/1.38416 -> (0, 0.277540).
    low, high = wilson_interval(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.277540, abs=1e-5)
    # Mirror image: k successes vs n - k.
    lo7, hi7 = wilson_interval(7, 20)
    lo13, hi13 = wilson_interval(13, 20)
    assert lo7 == pytest.approx(1 - hi13) and hi7 == pytest.approx(1 - lo13)
    assert wilson_interval(7, 20, z=1.0)[1] < hi7  # narrower at lower confidence


@pytest.mark.parametrize("k, n", [(0, 0), (11, 10), (-1, 10)])
def test_wilson_interval_rejects_bad_counts(k, n):
    with pytest.raises(ValueError):
        wilson_interval(k, n)


def test_top5_distance_ignores_padding_of_models_with_few_classes():
    # 3-class model, ids padded with -1: classes 1 and 2 swap ranks -> |2-3| + |3-2| = 2, and the
    # padding at ranks 4 and 5 never matches (sigma = 6) -> |4-6| + |5-6| = 3; total 5
    top5 = np.array([[[0, 1, 2, -1, -1], [0, 2, 1, -1, -1]]])
    assert top5_distance(top5, noise=False) == pytest.approx(5)


def test_mce_is_over_the_15_benchmark_corruptions_when_more_were_scored():
    """The released ImageNet-C adds 4 held-out corruptions; mCE stays the benchmark's 15."""
    from qrobust.score.summary import _natural

    n = 20
    labels = np.zeros(n, dtype=np.int32)
    predictions, variants = {}, {}
    for k, corruption in enumerate([*ALEXNET_ERR, "spatter"]):
        for severity in range(1, 6):
            vid = f"natural/{corruption}-{severity}"
            top5 = np.ones((n, 5), dtype=np.int32)
            top5[: (k + severity) % n, 0] = 0  # some rows right
            predictions[vid] = top5
            variants[vid] = {"params": {"corruption": corruption, "severity": severity}}
    out = _natural(predictions, labels, variants, acc=0.9, n_classes=1000)
    errors = {c: [1 - float((predictions[f"natural/{c}-{s}"][:, 0] == 0).mean()) for s in range(1, 6)]
              for c in ALEXNET_ERR}
    assert out["mce"] == pytest.approx(mce(errors))
    assert out["relative_mce"] == pytest.approx(relative_mce(errors, 0.1))
    assert "spatter" in out["extra"]["acc_by_corruption"] and "spatter" not in out["acc_by_corruption"]
    del predictions["natural/fog-3"]  # one benchmark variant missing: no mCE
    assert _natural(predictions, labels, variants, acc=0.9, n_classes=1000)["mce"] is None
