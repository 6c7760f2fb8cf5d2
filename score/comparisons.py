"""Paired comparisons between the models of a report, and the sample sizes they would need.

For every architecture, each quantized model is compared with its FP model,
and the quantization methods with each other at equal bits. A comparison is
the difference of a headline number with its paired bootstrap interval
(:func:`qrobust.score.uncertainty.compare`: the same resampled images for both
models), and for accuracies of single variants (ACC, WCAR) an exact McNemar
test. Models scored on other samples (another ``--limit``) or without
per-sample columns (results of qrobust 0.1) are not compared, and the report
says so. The findings count a model as more or less robust only when its
interval excludes zero.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from qrobust.score import uncertainty
from qrobust.score.results import ResultsError, read_samples

# the numbers compared: the paper's headline columns (a "*" stands for every budget the summary holds)
PATHS = ("clean.acc", "wcar.*", "natural.mnr", "natural.nci", "sequence.mfp", "systematic.mean", "systematic.sni",
         "systematic.sr")
PER_SAMPLE = ("clean.acc", "wcar.*")  # a right/wrong outcome per image: McNemar applies


@dataclass
class Sampled:
    """A model's per-sample columns and its resampled headline numbers (computed once, shared by its pairs)."""

    names: list[str]
    x: np.ndarray
    draws: dict = field(default_factory=dict)
    point: dict = field(default_factory=dict)


def _paths(summary: dict) -> list[str]:
    out = []
    for path in PATHS:
        head, _, tail = path.partition(".")
        if tail == "*":
            out += [f"{head}.{b}" for b, v in (summary.get(head) or {}).items() if v is not None]
        else:
            out.append(path)
    return out


def load(models) -> tuple[dict[int, Sampled], list[str]]:
    """Per model (by id) its columns and draws; and one line per model that cannot be compared."""
    out, notes = {}, []
    for m in models:
        try:
            rows = (m.s.get("corpus") or {}).get("samples")
            found = read_samples(m.folder, rows if isinstance(rows, int) else None)
        except ResultsError as e:
            notes.append(f"{m.name}: not compared ({e})")
            continue
        if found is None:
            notes.append(f"{m.name}: not compared (no per-sample columns: results of an older qrobust; rescore)")
            continue
        names, x = found
        s = Sampled(names, x)
        try:
            s.draws = uncertainty.resampled(m.s, names, x)
            s.point = uncertainty.point(m.s, names, x)
        # columns that do not fit the summary, or a summary field of another kind: edited or damaged
        except (KeyError, ValueError, IndexError, TypeError, AttributeError) as e:
            notes.append(f"{m.name}: not compared (its per-sample columns do not fit its summary: "
                         f"{type(e).__name__}: {' '.join(str(e).split())[:200]})")
            continue
        out[id(m)] = s
    return out, notes


def pairs(groups) -> list[tuple]:
    """``(a, b, kind)``: each converged quantized model against its architecture's FP model, and the methods
    against each other at equal bits."""
    out = []
    for _, ms in groups:
        ok = [m for m in ms if not m.nc]
        fp = next((m for m in ok if m.method == "fp"), None)
        quantized = [m for m in ok if m.method != "fp"]
        if fp is not None:
            out += [(q, fp, "vs FP") for q in quantized]
        for bits in dict.fromkeys(m.bits_label for m in quantized):
            same = [m for m in quantized if m.bits_label == bits]
            out += [(a, b, f"methods at {bits} bits") for a, b in itertools.combinations(same, 2)]
    return out


def compare_all(groups, sampled: dict[int, Sampled], notes: list[str]) -> list[dict]:
    """The rows of the comparisons table (``sampled`` from :func:`load`); what cannot be compared is added
    to ``notes``."""
    rows = []
    for a, b, kind in pairs(groups):
        sa, sb = sampled.get(id(a)), sampled.get(id(b))
        if sa is None or sb is None:
            continue
        if sa.x.shape[0] != sb.x.shape[0]:
            notes.append(f"{a.name} and {b.name}: not compared (scored on {sa.x.shape[0]} and {sb.x.shape[0]} "
                         "samples: a paired comparison needs the same images)")
            continue
        for path in _paths(a.s):
            if path not in sa.draws or path not in sb.draws:
                continue
            low, high = uncertainty.percentile_interval(sa.draws[path] - sb.draws[path])
            row = {"a": a, "b": b, "kind": kind, "path": path, "difference": sa.point[path] - sb.point[path],
                   "low": low, "high": high, "significant": low is not None and (low > 0 or high < 0),
                   "mcnemar_p": None}
            column = _binary_column(path)
            if column in sa.names and column in sb.names:
                row["mcnemar_p"] = uncertainty.mcnemar(sa.x[:, sa.names.index(column)],
                                                       sb.x[:, sb.names.index(column)])["p"]
            rows.append(row)
    return rows


def _binary_column(path: str) -> str | None:
    if path == "clean.acc":
        return "acc:clean/onecrop"
    if path.startswith("wcar."):
        return f"wcar:{path.split('.', 1)[1]}"
    return None


def significance(rows: list[dict]) -> dict[tuple[int, str], dict]:
    """``{(id(quantized model), path): row}`` of the comparisons against the FP model."""
    return {(id(r["a"]), r["path"]): r for r in rows if r["kind"] == "vs FP"}


def required_samples_line(sampled: dict[int, Sampled], rows: list[dict], delta: float,
                          path: str = "wcar.small") -> str | None:
    """How many images a corpus needs to tell two models apart by ``delta`` of ``path`` (or of ACC when no
    WCAR was run), from the paired per-sample differences of the first comparison that has it."""
    for candidate in (path, "clean.acc"):
        column = _binary_column(candidate)
        for r in rows:
            sa, sb = sampled.get(id(r["a"])), sampled.get(id(r["b"]))
            if r["path"] != candidate or sa is None or sb is None or column not in sa.names or column not in sb.names:
                continue
            d = sa.x[:, sa.names.index(column)].astype(np.float64) - sb.x[:, sb.names.index(column)]
            n = uncertainty.required_samples(d, delta)
            if n is None:
                continue
            have = int((~np.isnan(d)).sum())
            label = {"clean.acc": "ACC"}.get(candidate, candidate.replace("wcar.", "WCAR "))
            return (f"To tell two models apart by {delta * 100:g} points of {label} (paired, 95% confidence, 80% "
                    f"power) a corpus needs about {n} images; these results have {have} (from the per-sample "
                    f"differences of {r['a'].name} and {r['b'].name}).")
    return None
