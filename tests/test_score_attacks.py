"""Attacks inside `qrobust score`: outcomes stored per sample, AR/AAI/WCAR in the summary, resumption."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import fitted_checkpoint, small_corpus
from qrobust.cli import main


def run(*args) -> int:
    return main(["-q", *map(str, args)])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return small_corpus(tmp_path_factory.mktemp("attack-corpus"), "clean/*,natural/*", per_class=4, shard=4)


@pytest.fixture(scope="module")
def checkpoint(corpus, tmp_path_factory) -> Path:
    """tiny_cnn fitted to the corpus's clean images, so attacks have something to fool."""
    return fitted_checkpoint(corpus, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")  # 30 steps: fitted,
    # not saturated: 8/255 PGD fools some, 0.5/255 none


def _outcome(results: Path, job: str) -> np.ndarray:
    import zarr

    return zarr.open_group(str(results / "predictions.zarr"), mode="r")[f"attacks/{job}/outcome"][...]


def score(corpus, checkpoint, out, *extra) -> dict:
    assert run("score", "--corpus", corpus, "--model", checkpoint, "--out", out, "--workers", 0,
               "--batch-size", 5, *extra) == 0
    return json.loads((Path(out) / "summary.json").read_text())


ATTACKS = ("--attacks", "fgsm-linf,pgd-linf,pgd-l2", "--budgets", "small,large")


def test_attack_results_in_store_and_summary(corpus, checkpoint, tmp_path):
    s = score(corpus, checkpoint, tmp_path / "r", *ATTACKS)
    assert set(s["attacks"]) == {"fgsm-linf", "pgd-linf", "pgd-l2"}
    assert set(s["wcar"]) == {"small", "large"}
    acc = s["clean"]["acc"]
    assert acc > 0.5
    for attack, by_budget in s["attacks"].items():
        for budget, e in by_budget.items():
            outcome = _outcome(tmp_path / "r", f"{attack}/{budget}")
            assert set(np.unique(outcome)) <= {0, 1}
            assert e["n"] == len(outcome) == 12
            assert e["ar"] == pytest.approx((outcome == 0).mean())
            assert e["aai"] == pytest.approx((acc - e["ar"]) / acc)
            assert e["ar"] <= acc + 1e-9  # misclassified samples count as fooled
        assert by_budget["large"]["ar"] <= by_budget["small"]["ar"] + 1 / 12
    # eps are the reference budgets, L2 scaled from 3x224x224 to this corpus's 3x36x36
    assert s["attacks"]["pgd-linf"]["large"]["eps"] == pytest.approx(8 / 255)
    assert s["attacks"]["pgd-l2"]["small"]["eps"] == pytest.approx(0.5 * 36 / 224)
    for budget, wcar in s["wcar"].items():  # WCAR = AND over attacks of "not fooled"
        robust = np.logical_and.reduce([_outcome(tmp_path / "r", f"{a}/{budget}") == 0 for a in s["attacks"]])
        assert wcar == pytest.approx(robust.mean())
        assert wcar <= min(s["attacks"][a][budget]["ar"] for a in s["attacks"])
    assert s["attacks"]["pgd-linf"]["large"]["ar"] < acc  # the attack does something on a fitted model
    assert 0 <= s["checks"]["zero_grad_share"] <= 1


def test_rerun_resumes_and_changed_settings_are_refused(corpus, checkpoint, tmp_path, capsys):
    out = tmp_path / "r"
    first = score(corpus, checkpoint, out, "--attacks", "pgd-linf", "--budgets", "small")
    progress = (out / "progress.json").read_text()
    before = _outcome(out, "pgd-linf/small")
    again = score(corpus, checkpoint, out, "--attacks", "pgd-linf", "--budgets", "small")
    assert (out / "progress.json").read_text() == progress
    assert again["attacks"] == first["attacks"]
    np.testing.assert_array_equal(_outcome(out, "pgd-linf/small"), before)
    # the same attack with another setting would mix two experiments in one folder
    assert main(["-q", "score", "--corpus", str(corpus), "--model", str(checkpoint), "--out", str(out),
                 "--workers", "0", "--batch-size", "5", "--attacks", "pgd-linf", "--budgets", "small",
                 "--attack-set", "pgd-linf.steps=3"]) == 2
    assert "other settings" in capsys.readouterr().err
    # a new attack joins the folder and the summary keeps the old one
    more = score(corpus, checkpoint, out, "--attacks", "fgsm-linf", "--budgets", "small")
    assert set(more["attacks"]) == {"pgd-linf", "fgsm-linf"}


def test_interrupted_attacks_resume_batch_by_batch(corpus, checkpoint, tmp_path, monkeypatch):
    from qrobust.score import attacks as attack_pkg

    out = tmp_path / "r"
    real, calls = attack_pkg.run_attack, []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(attack_pkg, "run_attack", flaky)
    assert run("score", "--corpus", corpus, "--model", checkpoint, "--out", out, "--workers", 0, "--batch-size", 5,
               "--attacks", "pgd-linf", "--budgets", "small") == 130
    done = json.loads((out / "progress.json").read_text())
    assert sum(u.startswith("attack/") for u in done) == 1  # the first batch survived
    monkeypatch.setattr(attack_pkg, "run_attack", real)
    resumed = score(corpus, checkpoint, out, "--attacks", "pgd-linf", "--budgets", "small")
    fresh = score(corpus, checkpoint, tmp_path / "fresh", "--attacks", "pgd-linf", "--budgets", "small")
    assert resumed["attacks"] == fresh["attacks"]
    np.testing.assert_array_equal(_outcome(out, "pgd-linf/small"), _outcome(tmp_path / "fresh", "pgd-linf/small"))


def test_cascade_gives_the_same_wcar(corpus, checkpoint, tmp_path):
    full = score(corpus, checkpoint, tmp_path / "full", *ATTACKS)
    fast = score(corpus, checkpoint, tmp_path / "fast", *ATTACKS, "--cascade")
    assert fast["wcar"] == pytest.approx(full["wcar"])
    skipped = sum((_outcome(tmp_path / "fast", f"{a}/{b}") == 2).sum() for a in fast["attacks"] for b in fast["wcar"])
    assert skipped > 0  # the cascade did skip work
    assert all(e.get("cascade") and e["ar"] is None for by in fast["attacks"].values() for e in by.values()
               if e.get("cascade"))


def test_autoattack_only_attacks_samples_not_yet_fooled(corpus, checkpoint, tmp_path, monkeypatch):
    """AutoAttack (the costliest) gets only clean-correct rows, and with --cascade only those PGD left robust."""
    import qrobust.score.attacks as attacks

    handed = []
    real = attacks.run_attack

    def spy(name, model, x, y, eps, **kw):
        if name == "autoattack-linf":
            with torch.no_grad():
                handed.append(int((model(x).argmax(1) == y).sum()) - len(x))  # 0: every row correct clean
            handed.append(len(x))
        return real(name, model, x, y, eps, **kw)

    monkeypatch.setattr(attacks, "run_attack", spy)
    s = score(corpus, checkpoint, tmp_path / "r", "--attacks", "pgd-linf,autoattack-linf", "--budgets", "large",
              "--attack-set", "autoattack-linf.n_iter=5", "--cascade")
    misclassified_handed, sizes = handed[0::2], handed[1::2]
    assert misclassified_handed and all(m == 0 for m in misclassified_handed)
    correct = round(s["clean"]["acc"] * 12)
    pgd, aa = _outcome(tmp_path / "r", "pgd-linf/large"), _outcome(tmp_path / "r", "autoattack-linf/large")
    assert (pgd == 1).sum() > 12 - correct  # PGD fooled some correct rows, which AutoAttack then skipped
    assert sum(sizes) == correct - ((pgd == 1).sum() - (12 - correct)) == ((aa == 0) | (aa == 1)).sum() - (12 - correct)
    assert (aa == 2).sum() == (pgd == 1).sum() - (12 - correct)


def test_attack_limit_spreads_over_classes_and_transfer_check(corpus, checkpoint, tmp_path):
    import zarr

    s = score(corpus, checkpoint, tmp_path / "r", "--attacks", "fgsm-linf", "--budgets", "large",
              "--attack-limit", 6, "--transfer-from", checkpoint)
    rows = zarr.open_group(str(tmp_path / "r" / "predictions.zarr"), mode="r")["attacks/rows"][...]
    assert rows.tolist() == [0, 2, 4, 6, 8, 10]
    labels = zarr.open_group(str(tmp_path / "r" / "predictions.zarr"), mode="r")["labels"][...]
    assert len(set(labels[rows].tolist())) == 3  # every class of the class-sorted corpus
    assert s["attacks"]["fgsm-linf"]["large"]["n"] == 6
    # the model transferring to itself is the white-box attack: same outcome on the same rows
    assert s["checks"]["transfer"]["pgd-linf"]["large"] is not None
    assert "transfer-pgd-linf" not in s["attacks"]


def test_attack_errors_are_one_line(corpus, checkpoint, tmp_path, capsys):
    base = ["-q", "score", "--corpus", str(corpus), "--model", str(checkpoint), "--workers", "0"]
    assert main([*base, "--out", str(tmp_path / "a"), "--attacks", "pgd-lin"]) == 2
    assert "did you mean" in capsys.readouterr().err.lower()
    assert main([*base, "--out", str(tmp_path / "b"), "--attacks", "pgd-linf", "--budgets", "huge"]) == 2
    assert "unknown budget 'huge'" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "c"), "--attacks", "pgd-linf", "--attack-set", "pgd-linf.stepz=3"]) == 2
    assert "stepz" in capsys.readouterr().err
    cfg = tmp_path / "a.toml"
    cfg.write_text("[pgd-linf]\nsteps = 2\n[pgd-linf.budgets]\nsmall = 0.01\n")
    s = score(corpus, checkpoint, tmp_path / "d", "--attacks", "pgd-linf", "--budgets", "small",
              "--attack-config", cfg)
    assert s["attacks"]["pgd-linf"]["small"]["eps"] == 0.01
    assert s["attacks"]["pgd-linf"]["small"]["params"]["steps"] == 2


def test_attack_config_parsing():
    from qrobust.score.adversarial import AttackConfigError, attack_config, plan_jobs

    assert attack_config(sets=["pgd-l1.step_size=60", "pgd-l1.budgets.large=800"]) == \
        {"pgd-l1": {"step_size": 60, "budgets": {"large": 800}}}
    with pytest.raises(AttackConfigError):
        attack_config(sets=["pgd-linf"])
    jobs = plan_jobs(["pgd-l1"], ["small"], (3, 112, 112))
    assert jobs[0].eps == pytest.approx(25.0)  # 100 at 224, a quarter of the coordinates at 112
    assert jobs[0].params["step_size"] == pytest.approx(30.0)
    same = plan_jobs(["pgd-l1"], ["small"], (3, 112, 112), rule="none")
    assert same[0].eps == 100.0
    assert {j.attack for j in plan_jobs(["all"], ["small"], (3, 224, 224))} == \
        {"fgsm-linf", "pgd-linf", "pgd-l2", "pgd-l1", "autoattack-linf"}


def test_expensive_attack_on_a_nested_subset(corpus, checkpoint, tmp_path):
    """`ATTACK.limit=N` attacks N of the attack rows; WCAR is computed on the rows every attack ran on."""
    out = tmp_path / "r"
    s = score(corpus, checkpoint, out, "--attacks", "fgsm-linf,pgd-linf", "--budgets", "large",
              "--attack-set", "pgd-linf.limit=4")
    assert s["attacks"]["fgsm-linf"]["large"]["n"] == 12 and s["attacks"]["pgd-linf"]["large"]["n"] == 4
    pgd, fgsm = _outcome(out, "pgd-linf/large"), _outcome(out, "fgsm-linf/large")
    ran = pgd != 3
    assert np.flatnonzero(ran).tolist() == [0, 3, 6, 9]  # spread over the 12 rows (and the 3 classes)
    assert s["attacks"]["pgd-linf"]["large"]["ar"] == pytest.approx((pgd[ran] == 0).mean())
    assert s["wcar_basis"]["large"] == {"attacks": ["fgsm-linf", "pgd-linf"], "n": 4,
                                        "missing": ["pgd-l1", "pgd-l2", "autoattack-linf"]}
    assert s["wcar"]["large"] == pytest.approx(((pgd[ran] == 0) & (fgsm[ran] == 0)).mean())


def test_reference_autoattack_flags_become_masking_warnings(corpus, checkpoint, tmp_path, monkeypatch):
    """A warning the reference AutoAttack raises about its own evaluation lands in summary.json and the report."""
    import logging

    from qrobust.score import attacks as attack_pkg

    real = attack_pkg.run_attack

    def flagging(*args, **kw):
        logging.getLogger("qrobust.attacks.autoattack").warning("pyautoattack: Square Attack has decreased the "
                                                                "robust accuracy of 10.00%.")
        return real(*args, **kw)

    monkeypatch.setattr(attack_pkg, "run_attack", flagging)
    s = score(corpus, checkpoint, tmp_path / "r", "--attacks", "fgsm-linf", "--budgets", "small")
    assert any("Square Attack has decreased" in w for w in s["checks"]["gradient_masking"])
    monkeypatch.setattr(attack_pkg, "run_attack", real)
    again = score(corpus, checkpoint, tmp_path / "r", "--attacks", "fgsm-linf", "--budgets", "small")
    assert again["checks"]["gradient_masking"] == s["checks"]["gradient_masking"]  # kept with the results
