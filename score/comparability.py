"""What a summary's numbers can be put next to: how the corpus was made, and how much of the benchmark it covers.

RobustMQ's tables (and published ImageNet-C/P numbers) are measured on
ImageNet's 1000 classes at the 256/224 geometry, on every variant of a
family, with the paper's five attacks at their settings. A number measured
otherwise is still a measurement, but not of the same quantity; each family's
entry in ``summary["comparability"]`` says which, in one line:

* ``comparable``: True when the family's aggregates are measured on the
  paper's basis: every variant of the benchmark's set scored (15 corruptions x
  5 severities; the 10 test perturbations at difficulty 1; the 14 decode/resize
  variants; the five attacks at each budget with their reference settings),
  at 224 px crops of a 1000-class corpus, natural variants stored as JPEG q85
  (or as released), sequences in the reference H.264 recipe (or as released);
* ``note``: what was scored, on how many samples, how the corpus was made,
  and the first reasons it is not comparable.

mCE gets its own entry: the AlexNet errors that normalise it were measured on
the released ImageNet-C, which Hendrycks' own generator made. A corpus
generated with imagecorruptions 1.1.2 differs from it (elastic_transform is
another algorithm; frost, snow and motion blur differ), so only an imported
release gives an mCE comparable with published values.
"""
from __future__ import annotations

from qrobust.shared.spec import BENCHMARK_CORRUPTIONS, SEQUENCE_PERTURBATIONS, SYSTEMATIC_DECODERS, \
    SYSTEMATIC_RESIZES

PAPER_CROP, PAPER_RESIZE, PAPER_CLASSES = 224, 256, 1000
SEVERITIES = (1, 2, 3, 4, 5)
SYSTEMATIC_VARIANTS = tuple(f"decode-{d}" for d in SYSTEMATIC_DECODERS) + \
    tuple(f"resize-{r}" for r in SYSTEMATIC_RESIZES)
# the paper's attacks (WCAR, eq. 5, is their worst case); anything else run is an extra
PAPER_ATTACKS = ("fgsm-linf", "pgd-l1", "pgd-l2", "pgd-linf", "autoattack-linf")
GENERATOR_DIFFERENCE = ("generated with imagecorruptions {version}, not the released ImageNet-C (its "
                        "elastic_transform is another algorithm; frost, snow and motion blur differ)")


def _table(parent, key: str) -> dict:
    """``parent[key]`` if it is a table, else {} (a manifest is a file someone else wrote)."""
    value = parent.get(key) if isinstance(parent, dict) else None
    return value if isinstance(value, dict) else {}


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def difficulties(manifest: dict) -> list[int]:
    """The ImageNet-P difficulties a corpus asks for: its suite's, and those of the noise videos it holds."""
    asked = _table(_table(_table(manifest, "suite"), "spec"), "sequence").get("difficulties")
    held = [_table(v, "params").get("difficulty") for v in _table(manifest, "variants").values()
            if isinstance(v, dict) and v.get("family") == "sequence"]
    values = [*(asked if isinstance(asked, list) else []), *held]
    return sorted({1, *(d for d in values if type(d) is int and 1 <= d <= 3)})


def _benchmark_sets(manifest: dict) -> dict[str, list[str]]:
    """Variant ids of each family's benchmark set, named as a corpus names them."""
    return {
        "clean": ["clean/onecrop", "clean/square"],
        "natural": [f"natural/{c}-{s}" for c in BENCHMARK_CORRUPTIONS for s in SEVERITIES],
        "sequence": [f"sequence/{p}" for p in SEQUENCE_PERTURBATIONS],
        "systematic": [f"systematic/{v}" for v in SYSTEMATIC_VARIANTS],
    }


def provenance(manifest: dict, predictions: dict) -> dict:
    """How the corpus was made, and for each family how much of the benchmark's set was scored.

    ``families[f]``: ``complete`` (every variant of the set scored), ``scored``
    and ``of`` (counts of the set), ``missing`` (the first few ids of the set
    not scored) and ``extra`` (variants scored beyond the set).
    """
    imported = _table(manifest, "imported_from")
    spec = _table(_table(manifest, "suite"), "spec")
    natural, sequence = _table(spec, "natural"), _table(spec, "sequence")
    if imported:
        made_by, release = "import", _text(imported.get("kind"))
        natural_encoding = "as released (JPEG)" if release == "imagenet-c" else None
        sequence_encoding = "as released (H.264)" if release == "imagenet-p" else None
    else:
        made_by, release = "generate", None
        natural_encoding = _text(natural.get("encoding"))
        if natural_encoding == "jpg":
            natural_encoding = f"jpg q{natural.get('jpeg_quality', 85)}"
        sequence_encoding = _text(sequence.get("encoding", "reference")) if sequence else None
    scored = set(predictions)
    families = {}
    for family, wanted in _benchmark_sets(manifest).items():
        held = [v for v in scored if v.startswith(family + "/")]
        if not held:
            continue
        missing = [v for v in wanted if v not in scored]
        families[family] = {"complete": not missing, "scored": len(wanted) - len(missing), "of": len(wanted),
                            "missing": missing[:5], "extra": len([v for v in held if v not in wanted])}
    geometry, classes = _table(manifest, "geometry"), manifest.get("classes")
    return {"made_by": made_by, "release": release, "suite": _text(_table(manifest, "suite").get("name")),
            "geometry": {"resize": geometry.get("resize"), "crop": geometry.get("crop")},
            "classes": len(classes) if isinstance(classes, list) else 0,
            "samples": _table(manifest, "samples").get("count"),
            "natural_encoding": natural_encoding, "sequence_encoding": sequence_encoding,
            "libraries": {k: v for k, v in _table(manifest, "versions").items() if isinstance(v, str)},
            "families": families}


def _corpus_reasons(prov: dict) -> list[str]:
    """Why no number of this corpus is on the paper's basis (geometry, classes), if it is not."""
    reasons = []
    crop, resize = prov["geometry"]["crop"], prov["geometry"]["resize"]
    if crop != PAPER_CROP:
        reasons.append(f"{crop} px crops, not {PAPER_CROP}")
    elif resize not in (None, PAPER_RESIZE):  # None: an imported release, already cropped
        reasons.append(f"resize {resize}, not {PAPER_RESIZE}")
    if prov["classes"] != PAPER_CLASSES:
        reasons.append(f"{prov['classes']} classes, not ImageNet's {PAPER_CLASSES}")
    return reasons


def _line(comparable: bool, what: str, reasons: list[str], how: str = "") -> dict:
    head = "comparable with the paper" if comparable else f"not comparable with the paper ({'; '.join(reasons)})"
    return {"comparable": comparable, "note": f"{head}: {what}" + (f"; {how}" if how else "")}


def _coverage(fam: dict | None, unit: str) -> tuple[str, list[str]]:
    if fam is None:
        return f"none of the benchmark's {unit} scored", ["not scored"]
    what = f"{fam['scored']} of {fam['of']} {unit}" + (f" (+{fam['extra']} extra, not averaged in)"
                                                        if fam["extra"] else "")
    return what, [] if fam["complete"] else [f"only {fam['scored']} of {fam['of']} {unit}"]


def assess(summary: dict, manifest: dict) -> dict:
    """``{family: {"comparable": bool, "note": str}}`` for every family the summary holds, plus mCE and WCAR."""
    prov = summary["corpus"]["provenance"]
    fams, base = prov["families"], _corpus_reasons(prov)
    n = summary["corpus"].get("samples") or prov["samples"]
    size = f"{n} samples, {prov['classes']} classes, {prov['geometry']['crop']} px"
    made = (f"the released {prov['release']} files" if prov["made_by"] == "import"
            else f"generated by qrobust (suite {prov['suite']})")
    out = {}
    if summary["clean"]["acc"] is not None:
        out["clean"] = _line(not base, f"ACC on clean/onecrop, {size}", base, made)
    if summary.get("natural"):
        what, partial = _coverage(fams.get("natural"), "corruption x severity variants")
        enc = prov["natural_encoding"]
        reasons = base + partial + ([f"stored as {enc}, not JPEG q85"] if enc and not enc.startswith(("jpg q85", "as"))
                                    else [])
        how = made if prov["made_by"] == "import" else \
            f"{made}, {enc}, " + GENERATOR_DIFFERENCE.format(version=prov["libraries"].get("imagecorruptions", "?"))
        out["natural"] = _line(not reasons, f"mNR and NCI over {what}, {size}", reasons, how)
        out["mce"] = _mce_line(summary["natural"], prov, base, partial)
    if summary.get("sequence"):
        what, partial = _coverage(fams.get("sequence"), "test perturbations at difficulty 1")
        enc = prov["sequence_encoding"]
        reasons = base + partial + ([f"{enc} videos, not the reference H.264 recipe (flips differ on noise)"]
                                    if enc and enc not in ("reference", "as released (H.264)") else [])
        out["sequence"] = _line(not reasons, f"mFP and mT5D over {what}, {size}", reasons, f"{made}, {enc} videos")
    if summary.get("systematic"):
        what, partial = _coverage(fams.get("systematic"), "decode/resize variants")
        reasons = base + partial + (["clean/onecrop not scored (SNI)"] if summary["clean"]["acc"] is None else [])
        out["systematic"] = _line(not reasons, f"mean ACC_s, SNI and SR over {what}, {size}", reasons, made)
    if summary.get("attacks"):
        out["attacks"], out["wcar"] = _attack_lines(summary, base, size)
    return out


def _mce_line(natural: dict, prov: dict, base: list[str], partial: list[str]) -> dict:
    if natural.get("mce") is None:
        why = "; ".join(base + partial) or "no benchmark corruption scored at all 5 severities"
        return {"comparable": False, "note": f"no mCE: it needs all 75 benchmark variants of a 1000-class "
                                             f"ImageNet corpus ({why})"}
    if prov["made_by"] == "import" and prov["release"] == "imagenet-c":
        reasons = base + partial
        return {"comparable": not reasons,
                "note": ("comparable with published mCE: the released ImageNet-C files, imported" if not reasons
                         else f"not comparable with published mCE ({'; '.join(reasons)})")}
    why = GENERATOR_DIFFERENCE.format(version=prov["libraries"].get("imagecorruptions", "?"))
    if prov["natural_encoding"] == "png":
        why += "; stored as PNG, without the release's JPEG q85 step"
    return {"comparable": False, "note": f"not comparable with published mCE: {why}"}


def _attack_lines(summary: dict, base: list[str], size: str) -> tuple[dict, dict]:
    """The attacks' line (the paper's five at their settings, on every sample?) and WCAR's, per budget."""
    from qrobust.score.attacks import ATTACKS, resolved_params

    attacks, n = summary["attacks"], summary["corpus"].get("samples")
    classes = summary["corpus"]["provenance"]["classes"] or None
    problems: list[str] = []
    for name in PAPER_ATTACKS:
        for budget, entry in (attacks.get(name) or {}).items():
            reference = resolved_params(name, None, classes)
            changed = [k for k in reference if entry.get("params", {}).get(k) != reference[k]]
            if changed:
                problems.append(f"{name} {changed[0]} {entry['params'].get(changed[0])!r}, "
                                f"not {reference[changed[0]]!r}")
            if abs(entry["eps"] - ATTACKS.get(name).budgets[budget]) > 1e-9 * max(1.0, entry["eps"]) and not base:
                problems.append(f"{name}/{budget} eps {entry['eps']:.4g}, not {ATTACKS.get(name).budgets[budget]:.4g}")
            if n and entry.get("n") != n:
                problems.append(f"{name}/{budget} on {entry.get('n')} of {n} samples")
    ran = [a for a in PAPER_ATTACKS if a in attacks]
    missing = [a for a in PAPER_ATTACKS if a not in attacks]
    reasons = base + problems[:2] + ([f"{', '.join(missing)} not run"] if missing else [])
    extras = sorted(a for a in attacks if a not in PAPER_ATTACKS)
    what = f"{len(ran)} of the paper's {len(PAPER_ATTACKS)} attacks" + (
        f" (+ extra {', '.join(extras)}, not in WCAR)" if extras else "") + f", {size}"
    attack_line = _line(not reasons, what, reasons, "budgets scaled to the crop size" if base else "")
    wcar = {}
    for budget, basis in (summary.get("wcar_basis") or {}).items():
        gaps = [f"{', '.join(basis['missing'])} not run"] if basis.get("missing") else []
        if n and basis.get("n") != n:
            gaps.append(f"on {basis.get('n')} of {n} samples")
        wcar[budget] = _line(not (base or gaps or problems), f"WCAR {budget} over {', '.join(basis['attacks'])}",
                             base + gaps + problems[:1])
    return attack_line, wcar
