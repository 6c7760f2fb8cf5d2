"""The report: the paper's tables (:mod:`qrobust.score.tables`), figures, and one mailable HTML page.

``build_report(results, out)`` reads results folders written by ``qrobust score``
(one model each, all scored on the same corpus) and writes into ``out``:
``tables/<name>.md|.csv|.tex``, ``figures/<name>.png|.svg`` (a metric against
bit width per method, or a bar or line per model across corruptions, sequences
or systematic variants), ``index.html``: header, findings drawn from the
data, every table and figure, in one file (inline CSS, base64 PNGs), and
``findings.txt``, ``results.csv`` and the marker ``report.json``.

The results come from collaborators, so nothing in them is trusted: every
summary is checked field by field before use (:mod:`qrobust.score.tables`),
every name or note from them is escaped for the format it lands in
(:mod:`qrobust.score.escape`), and ``out`` must be new, empty, or an earlier
report: a folder of other files, a link, or a link inside the report is
refused, never written through. Each file is written under a partial name and
renamed into place.
"""
from __future__ import annotations

import base64
import importlib.util
import io
import json
import logging
import os
import stat
import warnings
from pathlib import Path

from qrobust._version import __version__
from qrobust.score import comparisons, escape, tidy
from qrobust.score.tables import (ARCHS, HUES, METHODS, TABLES, WRITERS, Col, Model, ReportError, Table,  # noqa: F401
                                  cell_grid, checked_name, comparability_lines, groups_of, html_table, load_all)
from qrobust.shared.errors import NO_SPACE
from qrobust.shared.files import fsync_dir, partial_path, remove_dead_partials

MARKER = "report.json"  # written first into every report folder: what a rerun may overwrite
MARKER_SCHEMA = "qrobust.report/1"
SUBFOLDERS = ("tables", "figures")
log = logging.getLogger("qrobust.report")

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
        # a line per method (and per results folder, where two models of a method share their bits)
        series = dict.fromkeys((m.method, m.tag) for m in ms if m.method != "fp") or {("fp", ""): None}
        for method, tag in series:
            pts = [m for m in ms if (m.method, m.tag) == (method, tag) and not m.nc and col.value(m) is not None]
            pts = sorted(pts + (fp if method != "fp" else []), key=lambda m: m.bits)
            color = _color(method, 6)
            ys = [col.value(m) * col.scale for m in pts]
            label = _legend(METHODS.get(method, method) + (f" [{tag}]" if tag else ""))
            ax.errorbar([xs.index(m.bits) for m in pts], ys, yerr=_error_bars(col, pts, ys), fmt="o-",
                        color=color, label=label, capsize=3)
            nc = [xs.index(m.bits) for m in ms if (m.method, m.tag) == (method, tag) and m.nc]
            ax.plot(nc, [0.03] * len(nc), "x", color=color, ms=9, mew=2, transform=ax.get_xaxis_transform())
        if not any(not m.nc and col.value(m) is not None for m in ms):
            ax.text(0.5, 0.5, "no converged model", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks(range(len(xs)), [f"{b} (FP)" if b == 32 else str(b) for b in xs])
        ax.set(title=escape.mathtext(ARCHS.get(arch, arch)), xlabel="bits (x: not converged)",
               ylabel=escape.mathtext(col.label) + (" (%)" if col.scale == 100 else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _error_bars(col: Col, models: list[Model], ys: list[float]):
    """(2, n) distances from each value to its 95% interval's bounds (0 where a summary has no interval)."""
    path = ".".join(col.path)
    out = [[0.0] * len(ys), [0.0] * len(ys)]
    for i, (m, y) in enumerate(zip(models, ys)):
        bounds = ((m.get("intervals") or {}).get("values") or {}).get(path)
        if isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, (int, float)) for b in bounds):
            out[0][i], out[1][i] = max(0.0, y - bounds[0] * col.scale), max(0.0, bounds[1] * col.scale - y)
    return out


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
                       color=_color(m.method, m.bits), label=_legend(m.short))
            else:
                ax.plot(range(len(cols)), ys, "o-", ms=4, color=_color(m.method, m.bits), label=_legend(m.short))
        tilt = len(cols) > 6
        ax.set_xticks(range(len(cols)), [escape.mathtext(c.label) for c in cols], rotation=30 if tilt else 0,
                      ha="right" if tilt else "center")
        ax.set(title=escape.mathtext(ARCHS.get(arch, arch)), ylabel="FP" if cols[0].scale == 1 else "accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def _legend(label: str) -> str:
    """A legend entry: escaped for mathtext, and shown even where it starts with "_" (which hides it)."""
    label = escape.mathtext(label)
    return " " + label if label.startswith("_") else label


def _color(method: str, bits: int):
    """A hue per method (FP dark grey), lighter for fewer bits, the same in every figure."""
    from matplotlib import colormaps
    return colormaps[HUES.get(method, "Purples")](0.85 if method == "fp" else 0.35 + 0.5 * min(bits, 8) / 8)


def _figure(table: Table, cols: list[Col], groups):
    if table.figure == "bits":
        col = next((c for c in cols if c.mark == "best"), None)
        if col is None or not any(not m.nc and col.value(m) is not None for _, ms in groups for m in ms):
            return None  # nothing to plot (every model not converged): no empty figure
        return _bits_figure(col, groups)
    return _variant_figure([c for c in cols if c.mark == "worst"], groups, table.figure)


# text is never handed to a TeX installation (a name's "\\input" would run there), whatever matplotlibrc says
FIGURE_RC = {"text.usetex": False, "svg.hashsalt": "qrobust", "svg.fonttype": "none"}


def _save(fig, folder: Path, name: str) -> bytes:
    """Write name.svg and name.png; return the PNG bytes."""
    svg, png = io.BytesIO(), io.BytesIO()
    fig.savefig(svg, format="svg", metadata={"Date": None})
    fig.savefig(png, format="png", dpi=100)
    _publish(folder / f"{name}.svg", svg.getvalue())
    _publish(folder / f"{name}.png", png.getvalue())
    return png.getvalue()


# --- findings and page --------------------------------------------------------

def _findings(models: list[Model], done: list[tuple[Table, list[Col]]], threshold: float,
              significant: dict | None = None) -> list[str]:
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
            out += _trend(cols[0], ok, significant)
    for m in models:
        for kind in ("gradient_masking", "warnings"):
            out += [f"{m.name}: {kind.replace('_', ' ')}: {w}" for w in (m.get("checks", kind) or [])]
    return out


def _trend(col: Col, models: list[Model], significant: dict | None = None) -> list[str]:
    """How a metric moves with bit width per architecture and method, and how quantized models compare to FP:
    more or less robust only where the paired interval excludes 0 (``significant``: see
    :func:`qrobust.score.comparisons.significance`)."""
    moves = {"rises": [], "falls": [], "is mixed": []}
    worse = better = unclear = raw_worse = untested = total = 0
    path = ".".join(col.path)
    for arch, ms in groups_of([m for m in models if col.value(m) is not None]):
        fp = next((col.value(m) for m in ms if m.method == "fp"), None)
        for method in dict.fromkeys(m.method for m in ms if m.method != "fp"):
            # by bits and value only: two models of one method, bits and value (reruns) are no error
            pts = sorted(((m.bits, col.value(m), m) for m in ms if m.method == method), key=lambda p: p[:2])
            if fp is not None:
                for _, v, m in pts:
                    total += 1
                    down = v != fp and (v < fp) == (col.better == "high")
                    row = (significant or {}).get((id(m), path))
                    if row is None:
                        untested += 1
                        raw_worse += down
                    elif not row["significant"]:
                        unclear += 1
                    elif (row["difference"] < 0) == (col.better == "high"):
                        worse += 1
                    else:
                        better += 1
            if len(pts) >= 2:
                steps = [b[1] - a[1] for a, b in zip(pts, pts[1:])]
                move = "rises" if all(s > 0 for s in steps) else "falls" if all(s < 0 for s in steps) else "is mixed"
                moves[move].append(f"{ARCHS.get(arch, arch)} {METHODS.get(method, method)}")
    series = sum(map(len, moves.values()))
    said = [f"{move} in {len(names)} of {series} series" + (f" ({', '.join(names)})" if len(names) <= 4 else "")
            for move, names in moves.items() if names]
    said = [", ".join(said)] if said else []
    if total and untested < total:
        said.append(f"of {total - untested} quantized models compared with their FP model (paired 95% intervals), "
                    f"{worse} are less robust, {better} more robust, and {unclear} differences are not significant")
    if untested:
        said.append(f"{raw_worse} of {untested} quantized models are less robust than their FP model (raw "
                    "differences, untested: no per-sample data)")
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
    esc = escape.html
    corpus = models[0].s["corpus"]
    per_arch = "<br>".join(f"<b>{esc(ARCHS.get(a, a))}</b>: " + esc(", ".join(
        m.short + (" (NC)" if m.nc else "") for m in ms)) for a, ms in groups_of(models))
    # each results folder by its name: the page goes to collaborators, local paths stay here
    names = "<br>".join(esc(f"{m.name}: {m.folder.name}") for _, ms in groups_of(models) for m in ms)
    info = {"Models": f"{per_arch}<details><summary>{len(models)} results folders</summary>{names}</details>",
            "Corpus": esc(f"{corpus.get('suite', '?')}, {corpus.get('samples', '?')} samples, manifest "
                          f"{corpus['manifest_sha256'][:16]}"),
            "Made": esc(provenance_line(models)),
            "Paper basis": esc(corpus_basis(models)),
            "Scored with": esc(f"qrobust {env('qrobust')}; torch {env('torch')}; device {env('device')}"),
            "Values": f"percentages with two decimals (flip probabilities: fractions); NC: clean accuracy below "
                      f"{threshold * 100:g}%; best per architecture, or most harmful variant per model, in bold",
            "Report": f"qrobust {esc(__version__)}"}
    nav = "".join(f'<a href="#{esc(checked_name(t.name))}">{esc(t.title)}</a> ' if t is not None
                  else '<a href="#comparisons">Paired comparisons</a> ' for t, _ in sections)
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>qrobust report</title>'
            f"<style>{CSS}</style></head><body><h1>qrobust robustness report</h1><dl>"
            + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in info.items()) + f"</dl><nav>{nav}</nav>"
            + '<h2>Findings</h2><ul>' + "".join(f"<li>{esc(f)}</li>" for f in findings) + "</ul>"
            + "".join(s for _, s in sections) + "</body></html>\n")


def provenance_line(models: list[Model]) -> str:
    """How the corpus was made and how much of each family was scored, in one line (the first model's record)."""
    prov = models[0].get("corpus", "provenance")
    if not prov:
        return "not recorded (results of qrobust 0.1: rescore to record it)"
    made = (f"imported from the released {prov.get('release')} files" if prov.get("made_by") == "import"
            else f"generated by qrobust (suite {prov.get('suite')})")
    geometry = prov.get("geometry") or {}
    parts = [made, f"{geometry.get('crop')} px crops", f"{prov.get('classes')} classes"]
    if prov.get("natural_encoding"):
        parts.append(f"natural variants {prov['natural_encoding']}")
    if prov.get("sequence_encoding"):
        parts.append(f"sequences {prov['sequence_encoding']}")
    libs = prov.get("libraries") or {}
    parts += [f"{lib} {libs[lib]}" for lib in ("imagecorruptions", "qrobust") if libs.get(lib)]
    for family, f in (prov.get("families") or {}).items():
        state = "complete" if f.get("complete") else "partial, its aggregates not comparable"
        parts.append(f"{family} {f.get('scored')}/{f.get('of')} ({state})")
    return "; ".join(str(p) for p in parts)


def corpus_basis(models: list[Model]) -> str:
    """Whether the corpus itself (geometry, classes) is on the paper's basis; the tables say the rest."""
    entry = models[0].get("comparability", "corpus")
    if not isinstance(entry, dict) or not isinstance(entry.get("comparable"), bool):
        return "not recorded (results of qrobust 0.1: rescore to record it)"
    if entry["comparable"]:
        return "the corpus is (ImageNet's classes at 224 px); each table says whether its numbers are"
    return "no number of this corpus is comparable with the paper's: " + "; ".join(map(str, entry.get("reasons") or []))


def build_report(results: list[str | Path], out: str | Path, nc_threshold: float = 0.1,
                 power: float = 0.005) -> Path:
    """Write the tables, figures and index.html for ``results`` (folders holding summary.json) into ``out``.

    Models are compared in pairs (:mod:`qrobust.score.comparisons`: each quantized model with its FP model,
    methods at equal bits); ``power`` is the difference (a fraction) the sample-size line is about.
    Returns the path of index.html. Raises ReportError (a ValueError) for a folder without a readable
    summary.json (schema 2, or schema 1 of qrobust 0.1, upgraded), a summary with a malformed field, results
    scored on different corpora, or an ``out`` that is no new, empty or earlier report folder."""
    out = Path(out)
    _check_out(out)
    models = load_all(results, nc_threshold)
    if importlib.util.find_spec("matplotlib") is None:
        raise ReportError("the report's figures need matplotlib: pip install matplotlib")
    for m in models:
        _rehearse(m, nc_threshold)
    paired = {id(m): m for a, b, _ in comparisons.pairs(groups_of(models)) for m in (a, b)}
    sampled, notes = comparisons.load(list(paired.values()))  # only the models some comparison needs
    for m in models:  # said on the page and on stderr: its numbers are shown, but they are the folder's word
        for why in m.unchecked:
            log.warning("%s", escape.visible(why))
            # the page names the folder, never a local path
            notes.append(f"{m.folder.name}: {why.removeprefix(str(m.folder)).lstrip(': ')}")
    compared = comparisons.compare_all(groups_of(models), sampled, notes)
    significant = comparisons.significance(compared)

    def marked(m, path) -> bool:
        row = significant.get((id(m), path))
        return row is not None and row["significant"]

    _make_out(out)
    sections, done = [], []
    for table, cols, groups, caption, cells in _tables(models, nc_threshold, marked):
        for ext, write in WRITERS.items():
            _publish(out / "tables" / f"{table.name}{ext}", write(table, caption, cols, groups, cells))
        section = html_table(cols, groups, cells)
        fig = _figure_of(table, cols, groups, out / "figures")
        if fig is not None:
            section += f'<img alt="{escape.html(table.title)}" src="data:image/png;base64,{fig}">'
        sections.append((table, f'<h2 id="{escape.html(table.name)}">{escape.html(table.title)}</h2>'
                                f'<p class="cap">{escape.html(caption)}</p><div class="row">{section}</div>'))
        done.append((table, cols))
    if compared or notes:
        sections.append((None, _comparisons_section(out, compared, notes)))
    long_rows = [row for m in models for row in tidy.rows(m.s, m.folder.name, m.nc)]
    _publish(out / "results.csv", tidy.to_csv(long_rows))  # every number, for pandas
    index = out / "index.html"
    findings = _findings(models, done, nc_threshold, significant if compared else None)
    line = comparisons.required_samples_line(sampled, compared, power)
    findings += [line] if line else []
    findings = [escape.plain(f) for f in findings + notes]  # one line each, whatever a name holds
    _publish(out / "findings.txt", "".join(f"{f}\n" for f in findings))  # for terminals and scripts
    _publish(index, _page(models, findings, sections, nc_threshold))  # last: a complete report has its page
    return index


def _tables(models: list[Model], nc_threshold: float, marked=None) -> list[tuple]:
    """``(table, columns, groups, caption, cells)`` of every table some model has data for."""
    out = []
    for table in (t for entry in TABLES for t in (entry(models) if callable(entry) else [entry])):
        rows = [m for m in models if m.nc or m.get(*table.family)]
        cols = [c for col in table.columns for c in col.expand(rows) if any(c.value(m) is not None for m in rows)]
        if not any(m.get(*table.family) for m in models) or not cols:
            continue  # no model has this table's data
        checked_name(table.name)  # it names files and the page's anchor
        # the caption's one placeholder, by replace: names in it (budgets) are no format string
        groups, caption = groups_of(rows), table.caption.replace("{nc}", f"{nc_threshold * 100:g}")
        basis = comparability_lines(table, rows)
        if basis:  # what the numbers can be put next to, one line per note, in every format
            caption += " Comparability: " + "; ".join(basis) + "."
        cells = cell_grid(cols, groups, marked)
        if any(mark for row in cells.values() for *_, mark, _ in row):
            caption += " †: differs from its architecture's FP model (paired 95% interval excludes 0)."
        out.append((table, cols, groups, caption, cells))
    return out


def _rehearse(m: Model, nc_threshold: float) -> None:
    """Everything the report computes from one summary except figures, for that summary alone and in memory.

    The checks of :func:`qrobust.score.tables.load_all` cover each field the report reads; should a value of
    an unforeseen kind pass them, it fails here, naming its file, before anything is written."""
    try:
        built = _tables([m], nc_threshold)
        for table, cols, groups, caption, cells in built:
            for write in WRITERS.values():
                write(table, caption, cols, groups, cells)
            html_table(cols, groups, cells)
        _page([m], _findings([m], [(t, c) for t, c, *_ in built], nc_threshold), [], nc_threshold)
        tidy.to_csv(tidy.rows(m.s, m.folder.name, m.nc))
    except ReportError:
        raise
    except (TypeError, KeyError, AttributeError, ValueError, IndexError, OverflowError, ZeroDivisionError) as e:
        raise ReportError(f"{m.folder / 'summary.json'}: cannot be reported ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]}); rescore the model") from None


def _figure_of(table: Table, cols: list[Col], groups, folder: Path) -> str | None:
    """Save the table's figure (SVG and PNG) into ``folder``; its PNG as base64, or None without one."""
    import matplotlib

    with matplotlib.rc_context(FIGURE_RC), warnings.catch_warnings():
        # long names can crowd a panel, exotic ones miss a glyph: the figure is still right, and a report
        # built from collaborators' folders says nothing the user could act on
        warnings.filterwarnings("ignore", "constrained_layout not applied", UserWarning)
        warnings.filterwarnings("ignore", "Glyph .* missing from", UserWarning)
        fig = _figure(table, cols, groups)
        if fig is None:
            return None
        return base64.b64encode(_save(fig, folder, table.name)).decode("ascii")


# --- the report folder ----------------------------------------------------------

def _is_report(out: Path) -> bool:
    """Whether the folder ``out`` holds a report qrobust wrote: its marker, or (reports written before the
    marker) an index.html with the report's title beside a tables folder."""
    marker = out / MARKER
    if _regular(marker):
        try:
            with open(marker, "rb") as f:
                return json.loads(f.read(4096)).get("schema") == MARKER_SCHEMA
        except (OSError, ValueError, AttributeError):
            return False
    index = out / "index.html"
    if not (_regular(index) and (out / "tables").is_dir() and not (out / "tables").is_symlink()):
        return False
    try:
        with open(index, "rb") as f:
            return b"<title>qrobust report</title>" in f.read(4096)
    except OSError:
        return False


def _regular(path: Path) -> bool:
    """A regular file itself, not a link to one."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _check_out(out: Path) -> None:
    """``out`` may be new, an empty folder or an earlier report, with no link where the report writes;
    checked before anything is read or written."""
    if out.is_symlink():
        raise ReportError(f"--out {out} is a link; give the report folder itself")
    if not out.exists():
        return
    if not out.is_dir():
        raise ReportError(f"--out {out} exists and is not a folder")
    try:
        empty = next(os.scandir(out), None) is None
    except OSError as e:
        raise ReportError(f"--out {out}: cannot be read ({e.strerror or e})") from None
    if not empty and not _is_report(out):
        raise ReportError(f"--out {out} holds other files and no earlier qrobust report; give a new or empty "
                          "folder")
    own = [out / name for name in (MARKER, "index.html", "findings.txt", "results.csv")]
    for sub in SUBFOLDERS:
        folder = out / sub
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise ReportError(f"{folder} is a link or not a folder, which qrobust never makes there; remove it "
                              "or give a new --out")
        if folder.exists():
            own += sorted(folder.iterdir())  # every file there is the report's
    for path in own:
        if path.is_symlink() or (path.exists() and not _regular(path)):
            raise ReportError(f"{path} is a link or not a file, which qrobust never writes into a report; remove "
                              "it or give a new --out")


def _make_out(out: Path) -> None:
    """Create the report folder and its subfolders, the marker first (so an interrupted report is still
    recognised as one), and clear what a killed report left half-written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for sub in SUBFOLDERS:
            (out / sub).mkdir(exist_ok=True)
    except OSError as e:
        raise ReportError(f"cannot create --out {out} ({e.strerror or e})") from None
    for folder in (out, *(out / sub for sub in SUBFOLDERS)):
        remove_dead_partials(folder)
    _publish(out / MARKER, json.dumps({"qrobust": __version__, "schema": MARKER_SCHEMA}, indent=1) + "\n")


def _publish(path: Path, data: str | bytes) -> None:
    """Write one report file (text as UTF-8) under a partial name, fsync, and rename it into place; never
    through a link, never over anything but a regular file."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise ReportError(f"{path} is a link or not a file, which qrobust never writes into a report; remove it "
                          "or give a new --out")
    tmp = partial_path(path)
    tmp.unlink(missing_ok=True)  # a killed report's, under a reused process id (a link goes, not its target)
    try:
        # O_EXCL: a link or file someone makes under the partial name meanwhile is refused, not written through
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except FileExistsError:
        raise ReportError(f"{tmp} appeared while this report wrote it: is another `qrobust report` writing "
                          f"{path.parent}?") from None
    except OSError as e:
        if e.errno in NO_SPACE:  # the command line says how to go on, naming the file
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise ReportError(f"cannot write {path} ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def _comparisons_section(out: Path, rows: list[dict], notes: list[str]) -> str:
    """The paired comparisons as tables/comparisons.{csv,md} and an HTML section."""
    import csv as csv_module

    head = ["Model", "Compared with", "Kind", "Metric", "Difference", "95% low", "95% high", "Significant",
            "McNemar p"]

    def fmt(v, digits=4):
        return "" if v is None else f"{v:.{digits}f}"

    names = [[r["a"].name, r["b"].name, r["kind"], r["path"]] for r in rows]  # from the summaries
    numbers = [[fmt(r["difference"]), fmt(r["low"]), fmt(r["high"]), "yes" if r["significant"] else "no",
                fmt(r["mcnemar_p"], 3)] for r in rows]  # formatted here
    esc = escape.html
    if not rows:  # nothing could be compared: the notes say why
        return ('<h2 id="comparisons">Paired comparisons</h2><ul>'
                + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    buf = io.StringIO()
    writer = csv_module.writer(buf, lineterminator="\n")
    writer.writerow(head)
    writer.writerows([*map(escape.csv_cell, text), *number] for text, number in zip(names, numbers))
    _publish(out / "tables" / "comparisons.csv", buf.getvalue())
    md = ["**Paired comparisons.** Differences (model minus the one it is compared with, fractions) with paired "
          "bootstrap 95% intervals; McNemar: exact test of the per-image outcomes.", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(map(escape.markdown, text + number)) + " |" for text, number in zip(names, numbers)]
    _publish(out / "tables" / "comparisons.md", "\n".join(md) + "\n")
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in text + number) + "</tr>"
                   for text, number in zip(names, numbers))
    note = "".join(f"<li>{esc(n)}</li>" for n in notes)
    return ('<h2 id="comparisons">Paired comparisons</h2><p class="cap">Each quantized model against its '
            "architecture's FP model, and the methods against each other at equal bits: the difference of each "
            "headline number with its paired bootstrap 95% interval (the same resampled images for both), and "
            "an exact McNemar test where the number is one right/wrong outcome per image.</p>"
            + (f"<ul>{note}</ul>" if note else "")
            + (f'<div class="scroll"><table><thead><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr></thead>'
               f"<tbody>{body}</tbody></table></div>" if rows else ""))
