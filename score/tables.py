"""The paper's tables from ``summary.json`` results: definitions, loading, grouping, writers.

Used by :mod:`qrobust.score.report`, which adds the figures and the HTML page.
The report as a whole:

``build_report(results, out)`` reads results folders written by ``qrobust score``
(one model each, all scored on the same corpus) and writes into ``out``:
``tables/<name>.md|.csv|.tex`` for each entry of TABLES that some model has data
for (rows grouped by architecture, floating point as 32 bits),
``figures/<name>.png|.svg`` (its metric against bit width per method, or a bar
or line per model across corruptions, sequences or systematic variants), and
``index.html``: header, findings drawn from the data, every table and figure,
in one file (inline CSS, base64 PNGs). Values are percentages with two
decimals; flip probabilities are fractions with three, as the paper prints
them. Models with clean accuracy below ``nc_threshold`` are NC (not converged):
"NC" in every table, left out of bold marks, lines and findings.
"""
from __future__ import annotations

import csv
import html
import io
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from qrobust._version import __version__
from qrobust.score import tidy
from qrobust.score.comparability import PAPER_ATTACKS
from qrobust.score.results import reading
from qrobust.score.summary import OLD_SCHEMAS, SUMMARY_SCHEMA, upgrade
from qrobust.shared import noises
from qrobust.shared.architectures import ARCHITECTURES
from qrobust.shared.quant import METHODS as METHODS_REGISTRY
from qrobust.shared.errors import QrobustError

# labels, order and colours come from the architectures' and quantization methods' definitions
ARCHS = {n: ARCHITECTURES.get(n).label for n in ARCHITECTURES.in_order()}  # the paper's order first
METHODS = {"fp": "FP", **{n: METHODS_REGISTRY.get(n).label for n in METHODS_REGISTRY.in_order()}}
BUDGETS = ("small", "middle", "large")
HUES = {"fp": "Greys", **{n: METHODS_REGISTRY.get(n).hue for n in METHODS_REGISTRY.in_order()}}  # lighter: fewer bits


class ReportError(QrobustError, ValueError):
    """Results that cannot be reported (no or foreign summary.json, different corpora)."""


@dataclass
class Model:
    folder: Path
    s: dict          # the parsed summary.json
    arch: str
    method: str      # "fp" for floating point
    bits: int        # weight bits, 32 for floating point
    bits_label: str  # "4", or "4/8" when weight and activation bits differ
    nc: bool
    tag: str = ""    # the results folder's name, where two models would otherwise look the same

    def get(self, *path):
        """The value at ``path`` in the summary; None where a step is missing or null."""
        v = self.s
        for key in path:
            if not isinstance(v, dict) or v.get(key) is None:
                return None
            v = v[key]
        return v

    @property
    def short(self) -> str:
        label = "FP" if self.method == "fp" else f"{METHODS.get(self.method, self.method)} {self.bits_label}-bit"
        return f"{label} [{self.tag}]" if self.tag else label

    @property
    def method_label(self) -> str:
        """The method column of a table: DoReFa, ..., and the results folder where needed to tell models apart."""
        label = METHODS.get(self.method, self.method)
        return f"{label} [{self.tag}]" if self.tag else label

    @property
    def name(self) -> str:
        name = self.get("model", "name") or f"{self.arch} {self.short}"
        return f"{name} [{self.tag}]" if self.tag and self.tag not in name else name


@dataclass(frozen=True)
class Col:
    """A column; a "*" in ``path`` makes one column per key found there ("{key}"/"{label}" in ``label``)."""
    label: str
    path: tuple              # keys into summary.json
    better: str = "high"     # "high" or "low"
    mark: str | None = "best"  # "best": bold the best per architecture; "worst": bold the row's most harmful
    scale: float = 100       # 100: percentages
    digits: int = 2

    def value(self, m: Model):
        return m.get(*self.path)

    def text(self, v) -> str | None:
        return None if v is None else f"{v * self.scale:.{self.digits}f}"

    def arrow(self, up: str = " ↑", down: str = " ↓") -> str:
        return "" if self.mark == "worst" else up if self.better == "high" else down

    def expand(self, models: list[Model]) -> list[Col]:
        if "*" not in self.path:
            return [self]
        i = self.path.index("*")
        return [replace(self, label=self.label.format(key=k, label=_label(k)), path=(*self.path[:i], k,
                                                                                     *self.path[i + 1:]))
                for k in _keys(models, *self.path[:i])]


@dataclass(frozen=True)
class Table:
    name: str        # file stem
    title: str
    caption: str     # "{nc}": the NC threshold in percent
    family: tuple    # the summary entry a model needs for a row (NC models always have one)
    columns: tuple[Col, ...]
    figure: str      # "bits": first "best" column against bit width; "bar"/"line": the "worst" columns per model
    trend: bool = False  # findings say how the first column moves with bit width
    noun: str = ""   # what a variant of a per-variant table is, for the findings
    basis: tuple = ()  # keys of summary["comparability"] whose lines the table's caption carries


ACC = Col("ACC", ("clean", "acc"), mark=None)
MNR, NCI = Col("mNR", ("natural", "mnr")), Col("NCI", ("natural", "nci"), "low")
MFP = Col("mFP", ("sequence", "mfp"), "low", scale=1, digits=3)
MEAN_S, SR = Col("Mean ACC_s", ("systematic", "mean")), Col("SR", ("systematic", "sr"), "low")
PER_ROW = "; each model's most harmful {} in bold."


def _keys(models: Iterable[Model], *path) -> list[str]:
    """The keys of a summary entry over all models, first seen first (budgets in paper order)."""
    keys = list(dict.fromkeys(k for m in models for k in (m.get(*path) or {})))
    return sorted(keys, key=lambda k: BUDGETS.index(k) if k in BUDGETS else len(BUDGETS))


def _label(key: str) -> str:
    """A column's label: the catalogue's (glass_blur -> Glass, resize-opencv-area -> OpenCV area), else the
    key made readable (a name the catalogue does not know, from someone else's corpus)."""
    return noises.label(key) or key.replace("_", " ").capitalize()


def _attack_tables(models: list[Model]) -> list[Table]:
    """Paper Tables 3-4: one table per attack, AR and AAI per budget."""
    tables = []
    for attack in _keys(models, "attacks"):
        eps = {b: next(filter(None, (m.get("attacks", attack, b) for m in models)), None)
               for b in _keys(models, "attacks", attack)}
        eps = ", ".join(f"{b} {_eps(e)}" for b, e in eps.items() if e and e.get("eps")) or "not recorded"
        extra = "" if attack in PAPER_ATTACKS else " (not one of the paper's attacks: outside WCAR)"
        tables.append(Table(f"attack-{attack}", f"Adversarial robustness under {attack} (paper Tables 3-4)",
                            f"AR and AAI per perturbation budget; eps: {eps}{extra}.", ("attacks", attack),
                            (Col("AR {key}", ("attacks", attack, "*", "ar")),
                             Col("AAI {key}", ("attacks", attack, "*", "aai"), "low")), "bits", basis=("attacks",)))
    return tables


def _eps(entry: dict) -> str:
    """An attack's budget as people write it: Linf in 1/255 steps, L1 and L2 as numbers."""
    e = entry["eps"]
    return f"{e * 255:.3g}/255" if entry.get("norm", "linf") == "linf" else f"{e:.4g} ({entry['norm'].upper()})"


TABLES = [
    Table("clean", "Clean accuracy (paper Table 1)", "ACC; NC: not converged, clean accuracy below {nc}%.",
          ("clean",), (replace(ACC, mark="best"),), "bits", basis=("clean",)),
    Table("wcar", "Worst-case adversarial robustness (paper Table 2)",
          "WCAR per budget over the paper's five attacks (FGSM-Linf, PGD-L1, PGD-L2, PGD-Linf, AutoAttack-Linf); "
          "'incl. extras': the worst case over every attack run.",
          ("attacks",),
          (Col("WCAR {key}", ("wcar", "*")), Col("WCAR incl. extras {key}", ("wcar_extra", "*"), mark=None)),
          "bits", trend=True, basis=("wcar",)),
    _attack_tables,
    Table("natural", "Natural robustness (paper Table 5)",
          "mNR and NCI over the 15 benchmark corruptions; mCE*: against AlexNet's errors, see the mCE line below.",
          ("natural",),
          (MNR, NCI, Col("mCE*", ("natural", "mce"), "low"), Col("Relative mCE*", ("natural", "relative_mce"), "low"),
           Col("mNR extra", ("natural", "extra", "mnr"), mark=None)),
          "bits", trend=True, basis=("natural", "mce")),
    Table("corruptions", "Natural robustness per corruption (paper Table 6)",
          "Accuracy per corruption, averaged over severities" + PER_ROW.format("benchmark corruption")
          + " Extra: corruptions outside the benchmark's 15, not in mNR.", ("natural",),
          (ACC, Col("{label}", ("natural", "acc_by_corruption", "*"), mark="worst"), replace(MNR, mark=None),
           replace(NCI, mark=None), Col("{label} (extra)", ("natural", "extra", "acc_by_corruption", "*"), mark=None)),
          "bar", noun="corruption", basis=("natural",)),
    Table("sequences", "Corruption sequences (paper Table 7)",
          "Mean flip probability mFP and mean top-5 distance mT5D over the 10 test perturbations at difficulty 1; "
          "d=2, d=3: ImageNet-P's harder difficulties, reported beside them.", ("sequence",),
          (MFP, Col("mT5D", ("sequence", "mt5d"), "low", scale=1),
           Col("mFP d={key}", ("sequence", "difficulty", "*", "mfp"), "low", None, 1, 3)),
          "bits", trend=True, basis=("sequence",)),
    Table("sequence-fp", "Flip probability per corruption sequence (paper Table 8)",
          "FP per sequence at difficulty 1" + PER_ROW.format("test perturbation")
          + " Extra: validation perturbations, not in mFP.", ("sequence",),
          (Col("{label}", ("sequence", "fp", "*"), "low", "worst", 1, 3), replace(MFP, mark=None),
           Col("{label} (extra)", ("sequence", "extra", "fp", "*"), "low", None, 1, 3)), "bar",
          noun="corruption sequence", basis=("sequence",)),
    Table("systematic", "Systematic robustness (paper Table 9)",
          "Mean ACC_s, SNI = (ACC - mean ACC_s) / ACC and SR (sample standard deviation of ACC_s) over the 14 "
          "decode/resize variants.", ("systematic",),
          (MEAN_S, Col("SNI", ("systematic", "sni"), "low"), SR), "bits", trend=True, basis=("systematic",)),
    Table("systematic-variants", "Systematic robustness per variant (paper Table 10)",
          "ACC_s per decode/resize variant" + PER_ROW.format("variant"), ("systematic",),
          (ACC, Col("{label}", ("systematic", "acc", "*"), mark="worst"), replace(MEAN_S, mark=None),
           replace(SR, mark=None)), "line", noun="systematic variant", basis=("systematic",)),
]


def _short_line(entry, corpus: set[str]) -> str | None:
    """One entry of summary["comparability"] without the reasons the corpus line already gives."""
    if not isinstance(entry, dict) or not isinstance(entry.get("comparable"), bool):
        return None
    if entry["comparable"]:
        return "comparable with the paper"
    reasons = entry.get("reasons")
    if not isinstance(reasons, list):  # written without reasons: the whole note
        return str(entry.get("note"))
    own = [str(r) for r in reasons if r not in corpus]
    return "not comparable: " + "; ".join(own) if own else "not comparable: see the corpus line"


def comparability_lines(table: Table, models: list[Model]) -> list[str]:
    """The table's comparability, one short line per distinct statement (model names where they differ).

    The reasons that hold for the whole corpus (geometry, classes) are left to the report's header."""
    notes: dict[str, list[str]] = {}
    for m in models:
        corpus = set((m.get("comparability", "corpus") or {}).get("reasons") or [])
        for key in table.basis:
            entry = m.get("comparability", key)
            if key == "wcar" and isinstance(entry, dict) and "comparable" not in entry:
                lines = {b: _short_line(e, corpus) for b, e in entry.items()}
                same = set(lines.values())
                text = next(iter(same)) if len(same) == 1 else "; ".join(f"{b}: {t}" for b, t in lines.items())
            else:
                text = _short_line(entry, corpus)
                text = text and (f"mCE {text}" if key == "mce" else text)
            if text:
                notes.setdefault(text, []).append(m.name)
    return [note if len(names) == len(models) else f"{note} [{', '.join(names)}]" for note, names in notes.items()]


# --- loading ----------------------------------------------------------------

def _load(folder, nc_threshold: float) -> Model:
    folder = Path(folder)
    path = folder if folder.name == "summary.json" else folder / "summary.json"
    if not path.is_file():
        raise ReportError(f"{folder}: no summary.json there; pass results folders written by `qrobust score`")
    try:
        with reading(path.parent):  # not while a `score` rewrites it
            s = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: not readable JSON ({' '.join(str(e).split())})") from None
    schema = s.get("schema") if isinstance(s, dict) else None
    if schema in OLD_SCHEMAS:
        try:
            s = upgrade(s)  # what can be recomputed is; the rest says it is not comparable
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ReportError(f"{path}: a {schema} summary that cannot be read ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]}); rescore the model") from None
    elif schema != SUMMARY_SCHEMA:
        readable = ", ".join([*OLD_SCHEMAS, SUMMARY_SCHEMA])
        raise ReportError(f"{path}: schema {schema!r}, this qrobust reads {readable}; rescore with this version")
    for need in (("model", "arch"), ("corpus", "manifest_sha256"), ("clean",)):
        if not isinstance(s.get(need[0]), dict) or (need[1:] and s[need[0]].get(need[1]) is None):
            raise ReportError(f"{path}: {'.'.join(need)} is missing; the file is incomplete, rescore the model")
    q = s["model"].get("quant") or {}
    w = q.get("w_bits", 32 if not q else None)  # as ModelSpec writes it
    a = q.get("a_bits", w)
    if not isinstance(w, int) or not isinstance(a, int):
        raise ReportError(f"{path}: model.quant has no integer weight bits; the file is incomplete, rescore the model")
    acc = s["clean"].get("acc")  # null when clean/onecrop was not scored: then not NC, ACC shown as missing
    return Model(path.parent, s, s["model"]["arch"], q.get("method", "fp").lower(), w,
                 str(w) if w == a else f"{w}/{a}", acc is not None and acc < nc_threshold)


def load_all(results, nc_threshold: float) -> list[Model]:
    if not 0 <= nc_threshold <= 1:
        raise ReportError(f"nc_threshold {nc_threshold} is not a fraction in [0, 1]")
    models = [_load(r, nc_threshold) for r in results]
    if not models:
        raise ReportError("no results folders given")
    same = {}
    for m in models:  # two models of one architecture, method and bits: told apart by their folders' names
        same.setdefault((m.arch, m.method, m.bits_label), []).append(m)
    for group in same.values():
        if len(group) > 1:
            for m in group:
                m.tag = m.folder.name
    corpora = {}
    for m in models:
        corpora.setdefault(m.s["corpus"]["manifest_sha256"], m.folder)
    if len(corpora) > 1:
        (sha_a, a), (sha_b, b) = list(corpora.items())[:2]
        raise ReportError(f"{a} and {b} were scored on different corpora (manifest {sha_a[:12]} vs {sha_b[:12]});"
                          " report models scored on the same corpus together")
    return models


def groups_of(models: list[Model]) -> list[tuple[str, list[Model]]]:
    """Models by architecture, in paper order; FP first, then DoReFa, PACT, LSQ by bit width."""
    def order(m):
        a = list(ARCHS).index(m.arch) if m.arch in ARCHS else len(ARCHS)
        q = list(METHODS).index(m.method) if m.method in METHODS else len(METHODS)
        return a, m.arch, q, m.method, m.bits, m.bits_label, m.name
    groups: dict[str, list[Model]] = {}
    for m in sorted(models, key=order):
        groups.setdefault(m.arch, []).append(m)
    return list(groups.items())


# --- tables -------------------------------------------------------------------

def _bold(cells: list[list], high: bool) -> None:
    """Bold the highest (or lowest) printed value of the cells, ties included, unless all are equal."""
    values = [float(c[0]) for c in cells if c[0] not in (None, "NC")]
    if len(set(values)) >= 2:
        best = max(values) if high else min(values)
        for c in cells:
            c[1] = c[0] not in (None, "NC") and float(c[0]) == best


def cell_grid(cols: list[Col], groups, significant=None) -> dict[int, list[list]]:
    """Per model (by id) its cells [text, bold, mark, interval]: "NC" for NC models, None where a value is
    missing; mark "†" where ``significant(model, path)`` (a paired difference from the FP model whose
    interval excludes 0); interval the value's 95% interval as text (for the HTML cell's title)."""
    def cell(m, c):
        text = "NC" if m.nc else c.text(c.value(m))
        path = ".".join(c.path)
        mark = "†" if text not in (None, "NC") and significant is not None and significant(m, path) else ""
        bounds = ((m.get("intervals") or {}).get("values") or {}).get(path)
        ok = isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, (int, float)) for b in bounds)
        return [text, False, mark, f"95% interval {c.text(bounds[0])}–{c.text(bounds[1])}" if ok else ""]

    grid = {id(m): [cell(m, c) for c in cols] for _, ms in groups for m in ms}
    for _, ms in groups:
        for j, c in enumerate(cols):
            if c.mark == "best":
                _bold([grid[id(m)][j] for m in ms], c.better == "high")
    worst = [j for j, c in enumerate(cols) if c.mark == "worst"]
    for row in grid.values():
        if worst:
            _bold([row[j] for j in worst], cols[worst[0]].better == "low")
    return grid


def _rows(groups, grid):
    """(architecture on a group's first row, else ""; method; bits; cells; group size on its first row, else 0)."""
    for arch, ms in groups:
        for i, m in enumerate(ms):
            yield ("" if i else ARCHS.get(arch, arch)), m.method_label, m.bits_label, \
                grid[id(m)], (0 if i else len(ms))


def _markdown(table: Table, caption: str, cols, groups, grid) -> str:
    head = ["Model", "Method", "Bits", *(c.label + c.arrow() for c in cols)]
    lines = [f"**{table.title}.** {caption}", "", "| " + " | ".join(head) + " |",
             "|---|---|---:|" + "---:|" * len(cols)]
    for arch, method, bits, cells, _ in _rows(groups, grid):
        text = [(f"**{t}**" if bold else (t or "–")) + mark for t, bold, mark, _ in cells]
        lines.append("| " + " | ".join([arch, method, bits, *text]) + " |")
    return "\n".join(lines) + "\n"


def _csv(table: Table, caption: str, cols, groups, grid) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["Model", "Method", "Bits", *(c.label for c in cols), "NC"])
    for arch, ms in groups:
        for m in ms:  # numbers, also for a not-converged model (its mark is the NC column); formula-safe text
            w.writerow([tidy.cell(x) for x in (ARCHS.get(arch, arch), m.method_label, m.bits_label,
                                               *(c.text(c.value(m)) or "" for c in cols), "yes" if m.nc else "")])
    return buf.getvalue()


def _tex(text: str) -> str:
    return "".join("\\" + ch if ch in "&%$#_{}" else ch for ch in text).replace("ACC\\_s", "ACC$_s$")


def _latex(table: Table, caption: str, cols, groups, grid) -> str:
    head = ["Model", "Method", "Bits", *(_tex(c.label) + c.arrow(r" $\uparrow$", r" $\downarrow$") for c in cols)]
    body = []
    for arch, method, bits, cells, first in _rows(groups, grid):
        body += [r"\midrule"] if first else []
        text = [(f"\\textbf{{{t}}}" if bold else (t or "--")) + ("$^\\dagger$" if mark else "")
                for t, bold, mark, _ in cells]
        body.append(" & ".join([_tex(arch), _tex(method), bits, *text]) + r" \\")
    tabular = [rf"\begin{{tabular}}{{lll{'r' * len(cols)}}}", r"\toprule", " & ".join(head) + r" \\",
               *body, r"\bottomrule", r"\end{tabular}"]
    if len(cols) > 8:  # wide per-variant tables: scale to the text width (graphicx)
        tabular = [r"\resizebox{\linewidth}{!}{%", *tabular, "}"]
    return "\n".join([f"% qrobust {__version__}; needs \\usepackage{{booktabs}} (and graphicx)",
                      r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(table.title + '. ' + caption)}}}",
                      rf"\label{{tab:qrobust-{table.name}}}", *tabular, r"\end{table}"]) + "\n"


def html_table(cols, groups, grid) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>"
                   for h in ["Model", "Method", "Bits", *(c.label + c.arrow("\u00a0↑", "\u00a0↓") for c in cols)])
    body = []
    for arch, method, bits, cells, first in _rows(groups, grid):
        lead = f'</tbody><tbody><tr><th class="arch" rowspan="{first}">{html.escape(arch)}</th>' if first else "<tr>"
        tds = "".join(f'<td title="{html.escape(ci)}">' + (f"<strong>{t}</strong>" if bold else (t or "–")) + mark
                      + "</td>" for t, bold, mark, ci in cells)
        body.append(f'{lead}<td class="m">{html.escape(method)}</td><td>{bits}</td>{tds}</tr>')
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f'{"".join(body).removeprefix("</tbody>")}</tbody></table></div>')


WRITERS = {".md": _markdown, ".csv": _csv, ".tex": _latex}
