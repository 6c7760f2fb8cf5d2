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

from qrobust.shared.noises import BENCHMARK_CORRUPTIONS, SEQUENCE_PERTURBATIONS, SYSTEMATIC_VARIANTS

PAPER_CROP, PAPER_RESIZE, PAPER_CLASSES = 224, 256, 1000
SEVERITIES = (1, 2, 3, 4, 5)
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
            # an import keeps the released bytes: the importing machine's pixel libraries made none of them
            "libraries": {k: v for k, v in _table(manifest, "versions").items()
                          if isinstance(v, str) and (made_by == "generate" or k == "qrobust")},
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
    return {"comparable": comparable, "reasons": list(reasons), "note": f"{head}: {what}" + (f"; {how}" if how else "")}


def _coverage(fam: dict | None, unit: str) -> tuple[str, list[str]]:
    if fam is None:
        return f"none of the benchmark's {unit} scored", ["not scored"]
    what = f"{fam['scored']}/{fam['of']} {unit}" + (f" (+{fam['extra']} extra, not averaged in)"
                                                     if fam["extra"] else "")
    return what, [] if fam["complete"] else [f"only {fam['scored']} of {fam['of']} {unit}"]


def assess(summary: dict, manifest: dict) -> dict:
    """``{key: {"comparable": bool, "reasons": [str], "note": str}}`` for the corpus and every family the summary
    holds, plus mCE, and WCAR per budget (``{"wcar": {budget: {...}}}``). ``corpus`` gives the reasons that hold
    for every number (geometry, classes); each family's ``reasons`` include them."""
    prov = summary["corpus"]["provenance"]
    fams, base = prov["families"], _corpus_reasons(prov)
    n = summary["corpus"].get("samples") or prov["samples"]
    size = f"{n} samples, {prov['classes']} classes, {prov['geometry']['crop']} px"
    imported = prov["made_by"] == "import"
    out = {"corpus": _line(not base, size, base,
                           f"the released {prov['release']} files" if imported else f"suite {prov['suite']}")}
    if summary["clean"]["acc"] is not None:
        out["clean"] = _line(not base, f"ACC on {size}", base)
    if summary.get("natural"):
        what, partial = _coverage(fams.get("natural"), "variants")
        enc = prov["natural_encoding"]
        reasons = base + partial + ([f"stored as {enc}, not JPEG q85"] if enc and not enc.startswith(("jpg q85", "as"))
                                    else [])
        how = "the released ImageNet-C files" if imported else \
            f"imagecorruptions {prov['libraries'].get('imagecorruptions', '?')}, not the released ImageNet-C, {enc}"
        out["natural"] = _line(not reasons, f"mNR over {what}, {size}", reasons, how)
        out["mce"] = _mce_line(summary["natural"], prov, base, partial)
    if summary.get("sequence"):
        what, partial = _coverage(fams.get("sequence"), "test perturbations")
        enc = prov["sequence_encoding"]
        reasons = base + partial + ([f"{enc} videos, not the reference H.264 recipe (flips differ on noise)"]
                                    if enc and enc not in ("reference", "as released (H.264)") else [])
        out["sequence"] = _line(not reasons, f"mFP over {what}, {size}", reasons, f"{enc} videos")
    if summary.get("systematic"):
        what, partial = _coverage(fams.get("systematic"), "variants")
        reasons = base + partial + (["clean/onecrop not scored (SNI)"] if summary["clean"]["acc"] is None else [])
        out["systematic"] = _line(not reasons, f"mean ACC_s, SNI and SR over {what}, {size}", reasons)
    if summary.get("attacks"):
        out["attacks"], out["wcar"] = _attack_lines(summary, base, size)
    return out


def _mce_line(natural: dict, prov: dict, base: list[str], partial: list[str]) -> dict:
    if natural.get("mce") is None:
        reasons = base + partial or ["no benchmark corruption scored at all 5 severities"]
        return {"comparable": False, "reasons": reasons,
                "note": f"no mCE: it needs all 75 benchmark variants of a 1000-class ImageNet corpus "
                        f"({'; '.join(reasons)})"}
    if prov["made_by"] == "import" and prov["release"] == "imagenet-c":
        reasons = base + partial
        return {"comparable": not reasons, "reasons": reasons,
                "note": ("comparable with published mCE: the released ImageNet-C files, imported" if not reasons
                         else f"not comparable with published mCE ({'; '.join(reasons)})")}
    why = [GENERATOR_DIFFERENCE.format(version=prov["libraries"].get("imagecorruptions", "?"))]
    if prov["natural_encoding"] == "png":
        why.append("stored as PNG, without the release's JPEG q85 step")
    return {"comparable": False, "reasons": base + why, "note": f"not comparable with published mCE: {'; '.join(why)}"}


def _attack_lines(summary: dict, base: list[str], size: str) -> tuple[dict, dict]:
    """The attacks' line (the paper's five at their settings, on every sample?) and WCAR's, per budget."""
    from qrobust.score.attacks import ATTACKS, at_shape, resolved_params

    attacks, n = summary["attacks"], summary["corpus"].get("samples")
    prov = summary["corpus"]["provenance"]
    classes, crop = prov["classes"] or None, prov["geometry"]["crop"]
    problems: list[str] = []
    fewest = n
    for name in PAPER_ATTACKS:
        for budget, entry in (attacks.get(name) or {}).items():
            if budget not in ATTACKS.get(name).budgets or not isinstance(crop, int):
                continue
            # the reference settings at this crop size (budgets and L1 steps follow it, as the scorer's default)
            eps, params = at_shape(name, budget, (3, crop, crop))
            reference = resolved_params(name, params, classes)
            given = entry.get("params") if isinstance(entry.get("params"), dict) else {}
            changed = [k for k in reference if not _same(given.get(k), reference[k])]
            if changed:
                problems.append(f"{name} {changed[0]} {given.get(changed[0])!r}, not {reference[changed[0]]!r}")
            if not _same(entry.get("eps"), eps):
                problems.append(f"{name}/{budget} eps {entry.get('eps')!r}, not {eps:.4g}")
            if isinstance(entry.get("n"), int) and n:
                fewest = min(fewest, entry["n"])
    problems = list(dict.fromkeys(problems))[:2]
    if n and fewest < n:
        problems.append(f"attacked on as few as {fewest} of {n} samples")
    ran = [a for a in PAPER_ATTACKS if a in attacks]
    missing = [a for a in PAPER_ATTACKS if a not in attacks]
    reasons = base + problems + ([f"{', '.join(missing)} not run"] if missing else [])
    extras = sorted(a for a in attacks if a not in PAPER_ATTACKS)
    what = f"{len(ran)} of the paper's {len(PAPER_ATTACKS)} attacks" + (
        f" (+ extra {', '.join(extras)}, not in WCAR)" if extras else "") + f", {size}"
    attack_line = _line(not reasons, what, reasons, "budgets scaled to the crop size" if base else "")
    settings = [p for p in problems if not p.startswith("attacked on")]
    wcar = {}
    for budget, basis in (summary.get("wcar_basis") or {}).items():
        gaps = [f"{', '.join(basis['missing'])} not run"] if basis.get("missing") else []
        if n and basis.get("n") != n:
            gaps.append(f"on {basis.get('n')} of {n} samples")
        reasons = base + settings + gaps
        wcar[budget] = _line(not reasons, f"WCAR {budget} over {', '.join(basis['attacks'])}", reasons)
    return attack_line, wcar


def _same(a, b) -> bool:
    """Equal, numbers to float rounding (eps and step sizes are products of scale factors)."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(a - b) <= 1e-9 * max(1.0, abs(b))
    return a == b
