"""What the command line prints: -q/-v anywhere, --json documents that parse, progress as plain lines in a
log, the attacks table, and file names with control characters shown escaped."""
from __future__ import annotations

import json
import logging

import pytest

from helpers import fitted_checkpoint, small_corpus
from qrobust.cli import build_parser, main
from qrobust.score.attacks import ATTACKS
from qrobust.shared import progress


@pytest.mark.parametrize("argv, quiet, verbose", [
    (["ls", "suites"], False, False),
    (["-q", "ls", "suites"], True, False),
    (["ls", "suites", "-q"], True, False),       # after the subcommand, where people type it
    (["ls", "-v", "suites"], False, True),
    (["-v", "ls", "suites"], False, True),       # the subcommand does not reset what came before it
])
def test_quiet_and_verbose_are_accepted_before_and_after_the_subcommand(argv, quiet, verbose):
    args = build_parser().parse_args(argv)
    assert (args.quiet, args.verbose) == (quiet, verbose)


def test_log_levels_follow_the_flags_and_other_libraries_stay_quiet(capsys):
    qrobust_log, other_log = logging.getLogger("qrobust.test"), logging.getLogger("matplotlib.font_manager")
    before = logging.getLogger("qrobust").level
    try:
        assert main(["ls", "suites", "-q"]) == 0
        assert not logging.getLogger("qrobust").isEnabledFor(logging.INFO)
        assert main(["ls", "suites"]) == 0
        assert qrobust_log.isEnabledFor(logging.INFO) and not qrobust_log.isEnabledFor(logging.DEBUG)
        assert not other_log.isEnabledFor(logging.INFO)  # "generated new fontManager" is not the user's business
        assert main(["ls", "suites", "-v"]) == 0
        assert qrobust_log.isEnabledFor(logging.DEBUG)
    finally:
        logging.getLogger("qrobust").setLevel(before)
    capsys.readouterr()


def test_ls_json_is_one_document(capsys):
    assert main(["ls", "corruptions", "glass*", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == ["glass_blur"]
    assert main(["ls", "corruptions", "no-such-*", "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == []


def test_ls_attacks_is_a_table_of_norms_budgets_and_sets(capsys):
    assert main(["ls", "attacks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["attack", "norm", "small", "middle", "large", "set"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    linf = ATTACKS.get("pgd-linf").budgets
    assert rows["pgd-linf"][1:6] == ["linf", *(f"{linf[k] * 255:g}/255" for k in ("small", "middle", "large")),
                                     "paper"]
    assert rows["pgd-l2"][2] == f"{ATTACKS.get('pgd-l2').budgets['small']:g}"
    assert rows["fgsm-linf"][5] == "paper" and rows["slide-l1"][5] == "extra"
    assert rows["square-linf"][5:7] == ["extra", "(black-box)"]
    assert main(["ls", "attacks", "pgd-*", "--json"]) == 0
    table = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(table) == {"pgd-l1", "pgd-l2", "pgd-linf"}
    assert table["pgd-linf"]["budgets"] == pytest.approx(dict(linf))
    assert all(r["paper"] and r["white_box"] for r in table.values())


def test_checkpoint_names_with_control_characters_are_printed_escaped(tmp_path, capsys):
    (tmp_path / "evil\x1b[2Jname.safetensors").write_bytes(b"not a checkpoint")
    assert main(["ls", "checkpoints", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "evil\\x1b[2Jname" in out and "not a qrobust checkpoint" in out
    assert main(["ls", "checkpoints", str(tmp_path), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)  # JSON escapes it itself; the name stays exact
    assert row["file"].endswith("evil\x1b[2Jname.safetensors") and row["reason"]


def test_progress_in_a_log_is_plain_periodic_lines(monkeypatch, capsys):
    monkeypatch.setattr(progress, "INTERVAL", 0.0)  # a line at every update
    bar = progress.bar(4, "score", "img")  # stderr is captured: not a terminal
    assert isinstance(bar, progress.Lines)
    bar.update(1)
    bar.set_postfix(acc="50%")
    bar.update(3)
    bar.close()
    bar.close()  # closing twice prints once
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("qrobust: score: 1/4 img (25%)") and "left" in lines[0]
    assert lines[-1].startswith("qrobust: score: 4/4 img (100%)") and "done in" in lines[-1]
    assert lines[-1].endswith("acc=50%") and len(lines) == 3 and "\r" not in "".join(lines)


def test_progress_lines_are_spaced_by_the_interval(monkeypatch, capsys):
    monkeypatch.setattr(progress, "INTERVAL", 3600.0)
    with progress.bar(1000, "verify", "shard") as bar:
        for _ in range(1000):
            bar.update()
    assert len(capsys.readouterr().err.splitlines()) == 1  # only the closing line
    with progress.bar(10, "x", "y", enabled=False) as bar:
        bar.update(10)
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def corpus_and_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("json")
    corpus = small_corpus(tmp, "clean/*", shard=4)
    return corpus, fitted_checkpoint(corpus, tmp / "tiny.safetensors"), tmp


def test_verify_score_and_report_print_json_documents(corpus_and_model, capsys):
    corpus, checkpoint, tmp = corpus_and_model
    assert main(["verify", str(corpus), "--json"]) == 0
    captured = capsys.readouterr()
    checked = json.loads(captured.out)
    assert checked["ok"] is True and checked["problems"] == [] and checked["shards"] >= 1
    assert captured.err == ""  # no progress around a machine-readable result

    assert main(["score", "--corpus", str(corpus), "--model", str(checkpoint), "--out", str(tmp / "r"),
                 "--workers", "0", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == json.loads((tmp / "r" / "summary.json").read_text())

    assert main(["report", str(tmp / "r"), "--out", str(tmp / "rep"), "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["index"].endswith("index.html") and report["tables"] and isinstance(report["findings"], list)
    assert (tmp / "rep" / "results.csv").exists() and report["results"].endswith("results.csv")
    assert all(path.endswith(".csv") for path in report["tables"])

    shard = next(corpus.rglob("*.tar"))
    shard.write_bytes(shard.read_bytes()[:-512] + b"\0" * 511 + b"x")
    assert main(["verify", str(corpus), "--json"]) == 1
    broken = json.loads(capsys.readouterr().out)
    assert broken["ok"] is False and any(shard.name in p for p in broken["problems"])
