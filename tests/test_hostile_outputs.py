"""Hostile results folders: names and notes that are markup, summaries of the wrong shape, report folders
that are links or hold other files, a manifest whose suite lists no family.

Each test builds the hostile input itself. What is from the input lands in every output escaped for its
format (HTML, LaTeX, CSV, Markdown, plain text, figure labels); a malformed input is one line on stderr
naming the file and the field, exit status 2, and nothing is written or run.
"""
from __future__ import annotations

import copy
import csv
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from qrobust.cli import main
from qrobust.score import escape, report as report_module, tables
from qrobust.score.report import MARKER, ReportError, build_report
from test_report import make_summary, write_results
from test_uncertainty import rich_predictions, write_model

# what a collaborator could put in a name: a tag, an attribute break-out, TeX commands (^^5c is a backslash to
# TeX), a formula, a table cell break, a Markdown link, math for matplotlib (that does not even parse), a
# terminal escape, a line break and a right-to-left override
FORMULA = '=HYPERLINK("http://evil.example/x","y")'
HOSTILE = (FORMULA + '<script>alert(1)</script>"onload="alert(1)\' \\input{/etc/passwd} ^^5cinput ~ a|b '
           "[x](javascript:alert(1)) $\\frac{$ # % & _ line\nbreak\x1b[31m\u202eend")
SHA = "ab" * 32


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["-q", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str) -> str:
    """The error line of a refused command: status 2, one line, no traceback."""
    assert code == 2, err
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
    return err


def hostile_summary(name: str) -> dict:
    """A summary whose every name, key and note that the report shows comes from a hostile collaborator."""
    s = make_summary(name, sha=SHA)
    s["model"].update(name=HOSTILE, arch="-" + HOSTILE)
    s["model"]["quant"]["method"] = "@" + HOSTILE
    key = "+" + HOSTILE.replace(".", "")  # a corruption, variant, budget: dots would split results.csv's paths
    s["natural"]["acc_by_corruption"][key] = 0.25
    s["systematic"]["acc"][key] = 0.5
    s["sequence"]["fp"][key] = 0.125
    s["wcar"][key] = 0.0625
    s["attacks"]["pgd-linf"][key] = {"eps": 0.01, "ar": 0.5, "aai": 0.25, "n": 72, "norm": HOSTILE}
    s["systematic"]["sni"] = -0.0123  # a genuine negative number, which CSV must keep a number
    s["checks"]["warnings"] = [HOSTILE]
    s["comparability"] = {"corpus": {"comparable": False, "reasons": [HOSTILE], "note": HOSTILE},
                          "natural": {"comparable": False, "reasons": [HOSTILE], "note": HOSTILE}}
    s["corpus"].update(suite=HOSTILE, provenance={
        "made_by": "generate", "suite": HOSTILE, "geometry": {"crop": 224, "resize": 256}, "classes": 1000,
        "natural_encoding": HOSTILE, "libraries": {"imagecorruptions": HOSTILE, "qrobust": HOSTILE},
        "families": {HOSTILE: {"complete": False, "scored": 1, "of": 2}}})
    s["env"].update(qrobust=HOSTILE, torch=HOSTILE, device=HOSTILE)
    return s


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A report of three hostile results folders: two with per-sample columns (paired comparisons), one whose
    keys become table columns; their folders' names are hostile too."""
    root = tmp_path_factory.mktemp("hostile")
    n = 200
    fp = rich_predictions(n, 3)
    drop = {k: v.copy() for k, v in fp.items()}
    for k, v in drop.items():
        if v.ndim == 2 and k.startswith("natural/"):
            right = np.flatnonzero(v[:, 0] == 0)
            v[right[: len(right) // 3], 0] = 9
    a, b = root / ("=a<script>\n|$x$" + "\x1b[0m"), root / "+b\"onload=x"
    write_model(a, HOSTILE, None, fp, SHA)
    write_model(b, "-" + HOSTILE, ("+" + HOSTILE, 4), drop, SHA)
    for folder in (a, b):
        s = json.loads((folder / "summary.json").read_text())
        s["checks"] = {"gradient_masking": [HOSTILE], "warnings": [HOSTILE]}
        s["env"] = {"qrobust": HOSTILE, "torch": "2", "device": "cpu"}
        (folder / "summary.json").write_text(json.dumps(s))
    (c,) = write_results(root, {"@c|<b>": hostile_summary("r18-dorefa2")})
    out = root / "report"
    code = main(["-q", "report", str(a), str(b), str(c), "--out", str(out)])
    assert code == 0
    return out


class Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = set(), []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attrs += [(tag, k, v) for k, v in attrs]


def test_html_holds_only_the_report_s_own_elements_and_links(hostile):
    page = (hostile / "index.html").read_text(encoding="utf-8")
    assert "<script" not in page.lower() and '"onload=' not in page and "\x1b" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;onload=&quot;alert(1)&#x27;" in page  # shown, as text
    parsed = Elements()
    parsed.feed(page)
    assert parsed.tags <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "dl", "dt", "dd", "nav",
                           "a", "ul", "li", "b", "br", "details", "summary", "p", "div", "table", "thead", "tbody",
                           "tr", "th", "td", "strong", "img"}
    assert {k for _, k, _ in parsed.attrs} <= {"lang", "charset", "href", "id", "class", "title", "rowspan", "alt",
                                               "src"}
    for tag, key, value in parsed.attrs:
        if key == "href":
            assert value.startswith("#") and escape.is_name(value[1:]), value
        elif key == "id":
            assert escape.is_name(value), value
        elif key == "src":
            assert value.startswith("data:image/png;base64,"), value
    titles = [v for _, k, v in parsed.attrs if k == "title"]
    assert titles and all("<" not in v for v in titles)


def test_latex_prints_every_name_as_text(hostile):
    allowed = {"begin", "end", "centering", "caption", "label", "toprule", "midrule", "bottomrule", "textbf",
               "resizebox", "linewidth", "uparrow", "downarrow", "dagger", "usepackage", "textbackslash",
               "textasciicircum", "textasciitilde", "textless", "textgreater", "textbar"}
    found = False
    for path in (hostile / "tables").glob("*.tex"):
        tex = path.read_text(encoding="utf-8")
        body = tex.split("\n", 1)[1]  # the first line is qrobust's own comment
        found |= "\\textbackslash{}input\\{/etc/passwd\\}" in body
        assert "\\input" not in body and "^^" not in body and "\x1b" not in body, path.name
        assert set(re.findall(r"\\([A-Za-z]+)", body)) <= allowed, path.name
        # what is left of the escapes (and of the resizebox line's own %): braces balance, no comment, no #
        bare = re.sub(r"\\[\\&%$#_{}]", "", body).replace("{!}{%\n", "{!}{\n")
        assert bare.count("{") == bare.count("}") and "%" not in bare and "#" not in bare, path.name
        rows = [re.sub(r"\\[\\&%$#_{}]", "", line) for line in body.splitlines() if line.endswith(" \\\\")]
        assert len({line.count("&") for line in rows}) == 1, path.name  # no name adds a column separator
    assert found  # the names are in the tables, escaped


def csv_cells(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_csv_cells_from_the_results_cannot_be_formulas(hostile):
    files = [hostile / "results.csv", *(hostile / "tables").glob("*.csv")]
    assert hostile / "tables" / "comparisons.csv" in files
    quoted = negative = 0
    for path in files:
        for row in csv_cells(path):
            for cell in row:
                if cell[:1] in ("=", "+", "@", "\t", "\r", "\n"):
                    pytest.fail(f"{path.name}: a cell that a spreadsheet runs: {cell[:40]!r}")
                if cell.startswith("-"):
                    float(cell)  # a number qrobust wrote, else it would have been quoted
                    negative += 1
                quoted += cell.startswith(("'=", "'+", "'-", "'@"))
    assert quoted >= 10 and negative >= 2  # the hostile names are there, quoted; negative numbers stay numbers
    sni = {r["Model"]: r["SNI"] for r in csv.DictReader(open(hostile / "tables" / "systematic.csv"))}
    assert sni["'-" + HOSTILE] == "-1.23"
    differences = [float(r["Difference"]) for r in csv.DictReader(open(hostile / "tables" / "comparisons.csv"))]
    assert min(differences) < 0


def markdown_rows(path: Path) -> list[list[str]]:
    return [re.split(r"(?<!\\)\|", line)[1:-1] for line in path.read_text(encoding="utf-8").splitlines()
            if line.startswith("|")]


def test_markdown_cells_stay_cells(hostile):
    for path in (hostile / "tables").glob("*.md"):
        text = path.read_text(encoding="utf-8")
        assert "<" not in text and "](" not in text and "\x1b" not in text, path.name
        rows = markdown_rows(path)
        assert rows and {len(r) for r in rows} == {len(rows[0])}, path.name  # no cell split by a name's |
        caption = text.split("\n", 1)[0]
        assert caption.startswith("**") and "|" not in caption.replace("\\|", "")
    corruptions = (hostile / "tables" / "corruptions.md").read_text(encoding="utf-8")
    assert "a\\|b" in corruptions and "&lt;script&gt;" in corruptions


def test_findings_are_one_plain_line_each(hostile, capsys):
    text = (hostile / "findings.txt").read_text(encoding="utf-8")
    lines = text.splitlines()
    warnings = [line for line in lines if ": warnings: " in line]
    assert len(warnings) == 3  # one per model, each on its own line despite the name's line break
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f\u2028\u2029\u202a-\u202e]", text)
    assert all(HOSTILE.replace("\n", " ").replace("\x1b", " ").replace("\u202e", " ") in w for w in warnings)


def test_figures_print_names_as_text_and_never_call_tex(tmp_path, monkeypatch, capsys):
    """A user's matplotlibrc may turn usetex on: the report's labels still never reach TeX, and a name with
    "$" is printed, not parsed as math (this one does not even parse)."""
    import matplotlib
    from matplotlib import texmanager

    calls = []
    monkeypatch.setitem(matplotlib.rcParams, "text.usetex", True)
    monkeypatch.setattr(texmanager.TexManager, "_run_checked_subprocess",
                        classmethod(lambda cls, command, tex, cwd=None: calls.append(command)))
    s = hostile_summary("r18-dorefa2")
    code, _, err = run(capsys, "report", *write_results(tmp_path, {"r": s}), "--out", tmp_path / "out")
    assert code == 0, err
    assert calls == []
    svg = (tmp_path / "out" / "figures" / "corruptions.svg").read_text(encoding="utf-8")
    assert "$\\frac{$" in svg and "<script" not in svg and "\x1b" not in svg


def test_names_that_become_files_or_anchors_are_checked(tmp_path, capsys):
    for i, bad in enumerate(("../../x", "<b>", "a b", "-x" * 40)):
        s = make_summary("r18-fp")
        s["attacks"][bad] = {"small": {"eps": 0.01, "ar": 0.5, "aai": 0.2, "n": 72}}
        folder = tmp_path / f"r{i}"
        write_results(tmp_path, {folder.name: s})
        code, _, err = run(capsys, "report", folder, "--out", tmp_path / "out")
        assert str(folder / "summary.json") in one_line_error(code, err) and "attack" in err
        assert not (tmp_path / "out").exists() and not list(tmp_path.parent.glob("**/x.md"))
    with pytest.raises(ReportError):
        tables.checked_name("attack-<b>")
    # every other table, figure and anchor name is qrobust's own
    assert all(escape.is_name(t.name) for t in tables.TABLES if not callable(t))


def test_a_budget_name_is_no_format_string(tmp_path):
    s = make_summary("r18-fp")
    s["attacks"]["pgd-linf"]["{nc.__class__}{0:>999999999}"] = {"eps": 0.01, "ar": 0.5, "aai": 0.2, "n": 72}
    index = build_report(write_results(tmp_path, {"r": s}), tmp_path / "out")
    tex = (index.parent / "tables" / "attack-pgd-linf.tex").read_text()
    assert "\\{nc.\\_\\_class\\_\\_\\}\\{0:>999999999\\}" in tex.replace("\\textgreater{}", ">")


# ---- malformed summaries -----------------------------------------------------------------------------------

def nested(depth: int):
    value = 0
    for _ in range(depth):
        value = [value]
    return value


MALFORMED = [  # (edit of a good summary, the field the one-line error names)
    (lambda s: s["clean"].update(acc="0.7"), "clean.acc: text where a number belongs"),
    (lambda s: s.update(natural=[]), "natural: a list where a table belongs"),
    (lambda s: s["natural"].update(acc_by_corruption=5), "natural.acc_by_corruption: a number where a table"),
    (lambda s: s["wcar"].update(small=[1]), "wcar.small: a list where a number belongs"),
    (lambda s: s["clean"].update(acc=float("nan")), "clean.acc"),
    (lambda s: s["natural"].update(mnr=float("inf")), "natural.mnr"),
    (lambda s: s["natural"].update(mnr=1e300), "natural.mnr"),
    (lambda s: s["natural"]["acc"].update(x=-(10 ** 400)), "natural.acc.x"),
    (lambda s: s["model"]["quant"].update(w_bits="4"), "model.quant.w_bits: text where an integer belongs"),
    (lambda s: s["model"]["quant"].update(w_bits=True), "model.quant.w_bits"),
    (lambda s: s["model"]["quant"].update(w_bits=0), "model.quant.w_bits"),
    (lambda s: s["model"].update(quant=[4]), "model.quant: a list where a table belongs"),
    (lambda s: s["model"].update(name={"x": 1}), "model.name: a table where text belongs"),
    (lambda s: s["model"].update(arch=["x"]), "model.arch: a list where text belongs"),
    (lambda s: s["corpus"].update(manifest_sha256=5), "corpus.manifest_sha256: a number where text belongs"),
    (lambda s: s["checks"].update(warnings="<script>"), "checks.warnings: text where a list"),
    (lambda s: s.update(intervals={"values": {"clean.acc": 5}}), "intervals.values.clean.acc"),
    (lambda s: s.update(intervals={"values": {"clean.acc": ["0", 1]}}), "intervals.values.clean.acc"),
    (lambda s: s.update(comparability={"corpus": {"comparable": False, "reasons": [{"x": 1}]}}),
     "comparability.corpus.reasons[0]"),
    (lambda s: s.update(comparability={"natural": {"comparable": "no"}}), "comparability.natural.comparable"),
    (lambda s: s["sequence"].update(difficulty={"2": 5}), "sequence.difficulty.2: a number where a table"),
    (lambda s: s["attacks"]["pgd-linf"].update(small=0.5), "attacks.pgd-linf.small: a number where a table"),
    (lambda s: s["attacks"].update({"pgd-linf": "all"}), "attacks.pgd-linf: text where a table"),
    (lambda s: s["natural"].update(acc_by_corruption={f"c{i}": 0.5 for i in range(500)}),
     "natural.acc_by_corruption: 500 entries"),
    (lambda s: s["model"].update(name="x" * 20_000), "model.name: 20000 characters"),
    (lambda s: s["corpus"].update(provenance={"families": {"natural": 3}}), "corpus.provenance.families.natural"),
    (lambda s: s.update(env={"x": nested(100)}), "nested deeper"),
    (lambda s: s.pop("clean"), "clean is missing"),
    (lambda s: s["model"].pop("arch"), "model.arch is missing"),
    (lambda s: s.update(schema={"a": [1] * 1000}), "schema {'a': [1, 1, 1"),
]


@pytest.mark.parametrize("edit, field", MALFORMED, ids=[f for _, f in MALFORMED])
def test_malformed_summaries_are_one_line_naming_file_and_field(tmp_path, capsys, edit, field):
    s = make_summary("r18-dorefa2")
    edit(s)
    (folder,) = write_results(tmp_path, {"r": s})
    code, out, err = run(capsys, "report", folder, "--out", tmp_path / "out")
    line = one_line_error(code, err)
    assert str(folder / "summary.json") in line and field in line, line
    assert not (tmp_path / "out").exists()


def test_json_of_absurd_size_or_numbers_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    cases = {"huge-int": b'{"schema": "qrobust.summary/2", "x": ' + b"9" * 5000 + b"}",
             "deep": b"[" * 100_000 + b"]" * 100_000, "binary": b"\xff\xfe{\x00", "size": b" " * 5000 + b"{}"}
    monkeypatch.setattr(tables, "SUMMARY_MAX_BYTES", 4096)
    for name, raw in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_bytes(raw)
        code, _, err = run(capsys, "report", tmp_path / name, "--out", tmp_path / "out")
        assert str(tmp_path / name / "summary.json") in one_line_error(code, err), name


def test_a_summary_that_is_a_link_is_refused(tmp_path, capsys):
    (real,) = write_results(tmp_path, {"real": make_summary("r18-fp")})
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "summary.json").symlink_to(real / "summary.json")
    code, _, err = run(capsys, "report", tmp_path / "linked", "--out", tmp_path / "out")
    assert "a link" in one_line_error(code, err)


def test_control_characters_in_paths_stay_on_one_line(tmp_path, capsys):
    odd = tmp_path / "evil\nqrobust report: error: forged\x1b[2J"
    odd.mkdir()
    code, _, err = run(capsys, "report", odd, "--out", tmp_path / "out")
    assert "evil\\nqrobust report: error: forged\\x1b[2J" in one_line_error(code, err)


def test_an_unforeseen_failure_on_one_summary_names_its_file(tmp_path, capsys, monkeypatch):
    """The checks cover every field the report reads; a failure they did not foresee still ends in one line
    naming the summary it came from, before anything is written."""
    good, odd = make_summary("r18-fp"), make_summary("r18-lsq4")
    odd["model"]["name"] = "odd"
    folders = write_results(tmp_path, {"good": good, "odd": odd})
    real_rows = report_module.tidy.rows

    def rows(summary, *args):
        if summary["model"]["name"] == "odd":
            raise TypeError("unsupported operand")
        return real_rows(summary, *args)

    monkeypatch.setattr(report_module.tidy, "rows", rows)
    code, _, err = run(capsys, "report", *folders, "--out", tmp_path / "out")
    assert str(folders[1] / "summary.json") in one_line_error(code, err) and "TypeError" in err
    assert not (tmp_path / "out").exists()


def test_damaged_per_sample_columns_are_a_note_not_a_traceback(tmp_path, capsys):
    import zarr

    from qrobust.score.results import SAMPLES

    preds = rich_predictions(60, 5)
    damage = {
        "garbage metadata": lambda store: (store / SAMPLES / "zarr.json").write_text("{not json"),
        "columns not a list": lambda store: zarr.open_group(str(store), mode="r+")[SAMPLES].attrs.update(
            columns="acc:clean/onecrop"),
        "columns of another summary": lambda store: zarr.open_group(str(store), mode="r+")[SAMPLES].attrs.update(
            columns=[f"x{i}" for i in range(len(zarr.open_group(str(store), mode="r")[SAMPLES].attrs["columns"]))]),
        "chunks gone": lambda store: [shutil.rmtree(p) for p in (store / SAMPLES).iterdir() if p.is_dir()],
    }
    for i, (what, damage_it) in enumerate(damage.items()):
        fp, q = tmp_path / f"fp{i}", tmp_path / f"q{i}"
        write_model(fp, "r18-fp", None, preds)
        write_model(q, "r18-lsq4", ("lsq", 4), preds)
        damage_it(q / "predictions.zarr")
        code, out, err = run(capsys, "report", fp, q, "--out", tmp_path / f"out{i}")
        assert code == 0 and "Traceback" not in err, (what, err)
        findings = (tmp_path / f"out{i}" / "findings.txt").read_text()
        if what != "chunks gone":  # missing chunks read as the fill value: a store zarr calls intact
            assert "r18-lsq4: not compared (" in findings, (what, findings)


# ---- the report folder ---------------------------------------------------------------------------------------

@pytest.fixture
def results(tmp_path) -> list[Path]:
    return write_results(tmp_path / "results", {"fp": make_summary("r18-fp"), "q": make_summary("r18-dorefa4")})


def test_out_that_is_a_file_or_a_link_is_refused(tmp_path, capsys, results):
    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / "file").write_text("mine")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "linked").symlink_to(victim)
    for out, problem in (("file", "not a folder"), ("dangling", "is a link"), ("linked", "is a link")):
        code, _, err = run(capsys, "report", *results, "--out", tmp_path / out)
        assert f"--out {tmp_path / out}" in one_line_error(code, err) and problem in err
    assert (tmp_path / "file").read_text() == "mine"
    assert not (tmp_path / "nowhere").exists() and list(victim.iterdir()) == []


def test_out_with_other_files_is_refused_and_left_alone(tmp_path, capsys, results):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter.tex").write_text("mine")
    (out / "index.html").write_text("<title>my page</title>")
    code, _, err = run(capsys, "report", *results, "--out", out)
    assert "no earlier qrobust report" in one_line_error(code, err)
    assert sorted(p.name for p in out.iterdir()) == ["chapter.tex", "index.html"]
    assert (out / "index.html").read_text() == "<title>my page</title>"
    (out / "chapter.tex").unlink()
    (out / "index.html").unlink()
    code, _, err = run(capsys, "report", *results, "--out", out)  # an empty folder is fine
    assert code == 0, err


def test_an_earlier_report_is_overwritten_also_one_without_the_marker(tmp_path, capsys, results):
    out = tmp_path / "report"
    assert run(capsys, "report", *results, "--out", out)[0] == 0
    assert json.loads((out / MARKER).read_text())["schema"] == report_module.MARKER_SCHEMA
    first = (out / "tables" / "clean.csv").read_bytes()
    assert run(capsys, "report", *results, "--out", out)[0] == 0
    assert (out / "tables" / "clean.csv").read_bytes() == first
    (out / MARKER).unlink()  # as a report of an earlier qrobust left it: index.html and tables/
    (out / "notes.txt").write_text("the user's")
    assert run(capsys, "report", *results, "--out", out)[0] == 0
    assert (out / MARKER).is_file() and (out / "notes.txt").read_text() == "the user's"
    assert not [p for p in out.rglob("*") if ".partial" in p.name]


@pytest.mark.parametrize("link", ["tables", "figures", "index.html", "results.csv", "tables/clean.md",
                                  "figures/clean.png", MARKER])
def test_a_link_inside_a_report_is_never_written_through(tmp_path, capsys, results, link):
    out = tmp_path / "report"
    assert run(capsys, "report", *results, "--out", out)[0] == 0
    victim = tmp_path / "victim"
    if link in ("tables", "figures"):
        victim.mkdir()
        shutil.rmtree(out / link)
    else:
        victim.write_text("mine")
        (out / link).unlink()
    (out / link).symlink_to(victim)
    code, _, err = run(capsys, "report", *results, "--out", out)
    assert str(out / link) in one_line_error(code, err) and "link" in err
    if victim.is_dir():
        assert list(victim.iterdir()) == []
    else:
        assert victim.read_text() == "mine"


def test_a_failed_report_leaves_the_earlier_page_and_no_partial_file(tmp_path, capsys, results, monkeypatch):
    out = tmp_path / "report"
    assert run(capsys, "report", *results, "--out", out)[0] == 0
    page = (out / "index.html").read_bytes()

    def full(fig, folder, name):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_module, "_save", full)
    assert run(capsys, "report", *results, "--out", out)[0] != 0
    assert (out / "index.html").read_bytes() == page  # the page is written last
    assert not [p for p in out.rglob("*") if ".partial" in p.name]


def test_report_files_are_renamed_into_place(tmp_path, results, monkeypatch):
    """Every file goes through a partial name and a rename: none is ever open under its final name."""
    renamed = []
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).is_relative_to(tmp_path / "out"):  # the report's; any other caller passes through
            assert ".partial-" in str(src) and ".partial" not in str(dst)
            renamed.append(Path(dst).relative_to(tmp_path / "out").as_posix())
        real_replace(src, dst)

    monkeypatch.setattr(report_module.os, "replace", replace)
    build_report(results, tmp_path / "out")
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*")
                     if p.is_file())
    assert sorted(renamed) == written and renamed[0] == MARKER and renamed[-1] == "index.html"


# ---- the manifest ------------------------------------------------------------------------------------------

def test_a_manifest_whose_suite_lists_no_family_is_refused(tmp_path, capsys):
    from helpers import small_corpus
    from qrobust.shared.manifest import dumps, manifest_problems, plan_digest, plan_of

    corpus = small_corpus(tmp_path, "clean/onecrop")
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest_problems(manifest) == []
    spec = manifest["suite"]["spec"]
    for family in ("clean", "natural", "sequence", "systematic"):
        spec.pop(family, None)
    manifest["plan_sha256"] = plan_digest(plan_of(manifest))  # a careful hand edit: the digest recomputed
    (corpus / "manifest.json").write_text(dumps(manifest))
    problems = manifest_problems(manifest)
    assert len(problems) == 1 and problems[0][0] is None
    assert problems[0][1].startswith("manifest.json: its suite spec lists no family")
    code, out, _ = run(capsys, "verify", corpus)
    assert code == 1 and out.count("lists no family") == 1
    code, _, err = run(capsys, "score", "--corpus", corpus, "--model", "tiny_cnn", "--out", tmp_path / "r")
    assert "manifest.json: its suite spec lists no family" in one_line_error(code, err)
    assert not (tmp_path / "r" / "summary.json").exists()
    imported = copy.deepcopy(manifest)  # an imported release's spec lists no family: its files describe it
    imported["imported_from"] = {"kind": "imagenet-c", "root": "release", "classes": None}
    assert manifest_problems(imported) == []
