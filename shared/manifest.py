"""The corpus format: ``manifest.json`` and its shards (the only bond between
``generate`` and ``score``).

::

    <corpus>/manifest.json
    <corpus>/README.md                            the dataset card (qrobust.shared.card), recorded under "card"
    <corpus>/<family>/<name>/<name>-000000.tar    one WebDataset shard set per variant

A shard sample is ``<key>.cls`` (the integer label, as text) plus one payload
(``<key>.jpg`` / ``<key>.png``); samples appear in key order, the same in
every variant. The manifest records how the corpus was made (suite, source
fingerprint, label map, library versions) and, per shard, its byte size,
sha256, sample count and a sha256 over its keys, which :func:`verify_corpus`
checks. :func:`parse_manifest` accepts only well-typed manifests whose shard
names stay inside the corpus; :func:`manifest_problems` finds hand edits; the shards' own structure is
checked by :mod:`qrobust.shared.shards` before ``verify`` or ``score`` trust it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import stat
from collections import Counter
from pathlib import Path

from qrobust.shared.bounded import BoundsError, load_json
from qrobust.shared.card import CARD_NAME
from qrobust.shared.errors import QrobustError
from qrobust.shared.shards import keys_digest
from qrobust.shared.versions import pixel_libraries

SCHEMA = "qrobust.manifest/1"
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20  # the paper's 101-variant ImageNet corpus has a manifest of about 1 MiB


class ManifestError(QrobustError, ValueError):
    """A manifest is missing, malformed, or points outside its corpus."""


def shard_name(variant_id: str, index: int) -> str:
    """Relative path of shard ``index`` of a variant: ``natural/fog-3/fog-3-000000.tar``."""
    return f"{variant_id}/{variant_id.split('/')[-1]}-{index:06d}.tar"


def plan_of(manifest: dict) -> dict:
    """The settings a corpus was made with, as recorded in its manifest; equal
    plans make equal shards, so resumption and verification compare these."""
    source = manifest.get("source") or {}
    spec = (manifest.get("suite") or {}).get("spec") or {}
    versions = manifest.get("versions") or {}
    return {"suite": manifest.get("suite", {}).get("spec"), "source": source.get("fingerprint"),
            "classes": manifest.get("classes"), "selection": source.get("selection"),
            "versions": {lib: versions.get(lib) for lib in pixel_libraries(spec)}}


def plan_digest(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def new_manifest(*, suite: dict, geometry: dict, seed: int, source: dict, classes: list, keys: list[str],
                 rejected: list[dict], versions: dict, variants: dict, plan_sha256: str,
                 imported_from: dict | None = None) -> dict:
    """A manifest document (schema :data:`SCHEMA`): the one constructor of ``generate`` and ``import``.

    ``keys`` are the samples' keys in order (their count and digest are recorded), ``variants`` maps a
    variant id to its record (family, name, params, encoding, count, shards); ``imported_from`` marks a
    corpus made of released files.
    """
    manifest = {"schema": SCHEMA, "suite": suite, "geometry": geometry, "seed": seed, "source": source,
                "classes": classes, "samples": {"count": len(keys), "keys_sha256": keys_digest(keys)},
                "rejected": rejected, "versions": versions, "plan_sha256": plan_sha256,
                "variants": dict(sorted(variants.items()))}
    if imported_from is not None:
        manifest["imported_from"] = imported_from
    return manifest


def portable_path(path: str, root: str) -> str:
    """A local path as a manifest records it: relative to the source folder ``root`` (POSIX separators),
    or the file name alone for a path outside it. A manifest is shared with collaborators, so it never
    holds an absolute path (log lines and error messages, which stay on the machine, do)."""
    p = Path(path)
    if not p.is_absolute():
        return path
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return p.name


def portable_text(text: str, root: str) -> str:
    """``text`` (a rejected input's reason) with the paths under the absolute folder ``root`` written
    relative to it."""
    prefix = root.rstrip("/") + "/"
    return text.replace(prefix, "") if os.path.isabs(root) and prefix != "/" else text


def portable_rejected(rejected, root: str) -> list[dict]:
    """The manifest's ``rejected`` list from ``(path, reason)`` pairs of a source under ``root``: paths and
    reasons relative to ``root``, sorted by path."""
    return sorted(({"path": portable_path(path, root), "reason": portable_text(reason, root)}
                   for path, reason in rejected), key=lambda r: (r["path"], r["reason"]))


def portable(manifest: dict) -> dict:
    """A copy of ``manifest`` without the local paths that corpora written before recorded: the source
    and release folders as their names, the label and class files and the rejected inputs (and their
    reasons) relative to the source folder. The plan digest does not change (no path is in the plan);
    a manifest already without them is returned unchanged."""
    out = copy.deepcopy(manifest)
    source = out.get("source")
    root = source.get("root") if isinstance(source, dict) else None
    if isinstance(root, str) and os.path.isabs(root):
        source["root"] = Path(root).name
        if isinstance(source.get("label_file"), str):
            source["label_file"] = portable_path(source["label_file"], root)
        if isinstance(out.get("rejected"), list):
            out["rejected"] = [dict(r, path=portable_path(r["path"], root), reason=portable_text(r["reason"], root))
                               if isinstance(r, dict) and isinstance(r.get("path"), str)
                               and isinstance(r.get("reason"), str) else r for r in out["rejected"]]
    imported = out.get("imported_from")
    if isinstance(imported, dict):
        for key in ("root", "classes"):
            if isinstance(imported.get(key), str) and os.path.isabs(imported[key]):
                imported[key] = Path(imported[key]).name
    return out


def dumps(manifest: dict) -> str:
    return json.dumps(manifest, indent=1, sort_keys=True) + "\n"


def safe_relative(corpus: Path, name: str) -> Path:
    """Resolve a shard path from a manifest, refusing anything outside the corpus."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name \
            or ":" in name or ".." in name.split("/"):
        raise ManifestError(f"shard path {name!r} is not a plain path inside the corpus")
    return corpus / name


def load_manifest(corpus: str | os.PathLike) -> dict:
    """Read and check the structure of ``<corpus>/manifest.json``.

    Raises :class:`ManifestError` for a missing or malformed manifest or one
    whose shard paths leave the corpus.
    """
    corpus = Path(corpus)
    path = corpus / MANIFEST_NAME
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError(f"{path} is not a regular file")
        if st.st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{path}: larger than {MAX_MANIFEST_BYTES >> 20} MiB, not a qrobust manifest")
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise ManifestError(f"{path} not found: is {corpus} a qrobust corpus (made by `qrobust generate`)?") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot read: {e}") from None
    return parse_manifest(raw, str(path))


VARIANT_ID = re.compile(r"[A-Za-z0-9_]+/[A-Za-z0-9_][A-Za-z0-9_.+-]*")


# bounds far above any real corpus, so that no number read from a manifest sizes an absurd allocation
MAX_SAMPLES = 10 ** 9
MAX_SHARD_BYTES = 1 << 44
MAX_CROP = 1 << 14
MAX_FRAMES = 10_000


def _int(value, minimum: int = 0, maximum: int = MAX_SAMPLES) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= maximum


def _optional(value, kind) -> bool:
    return value is None or isinstance(value, kind)


def parse_manifest(raw: bytes, path: str) -> dict:
    """Parse and check manifest bytes (from a file or a URL): schema, the types of every field
    ``verify`` and ``score`` use, and shard names that are exactly ``shard_name(variant, i)`` (so
    none can leave the corpus). Raises :class:`ManifestError` and nothing else, whatever the bytes."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path}: larger than {MAX_MANIFEST_BYTES >> 20} MiB, not a qrobust manifest")
    try:
        manifest = load_json(raw, path, max_bytes=MAX_MANIFEST_BYTES)
    except BoundsError as e:  # nesting too deep: refused before a recursive check could overflow
        raise ManifestError(str(e)) from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too-long integers
        raise ManifestError(f"{path}: cannot read: {str(e)[:200]}") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else None
        raise ManifestError(f"{path}: schema is {str(found)[:80]!r}, expected {SCHEMA!r}")

    def bad(what: str) -> ManifestError:
        return ManifestError(f"{path}: {what} (malformed or edited manifest; regenerate the corpus)")

    suite = manifest.get("suite")
    spec = suite.get("spec") if isinstance(suite, dict) else None
    if not isinstance(spec, dict) or not isinstance(suite.get("name"), str):
        raise bad("no suite name and spec")
    geometry, shards_table = spec.get("geometry"), spec.get("shards", {})
    if not isinstance(geometry, dict) or not _int(geometry.get("crop"), 1, MAX_CROP) \
            or not isinstance(shards_table, dict) or not _int(shards_table.get("samples", 1), 1):
        raise bad("the suite spec has no [geometry] crop or a malformed [shards] table")
    classes = manifest.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise bad("classes is not a list of names")
    seed = manifest.get("seed")
    if seed is not None and not _int(seed, 0, 2 ** 64):
        raise bad("seed is not a non-negative integer")
    for key in ("source", "versions"):
        if not _optional(manifest.get(key), dict):
            raise bad(f"{key} is not a table")
    if not _optional(manifest.get("plan_sha256"), str):
        raise bad("plan_sha256 is not a string")
    card = manifest.get("card")  # absent in corpora written before cards were
    if card is not None and not (isinstance(card, dict) and card.get("name") == CARD_NAME
                                 and _int(card.get("bytes"), 0, MAX_MANIFEST_BYTES)
                                 and isinstance(card.get("sha256"), str)):
        raise bad(f"card is not an entry of {CARD_NAME} with its bytes and sha256")
    variants = manifest.get("variants")
    samples = manifest.get("samples")
    if not isinstance(variants, dict) or not isinstance(samples, dict) or not _int(samples.get("count")) \
            or not _optional(samples.get("keys_sha256"), str):
        raise ManifestError(f"{path}: no variants table or sample count")
    for vid, entry in variants.items():
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list) or not _int(entry.get("count")) \
                or not isinstance(entry.get("params"), dict) or not isinstance(entry.get("family"), str):
            raise ManifestError(f"{path}: variant {vid[:80]!r} has no shard list, count, family or params")
        if not VARIANT_ID.fullmatch(vid) or vid.split("/")[0] != entry["family"]:
            raise ManifestError(f"{path}: variant id {vid[:80]!r} is not family/name of its family "
                                f"{entry['family'][:40]!r}")
        params = entry["params"]
        needs = {"natural": {"corruption": str, "severity": (1, 1_000)},  # a sequence needs 2 frames for a flip
                 "sequence": {"perturbation": str, "difficulty": (1, 1_000), "frames": (2, MAX_FRAMES)}
                 }.get(entry["family"], {})
        for key, kind in needs.items():  # str, or the bounds of an int
            value = params.get(key)
            if not (isinstance(value, str) if kind is str else _int(value, *kind)):
                raise ManifestError(f"{path}: variant {vid!r} has no valid {key} parameter")
        if entry["family"] == "sequence" and not isinstance(params.get("noise", False), bool):
            raise ManifestError(f"{path}: variant {vid!r}: its noise flag is not true or false")
        for i, shard in enumerate(shards):
            if not isinstance(shard, dict) or not {"name", "sha256", "bytes", "count"} <= set(shard) \
                    or not _int(shard["bytes"], 0, MAX_SHARD_BYTES) or not _int(shard["count"]) \
                    or not _optional(shard["sha256"], str) or not _optional(shard.get("keys_sha256"), str):
                raise ManifestError(f"{path}: variant {vid!r} has a malformed shard entry")
            try:
                safe_relative(Path("."), shard["name"])
            except ManifestError as e:
                raise ManifestError(f"{path}: variant {vid!r}: {e}") from None
            if shard["name"] != shard_name(vid, i):
                raise ManifestError(f"{path}: shard {i} of {vid!r} is {shard['name'][:200]!r}, "
                                    f"expected {shard_name(vid, i)!r}")
    return manifest


def manifest_problems(manifest: dict) -> list[tuple[str | None, str]]:
    """What in a parsed manifest disagrees with itself, as (variant id or None for the whole corpus,
    one-line message naming manifest.json or the variant).

    Finds hand edits: the settings no longer match the plan digest recorded at
    generation; the top-level seed or geometry differ from the suite spec's; the
    suite spec of a generated corpus lists no family; a variant's family, name,
    parameters or encoding differ from what the suite spec defines for that id
    (or the spec defines no such id); a variant's shard counts disagree with its
    count or the corpus's sample count.
    """
    from qrobust.shared.suites import FAMILIES

    out: list[tuple[str | None, str]] = []
    if manifest.get("plan_sha256") != plan_digest(plan_of(manifest)):
        out.append((None, f"{MANIFEST_NAME}: edited by hand (suite, source, classes, selection or library versions "
                          "do not match the plan digest recorded when the corpus was made)"))
    spec = manifest["suite"]["spec"]
    if manifest.get("seed") != spec.get("seed", 0):
        out.append((None, f"{MANIFEST_NAME}: edited by hand (seed {manifest.get('seed')!r}, the suite spec says "
                          f"{spec.get('seed', 0)!r})"))
    if "geometry" in manifest and manifest["geometry"] != {k: spec["geometry"].get(k) for k in ("resize", "crop")}:
        out.append((None, f"{MANIFEST_NAME}: edited by hand (geometry differs from the suite spec's)"))
    expected = {}
    try:
        for family, table in spec.items():
            if family in FAMILIES:
                expected.update({v.id: v for v in FAMILIES.get(family)(table)})
    except Exception as e:  # the spec is data from a file: any failure means it is no valid suite
        out.append((None, f"{MANIFEST_NAME}: its suite spec is not a valid suite ({str(e)[:200]})"))
    # a generated corpus's spec defines its variants; one that lists no family would leave every variant
    # unchecked below (an imported release is described by its files, and its spec lists none)
    if "imported_from" not in manifest and not any(family in FAMILIES for family in spec):
        out.append((None, f"{MANIFEST_NAME}: its suite spec lists no family ({', '.join(FAMILIES.in_order())}), "
                          "so no variant can be checked against it (edited by hand; regenerate the corpus)"))
    total = manifest["samples"]["count"]
    for vid, entry in sorted(manifest["variants"].items()):
        v = expected.get(vid)
        if v is None and expected:
            out.append((vid, f"{MANIFEST_NAME}: variant {vid} is not defined by the suite spec (edited by hand)"))
        elif v is not None:
            record = {"family": entry.get("family"), "name": entry.get("name"), "params": entry.get("params"),
                      "encoding": entry.get("encoding")}
            want = v.as_record()
            if v.family == "sequence" and isinstance(record["encoding"], dict):  # + the recipe, a library matter
                record["encoding"] = {"format": record["encoding"].get("format")}
            if v.family == "sequence" and isinstance(record["params"], dict) and "noise" not in record["params"]:
                record["params"] = {**record["params"], "noise": v.params["noise"]}  # written before it was
            differ = sorted(k for k in want if record[k] != want[k])
            if differ:
                out.append((vid, f"{MANIFEST_NAME}: variant {vid}: {', '.join(differ)} differ from the suite "
                                 "spec's (edited by hand)"))
        held = sum(s["count"] for s in entry["shards"])
        if held != entry["count"] or held != total:
            out.append((vid, f"{vid}: shards hold {held} samples, manifest says {entry['count']} (corpus: {total})"))
    # every variant holds the same samples in the same shards: a variant whose shard counts or keys differ
    # from the others' was edited or had shards swapped (with ties, every variant off the common layout)
    layouts = {vid: tuple((s["count"], s.get("keys_sha256")) for s in entry["shards"])
               for vid, entry in manifest["variants"].items()}
    tally = Counter(layouts.values())
    if len(tally) > 1:
        top = tally.most_common(2)
        common = top[0][0] if top[0][1] > top[1][1] else None
        for vid in sorted(layouts):
            if layouts[vid] != common:
                out.append((vid, f"{MANIFEST_NAME}: variant {vid}: its shards hold other samples than the other "
                                 "variants' (shards swapped or manifest edited)"))
    return out


