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

Summaries come from collaborators: :func:`load_all` reads each within a size
and nesting bound and checks the kind and size of every field the report reads
(a string where a number belongs, NaN, a name that would become a file name),
refusing a malformed one in a line that names the file and the field. The
writers escape every name for their format (:mod:`qrobust.score.escape`).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from qrobust._version import __version__
from qrobust.score import escape, tidy
from qrobust.score.comparability import PAPER_ATTACKS
from qrobust.score.results import ResultsError, check_folder, reading
from qrobust.score.summary import OLD_SCHEMAS, SUMMARY_SCHEMA, upgrade
from qrobust.shared import noises
from qrobust.shared.architectures import ARCHITECTURES
from qrobust.shared.bounded import BoundsError, load_json
from qrobust.shared.errors import QrobustError
from qrobust.shared.quant import METHODS as METHODS_REGISTRY

# labels, order and colours come from the architectures' and quantization methods' definitions
ARCHS = {n: ARCHITECTURES.get(n).label for n in ARCHITECTURES.in_order()}  # the paper's order first
METHODS = {"fp": "FP", **{n: METHODS_REGISTRY.get(n).label for n in METHODS_REGISTRY.in_order()}}
BUDGETS = ("small", "middle", "large")
HUES = {"fp": "Greys", **{n: METHODS_REGISTRY.get(n).hue for n in METHODS_REGISTRY.in_order()}}  # lighter: fewer bits


class ReportError(QrobustError, ValueError):
    """Results that cannot be reported (no or foreign summary.json, different corpora, a malformed field, an
    unusable --out)."""

    def __init__(self, message: str):
        # messages quote names from others' files and folders: one line, whatever those hold
        super().__init__(escape.visible(message))


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
    unchecked: tuple = ()  # why its summary could not be checked against its predictions (digests)

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
    e, norm = entry["eps"], entry.get("norm") or "linf"
    return f"{e * 255:.3g}/255" if norm == "linf" else f"{e:.4g} ({norm.upper()})"


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

# Bounds far above anything `qrobust score` writes (a summary of the paper's 101-variant corpus with every
# attack is ~100 kB, ~1000 numbers): no edited summary sizes a table, a figure or a number beyond them.
SUMMARY_MAX_BYTES = 16 << 20
MAX_VALUE = 1e9        # accuracies, flip probabilities, top-5 distances, budgets, sample counts
MAX_NUMBERS = 100_000  # numbers in the measured sections, each a row of results.csv
MAX_KEYS = 200         # variants, corruptions, attacks or budgets of one entry: a table's columns
MAX_TEXT = 10_000      # characters of a name, a note or a warning
MAX_BITS = 64
SECTIONS = (*tidy.SECTIONS, "intervals")


class _Bad(Exception):
    """A summary field of the wrong kind or size; :func:`_load` names the file."""


def _kind(value) -> str:
    return {dict: "a table", list: "a list", str: "text", bool: "true/false", type(None): "null"}.get(
        type(value), "a number")


def _number(value, where: str, *, integer: bool = False, low: float = -MAX_VALUE, high: float = MAX_VALUE) -> None:
    """A number (or null) within [low, high]."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise _Bad(f"{where}: {_kind(value)} where {'an integer' if integer else 'a number'} belongs")
    if not low <= value <= high:  # NaN compares false: refused here too
        raise _Bad(f"{where}: {repr(value)[:40]} is not a number between {low:g} and {high:g}")


def _text(value, where: str) -> None:
    """Text (or null) of a name's or a note's length."""
    if value is not None and not isinstance(value, str):
        raise _Bad(f"{where}: {_kind(value)} where text belongs")
    if value is not None and len(value) > MAX_TEXT:
        raise _Bad(f"{where}: {len(value)} characters, more than any name or note ({MAX_TEXT})")


def _texts(value, where: str) -> None:
    """A list of text (or null)."""
    if value is None:
        return
    if not isinstance(value, list):
        raise _Bad(f"{where}: {_kind(value)} where a list of text belongs")
    if len(value) > MAX_KEYS:
        raise _Bad(f"{where}: {len(value)} entries, more than the {MAX_KEYS} a report shows")
    for i, item in enumerate(value):
        _text(item, f"{where}[{i}]")


def _table(value, where: str, *, required: bool = False, keys: int | None = None) -> dict:
    """A table (or, unless ``required``, null: then {}) of at most ``keys`` entries whose names fit a label."""
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise _Bad(f"{where}: {_kind(value)} where a table belongs")
    if keys is not None:
        if len(value) > keys:
            raise _Bad(f"{where}: {len(value)} entries, more than the {keys} a report shows")
        long = next((k for k in value if len(k) > 200), None)
        if long is not None:
            raise _Bad(f"{where}: an entry named by {len(long)} characters, not a variant's or budget's name")
    return value


def _numbers(value, where: str) -> None:
    """A table of numbers by variant, corruption or budget: a table's columns."""
    for key, item in _table(value, where, keys=MAX_KEYS).items():
        _number(item, f"{where}.{key}")


def _level(value, where: str, *, required: bool = False) -> dict:
    """The sequence entry, or one of its extras or difficulties."""
    level = _table(value, where, required=required)
    for key in ("fp", "t5d"):
        _numbers(level.get(key), f"{where}.{key}")
    for key in ("mfp", "mt5d"):
        _number(level.get(key), f"{where}.{key}")
    return level


def _statement(value, where: str) -> None:
    """One entry of summary["comparability"]."""
    entry = _table(value, where)
    if not isinstance(entry.get("comparable", False), bool):
        raise _Bad(f"{where}.comparable: {_kind(entry['comparable'])} where true/false belongs")
    _texts(entry.get("reasons"), f"{where}.reasons")
    _text(entry.get("note"), f"{where}.note")


def _finite(s: dict) -> None:
    """Every number of the measured sections finite and within a float's range (results.csv lists them all),
    and not more of them than any summary holds."""
    count, stack = 0, [(s.get(key), key) for key in SECTIONS]
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict):
            stack.extend((v, f"{where}.{k}") for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(node))
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            count += 1
            if count > MAX_NUMBERS:
                raise _Bad(f"more than {MAX_NUMBERS} numbers, more than any summary holds")
            if not -1e300 <= node <= 1e300:
                raise _Bad(f"{where[:300]}: {repr(node)[:40]} is not a finite number")


def _check(s: dict) -> None:
    """The kinds and sizes of every field the report reads (tables, figures, findings, comparisons,
    results.csv), so that none of them meets a string where a number belongs; raises :class:`_Bad`."""
    _finite(s)
    model = _table(s.get("model"), "model", required=True)
    for key in ("name", "arch", "sha256", "state_sha256"):
        _text(model.get(key), f"model.{key}")
    quant = _table(model.get("quant"), "model.quant")
    _text(quant.get("method"), "model.quant.method")
    for key in ("w_bits", "a_bits"):
        _number(quant.get(key), f"model.quant.{key}", integer=True, low=1, high=MAX_BITS)
    corpus = _table(s.get("corpus"), "corpus", required=True)
    for key in ("manifest_sha256", "suite"):
        _text(corpus.get(key), f"corpus.{key}")
    _number(corpus.get("samples"), "corpus.samples", integer=True, low=0)
    prov = _table(corpus.get("provenance"), "corpus.provenance")
    for key in ("made_by", "release", "suite", "natural_encoding", "sequence_encoding"):
        _text(prov.get(key), f"corpus.provenance.{key}")
    _number(prov.get("classes"), "corpus.provenance.classes", integer=True, low=0)
    for key, value in _table(prov.get("geometry"), "corpus.provenance.geometry").items():
        _number(value, f"corpus.provenance.geometry.{key}", integer=True, low=0)
    for key, value in _table(prov.get("libraries"), "corpus.provenance.libraries", keys=MAX_KEYS).items():
        _text(value, f"corpus.provenance.libraries.{key}")
    for key, value in _table(prov.get("families"), "corpus.provenance.families", keys=MAX_KEYS).items():
        family = _table(value, f"corpus.provenance.families.{key}", required=True)
        for count in ("scored", "of"):
            _number(family.get(count), f"corpus.provenance.families.{key}.{count}", integer=True, low=0)
    env = _table(s.get("env"), "env")
    for key in ("qrobust", "torch", "device"):
        _text(env.get(key), f"env.{key}")
    clean = _table(s.get("clean"), "clean", required=True)
    for key in ("acc", "acc_square"):
        _number(clean.get(key), f"clean.{key}")
    natural = _table(s.get("natural"), "natural")
    for key in ("acc", "acc_by_corruption"):
        _numbers(natural.get(key), f"natural.{key}")
    for key in ("mnr", "nci", "mce", "relative_mce"):
        _number(natural.get(key), f"natural.{key}")
    extra = _table(natural.get("extra"), "natural.extra")
    _numbers(extra.get("acc_by_corruption"), "natural.extra.acc_by_corruption")
    _number(extra.get("mnr"), "natural.extra.mnr")
    sequence = _level(s.get("sequence"), "sequence")
    _level(sequence.get("extra"), "sequence.extra")
    for d, value in _table(sequence.get("difficulty"), "sequence.difficulty", keys=MAX_KEYS).items():
        _level(_level(value, f"sequence.difficulty.{d}", required=True).get("extra"),
               f"sequence.difficulty.{d}.extra")
    systematic = _table(s.get("systematic"), "systematic")
    _numbers(systematic.get("acc"), "systematic.acc")
    for key in ("mean", "sni", "sr", "sni_square"):
        _number(systematic.get(key), f"systematic.{key}")
    for name, budgets in _table(s.get("attacks"), "attacks", keys=MAX_KEYS).items():
        if not escape.is_name(f"attack-{name}"):  # it names the attack's table files and HTML anchor
            raise _Bad(f"attacks: {name[:80]!r} is not an attack's name (letters, digits, '.', '_', '-')")
        for budget, value in _table(budgets, f"attacks.{name}", required=True, keys=MAX_KEYS).items():
            entry = _table(value, f"attacks.{name}.{budget}", required=True)
            for key in ("ar", "aai", "eps"):
                _number(entry.get(key), f"attacks.{name}.{budget}.{key}")
            _number(entry.get("n"), f"attacks.{name}.{budget}.n", integer=True, low=0)
            _text(entry.get("norm"), f"attacks.{name}.{budget}.norm")
            _table(entry.get("params"), f"attacks.{name}.{budget}.params")
    for key in ("wcar", "wcar_extra"):
        _numbers(s.get(key), key)
    intervals = _table(s.get("intervals"), "intervals")
    for key, bounds in _table(intervals.get("values"), "intervals.values").items():
        if bounds is not None and not (isinstance(bounds, list) and len(bounds) == 2):
            raise _Bad(f"intervals.values.{key[:200]}: {_kind(bounds)} where a [low, high] pair belongs")
        for bound in bounds or ():
            _number(bound, f"intervals.values.{key[:200]}")
    checks = _table(s.get("checks"), "checks")
    for key in ("gradient_masking", "warnings"):
        _texts(checks.get(key), f"checks.{key}")
    for key, value in _table(s.get("comparability"), "comparability", keys=MAX_KEYS).items():
        entry = _table(value, f"comparability.{key}")
        if "comparable" in entry or key != "wcar":
            _statement(entry, f"comparability.{key}")
        else:  # one statement per budget
            for budget, statement in _table(entry, "comparability.wcar", keys=MAX_KEYS).items():
                _statement(statement, f"comparability.wcar.{budget}")


def _read(path: Path):
    """The parsed summary.json at ``path``, within the size and nesting bounds, or a ReportError naming it."""
    if path.is_symlink():  # a link could make the report show (and send on) a file of this machine
        raise ReportError(f"{path}: a link, which `qrobust score` never writes; copy the file in its place")
    if not path.is_file():
        raise ReportError(f"{path.parent}: no summary.json there; pass results folders written by `qrobust score`")
    try:
        with reading(path.parent):  # not while a `score` rewrites it
            return load_json(path, max_bytes=SUMMARY_MAX_BYTES)
    except (BoundsError, ResultsError) as e:  # each names the file; a ReportError keeps it to one line
        raise ReportError(str(e)) from None
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: not readable JSON ({' '.join(str(e).split())[:200]})") from None


def _load(folder, nc_threshold: float) -> Model:
    folder = Path(folder)
    path = folder if folder.name == "summary.json" else folder / "summary.json"
    # an edited prediction or summary is refused (naming the array) before any number of it is read
    unchecked = tuple(check_folder(path.parent)) if path.is_file() else ()
    s = _read(path)
    schema = s.get("schema") if isinstance(s, dict) else None
    if schema in OLD_SCHEMAS:
        try:
            s = upgrade(s)  # what can be recomputed is; the rest says it is not comparable
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ReportError(f"{path}: a {schema} summary that cannot be read ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]}); rescore the model") from None
    elif schema != SUMMARY_SCHEMA:
        readable = ", ".join([*OLD_SCHEMAS, SUMMARY_SCHEMA])
        shown = repr(schema[:80]) if isinstance(schema, str) else repr(schema)[:80]
        raise ReportError(f"{path}: schema {shown}, this qrobust reads {readable}; rescore with this version")
    for need in (("model", "arch"), ("corpus", "manifest_sha256"), ("clean",)):
        if not isinstance(s.get(need[0]), dict) or (need[1:] and s[need[0]].get(need[1]) is None):
            raise ReportError(f"{path}: {'.'.join(need)} is missing; the file is incomplete, rescore the model")
    try:
        _check(s)
    except _Bad as e:
        raise ReportError(f"{path}: {str(e)[:500]} (not what `qrobust score` writes: rescore the model)") from None
    q = s["model"].get("quant") or {}
    w = q.get("w_bits", 32 if not q else None)  # as ModelSpec writes it
    a = q.get("a_bits", w)
    if not isinstance(w, int) or not isinstance(a, int):
        raise ReportError(f"{path}: model.quant has no integer weight bits; the file is incomplete, rescore the model")
    acc = s["clean"].get("acc")  # null when clean/onecrop was not scored: then not NC, ACC shown as missing
    method = q.get("method")
    return Model(path.parent, s, s["model"]["arch"], "fp" if method is None else method.lower(), w,
                 str(w) if w == a else f"{w}/{a}", acc is not None and acc < nc_threshold, unchecked=unchecked)


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
    md = escape.markdown
    head = ["Model", "Method", "Bits", *(md(c.label) + c.arrow() for c in cols)]
    lines = [f"**{md(table.title)}.** {md(caption)}", "", "| " + " | ".join(head) + " |",
             "|---|---|---:|" + "---:|" * len(cols)]
    for arch, method, bits, cells, _ in _rows(groups, grid):
        text = [(f"**{t}**" if bold else (t or "–")) + mark for t, bold, mark, _ in cells]
        lines.append("| " + " | ".join([md(arch), md(method), md(bits), *text]) + " |")
    return "\n".join(lines) + "\n"


def _csv(table: Table, caption: str, cols, groups, grid) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cell = escape.csv_cell
    w.writerow([cell(h) for h in ("Model", "Method", "Bits", *(c.label for c in cols), "NC")])
    for arch, ms in groups:
        for m in ms:  # numbers, also for a not-converged model (its mark is the NC column); names formula-safe,
            # the numbers qrobust formatted left as they are (a negative one stays a number)
            w.writerow([cell(ARCHS.get(arch, arch)), cell(m.method_label), cell(m.bits_label),
                        *(c.text(c.value(m)) or "" for c in cols), "yes" if m.nc else ""])
    return buf.getvalue()


def _tex(text: str) -> str:
    return escape.latex(text).replace("ACC\\_s", "ACC$_s$")


def _latex(table: Table, caption: str, cols, groups, grid) -> str:
    head = ["Model", "Method", "Bits", *(_tex(c.label) + c.arrow(r" $\uparrow$", r" $\downarrow$") for c in cols)]
    body = []
    for arch, method, bits, cells, first in _rows(groups, grid):
        body += [r"\midrule"] if first else []
        text = [(f"\\textbf{{{t}}}" if bold else (t or "--")) + ("$^\\dagger$" if mark else "")
                for t, bold, mark, _ in cells]
        body.append(" & ".join([_tex(arch), _tex(method), _tex(bits), *text]) + r" \\")
    tabular = [rf"\begin{{tabular}}{{lll{'r' * len(cols)}}}", r"\toprule", " & ".join(head) + r" \\",
               *body, r"\bottomrule", r"\end{tabular}"]
    if len(cols) > 8:  # wide per-variant tables: scale to the text width (graphicx)
        tabular = [r"\resizebox{\linewidth}{!}{%", *tabular, "}"]
    return "\n".join([f"% qrobust {__version__}; needs \\usepackage{{booktabs}} (and graphicx)",
                      r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(table.title + '. ' + caption)}}}",
                      rf"\label{{tab:qrobust-{checked_name(table.name)}}}", *tabular, r"\end{table}"]) + "\n"


def html_table(cols, groups, grid) -> str:
    esc = escape.html
    head = "".join(f"<th>{esc(h)}</th>"
                   for h in ["Model", "Method", "Bits", *(c.label + c.arrow("\u00a0↑", "\u00a0↓") for c in cols)])
    body = []
    for arch, method, bits, cells, first in _rows(groups, grid):
        lead = f'</tbody><tbody><tr><th class="arch" rowspan="{first}">{esc(arch)}</th>' if first else "<tr>"
        tds = "".join(f'<td title="{esc(ci)}">' + (f"<strong>{esc(t)}</strong>" if bold else esc(t or "–")) + mark
                      + "</td>" for t, bold, mark, ci in cells)
        body.append(f'{lead}<td class="m">{esc(method)}</td><td>{esc(bits)}</td>{tds}</tr>')
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f'{"".join(body).removeprefix("</tbody>")}</tbody></table></div>')


def checked_name(name: str) -> str:
    """``name`` if it may name a file, an HTML id or a link target as it is; else a ReportError."""
    if not escape.is_name(name):
        raise ReportError(f"{name[:80]!r} cannot name a table's files or anchor (letters, digits, '.', '_', '-')")
    return name


WRITERS = {".md": _markdown, ".csv": _csv, ".tex": _latex}
