"""summary.json from predictions: the paper's own numbers through compute_summary, and means over the
benchmark's own sets only (what else was scored is reported beside them, never averaged in)."""
from __future__ import annotations

import numpy as np
import pytest

from qrobust.score import metrics
from qrobust.score.adversarial import FOOLED, NOT_RUN, ROBUST
from qrobust.score.summary import attack_summary
from qrobust.score.summary import compute_summary
from qrobust.shared.noises import BENCHMARK_CORRUPTIONS, SEQUENCE_PERTURBATIONS

N = 10_000  # samples: a percentage with two decimals is a whole number of them

# Table 10 of the paper, ResNet18 (percent): ACC, then ACC_s in its column order (Pillow bilinear, nearest, box,
# hamming, cubic, lanczos; OpenCV bilinear, nearest, area, cubic, lanczos; decoders Pillow, OpenCV, FFmpeg),
# then Mean and SR. Every row but PACT 2 bit, which did not converge.
TABLE10 = {
    "FP 32": "71.06 70.21 69.15 70.64 70.73 70.66 70.78 70.82 69.21 70.71 70.53 70.21 70.21 70.22 70.22 70.31 0.53",
    "LSQ 2": "65.97 65.01 59.48 63.74 64.79 65.04 64.48 63.58 59.44 64.95 62.15 61.56 65.01 65.01 65.00 63.52 2.05",
    "LSQ 4": "70.52 69.82 64.79 68.85 69.57 69.77 69.46 68.71 64.74 69.76 67.01 66.51 69.82 69.85 69.87 68.47 1.90",
    "LSQ 6": "71.10 70.51 65.49 69.46 70.37 70.48 70.18 69.36 65.78 70.44 67.69 66.91 70.51 70.51 70.50 69.16 1.87",
    "LSQ 8": "71.31 70.73 66.07 69.77 70.64 70.73 70.42 69.67 66.05 70.73 67.95 67.09 70.73 70.72 70.68 69.43 1.82",
    "DoReFa 2": "62.31 61.14 54.77 59.86 60.98 60.98 60.71 59.79 55.04 61.22 57.88 57.26 61.14 61.07 61.24 59.50 2.32",
    "DoReFa 4": "70.60 69.88 65.03 69.03 69.75 70.00 69.65 69.01 64.97 69.94 67.45 66.94 69.88 69.94 70.00 68.68 1.83",
    "DoReFa 6": "71.15 70.61 66.08 69.67 70.48 70.66 70.35 69.67 66.14 70.55 68.26 67.62 70.61 70.61 70.70 69.43 1.69",
    "DoReFa 8": "71.51 70.88 65.88 69.72 70.68 70.72 70.47 69.67 65.86 70.75 67.84 66.86 70.88 70.87 70.97 69.43 1.95",
    "PACT 4": "70.41 69.69 64.76 68.71 69.42 69.71 69.31 68.59 64.71 69.64 67.19 66.39 69.69 69.60 69.88 68.38 1.85",
    "PACT 6": "71.17 70.62 65.66 69.40 70.39 70.51 70.14 69.47 65.91 70.58 67.76 67.12 70.62 70.67 70.63 69.25 1.84",
    "PACT 8": "71.43 70.89 65.71 69.65 70.67 70.68 70.39 69.72 65.78 70.71 67.74 66.75 70.89 70.84 70.84 69.38 1.98",
}
TABLE10_VARIANTS = ["resize-pil-bilinear", "resize-pil-nearest", "resize-pil-box", "resize-pil-hamming",
                    "resize-pil-cubic", "resize-pil-lanczos", "resize-opencv-bilinear", "resize-opencv-nearest",
                    "resize-opencv-area", "resize-opencv-cubic", "resize-opencv-lanczos",
                    "decode-pil", "decode-opencv", "decode-ffmpeg"]
# Table 9 of the paper, ResNet18: mean ACC_s, SNI (percent of ACC), SR
TABLE9 = {"FP 32": (70.31, 1.06, 0.53), "DoReFa 2": (59.51, 4.49, 2.32), "DoReFa 4": (68.67, 2.73, 1.83),
          "DoReFa 6": (69.43, 2.42, 1.69), "DoReFa 8": (69.43, 2.91, 1.95), "PACT 4": (68.38, 2.88, 1.85),
          "PACT 6": (69.25, 2.70, 1.84), "PACT 8": (69.38, 2.87, 1.98), "LSQ 2": (63.52, 3.71, 2.05),
          "LSQ 4": (68.47, 2.91, 1.90), "LSQ 6": (69.16, 2.73, 1.87), "LSQ 8": (69.43, 2.64, 1.82)}
# Table 6 of the paper, ResNet18: ACC, NR per corruption (the benchmark's order), mNR, NCI (percent)
TABLE6 = {
    "FP 32": "71.06 25.88 23.86 19.76 28.34 21.88 30.37 29.80 26.89 29.96 36.78 60.05 34.32 38.50 39.59 45.77 32.78 "
             "53.87",
    "DoReFa 2": "62.31 15.38 13.55 9.26 17.28 16.49 21.40 21.11 18.44 22.03 25.25 50.16 23.11 32.98 27.45 35.58 23.30 "
                "62.61",
    "LSQ 4": "70.52 25.79 23.08 17.54 25.01 20.79 28.04 27.12 25.36 29.37 33.78 59.40 30.65 37.58 35.99 44.73 30.95 "
             "56.11",
    "PACT 8": "71.43 25.56 22.89 17.95 26.07 20.68 28.72 27.66 25.85 29.77 35.54 60.14 33.48 37.83 37.62 45.59 31.69 "
              "55.63",
}
HALF = 0.005 + 1e-9  # half the last printed digit, in percent


def top5_with_accuracy(percent: float, n: int = N) -> np.ndarray:
    """Top-5 predictions (label 0 for all) with exactly ``percent`` of the rows right."""
    top5 = np.tile(np.arange(1, 6, dtype=np.int32), (n, 1))
    top5[: round(percent * n / 100), 0] = 0
    return top5


def manifest_of(predictions: dict, classes: int = 1000, extra: dict | None = None) -> dict:
    variants = {}
    for vid, top5 in predictions.items():
        family, name = vid.split("/", 1)
        if family == "natural":
            corruption, severity = name.rsplit("-", 1)
            params = {"corruption": corruption, "severity": int(severity)}
        elif family == "sequence":
            base, _, d = name.rpartition("_")
            params = ({"perturbation": base, "difficulty": int(d)} if d in ("2", "3")
                      else {"perturbation": name, "difficulty": 1})
            params["frames"] = top5.shape[1]
        elif family == "systematic":
            params = {}
        else:
            params = {}
        variants[vid] = {"family": family, "name": name, "params": params}
    manifest = {"suite": {"name": "test", "spec": {"natural": {"encoding": "jpg", "jpeg_quality": 85},
                                                   "sequence": {"encoding": "reference", "difficulties": [1]}}},
                "geometry": {"resize": 256, "crop": 224}, "classes": [f"n{i:08d}" for i in range(classes)],
                "samples": {"count": len(next(iter(predictions.values())))}, "versions": {}, "variants": variants}
    manifest.update(extra or {})
    return manifest


def summarize(predictions: dict, classes: int = 1000, adversarial: dict | None = None, **manifest_extra) -> dict:
    n = len(next(iter(predictions.values())))
    return compute_summary(predictions, np.zeros(n, dtype=np.int32), manifest_of(predictions, classes, manifest_extra),
                           model={}, corpus={"samples": n}, env={}, adversarial=adversarial)


@pytest.mark.parametrize("row", sorted(TABLE10))
def test_paper_tables_9_and_10_come_out_of_compute_summary(row):
    values = [float(v) for v in TABLE10[row].split()]
    acc, acc_s, mean, sr = values[0], values[1:15], values[15], values[16]
    predictions = {"clean/onecrop": top5_with_accuracy(acc), "clean/square": top5_with_accuracy(acc_s[0])}
    predictions.update({f"systematic/{v}": top5_with_accuracy(a) for v, a in zip(TABLE10_VARIANTS, acc_s)})
    s = summarize(predictions)["systematic"]
    assert s["acc"] == {v: pytest.approx(a / 100) for v, a in zip(TABLE10_VARIANTS, acc_s)}
    # the 14 inputs are rounded to 2 decimals too: their mean may move by up to half a digit more
    t9_mean, t9_sni, t9_sr = TABLE9[row]
    for printed in (mean, t9_mean):
        assert abs(100 * s["mean"] - printed) <= 2 * HALF
    for printed in (sr, t9_sr):
        assert abs(100 * s["sr"] - printed) <= 2 * HALF
    # SNI = (ACC - mean ACC_s) / ACC with the one-crop ACC (eq. 11, Table 9); bound the inputs' rounding
    slack = 100 * (HALF / 100 * (1 / (acc / 100) + (mean / 100) / (acc / 100) ** 2))
    assert abs(100 * s["sni"] - t9_sni) <= HALF + slack, (s["sni"], t9_sni)
    # relative to the square crop (what qrobust 0.1 printed as SNI) the table does not reproduce
    assert abs(100 * s["sni_square"] - t9_sni) > 0.5


@pytest.mark.parametrize("row", sorted(TABLE6))
def test_paper_table6_mnr_and_nci_come_out_of_compute_summary(row):
    values = [float(v) for v in TABLE6[row].split()]
    acc, nr, mnr, nci = values[0], values[1:16], values[16], values[17]
    predictions = {"clean/onecrop": top5_with_accuracy(acc)}
    predictions.update({f"natural/{c}-{sev}": top5_with_accuracy(a)
                        for c, a in zip(BENCHMARK_CORRUPTIONS, nr) for sev in range(1, 6)})
    natural = summarize(predictions)["natural"]
    assert natural["acc_by_corruption"] == {c: pytest.approx(a / 100) for c, a in zip(BENCHMARK_CORRUPTIONS, nr)}
    assert abs(100 * natural["mnr"] - mnr) <= 2 * HALF
    slack = 100 * (HALF / 100 * (1 / (acc / 100) + (mnr / 100) / (acc / 100) ** 2))
    assert abs(100 * natural["nci"] - nci) <= HALF + slack


def benchmark_natural(n: int = 200) -> dict:
    rng = np.random.default_rng(0)
    return {f"natural/{c}-{s}": top5_with_accuracy(rng.uniform(20, 70), n)
            for c in BENCHMARK_CORRUPTIONS for s in range(1, 6)}


def test_held_out_corruptions_do_not_move_mnr_nci_or_mce():
    base = {"clean/onecrop": top5_with_accuracy(70, 200), **benchmark_natural()}
    before = summarize(base)["natural"]
    more = dict(base)
    for c in ("speckle_noise", "gaussian_blur", "spatter", "saturate"):  # the released ImageNet-C's held-out 4
        more.update({f"natural/{c}-{s}": top5_with_accuracy(95, 200) for s in range(1, 6)})
    after = summarize(more)["natural"]
    for key in ("mnr", "nci", "mce", "relative_mce", "acc_by_corruption"):
        assert after[key] == before[key], key
    assert before["mce"] is not None and before["extra"] is None
    assert after["extra"]["mnr"] == pytest.approx(0.95)
    assert set(after["extra"]["acc_by_corruption"]) == {"speckle_noise", "gaussian_blur", "spatter", "saturate"}
    assert len(after["acc"]) == 95  # every variant scored is still listed


def videos(n: int, frames: int, flip_every: int, seed: int) -> np.ndarray:
    """Top-5 per frame whose top-1 changes at frames that are multiples of ``flip_every`` in some videos."""
    rng = np.random.default_rng(seed)
    top5 = np.tile(np.arange(5, dtype=np.int32), (n, frames, 1))
    for v in range(n):
        for t in range(frames):
            if t % flip_every == 0 and rng.random() < 0.5:
                top5[v, t, :2] = top5[v, t, 1::-1]
    return top5


def test_mfp_runs_over_the_ten_test_perturbations_at_difficulty_1():
    seqs = {f"sequence/{p}": videos(8, 41 if p == "translate" else 31, 2 + i % 3, i)
            for i, p in enumerate(SEQUENCE_PERTURBATIONS)}
    before = summarize(seqs)["sequence"]
    assert set(before["fp"]) == set(SEQUENCE_PERTURBATIONS) and before["extra"] is None
    assert before["mfp"] == pytest.approx(np.mean(list(before["fp"].values())))
    more = dict(seqs)
    more.update({f"sequence/{p}": videos(8, 31, 1, 99) for p in ("speckle_noise", "shear", "spatter")})  # validation
    more["sequence/gaussian_noise_2"] = videos(8, 31, 1, 7)  # a harder difficulty
    more["sequence/gaussian_noise_3"] = videos(8, 31, 1, 8)
    after = summarize(more)["sequence"]
    for key in ("fp", "mfp", "t5d", "mt5d"):
        assert after[key] == before[key], key
    assert set(after["extra"]["fp"]) == {"speckle_noise", "shear", "spatter"}
    assert after["extra"]["fp"]["speckle_noise"] == pytest.approx(
        metrics.flip_probability(more["sequence/speckle_noise"][..., 0], noise=True))


def test_difficulties_2_and_3_as_imagenet_p_test_py_computes_them():
    """Noise perturbations: their own difficulty-d videos against frame 0; the others: frame stride d."""
    seqs = {f"sequence/{p}": videos(6, 41 if p == "translate" else 31, 2, i)
            for i, p in enumerate(SEQUENCE_PERTURBATIONS)}
    for d in (2, 3):
        for p in ("gaussian_noise", "shot_noise"):
            seqs[f"sequence/{p}_{d}"] = videos(6, 31, 1, 10 * d + len(p))
    s = summarize(seqs)["sequence"]
    assert set(s["difficulty"]) == {"2", "3"}
    for d in (2, 3):
        level = s["difficulty"][str(d)]
        assert set(level["fp"]) == set(SEQUENCE_PERTURBATIONS)
        for p in SEQUENCE_PERTURBATIONS:
            noise = "noise" in p
            top5 = seqs[f"sequence/{p}_{d}"] if noise else seqs[f"sequence/{p}"]
            assert level["fp"][p] == pytest.approx(
                metrics.flip_probability(top5[..., 0], noise=noise, difficulty=1 if noise else d))
            assert level["t5d"][p] == pytest.approx(
                metrics.top5_distance(top5, noise=noise, difficulty=1 if noise else d))
        assert level["mfp"] == pytest.approx(np.mean(list(level["fp"].values())))
    # stride 2 on videos that flip at even frames only: every pair (t, t+2) of even t may differ
    assert s["difficulty"]["2"]["fp"]["rotate"] != s["fp"]["rotate"]


class FakeStore:
    def __init__(self, outcomes: dict):
        self.outcomes = outcomes

    def attack_outcome(self, job_id):
        return self.outcomes.get(job_id)


def outcomes_for(attacks: list[str], budget: str, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {f"{a}/{budget}": np.where(rng.random(n) < 0.3, FOOLED, ROBUST).astype(np.int8) for a in attacks}


def test_wcar_covers_exactly_the_papers_five_attacks():
    paper = ["fgsm-linf", "pgd-l1", "pgd-l2", "pgd-linf", "autoattack-linf"]
    n = 64
    outcomes = {**outcomes_for(paper, "small", n, 1), **outcomes_for(paper, "large", n, 2)}
    records = {j: {"eps": 0.1, "norm": "linf", "params": {}} for j in outcomes}
    correct = np.ones(n, dtype=bool)
    before = attack_summary(FakeStore(outcomes), records, np.arange(n), correct)
    expected = 1 - np.mean(np.logical_or.reduce([outcomes[f"{a}/small"] == FOOLED for a in paper]))
    assert before["wcar"]["small"] == pytest.approx(expected)
    assert before["wcar_basis"]["small"] == {"attacks": sorted(paper), "n": n, "missing": []}
    assert "wcar_extra" not in before
    extra = {**outcomes, **outcomes_for(["slide-l1", "apgd-l1", "square-linf"], "small", n, 3),
             "transfer-pgd-linf/small": np.full(n, FOOLED, dtype=np.int8)}
    records = {j: {"eps": 0.1, "norm": "linf", "params": {}, "transfer": j.startswith("transfer-")} for j in extra}
    after = attack_summary(FakeStore(extra), records, np.arange(n), correct)
    assert after["wcar"] == before["wcar"] and after["wcar_basis"] == before["wcar_basis"]
    assert after["wcar_extra_basis"]["small"] == {"attacks": sorted(paper + ["slide-l1", "apgd-l1", "square-linf"]),
                                                  "n": n}
    assert after["wcar_extra"]["small"] <= after["wcar"]["small"]  # a worst case over more attacks
    assert "large" not in after["wcar_extra"]  # no extra attack ran at that budget
    # with only some of the paper's attacks, WCAR says which are missing
    some = {j: o for j, o in outcomes.items() if j.split("/")[0] in ("fgsm-linf", "pgd-linf")}
    partial = attack_summary(FakeStore(some), {j: records[j] for j in some}, np.arange(n), correct)
    assert partial["wcar_basis"]["small"]["missing"] == ["pgd-l1", "pgd-l2", "autoattack-linf"]


def test_wcar_is_computed_on_the_rows_every_attack_ran_on():
    n = 10
    a = np.array([FOOLED, ROBUST] * 5, dtype=np.int8)
    b = np.full(n, NOT_RUN, dtype=np.int8)
    b[::2] = ROBUST  # ran on even rows only, where a fooled everything
    records = {"fgsm-linf/small": {"eps": 0.1, "norm": "linf", "params": {}},
               "pgd-linf/small": {"eps": 0.1, "norm": "linf", "params": {}}}
    out = attack_summary(FakeStore({"fgsm-linf/small": a, "pgd-linf/small": b}), records, np.arange(n),
                         np.ones(n, dtype=bool))
    assert out["wcar"]["small"] == 0.0 and out["wcar_basis"]["small"]["n"] == 5


# --- comparability: how the corpus was made, how much of the benchmark it covers ---------------

def natural_predictions(drop: str | None = None, n: int = 200) -> dict:
    out = {"clean/onecrop": top5_with_accuracy(70, n), **benchmark_natural(n)}
    out.pop(drop, None)
    return out


IMPORTED = {"imported_from": {"kind": "imagenet-c", "root": "ImageNet-C", "classes": None},
            "geometry": {"resize": None, "crop": 224}}


def test_mce_is_comparable_only_on_an_imported_release():
    imported = summarize(natural_predictions(), **IMPORTED)
    generated = summarize(natural_predictions())
    assert imported["natural"]["mce"] == generated["natural"]["mce"] is not None  # the same arithmetic...
    basis = imported["natural"]["mce_basis"]
    assert basis == imported["comparability"]["mce"] and basis["comparable"]  # ...on another basis
    assert "released ImageNet-C files" in basis["note"]
    basis = generated["natural"]["mce_basis"]
    assert not basis["comparable"] and "imagecorruptions" in basis["note"] and "elastic_transform" in basis["note"]
    prov = generated["corpus"]["provenance"]
    assert prov["made_by"] == "generate" and prov["natural_encoding"] == "jpg q85"
    assert imported["corpus"]["provenance"]["made_by"] == "import"
    assert imported["corpus"]["provenance"]["natural_encoding"] == "as released (JPEG)"
    png = summarize(natural_predictions(), suite={"name": "t", "spec": {"natural": {"encoding": "png"}}})
    assert "without the release's JPEG q85 step" in png["natural"]["mce_basis"]["note"]
    assert not png["comparability"]["natural"]["comparable"]  # mNR on PNG variants: not the release's inputs
    assert generated["comparability"]["natural"]["comparable"]  # complete, 224 px, 1000 classes, JPEG q85


def test_a_partial_family_is_flagged_not_comparable():
    partial = summarize(natural_predictions(drop="natural/fog-3"))
    family = partial["corpus"]["provenance"]["families"]["natural"]
    assert family == {"complete": False, "scored": 74, "of": 75, "missing": ["natural/fog-3"], "extra": 0}
    assert not partial["comparability"]["natural"]["comparable"]
    assert "only 74 of 75" in partial["comparability"]["natural"]["note"]
    assert partial["natural"]["mce"] is None and "no mCE" in partial["natural"]["mce_basis"]["note"]
    small = summarize(natural_predictions(), classes=12, geometry={"resize": 72, "crop": 64})
    assert not small["comparability"]["natural"]["comparable"]
    assert "64 px crops, not 224" in small["comparability"]["natural"]["note"]
    assert "12 classes, not ImageNet's 1000" in small["comparability"]["clean"]["note"]


def test_lossless_sequences_are_not_comparable_with_imagenet_p():
    seqs = {f"sequence/{p}": videos(4, 41 if p == "translate" else 31, 2, i)
            for i, p in enumerate(SEQUENCE_PERTURBATIONS)}
    reference = summarize(seqs)
    assert reference["comparability"]["sequence"]["comparable"]
    lossless = summarize(seqs, suite={"name": "t", "spec": {"sequence": {"encoding": "lossless"}}})
    assert not lossless["comparability"]["sequence"]["comparable"]
    assert "lossless videos, not the reference H.264 recipe" in lossless["comparability"]["sequence"]["note"]


def test_attacks_are_on_the_papers_basis_only_with_its_five_at_their_settings():
    from qrobust.score.attacks import ATTACKS, resolved_params
    from qrobust.score.comparability import PAPER_ATTACKS

    n = 50

    def adversarial(changed: dict | None = None, attacks=PAPER_ATTACKS) -> dict:
        outcomes = outcomes_for(list(attacks), "small", n, 5)
        records = {f"{a}/small": {"eps": ATTACKS.get(a).budgets["small"], "norm": ATTACKS.get(a).norm,
                                  "params": {**resolved_params(a, None, 1000), **(changed or {}).get(a, {})}}
                   for a in attacks}
        return attack_summary(FakeStore(outcomes), records, np.arange(n), np.ones(n, dtype=bool))

    clean = {"clean/onecrop": top5_with_accuracy(100, n)}
    paper = summarize(clean, adversarial=adversarial())
    assert paper["comparability"]["attacks"]["comparable"] and paper["comparability"]["wcar"]["small"]["comparable"]
    steps = summarize(clean, adversarial=adversarial({"pgd-linf": {"steps": 50}}))
    assert not steps["comparability"]["attacks"]["comparable"]
    assert "pgd-linf steps 50, not 20" in steps["comparability"]["attacks"]["note"]
    assert not steps["comparability"]["wcar"]["small"]["comparable"]
    four = summarize(clean, adversarial=adversarial(attacks=PAPER_ATTACKS[:4]))
    assert "autoattack-linf not run" in four["comparability"]["wcar"]["small"]["note"]
    extra = summarize(clean, adversarial=adversarial(attacks=(*PAPER_ATTACKS, "slide-l1")))
    assert extra["comparability"]["attacks"]["comparable"]  # an extra attack does not change the five's basis
    assert "extra slide-l1, not in WCAR" in extra["comparability"]["attacks"]["note"]
