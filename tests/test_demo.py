"""`qrobust demo --quick` end to end: data, training and QAT, corpus, scoring with attacks, report."""
from __future__ import annotations

import json
import re

import pytest

from qrobust.cli import main


@pytest.mark.slow
def test_quick_demo_end_to_end_and_rerun_reuses_everything(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    index = out / "report" / "index.html"
    assert f"report: {index}" in printed and index.is_file()
    models = sorted(p.stem for p in (out / "models").glob("*.safetensors"))
    assert models == ["tiny_cnn", "tiny_cnn-dorefa-w4a4", "tiny_cnn-lsq-w4a4", "tiny_cnn-pact-w4a4"]
    for name in models:  # every model scored on every variant and attacked at the three budgets
        summary = json.loads((out / "results" / name / "summary.json").read_text())
        assert summary["model"]["name"] == name and summary["clean"]["acc"] is not None
        assert summary["natural"]["mnr"] is not None and summary["sequence"]["mfp"] is not None
        assert summary["systematic"]["sr"] is not None
        assert set(summary["attacks"]) == {"fgsm-linf", "pgd-linf", "pgd-l2", "pgd-l1", "autoattack-linf"}
        assert set(summary["wcar"]) == {"small", "middle", "large"}
        assert summary["attacks"]["autoattack-linf"]["small"]["n"] == 6
        assert summary["attacks"]["pgd-l2"]["large"]["eps"] == pytest.approx(8.0 * 64 / 224)
    assert re.search(r"^tiny_cnn-lsq-w4a4 +\d", printed, re.M)  # the terminal table has every model
    assert "not converged (clean accuracy below 10%, NC in the report): " in printed
    tables = (out / "report" / "tables" / "wcar.md").read_text()
    assert "LSQ" in tables or "lsq" in tables
    html = index.read_text()
    assert "Worst-case adversarial robustness" in html and "<img" in html
    stamp = {p: p.stat().st_mtime_ns for p in (out / "models").glob("*.safetensors")}
    stamp.update({p: p.stat().st_mtime_ns for p in (out / "results").glob("*/summary.json")})
    progress = {p: p.read_text() for p in (out / "results").glob("*/progress.json")}
    assert main(["-q", "demo", "--out", str(out), "--quick"]) == 0  # second run: nothing rebuilt or rescored
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items() if p.suffix == ".safetensors")
    assert {p: p.read_text() for p in progress} == progress
