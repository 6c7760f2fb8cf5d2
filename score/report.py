"""The paper's tables and figures, and one mailable HTML page, from ``summary.json`` results.

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

import base64
import csv
import html
import importlib.util
import io
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import qrobust
from qrobust.shared.errors import QrobustError

SCHEMA = "qrobust.summary/1"
ARCHS = {"resnet18": "ResNet18", "resnet50": "ResNet50", "regnetx_600mf": "RegNetX600M", "mobilenet_v2": "MobileNetV2"}
METHODS = {"fp": "FP", "dorefa": "DoReFa", "pact": "PACT", "lsq": "LSQ"}
BUDGETS = ("small", "middle", "large")
HUES = {"fp": "Greys", "dorefa": "Blues", "pact": "Oranges", "lsq": "Greens"}  # figure colors; lighter: fewer bits
SHORT = {"gaussian_noise": "Gauss", "shot_noise": "Shot", "impulse_noise": "Impulse", "defocus_blur": "Defocus",
         "glass_blur": "Glass", "motion_blur": "Motion", "zoom_blur": "Zoom", "brightness": "Bright",
         "elastic_transform": "Elastic", "pixelate": "Pixel", "jpeg_compression": "JPEG",
         "pil": "PIL", "opencv": "OpenCV", "ffmpeg": "FFmpeg", "decode": "Decode", "resize": ""}


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
        return "FP" if self.method == "fp" else f"{METHODS.get(self.method, self.method)} {self.bits_label}-bit"

    @property
    def name(self) -> str:
        return self.get("model", "name") or f"{self.arch} {self.short}"


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
    """glass_blur -> Glass, rotate -> Rotate, resize-opencv-area -> OpenCV area, decode-pil -> Decode PIL."""
    words = [SHORT.get(w, w) for w in key.split("-")]
    return SHORT.get(key) or (" ".join(w for w in words if w) if len(words) > 1 else key.replace("_", " ").capitalize())


def _attack_tables(models: list[Model]) -> list[Table]:
    """Paper Tables 3-4: one table per attack, AR and AAI per budget."""
    tables = []
    for attack in _keys(models, "attacks"):
        eps = {b: next(filter(None, (m.get("attacks", attack, b, "eps") for m in models)), None)
               for b in _keys(models, "attacks", attack)}
        eps = ", ".join(f"{b} {e * 255:.3g}/255" for b, e in eps.items() if e) or "not recorded"
        tables.append(Table(f"attack-{attack}", f"Adversarial robustness under {attack} (paper Tables 3-4)",
                            f"AR and AAI per perturbation budget; eps: {eps}.", ("attacks", attack),
                            (Col("AR {key}", ("attacks", attack, "*", "ar")),
                             Col("AAI {key}", ("attacks", attack, "*", "aai"), "low")), "bits"))
    return tables


TABLES = [
    Table("clean", "Clean accuracy (paper Table 1)", "ACC; NC: not converged, clean accuracy below {nc}%.",
          ("clean",), (replace(ACC, mark="best"),), "bits"),
    Table("wcar", "Worst-case adversarial robustness (paper Table 2)", "WCAR over all attacks, per budget.",
          ("wcar",), (Col("WCAR {key}", ("wcar", "*")),), "bits", trend=True),
    _attack_tables,
    Table("natural", "Natural robustness (paper Table 5)", "mNR and NCI over all corruptions.", ("natural",),
          (MNR, NCI, Col("mCE", ("natural", "mce"), "low"), Col("Relative mCE", ("natural", "relative_mce"), "low")),
          "bits", trend=True),
    Table("corruptions", "Natural robustness per corruption (paper Table 6)",
          "Accuracy per corruption, averaged over severities" + PER_ROW.format("corruption"), ("natural",),
          (ACC, Col("{label}", ("natural", "acc_by_corruption", "*"), mark="worst"), replace(MNR, mark=None),
           replace(NCI, mark=None)), "bar", noun="corruption"),
    Table("sequences", "Corruption sequences (paper Table 7)",
          "Mean flip probability mFP and mean top-5 distance mT5D over all sequences.", ("sequence",),
          (MFP, Col("mT5D", ("sequence", "mt5d"), "low", scale=1)), "bits", trend=True),
    Table("sequence-fp", "Flip probability per corruption sequence (paper Table 8)",
          "FP per sequence" + PER_ROW.format("sequence"), ("sequence",),
          (Col("{label}", ("sequence", "fp", "*"), "low", "worst", 1, 3), replace(MFP, mark=None)), "bar",
          noun="corruption sequence"),
    Table("systematic", "Systematic robustness (paper Table 9)",
          "Mean ACC_s, SNI and SR (standard deviation of ACC_s) over all decode/resize variants.", ("systematic",),
          (MEAN_S, Col("SNI", ("systematic", "sni"), "low"), SR), "bits", trend=True),
    Table("systematic-variants", "Systematic robustness per variant (paper Table 10)",
          "ACC_s per decode/resize variant" + PER_ROW.format("variant"), ("systematic",),
          (ACC, Col("{label}", ("systematic", "acc", "*"), mark="worst"), replace(MEAN_S, mark=None),
           replace(SR, mark=None)), "line", noun="systematic variant"),
]


# --- loading ----------------------------------------------------------------

def _load(folder, nc_threshold: float) -> Model:
    folder = Path(folder)
    path = folder if folder.name == "summary.json" else folder / "summary.json"
    if not path.is_file():
        raise ReportError(f"{folder}: no summary.json there; pass results folders written by `qrobust score`")
    try:
        s = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: not readable JSON ({' '.join(str(e).split())})") from None
    schema = s.get("schema") if isinstance(s, dict) else None
    if schema != SCHEMA:
        raise ReportError(f"{path}: schema {schema!r}, this qrobust reads {SCHEMA!r}; rescore with this version")
    for need in (("model", "arch"), ("corpus", "manifest_sha256"), ("clean",)):
        if not isinstance(s.get(need[0]), dict) or (need[1:] and s[need[0]].get(need[1]) is None):
            raise ReportError(f"{path}: {'.'.join(need)} is missing; the file is incomplete, rescore the model")
    q = s["model"].get("quant") or {}
    w = q.get("w_bits", 32 if not q else None)  # DESIGN.md's spelling, as ModelSpec writes it
    a = q.get("a_bits", w)
    if not isinstance(w, int) or not isinstance(a, int):
        raise ReportError(f"{path}: model.quant has no integer weight bits; the file is incomplete, rescore the model")
    acc = s["clean"].get("acc")  # null when clean/onecrop was not scored: then not NC, ACC shown as missing
    return Model(path.parent, s, s["model"]["arch"], q.get("method", "fp").lower(), w,
                 str(w) if w == a else f"{w}/{a}", acc is not None and acc < nc_threshold)


def _load_all(results, nc_threshold: float) -> list[Model]:
    if not 0 <= nc_threshold <= 1:
        raise ReportError(f"nc_threshold {nc_threshold} is not a fraction in [0, 1]")
    models = [_load(r, nc_threshold) for r in results]
    if not models:
        raise ReportError("no results folders given")
    corpora = {}
    for m in models:
        corpora.setdefault(m.s["corpus"]["manifest_sha256"], m.folder)
    if len(corpora) > 1:
        (sha_a, a), (sha_b, b) = list(corpora.items())[:2]
        raise ReportError(f"{a} and {b} were scored on different corpora (manifest {sha_a[:12]} vs {sha_b[:12]});"
                          " report models scored on the same corpus together")
    return models


def _groups(models: list[Model]) -> list[tuple[str, list[Model]]]:
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


def _grid(cols: list[Col], groups) -> dict[int, list[list]]:
    """Per model (by id) its cells [text, bold]: "NC" for NC models, None where a value is missing."""
    grid = {id(m): [["NC" if m.nc else c.text(c.value(m)), False] for c in cols] for _, ms in groups for m in ms}
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
            yield ("" if i else ARCHS.get(arch, arch)), METHODS.get(m.method, m.method), m.bits_label, \
                grid[id(m)], (0 if i else len(ms))


def _markdown(table: Table, caption: str, cols, groups, grid) -> str:
    head = ["Model", "Method", "Bits", *(c.label + c.arrow() for c in cols)]
    lines = [f"**{table.title}.** {caption}", "", "| " + " | ".join(head) + " |",
             "|---|---|---:|" + "---:|" * len(cols)]
    for arch, method, bits, cells, _ in _rows(groups, grid):
        text = [f"**{t}**" if bold else (t or "–") for t, bold in cells]
        lines.append("| " + " | ".join([arch, method, bits, *text]) + " |")
    return "\n".join(lines) + "\n"


def _csv(table: Table, caption: str, cols, groups, grid) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["Model", "Method", "Bits", *(c.label for c in cols)])
    for arch, ms in groups:
        for m in ms:
            w.writerow([ARCHS.get(arch, arch), METHODS.get(m.method, m.method), m.bits_label,
                        *(t or "" for t, _ in grid[id(m)])])
    return buf.getvalue()


def _tex(text: str) -> str:
    return "".join("\\" + ch if ch in "&%$#_{}" else ch for ch in text).replace("ACC\\_s", "ACC$_s$")


def _latex(table: Table, caption: str, cols, groups, grid) -> str:
    head = ["Model", "Method", "Bits", *(_tex(c.label) + c.arrow(r" $\uparrow$", r" $\downarrow$") for c in cols)]
    body = []
    for arch, method, bits, cells, first in _rows(groups, grid):
        body += [r"\midrule"] if first else []
        text = [f"\\textbf{{{t}}}" if bold else (t or "--") for t, bold in cells]
        body.append(" & ".join([_tex(arch), _tex(method), bits, *text]) + r" \\")
    tabular = [rf"\begin{{tabular}}{{lll{'r' * len(cols)}}}", r"\toprule", " & ".join(head) + r" \\",
               *body, r"\bottomrule", r"\end{tabular}"]
    if len(cols) > 8:  # wide per-variant tables: scale to the text width (graphicx)
        tabular = [r"\resizebox{\linewidth}{!}{%", *tabular, "}"]
    return "\n".join([f"% qrobust {qrobust.__version__}; needs \\usepackage{{booktabs}} (and graphicx)",
                      r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(table.title + '. ' + caption)}}}",
                      rf"\label{{tab:qrobust-{table.name}}}", *tabular, r"\end{table}"]) + "\n"


def _html_table(cols, groups, grid) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>"
                   for h in ["Model", "Method", "Bits", *(c.label + c.arrow("\u00a0↑", "\u00a0↓") for c in cols)])
    body = []
    for arch, method, bits, cells, first in _rows(groups, grid):
        lead = f'</tbody><tbody><tr><th class="arch" rowspan="{first}">{html.escape(arch)}</th>' if first else "<tr>"
        tds = "".join(f"<td><strong>{t}</strong></td>" if bold else f"<td>{t or '–'}</td>" for t, bold in cells)
        body.append(f'{lead}<td class="m">{html.escape(method)}</td><td>{bits}</td>{tds}</tr>')
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f'{"".join(body).removeprefix("</tbody>")}</tbody></table></div>')


WRITERS = {".md": _markdown, ".csv": _csv, ".tex": _latex}


# --- figures ------------------------------------------------------------------

def _bits_figure(col: Col, groups):
    """A panel per architecture: the metric against bit width, a line per method ending at FP (32); NC as x."""
    from matplotlib.figure import Figure
    ncols, nrows = min(2, len(groups)), (len(groups) + 1) // 2
    fig = Figure(figsize=(0.8 + 3.9 * ncols, 0.4 + 3.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    for ax, (arch, ms) in zip(axes, groups):
        xs = sorted({m.bits for m in ms})
        fp = [m for m in ms if m.method == "fp" and not m.nc and col.value(m) is not None]
        for method in dict.fromkeys(m.method for m in ms if m.method != "fp") or ["fp"]:
            pts = [m for m in ms if m.method == method and not m.nc and col.value(m) is not None]
            pts = sorted(pts + (fp if method != "fp" else []), key=lambda m: m.bits)
            color = _color(method, 6)
            ax.plot([xs.index(m.bits) for m in pts], [col.value(m) * col.scale for m in pts], "o-",
                    color=color, label=METHODS.get(method, method))
            nc = [xs.index(m.bits) for m in ms if m.method == method and m.nc]
            ax.plot(nc, [0.03] * len(nc), "x", color=color, ms=9, mew=2, transform=ax.get_xaxis_transform())
        ax.set_xticks(range(len(xs)), [f"{b} (FP)" if b == 32 else str(b) for b in xs])
        ax.set(title=ARCHS.get(arch, arch), xlabel="bits (x: not converged)",
               ylabel=col.label + (" (%)" if col.scale == 100 else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _variant_figure(cols: list[Col], groups, style: str):
    """A panel per architecture: a bar group ("bar") or a line ("line") per model across the variants."""
    from matplotlib.figure import Figure
    groups = [(a, [m for m in ms if not m.nc and any(c.value(m) is not None for c in cols)]) for a, ms in groups]
    groups = [(a, ms) for a, ms in groups if ms]
    if not groups:
        return None
    fig = Figure(figsize=(max(8.0, 0.75 * len(cols) + 3), 0.6 + 2.9 * len(groups)), layout="constrained")
    for ax, (arch, ms) in zip(fig.subplots(len(groups), 1, squeeze=False)[:, 0], groups):
        width = 0.8 / len(ms)
        for k, m in enumerate(ms):
            ys = [float("nan") if c.value(m) is None else c.value(m) * c.scale for c in cols]
            if style == "bar":
                ax.bar([j - 0.4 + width * (k + 0.5) for j in range(len(cols))], ys, width,
                       color=_color(m.method, m.bits), label=m.short)
            else:
                ax.plot(range(len(cols)), ys, "o-", ms=4, color=_color(m.method, m.bits), label=m.short)
        tilt = len(cols) > 6
        ax.set_xticks(range(len(cols)), [c.label for c in cols], rotation=30 if tilt else 0,
                      ha="right" if tilt else "center")
        ax.set(title=ARCHS.get(arch, arch), ylabel="FP" if cols[0].scale == 1 else "accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def _color(method: str, bits: int):
    """A hue per method (FP dark grey), lighter for fewer bits, the same in every figure."""
    from matplotlib import colormaps
    return colormaps[HUES.get(method, "Purples")](0.85 if method == "fp" else 0.35 + 0.5 * min(bits, 8) / 8)


def _figure(table: Table, cols: list[Col], groups):
    if importlib.util.find_spec("matplotlib") is None:
        raise ReportError("the report's figures need matplotlib: pip install matplotlib")
    if table.figure == "bits":
        col = next((c for c in cols if c.mark == "best"), None)
        return col and _bits_figure(col, groups)
    return _variant_figure([c for c in cols if c.mark == "worst"], groups, table.figure)


def _save(fig, folder: Path, name: str) -> bytes:
    """Write name.svg and name.png; return the PNG bytes."""
    import matplotlib
    with matplotlib.rc_context({"svg.hashsalt": "qrobust", "svg.fonttype": "none"}):
        fig.savefig(folder / f"{name}.svg", metadata={"Date": None})
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    (folder / f"{name}.png").write_bytes(buf.getvalue())
    return buf.getvalue()


# --- findings and page --------------------------------------------------------

def _findings(models: list[Model], done: list[tuple[Table, list[Col]]], threshold: float) -> list[str]:
    ok = [m for m in models if not m.nc]
    out = []
    if len(ok) < len(models):
        out.append(f"Not converged (clean accuracy below {threshold * 100:g}%), shown as NC and left out of marks,"
                   " lines and findings: " + ", ".join(f"{m.name} ({m.s['clean']['acc'] * 100:.2f}%)"
                                                       for m in models if m.nc) + ".")
    for table, cols in done:
        variants = [c for c in cols if c.mark == "worst"]
        means = {c.label: [c.value(m) for m in ok if c.value(m) is not None] for c in variants}
        means = {k: sum(v) / len(v) for k, v in means.items() if v}
        if len(set(means.values())) >= 2:
            order = sorted(means, key=means.get, reverse=variants[0].better == "low")
            unit = "%" if variants[0].scale == 100 else ""
            (worst, w), (least, x) = ((k, variants[0].text(means[k]) + unit) for k in (order[0], order[-1]))
            out.append(f"Most harmful {table.noun} on average: {worst} ({w}); least harmful: {least} ({x}).")
        if table.trend:
            out += _trend(cols[0], ok)
    for m in models:
        for kind in ("gradient_masking", "warnings"):
            out += [f"{m.name}: {kind.replace('_', ' ')}: {w}" for w in (m.get("checks", kind) or [])]
    return out


def _trend(col: Col, models: list[Model]) -> list[str]:
    """How a metric moves with bit width per architecture and method, and how quantized models compare to FP."""
    moves, worse, total = {"rises": [], "falls": [], "is mixed": []}, 0, 0
    for arch, ms in _groups([m for m in models if col.value(m) is not None]):
        fp = next((col.value(m) for m in ms if m.method == "fp"), None)
        for method in dict.fromkeys(m.method for m in ms if m.method != "fp"):
            pts = sorted((m.bits, col.value(m)) for m in ms if m.method == method)
            if fp is not None:
                total += len(pts)
                worse += sum(v != fp and (v < fp) == (col.better == "high") for _, v in pts)
            if len(pts) >= 2:
                steps = [b[1] - a[1] for a, b in zip(pts, pts[1:])]
                move = "rises" if all(s > 0 for s in steps) else "falls" if all(s < 0 for s in steps) else "is mixed"
                moves[move].append(f"{ARCHS.get(arch, arch)} {METHODS.get(method, method)}")
    series = sum(map(len, moves.values()))
    said = [f"{move} in {len(names)} of {series} series" + (f" ({', '.join(names)})" if len(names) <= 4 else "")
            for move, names in moves.items() if names]
    said = [", ".join(said)] if said else []
    said += [f"{worse} of {total} quantized models are less robust than their FP model"] if total else []
    return [f"{col.label} as bits grow: " + "; ".join(said) + "."] if said else []


CSS = """body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#222;margin:0 auto;
max-width:1280px;padding:1em 1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:600}dd{margin:0}
nav a{margin-right:1em;white-space:nowrap}p.cap{color:#444;margin:.3em 0}
.row{display:flex;flex-wrap:wrap;gap:1em 2em;align-items:flex-start}.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:12px;white-space:nowrap;border-bottom:2px solid #333}
th,td{padding:.2em .4em;text-align:right}thead th{border-top:2px solid #333;border-bottom:1px solid #333;
white-space:normal;vertical-align:bottom;background:#f3f3f3}td.m,th.arch,thead th:nth-child(-n+2){text-align:left}
tbody{border-top:1px solid #999}
th.arch{vertical-align:top;background:#fafafa}td strong{color:#a00}img{max-width:100%;height:auto;min-width:0}
summary{cursor:pointer}"""


def _page(models: list[Model], findings: list[str], sections: list[tuple[Table, str]], threshold: float) -> str:
    def env(key):
        return ", ".join(sorted({str(m.get("env", key)) for m in models if m.get("env", key) is not None})) or "?"
    corpus = models[0].s["corpus"]
    per_arch = "<br>".join(f"<b>{html.escape(ARCHS.get(a, a))}</b>: " + html.escape(", ".join(
        m.short + (" (NC)" if m.nc else "") for m in ms)) for a, ms in _groups(models))
    names = "<br>".join(html.escape(f"{m.name}: {m.folder}") for _, ms in _groups(models) for m in ms)
    info = {"Models": f"{per_arch}<details><summary>{len(models)} results folders</summary>{names}</details>",
            "Corpus": html.escape(f"{corpus.get('suite', '?')}, {corpus.get('samples', '?')} samples, manifest "
                                  f"{corpus['manifest_sha256'][:16]}"),
            "Scored with": html.escape(f"qrobust {env('qrobust')}; torch {env('torch')}; device {env('device')}"),
            "Values": f"percentages with two decimals (flip probabilities: fractions); NC: clean accuracy below "
                      f"{threshold * 100:g}%; best per architecture, or most harmful variant per model, in bold",
            "Report": f"qrobust {html.escape(qrobust.__version__)}"}
    nav = "".join(f'<a href="#{t.name}">{html.escape(t.title)}</a> ' for t, _ in sections)
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>qrobust report</title>'
            f"<style>{CSS}</style></head><body><h1>qrobust robustness report</h1><dl>"
            + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in info.items()) + f"</dl><nav>{nav}</nav>"
            + '<h2>Findings</h2><ul>' + "".join(f"<li>{html.escape(f)}</li>" for f in findings) + "</ul>"
            + "".join(s for _, s in sections) + "</body></html>\n")


def build_report(results: list[str | Path], out: str | Path, nc_threshold: float = 0.1) -> Path:
    """Write the tables, figures and index.html for ``results`` (folders holding summary.json) into ``out``.

    Returns the path of index.html. Raises ReportError (a ValueError) for a folder without a readable
    qrobust.summary/1 summary.json, or for results scored on different corpora."""
    models = _load_all(results, nc_threshold)
    out = Path(out)
    for sub in ("tables", "figures"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    sections, done = [], []
    for table in (t for entry in TABLES for t in (entry(models) if callable(entry) else [entry])):
        rows = [m for m in models if m.nc or m.get(*table.family)]
        cols = [c for col in table.columns for c in col.expand(rows) if any(c.value(m) is not None for m in rows)]
        if not any(m.get(*table.family) for m in models) or not cols:
            continue  # no model has this table's data
        groups, caption = _groups(rows), table.caption.format(nc=f"{nc_threshold * 100:g}")
        grid = _grid(cols, groups)
        for ext, write in WRITERS.items():
            (out / "tables" / f"{table.name}{ext}").write_text(write(table, caption, cols, groups, grid), "utf-8")
        section = _html_table(cols, groups, grid)
        fig = _figure(table, cols, groups)
        if fig is not None:
            png = base64.b64encode(_save(fig, out / "figures", table.name)).decode("ascii")
            section += f'<img alt="{html.escape(table.title)}" src="data:image/png;base64,{png}">'
        sections.append((table, f'<h2 id="{table.name}">{html.escape(table.title)}</h2><p class="cap">'
                                f'{html.escape(caption)}</p><div class="row">{section}</div>'))
        done.append((table, cols))
    index = out / "index.html"
    index.write_text(_page(models, _findings(models, done, nc_threshold), sections, nc_threshold), "utf-8")
    return index
