"""Suite specs: which variants a corpus holds, and their parameters, as data.

A suite is a TOML file (the packaged ones live in ``suites/``): a name, a
seed, the geometry of the clean references, the shard size, and one table per
noise family. This module turns it into a list of :class:`Variant` with stable
ids ``family/name``; the generator renders them, the manifest records them.
"""
from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import tomllib

from qrobust.shared.errors import QrobustError
from qrobust.shared.noises import (CORRUPTIONS, PERTURBATIONS, SEQUENCE_PERTURBATIONS, SYSTEMATIC_DECODERS,
                                   SYSTEMATIC_RESIZES)
from qrobust.shared.registry import Registry

ENCODINGS = ("jpg", "png")
SEQUENCE_ENCODINGS = ("reference", "lossless")  # see qrobust.shared.video
FAMILY_ORDER = ("clean", "natural", "sequence", "systematic")


class SpecError(QrobustError, ValueError):
    """A suite file is malformed, or a selection or override does not fit it."""


@dataclass(frozen=True)
class Variant:
    """One model-independent perturbation: everything needed to render it for any sample."""

    id: str                      # "natural/glass_blur-3"
    family: str                  # "natural"
    name: str                    # "glass_blur-3"
    params: dict = field(hash=False)    # family-specific, e.g. {"corruption": "glass_blur", "severity": 3}
    encoding: dict = field(hash=False)  # {"format": "jpg", "quality": 85} or {"format": "png"}
    group: str = ""              # variants of one group are rendered in one pass over the samples

    def as_record(self) -> dict:
        return {"family": self.family, "name": self.name, "params": dict(self.params),
                "encoding": dict(self.encoding)}


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    seed: int
    resize: int
    crop: int
    samples_per_shard: int
    variants: tuple[Variant, ...]
    spec: dict = field(hash=False)   # the resolved TOML (overrides applied), recorded in the manifest
    path: str = ""

    def select(self, only: list[str] | None = None) -> list[Variant]:
        """The variants whose id matches any of the globs in ``only`` (all if none).

        Raises :class:`SpecError` naming any glob that matches nothing.
        """
        if not only:
            return list(self.variants)
        ids = [v.id for v in self.variants]
        for pattern in only:
            if not any(fnmatch.fnmatchcase(i, pattern) for i in ids):
                families = sorted({i.split("/")[0] for i in ids if fnmatch.fnmatchcase(i, f"*/{pattern}")})
                hint = (f"did you mean {' or '.join(repr(f'{f}/{pattern}') for f in families)}?" if families
                        else f"ids look like {ids[0]}, {ids[-1]}")
                raise SpecError(f"--only {pattern!r} matches no variant of suite {self.name!r}; {hint} "
                                f"(see `qrobust ls variants --suite {self.name}`)")
        return [v for v in self.variants if any(fnmatch.fnmatchcase(v.id, p) for p in only)]


FAMILIES: Registry[Callable[[dict], list[Variant]]] = Registry("noise family")
FAMILY_KEYS = {  # the keys each family table may hold (a typo must not silently change the suite)
    "clean": {"variants", "encoding", "jpeg_quality"},
    "natural": {"corruptions", "severities", "encoding", "jpeg_quality"},
    "sequence": {"perturbations", "difficulties", "encoding"},
    "systematic": {"decoders", "resizes", "encoding"},
}


def _encoding(table: dict, family: str, allowed=ENCODINGS) -> dict:
    fmt = table.get("encoding", "png")
    if fmt not in allowed:
        raise SpecError(f"[{family}] encoding must be one of {', '.join(allowed)}, got {fmt!r}")
    if fmt == "jpg":
        q = table.get("jpeg_quality", 85)
        if not isinstance(q, int) or not 1 <= q <= 100:
            raise SpecError(f"[{family}] jpeg_quality must be an integer in 1..100, got {q!r}")
        return {"format": "jpg", "quality": q}
    return {"format": fmt}


def _string_list(table: dict, key: str, family: str) -> list[str]:
    value = table.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise SpecError(f"[{family}] {key} must be a non-empty list of strings")
    if len(set(value)) != len(value):
        raise SpecError(f"[{family}] {key} lists a name twice")
    return value


@FAMILIES.register("clean")
def _clean_variants(table: dict) -> list[Variant]:
    known = ("onecrop", "square")
    encoding = _encoding(table, "clean")
    out = []
    for name in _string_list(table, "variants", "clean"):
        if name not in known:
            raise SpecError(f"[clean] unknown variant {name!r}; known: {', '.join(known)}")
        out.append(Variant(f"clean/{name}", "clean", name, {}, encoding, group=f"clean/{name}"))
    return out


@FAMILIES.register("natural")
def _natural_variants(table: dict) -> list[Variant]:
    encoding = _encoding(table, "natural")
    severities = table.get("severities", [1, 2, 3, 4, 5])
    if not isinstance(severities, list) or not severities or not all(
            isinstance(s, int) and 1 <= s <= 5 for s in severities):
        raise SpecError("[natural] severities must be a list of integers in 1..5")
    out = []
    for corruption in _known_names(table, "corruptions", "natural", tuple(CORRUPTIONS.in_order())):
        for s in severities:
            out.append(Variant(f"natural/{corruption}-{s}", "natural", f"{corruption}-{s}",
                               {"corruption": corruption, "severity": s}, encoding,
                               group=f"natural/{corruption}"))
    return out


def _known_names(table: dict, key: str, family: str, known: tuple[str, ...]) -> list[str]:
    names = _string_list(table, key, family)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SpecError(f"[{family}] unknown {key}: {', '.join(unknown)}; known: {', '.join(known)}")
    return names


@FAMILIES.register("sequence")
def _sequence_variants(table: dict) -> list[Variant]:
    fmt = table.get("encoding", "reference")
    if fmt not in SEQUENCE_ENCODINGS:
        raise SpecError(f"[sequence] encoding must be one of {', '.join(SEQUENCE_ENCODINGS)}, got {fmt!r}")
    difficulties = table.get("difficulties", [1])
    if not isinstance(difficulties, list) or not difficulties or len(set(difficulties)) != len(difficulties) \
            or not all(type(d) is int and d in (1, 2, 3) for d in difficulties):
        raise SpecError("[sequence] difficulties must be distinct integers drawn from 1, 2, 3")
    out = []
    for name in _known_names(table, "perturbations", "sequence", SEQUENCE_PERTURBATIONS):
        p = PERTURBATIONS.get(name)
        # difficulty 2 and 3 are separate videos only for the noise sequences; the reference scores
        # the others' difficulties as frame strides of the same video (metrics.flip_probability(difficulty=d))
        for d in (d for d in difficulties if d in p.difficulties):
            vname = name if d == 1 else f"{name}_{d}"
            out.append(Variant(f"sequence/{vname}", "sequence", vname,
                               {"perturbation": name, "difficulty": d, "frames": p.frames, "noise": p.noise},
                               {"format": fmt}, group=f"sequence/{vname}"))
    return out


@FAMILIES.register("systematic")
def _systematic_variants(table: dict) -> list[Variant]:
    encoding = _encoding(table, "systematic", allowed=("png",))  # the noise is a few levels: lossless only
    out = []
    for decoder in _known_names(table, "decoders", "systematic", SYSTEMATIC_DECODERS):
        out.append(Variant(f"systematic/decode-{decoder}", "systematic", f"decode-{decoder}",
                           {"decoder": decoder, "resize": "pil-bilinear"}, encoding, group="systematic/decode"))
    for resize in _known_names(table, "resizes", "systematic", SYSTEMATIC_RESIZES):
        out.append(Variant(f"systematic/resize-{resize}", "systematic", f"resize-{resize}",
                           {"decoder": "pil", "resize": resize}, encoding, group="systematic/resize"))
    return out


def _positive_int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SpecError(f"{what} must be a positive integer, got {value!r}")
    return value


def suite_path(name_or_path: str) -> Path:
    """A packaged suite by name (``robustmq``, ``demo``) or a TOML file by path."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or "/" in name_or_path or p.exists():
        if not p.is_file():
            raise SpecError(f"suite file {p} does not exist")
        return p
    packaged = resources.files("qrobust") / "suites" / f"{name_or_path}.toml"
    if not packaged.is_file():
        raise SpecError(f"unknown suite {name_or_path!r}; packaged suites: {', '.join(packaged_suites())}, "
                        "or pass a path to a .toml file")
    return Path(str(packaged))


def packaged_suites() -> list[str]:
    folder = resources.files("qrobust") / "suites"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_suite(name_or_path: str, *, seed: int | None = None, encoding: str | None = None,
               sequence_encoding: str | None = None) -> Suite:
    """Read and validate a suite. ``seed``, ``encoding`` (of the natural family, the
    one stored as JPEG by default) and ``sequence_encoding`` override the file.

    Raises :class:`SpecError` with the offending key for anything malformed.
    """
    path = suite_path(name_or_path)
    try:
        spec = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None
    spec = copy.deepcopy(spec)
    allowed = {"name", "description", "seed", "geometry", "shards", *FAMILY_ORDER}
    unknown = set(spec) - allowed
    if unknown:
        raise SpecError(f"{path}: unknown keys {', '.join(sorted(unknown))}")
    if seed is not None:
        spec["seed"] = seed
    if encoding is not None:
        if "natural" not in spec:
            raise SpecError("--encoding applies to the natural family, which this suite does not have")
        spec["natural"]["encoding"] = encoding
    if sequence_encoding is not None:
        if "sequence" not in spec:
            raise SpecError("--sequence-encoding applies to the sequence family, which this suite does not have")
        spec["sequence"]["encoding"] = sequence_encoding
    for table in ("geometry", "shards", *FAMILY_ORDER):
        if table in spec and not isinstance(spec[table], dict):
            raise SpecError(f"{path}: [{table}] must be a table")
    geometry = spec.get("geometry", {})
    resize = _positive_int(geometry.get("resize"), "[geometry] resize")
    crop = _positive_int(geometry.get("crop"), "[geometry] crop")
    if crop > resize:
        raise SpecError(f"[geometry] crop {crop} is larger than resize {resize}")
    seed_value = spec.get("seed", 0)
    if not isinstance(seed_value, int) or seed_value < 0:
        raise SpecError(f"seed must be a non-negative integer, got {seed_value!r}")
    per_shard = _positive_int(spec.get("shards", {}).get("samples", 1000), "[shards] samples")
    variants: list[Variant] = []
    for family in FAMILY_ORDER:
        if family in spec:
            if family not in FAMILIES:
                raise SpecError(f"{path}: family [{family}] is not supported by this version of qrobust")
            unknown_keys = set(spec[family]) - FAMILY_KEYS.get(family, set(spec[family]))
            if unknown_keys:
                raise SpecError(f"{path}: unknown keys in [{family}]: {', '.join(sorted(unknown_keys))}")
            variants.extend(FAMILIES.get(family)(spec[family]))
    if not variants:
        raise SpecError(f"{path}: the suite defines no variants")
    ids = [v.id for v in variants]
    if len(set(ids)) != len(ids):
        raise SpecError(f"{path}: variant {next(i for i in ids if ids.count(i) > 1)!r} is defined twice")
    return Suite(name=str(spec.get("name", path.stem)), description=str(spec.get("description", "")),
                 seed=seed_value, resize=resize, crop=crop, samples_per_shard=per_shard,
                 variants=tuple(variants), spec=spec, path=str(path))
