"""Every number of a summary as one row of a long table, for pandas and other tools (``results.csv``).

One row per number: which model (name, results folder, weights and state
digests, method, bits, not-converged flag), which variant or attack, which
family and metric, the value and its 95% interval. Values are plain numbers
(no percent signs, no "NC" in place of a number), so
``pandas.read_csv("results.csv")`` gives numeric columns. ``qrobust score``
writes one beside each ``summary.json``; ``qrobust report`` writes one for all
its models.
"""
from __future__ import annotations

import csv
import io

from qrobust.score.escape import csv_cell

FIELDS = ("model", "results", "weights_sha256", "state_sha256", "method", "bits", "nc", "family", "metric",
          "variant", "value", "low", "high")
SECTIONS = ("clean", "natural", "sequence", "systematic", "attacks", "wcar", "wcar_extra")
SKIP = {"eps", "n", "params", "norm", "cascade", "mce_basis"}  # settings and notes, not measurements


def _leaves(tree, prefix: str = ""):
    for key, value in tree.items():
        if key in SKIP:
            continue
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaves(value, path + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield path, float(value)


def _split(path: str) -> tuple[str, str, str]:
    """A summary path as (family, metric, variant): natural.acc.fog-3 -> (natural, acc, natural/fog-3)."""
    parts = path.split(".")
    family = parts[0]
    if family in ("wcar", "wcar_extra"):
        return "attacks", family, parts[1]
    if family == "attacks":  # attacks.<attack>.<budget>.<metric>
        return "attacks", parts[-1], f"{parts[1]}/{parts[2]}"
    if family == "clean":
        return "clean", "acc", "clean/onecrop" if parts[1] == "acc" else "clean/square"
    qualifier = ""
    if parts[1] == "difficulty":  # sequence.difficulty.<d>.<...>
        qualifier, parts = f"_d{parts[2]}", [parts[0], *parts[3:]]
    if parts[1] == "extra":
        qualifier, parts = qualifier + "_extra", [parts[0], *parts[2:]]
    metric = parts[1] + qualifier
    if len(parts) == 2:
        return family, metric, ""
    name = ".".join(parts[2:])
    per_variant = (family == "natural" and parts[1] == "acc") or family in ("sequence", "systematic")
    return family, metric, f"{family}/{name}" if per_variant else name


def rows(summary: dict, results: str = "", nc: bool = False) -> list[dict]:
    """The rows of one model's summary (``results``: its results folder's name, in a report; empty in the
    folder's own table)."""
    model = summary.get("model") or {}
    quant = model.get("quant") or {}
    intervals = ((summary.get("intervals") or {}).get("values")) or {}
    common = {"model": model.get("name", ""), "results": results, "weights_sha256": model.get("sha256") or "",
              "state_sha256": model.get("state_sha256") or "", "method": quant.get("method", "fp"),
              "bits": quant.get("w_bits", 32), "nc": bool(nc)}
    out = []
    for section in SECTIONS:
        tree = summary.get(section)
        if not isinstance(tree, dict):
            continue
        for path, value in _leaves(tree, section + "."):
            family, metric, variant = _split(path)
            bounds = intervals.get(path) or [None, None]
            out.append({**common, "family": family, "metric": metric, "variant": variant, "value": value,
                        "low": bounds[0], "high": bounds[1]})
    return out


def to_csv(all_rows: list[dict]) -> str:
    """The rows as CSV text (empty cells for missing interval bounds; names from files made formula-safe)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in all_rows:
        writer.writerow({k: csv_cell(row[k]) for k in FIELDS})
    return buf.getvalue()
