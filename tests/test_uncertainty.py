"""Intervals and paired comparisons from per-sample columns: the same formulas as the summary, intervals that
cover the truth as often as they claim, pairing that pays, McNemar by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from qrobust.score import uncertainty as u
from qrobust.score.adversarial import FOOLED, ROBUST
from qrobust.shared.noises import BENCHMARK_CORRUPTIONS, SEQUENCE_PERTURBATIONS
from test_summary import FakeStore, manifest_of, summarize, videos


def rich_predictions(n: int, seed: int) -> dict:
    """Every family, with per-sample right/wrong drawn at varied accuracies, 1000 classes (mCE on)."""
    rng = np.random.default_rng(seed)

    def top5(p):
        t = np.tile(np.arange(1, 6, dtype=np.int32), (n, 1))
        t[rng.random(n) < p, 0] = 0
        return t

    preds = {"clean/onecrop": top5(0.8), "clean/square": top5(0.78)}
    preds.update({f"natural/{c}-{s}": top5(0.7 - 0.1 * s) for c in BENCHMARK_CORRUPTIONS for s in range(1, 6)})
    preds.update({f"natural/spatter-{s}": top5(0.6) for s in range(1, 6)})
    preds.update({f"systematic/{v}": top5(0.75 + 0.01 * i) for i, v in enumerate(
        ["decode-pil", "decode-opencv", "resize-pil-nearest", "resize-opencv-area"])})
    preds.update({f"sequence/{p}": videos(n, 41 if p == "translate" else 31, 2, i)
                  for i, p in enumerate(SEQUENCE_PERTURBATIONS)})
    preds["sequence/shear"] = videos(n, 31, 3, 99)
    return preds


def attacked(n: int, rows: np.ndarray, seed: int, clean_correct: np.ndarray) -> dict:
    """An ``adversarial`` entry of compute_summary, with two budgets, an extra attack and a subset of rows."""
    from qrobust.score.summary import attack_summary

    rng = np.random.default_rng(seed)
    outcomes = {f"{a}/{b}": np.where(rng.random(len(rows)) < 0.4, FOOLED, ROBUST).astype(np.int8)
                for a in ("fgsm-linf", "pgd-linf", "slide-l1") for b in ("small", "large")}
    records = {j: {"eps": 0.1, "norm": "linf", "params": {}} for j in outcomes}
    return attack_summary(FakeStore(outcomes), records, rows, clean_correct[rows]), outcomes


def columns_of(summary: dict, predictions: dict, labels, outcomes=None, rows=None):
    attacks = None
    if outcomes is not None:
        attacks = {"rows": rows, "outcomes": outcomes,
                   **{k: {b: [f"{a}/{b}" for a in basis["attacks"]] for b, basis in summary[f"{k}_basis"].items()}
                      for k in ("wcar", "wcar_extra")}}
    variants = manifest_of(predictions)["variants"]
    return u.sample_columns(predictions, labels, variants, summary, attacks)


def flatten(tree, prefix=""):
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flatten(value, path + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield path, float(value)


def test_the_headline_formulas_are_the_summarys():
    n = 120
    preds = rich_predictions(n, 0)
    rows = np.arange(0, n, 2)
    adversarial, outcomes = attacked(n, rows, 1, preds["clean/onecrop"][:, 0] == 0)
    s = summarize(preds, adversarial=adversarial)
    names, x = columns_of(s, preds, np.zeros(n, np.int32), outcomes, rows)
    point = u.point(s, names, x)
    summary_values = dict(flatten({k: s[k] for k in ("clean", "natural", "sequence", "systematic", "attacks", "wcar",
                                                     "wcar_extra")}))
    assert len(point) > 150
    for path, value in point.items():
        assert value == pytest.approx(summary_values[path], abs=1e-6), path  # columns are float32
    # every number the tables show has an interval
    for path in ("clean.acc", "natural.mnr", "natural.nci", "natural.mce", "natural.relative_mce", "sequence.mfp",
                 "sequence.mt5d", "sequence.extra.mfp", "systematic.mean", "systematic.sr", "systematic.sni",
                 "attacks.pgd-linf.small.ar", "attacks.pgd-linf.small.aai", "wcar.small", "wcar_extra.large",
                 "natural.extra.mnr"):
        assert path in point, path


def test_intervals_cover_the_truth_as_often_as_they_claim():
    """Simulated models of known accuracy: the 95% intervals of ACC and of a mean over correlated variants
    cover the truth in about 95% of seeded trials (200 trials: 0.90-0.99 allows for the trials' own noise)."""
    n, trials, truth = 300, 200, 0.7
    covered_acc = covered_mean = 0
    for trial in range(trials):
        rng = np.random.default_rng(1000 + trial)
        ability = rng.random(n)  # a sample's difficulty, shared by its variants: correlated columns
        right = np.stack([ability < truth + d for d in (-0.1, 0.0, 0.1)], axis=1).astype(np.float32)
        draws = u.resample_means(right, resamples=400, seed=trial)
        low, high = u.percentile_interval(draws[:, 1])
        covered_acc += low <= truth <= high
        low, high = u.percentile_interval(draws.mean(axis=1))
        covered_mean += low <= truth <= high
    assert 0.90 <= covered_acc / trials <= 0.99
    assert 0.90 <= covered_mean / trials <= 0.99


def test_paired_intervals_are_narrower_than_unpaired_ones_for_correlated_models():
    n = 1000
    rng = np.random.default_rng(5)
    a = (rng.random(n) < 0.7).astype(np.float32)
    b = a.copy()
    flip = rng.random(n) < 0.05  # the second model agrees with the first on 95% of the images
    b[flip] = 1 - b[flip]
    paired = u.resample_means(np.stack([a, b], 1), 1000, seed=1)
    width_paired = np.subtract(*reversed(u.percentile_interval(paired[:, 0] - paired[:, 1])))
    unpaired = u.resample_means(a[:, None], 1000, seed=1)[:, 0] - u.resample_means(b[:, None], 1000, seed=2)[:, 0]
    width_unpaired = np.subtract(*reversed(u.percentile_interval(unpaired)))
    assert width_paired < width_unpaired / 2  # about 0.03 against 0.08


def test_compare_is_paired_and_refuses_other_sample_sets():
    n = 400
    preds = rich_predictions(n, 3)
    worse = dict(preds)
    worse["clean/onecrop"] = preds["clean/onecrop"].copy()
    right = np.flatnonzero(worse["clean/onecrop"][:, 0] == 0)
    worse["clean/onecrop"][right[:60], 0] = 9  # 60 of its right answers become wrong: a real drop of 15 points
    labels = np.zeros(n, np.int32)
    sa, sb = summarize(preds), summarize(worse)
    a, b = ((s, *columns_of(s, p, labels)) for s, p in ((sa, preds), (sb, worse)))
    out = u.compare(a, b, ["clean.acc", "natural.mnr"])
    assert out["clean.acc"]["difference"] == pytest.approx(60 / n) and out["clean.acc"]["significant"]
    assert out["natural.mnr"] == {"difference": 0.0, "low": 0.0, "high": 0.0, "significant": False}
    short = (sb, b[1], b[2][:-1])
    with pytest.raises(ValueError, match="not paired"):
        u.compare(a, short, ["clean.acc"])


def test_mcnemar_by_hand():
    a = np.array([1, 1, 1, 1, 1, 1, 0, 1, 0, np.nan])
    b = np.array([0, 0, 0, 0, 0, 1, 1, 1, 0, 1])
    out = u.mcnemar(a, b)  # only a: 5, only b: 1 (the NaN row is left out)
    assert (out["only_a"], out["only_b"]) == (5, 1)
    assert out["p"] == pytest.approx(2 * (math.comb(6, 0) + math.comb(6, 1)) / 2 ** 6)  # 0.21875
    assert u.mcnemar(np.ones(4), np.ones(4))["p"] == 1.0


def test_required_samples_by_hand():
    d = np.array([1.0, -1.0] * 50)  # sd = sqrt(100 / 99)
    z = 1.959963984540054 + 0.8416212335729143
    assert u.required_samples(d, 0.1) == math.ceil((z * math.sqrt(100 / 99) / 0.1) ** 2)
    assert u.required_samples(np.zeros(10), 0.1) is None


def test_bootstrap_counts_draw_n_rows_per_resample():
    counts = u.bootstrap_counts(50, 7, np.random.default_rng(0))
    assert counts.shape == (7, 50) and (counts.sum(axis=1) == 50).all()
    again = u.bootstrap_counts(50, 7, np.random.default_rng(0))
    assert np.array_equal(counts, again)  # seeded


def write_model(folder, name: str, quant, preds: dict, manifest_sha: str = "ab" * 32) -> None:
    """A results folder as `qrobust score` leaves it: summary.json (with intervals) and the per-sample columns."""
    import json

    import zarr

    n = len(preds["clean/onecrop"])
    labels = np.zeros(n, np.int32)
    s = summarize(preds)
    names, x = columns_of(s, preds, labels)
    s["intervals"] = u.intervals(s, names, x, resamples=300)
    s["model"] = {"name": name, "arch": "resnet18", "sha256": "0" * 64,
                  "quant": quant and {"method": quant[0], "w_bits": quant[1], "a_bits": quant[1]}}
    s["corpus"].update(suite="test", manifest_sha256=manifest_sha)
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(s))
    from qrobust.score.results import SAMPLES

    array = zarr.open_group(str(folder / "predictions.zarr"), mode="w").create_array(
        SAMPLES, shape=x.shape, dtype="float32")
    array[...] = x
    array.attrs["columns"] = names


def test_findings_claim_only_significant_differences(tmp_path):
    """A model that differs from FP by noise is 'not significant'; one with a planted drop is 'less robust'; the
    tables mark only the planted one, and the comparisons table lists both with McNemar p."""
    from qrobust.score.report import build_report

    n = 600
    rng = np.random.default_rng(7)
    fp = rich_predictions(n, 11)
    noise, drop = {}, {}
    for vid, top5 in fp.items():
        noisy, dropped = top5.copy(), top5.copy()
        if top5.ndim == 2:  # 1% of the images change their answer, as many each way: no difference but noise
            right, wrong = np.flatnonzero(top5[:, 0] == 0), np.flatnonzero(top5[:, 0] != 0)
            k = min(n // 100, len(right), len(wrong))
            noisy[rng.choice(right, k, replace=False), 0] = 7
            noisy[rng.choice(wrong, k, replace=False), 0] = 0
            if vid.startswith("natural/"):
                right = np.flatnonzero(top5[:, 0] == 0)
                dropped[right[: len(right) // 4], 0] = 7  # a quarter of the right answers lost: a real drop
        noise[vid], drop[vid] = noisy, dropped
    folders = [tmp_path / name for name in ("fp", "lsq4", "dorefa4")]
    write_model(folders[0], "r18-fp", None, fp)
    write_model(folders[1], "r18-lsq4", ("lsq", 4), noise)
    write_model(folders[2], "r18-dorefa4", ("dorefa", 4), drop)
    out = build_report(folders, tmp_path / "report").parent
    findings = (out / "findings.txt").read_text()
    assert ("mNR as bits grow: " in findings and "of 2 quantized models compared with their FP model (paired 95% "
            "intervals), 1 are less robust, 0 more robust, and 1 differences are not significant") in findings
    natural = (out / "tables" / "natural.md").read_text()
    marked = [line for line in natural.splitlines() if line.startswith("|") and "†" in line]
    assert len(marked) == 1 and "DoReFa" in marked[0] and "paired 95% interval excludes 0" in natural
    import csv

    rows = list(csv.DictReader(open(out / "tables" / "comparisons.csv")))
    mnr = {(r["Model"], r["Compared with"]): r for r in rows if r["Metric"] == "natural.mnr"}
    assert mnr[("r18-dorefa4", "r18-fp")]["Significant"] == "yes"
    assert mnr[("r18-lsq4", "r18-fp")]["Significant"] == "no"
    assert float(mnr[("r18-dorefa4", "r18-fp")]["95% high"]) < 0
    acc = {(r["Model"], r["Compared with"]): r for r in rows if r["Metric"] == "clean.acc"}
    assert 0 <= float(acc[("r18-lsq4", "r18-fp")]["McNemar p"]) <= 1  # right/wrong per image: McNemar applies
    assert ("r18-dorefa4", "r18-lsq4") in mnr or ("r18-lsq4", "r18-dorefa4") in mnr  # methods at equal bits
    assert "a corpus needs about" in findings  # the sample-size line
