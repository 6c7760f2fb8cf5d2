"""qrobust.score.report: tables, figures and index.html from synthetic summary.json files."""
from __future__ import annotations

import copy
import csv
import json
import re

import pytest

from qrobust.score.report import ReportError, build_report

TABLES = ["clean", "wcar", "attack-pgd-linf", "attack-fgsm-linf", "natural", "corruptions",
          "sequences", "sequence-fp", "systematic", "systematic-variants"]

# name: arch, quant, ACC, mNR, NCI, mFP (None: no sequence data), mean ACC_s, SNI, SR, WCAR small, PGD AR, PGD AAI
MODELS = {
    "r18-fp": ("resnet18", None, .7106, .3278, .5387, .098, .7031, .0106, .0053, .0130, .1396, .8035),
    "r18-dorefa2": ("resnet18", ("dorefa", 2), .6231, .2330, .6261, .283, .5951, .0449, .0232, .0555, .2661, .5729),
    "r18-dorefa4": ("resnet18", ("dorefa", 4), .7060, .3088, .5626, .152, .6867, .0273, .0183, .0286, .1939, .7254),
    "r18-lsq4": ("resnet18", ("lsq", 4), .7052, .3095, .5611, None, .6847, .0291, .0190, .0178, .2127, .6984),
    "r18-pact2": ("resnet18", ("pact", 2), .0261, .0100, .6000, .500, .0200, .2000, .0100, .0, .0, 1.0),
    "r50-fp": ("resnet50", None, .7663, .4037, .4732, .072, .7608, .0072, .0049, .0301, .2528, .6701),
}
CORRUPTIONS = {"impulse_noise": .6, "glass_blur": .7, "brightness": 1.7}  # x mNR: impulse is the most harmful
SEQUENCES = {"shot_noise": 1.5, "rotate": .5}                            # x mFP: shot is the most harmful
SYSTEMATIC = {"decode-pil": .005, "resize-pil-nearest": -.01, "resize-opencv-area": .005}  # + mean

# table -> CSV header -> path into summary.json (percent, 2 decimals) or (path, scale, digits)
EXPECTED = {
    "clean": {"ACC": ("clean", "acc")},
    "wcar": {f"WCAR {b}": ("wcar", b) for b in ("small", "middle", "large")},
    "attack-pgd-linf": {f"{w} {b}": ("attacks", "pgd-linf", b, w.lower()) for w in ("AR", "AAI")
                        for b in ("small", "middle")},
    "attack-fgsm-linf": {"AR small": ("attacks", "fgsm-linf", "small", "ar"),
                         "AAI small": ("attacks", "fgsm-linf", "small", "aai")},
    "natural": {"mNR": ("natural", "mnr"), "NCI": ("natural", "nci")},
    "corruptions": {"ACC": ("clean", "acc"), "Impulse": ("natural", "acc_by_corruption", "impulse_noise"),
                    "Glass": ("natural", "acc_by_corruption", "glass_blur"),
                    "Bright": ("natural", "acc_by_corruption", "brightness"), "mNR": ("natural", "mnr")},
    "sequences": {"mFP": (("sequence", "mfp"), 1, 3), "mT5D": (("sequence", "mt5d"), 1, 2)},
    "sequence-fp": {"Shot": (("sequence", "fp", "shot_noise"), 1, 3), "Rotate": (("sequence", "fp", "rotate"), 1, 3),
                    "mFP": (("sequence", "mfp"), 1, 3)},
    "systematic": {"Mean ACC_s": ("systematic", "mean"), "SNI": ("systematic", "sni"), "SR": ("systematic", "sr")},
    "systematic-variants": {"Decode PIL": ("systematic", "acc", "decode-pil"),
                            "PIL nearest": ("systematic", "acc", "resize-pil-nearest"),
                            "OpenCV area": ("systematic", "acc", "resize-opencv-area"),
                            "Mean ACC_s": ("systematic", "mean")},
}
ROW = {("ResNet18", "FP", "32"): "r18-fp", ("ResNet18", "DoReFa", "2"): "r18-dorefa2",
       ("ResNet18", "DoReFa", "4"): "r18-dorefa4", ("ResNet18", "LSQ", "4"): "r18-lsq4",
       ("ResNet18", "PACT", "2"): "r18-pact2", ("ResNet50", "FP", "32"): "r50-fp"}


def make_summary(name: str, sha: str = "c0ffee" * 10) -> dict:
    arch, quant, acc, mnr, nci, mfp, mean_s, sni, sr, wcar, ar, aai = MODELS[name]
    return {
        "schema": "qrobust.summary/2",
        "model": {"name": name, "arch": arch, "sha256": "0" * 64,
                  "quant": quant and {"method": quant[0], "w_bits": quant[1], "a_bits": quant[1]}},
        "corpus": {"suite": "demo", "manifest_sha256": sha, "samples": 72},
        "env": {"qrobust": "0.1.0", "torch": "2.14.1", "device": "cpu", "batch_size": 64, "seed": 0},
        "clean": {"acc": acc, "acc_square": acc - .001},
        "natural": {"acc": {f"{c}-{s}": mnr * k for c, k in CORRUPTIONS.items() for s in (1, 2)},
                    "acc_by_corruption": {c: mnr * k for c, k in CORRUPTIONS.items()},
                    "mnr": mnr, "nci": nci, "mce": None, "relative_mce": None},
        "sequence": mfp and {"fp": {s: mfp * k for s, k in SEQUENCES.items()}, "mfp": mfp,
                             "t5d": {s: 10 * mfp * k for s, k in SEQUENCES.items()}, "mt5d": 10 * mfp},
        "systematic": {"acc": {v: mean_s + d for v, d in SYSTEMATIC.items()}, "mean": mean_s, "sni": sni, "sr": sr},
        "attacks": {"pgd-linf": {"small": {"eps": 0.5 / 255, "ar": ar, "aai": aai, "n": 72},
                                 "middle": {"eps": 2 / 255, "ar": ar / 4, "aai": (aai + 1) / 2, "n": 72}},
                    "fgsm-linf": {"small": {"eps": 0.5 / 255, "ar": ar * 1.5, "aai": aai * .8, "n": 72}}},
        "wcar": {"small": wcar, "middle": wcar / 10, "large": 0.0},
        "checks": {"gradient_masking": [], "warnings": []},
    }


def write_results(root, summaries: dict) -> list:
    folders = []
    for name, summary in summaries.items():
        (root / name).mkdir(parents=True)
        (root / name / "summary.json").write_text(json.dumps(summary))
        folders.append(root / name)
    return folders


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    index = build_report(write_results(root / "results", {n: make_summary(n) for n in MODELS}), root / "out")
    return index.parent


def read_csv(out, table) -> list[dict]:
    with open(out / "tables" / f"{table}.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_markdown(out, table) -> list[dict]:
    """Markdown rows as dicts; the architecture, printed on a group's first row only, filled in."""
    lines = [line for line in (out / "tables" / f"{table}.md").read_text().splitlines() if line.startswith("|")]
    split = lambda line: [c.strip() for c in line.strip("|").split("|")]
    head, rows, arch = [re.sub(r" [↑↓]$", "", h) for h in split(lines[0])], [], ""
    for line in lines[2:]:
        row = dict(zip(head, split(line)))
        arch = row["Model"] = row["Model"] or arch
        rows.append(row)
    return rows


def expected(name: str, spec) -> str:
    path, scale, digits = spec if isinstance(spec[0], tuple) else (spec, 100, 2)
    value = make_summary(name)
    for key in path:
        value = value[key]
    return f"{value * scale:.{digits}f}"


def test_every_file_is_written(report):
    assert (report / "index.html").is_file()
    for table in TABLES:
        for ext in ("md", "csv", "tex"):
            assert (report / "tables" / f"{table}.{ext}").stat().st_size > 0, (table, ext)
        for ext in ("png", "svg"):
            assert (report / "figures" / f"{table}.{ext}").stat().st_size > 1000, (table, ext)
    assert (report / "figures" / "clean.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (report / "figures" / "clean.svg").read_text()


@pytest.mark.parametrize("table", TABLES)
def test_csv_and_markdown_values_equal_the_summaries(report, table):
    rows, md = read_csv(report, table), read_markdown(report, table)
    with_data = {n for n in MODELS if table not in ("sequences", "sequence-fp") or n != "r18-lsq4"}
    assert {ROW[r["Model"], r["Method"], r["Bits"]] for r in rows} == with_data  # no sequence data: no row
    spec = EXPECTED[table]
    for row, md_row in zip(rows, md):
        name = ROW[row["Model"], row["Method"], row["Bits"]]
        assert row.pop("NC") == ("yes" if name == "r18-pact2" else "")  # the CSV keeps an NC model's numbers
        for header, path in spec.items():
            assert float(row[header]) == pytest.approx(float(expected(name, path)), abs=1e-9), (header, name)
        if name == "r18-pact2":  # the display tables show NC in place of every number
            assert {v for k, v in md_row.items() if k not in ("Model", "Method", "Bits")} == {"NC"}
        else:
            assert {k: v.strip("*") for k, v in md_row.items()} == {k: v or "–" for k, v in row.items()}
    assert not any(k in rows[0] for k in ("mCE*", "Relative mCE*"))  # null in every summary: no column


def test_not_converged_models_show_nc(report):
    clean = {ROW[r["Model"], r["Method"], r["Bits"]]: r["ACC"] for r in read_csv(report, "clean")}
    assert clean["r18-pact2"] == "2.61" and clean["r18-fp"] == "71.06"  # CSV: the number, and the NC column
    assert [r["NC"] for r in read_csv(report, "clean") if r["ACC"] == "2.61"] == ["yes"]
    assert "|  | PACT | 2 | NC |" in (report / "tables" / "clean.md").read_text()
    assert "r18-pact2 (2.61%)" in (report / "index.html").read_text()


def bold_rows(out, table, column) -> set[str]:
    return {ROW[r["Model"], r["Method"], r["Bits"]] for r in read_markdown(out, table)
            if r[column].startswith("**")}


def test_best_entry_per_architecture_is_bold(report):
    assert bold_rows(report, "natural", "mNR") == {"r18-fp"}                # higher is better
    assert bold_rows(report, "natural", "NCI") == {"r18-fp"}                # lower is better
    assert bold_rows(report, "attack-pgd-linf", "AAI small") == {"r18-dorefa2"}  # lower is better
    assert bold_rows(report, "attack-pgd-linf", "AR small") == {"r18-dorefa2"}
    assert bold_rows(report, "wcar", "WCAR small") == {"r18-dorefa2"}
    assert bold_rows(report, "systematic", "SR") == {"r18-fp"}              # ResNet50 alone: nothing bold
    tex = (report / "tables" / "natural.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and "\\textbf{32.78}" in tex and "\\textbf{40.37}" not in tex


def test_most_harmful_variant_per_row_is_bold(report):
    for table, worst in (("corruptions", "Impulse"), ("sequence-fp", "Shot"), ("systematic-variants", "PIL nearest")):
        for row in read_markdown(report, table):
            if row["Bits"] != "2" or row["Method"] != "PACT":
                bold = [k for k, v in row.items() if v.startswith("**")]
                assert bold == [worst], (table, row)


def test_index_html_is_self_contained_and_has_every_table(report):
    page = (report / "index.html").read_text()
    assert page.count("<table>") == len(TABLES)
    for table in TABLES:
        assert f'id="{table}"' in page
    assert page.count('src="data:image/png;base64,') == len(TABLES)
    assert not re.search(r'(src|href)="(?!data:|#)', page) and "<link" not in page and "<script" not in page
    assert "Most harmful corruption on average: Impulse" in page
    assert "mNR as bits grow: rises in 1 of 1 series (ResNet18 DoReFa); 3 of 3 quantized models are less" in page


def test_tables_without_data_are_skipped(tmp_path):
    lone = make_summary("r18-lsq4")
    lone["attacks"], lone["wcar"], lone["systematic"] = {}, {}, None
    lone["clean"]["acc"] = None  # clean/onecrop not scored: reported, not NC
    lone["model"]["quant"] = {"method": "lsq", "w_bits": 4, "a_bits": 8}
    index = build_report(write_results(tmp_path, {"lsq": lone}), tmp_path / "out")
    written = sorted(p.stem for p in (index.parent / "tables").glob("*.csv"))
    assert written == ["corruptions", "natural"]  # no clean accuracy: no Table 1
    assert index.read_text().count("<table>") == 2
    natural = read_csv(index.parent, "natural")
    assert natural == [{"Model": "ResNet18", "Method": "LSQ", "Bits": "4/8", "mNR": "30.95", "NCI": "56.11", "NC": ""}]


def test_bad_inputs_are_one_line_errors(tmp_path):
    good = make_summary("r18-fp")
    other = make_summary("r18-lsq4", sha="beef" * 16)
    foreign = dict(good, schema="qrobust.summary/0")
    a, b, c = write_results(tmp_path, {"a": good, "b": other, "c": foreign})
    (tmp_path / "empty").mkdir()
    cases = [([a, b], "different corpora"), ([c], "schema 'qrobust.summary/0'"),
             ([tmp_path / "empty"], "no summary.json"), ([], "no results")]
    for folders, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            build_report(folders, tmp_path / "out")
        assert isinstance(error.value, ReportError) and "\n" not in str(error.value)
    broken = copy.deepcopy(good)
    del broken["model"]["arch"]
    with pytest.raises(ReportError, match="model.arch is missing"):
        build_report(write_results(tmp_path / "x", {"d": broken}), tmp_path / "out")


def test_summaries_of_schema_1_are_read_with_what_changed_recomputed(tmp_path):
    """qrobust 0.1 wrote schema 1: SNI against the square crop, held-out corruptions in mNR, a sparse L1 attack
    as pgd-l1 inside WCAR. The report reads it with SNI and mNR recomputed and that WCAR set apart."""
    old = make_summary("r18-fp")
    old["schema"] = "qrobust.summary/1"
    old["systematic"]["sni"] = -0.0014  # what schema 1 printed: relative to the square crop
    old["natural"]["acc_by_corruption"]["spatter"] = 0.9  # a held-out corruption, averaged in by schema 1
    old["natural"]["mnr"] = 0.5
    old["sequence"]["fp"]["gaussian_noise_2"] = 0.3  # difficulty 2, averaged in by schema 1
    old["sequence"]["t5d"]["gaussian_noise_2"] = 3.0
    old["attacks"]["pgd-l1"] = {"small": {"eps": 100.0, "norm": "l1", "ar": 0.5, "aai": 0.3, "n": 72}}
    index = build_report(write_results(tmp_path, {"old": old}), tmp_path / "out")
    out = index.parent
    systematic = read_csv(out, "systematic")[0]
    assert float(systematic["SNI"]) == pytest.approx(100 * (0.7106 - 0.7031) / 0.7106, abs=0.006)  # 1.06, not -0.14
    natural = read_csv(out, "natural")[0]
    corruptions = make_summary("r18-fp")["natural"]["acc_by_corruption"]
    assert float(natural["mNR"]) == pytest.approx(100 * sum(corruptions.values()) / len(corruptions), abs=0.006)
    assert float(natural["mNR extra"]) == pytest.approx(90.0)
    sequences = read_csv(out, "sequences")[0]
    assert float(sequences["mFP"]) == pytest.approx(0.098 * (1.5 + .5) / 2, abs=6e-4) and "mFP d=2" in sequences
    assert (out / "tables" / "attack-slide-l1.csv").is_file() and not (out / "tables" / "attack-pgd-l1.csv").exists()
    wcar = read_csv(out, "wcar")[0]
    assert "WCAR small" not in wcar and float(wcar["WCAR incl. extras small"]) == pytest.approx(1.30)
    page = index.read_text()
    assert "rescore for the paper&#x27;s PGD-L1 and WCAR" in page and "not recorded (results of qrobust 0.1" in page


def test_negative_numbers_stay_numbers_in_every_csv(tmp_path):
    """Names are made formula-safe with a leading ', the numbers qrobust formats are not: a negative SNI (a
    model more accurate under the systematic variants than on the reference crop) stays a number."""
    s = make_summary("r18-fp")
    s["systematic"]["sni"] = -0.0123
    out = build_report(write_results(tmp_path, {"r": s}), tmp_path / "out").parent
    assert read_csv(out, "systematic")[0]["SNI"] == "-1.23"
    with open(out / "results.csv", newline="") as f:
        sni = [r for r in csv.DictReader(f) if r["metric"] == "sni"]
    assert [float(r["value"]) for r in sni] == [-0.0123]
