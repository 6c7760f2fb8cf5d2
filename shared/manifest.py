"""The corpus format: ``manifest.json`` and its shards (the only bond between
``generate`` and ``score``).

::

    <corpus>/manifest.json
    <corpus>/<family>/<name>/<name>-000000.tar    one WebDataset shard set per variant

A shard sample is ``<key>.cls`` (the integer label, as text) plus one payload
(``<key>.jpg`` / ``<key>.png``); samples appear in key order, the same in
every variant. The manifest records how the corpus was made (suite, source
fingerprint, label map, library versions) and, per shard, its byte size,
sha256, sample count and a sha256 over its keys, which :func:`verify_corpus`
checks.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qrobust.shared.errors import QrobustError

SCHEMA = "qrobust.manifest/1"
MANIFEST_NAME = "manifest.json"
PARTIAL_SUFFIX = ".partial"


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: unique to this
    process, so a run that resumes while an old one still writes never shares a file."""
    return path.with_name(f"{path.name}{PARTIAL_SUFFIX}-{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ManifestError(QrobustError, ValueError):
    """A manifest is missing, malformed, or points outside its corpus."""


def shard_name(variant_id: str, index: int) -> str:
    """Relative path of shard ``index`` of a variant: ``natural/fog-3/fog-3-000000.tar``."""
    return f"{variant_id}/{variant_id.split('/')[-1]}-{index:06d}.tar"


def keys_digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def member_key(name: str) -> str:
    """The sample key of a tar member, split as webdataset does (at the first dot of the basename)."""
    folder, base = posixpath.split(name)
    stem = base.split(".", 1)[0]
    return posixpath.join(folder, stem) if folder else stem


def shard_summary(path: str | os.PathLike) -> dict:
    """sha256, byte size, sample count and keys digest of one shard file.

    Raises :class:`ValueError` if the file is not a readable tar, or if its
    samples are not in strictly increasing key order (a reordered or duplicated
    sample).
    """
    return read_shard_keys(path)[0]


def read_shard_keys(path: str | os.PathLike) -> tuple[dict, list[str]]:
    """:func:`shard_summary` and the shard's sample keys in order."""
    data = Path(path).read_bytes()
    keys: list[str] = []
    members: set[str] = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                key = member_key(member.name)
                if not keys or keys[-1] != key:
                    if keys and key < keys[-1]:
                        raise ValueError(f"sample {key!r} out of key order (after {keys[-1]!r})")
                    keys.append(key)
                    members.clear()
                if member.name in members:
                    raise ValueError(f"member {member.name!r} appears twice")
                members.add(member.name)
    except tarfile.TarError as e:
        raise ValueError(f"not a readable tar: {e}") from None
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "count": len(keys),
            "keys_sha256": keys_digest(keys)}, keys


def plan_of(manifest: dict) -> dict:
    """The settings a corpus was made with, as recorded in its manifest; equal
    plans make equal shards, so resumption and verification compare these."""
    source = manifest.get("source", {})
    spec = manifest.get("suite", {}).get("spec") or {}
    versions = manifest.get("versions", {})
    return {"suite": manifest.get("suite", {}).get("spec"), "source": source.get("fingerprint"),
            "classes": manifest.get("classes"), "selection": source.get("selection"),
            "versions": {lib: versions.get(lib) for lib in pixel_libraries(spec)}}


def plan_digest(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


# the libraries whose versions decide pixels: a corpus rebuilt with others may differ by a few levels
PIXEL_LIBRARIES = ("numpy", "Pillow", "libjpeg_turbo", "scipy", "scikit-image", "imagecorruptions", "opencv")
FFMPEG_LIBRARIES = ("av", "libavcodec", "libavformat", "libswscale", "x264")  # sequences, decode-ffmpeg


def pixel_libraries(spec: dict) -> tuple[str, ...]:
    """The libraries that decide the pixels of a suite (FFmpeg's only if it has sequences or systematic noise).

    Their versions are part of a corpus's settings: a run does not resume a
    corpus that other versions started, since the shards would mix outputs."""
    uses_ffmpeg = "sequence" in spec or "systematic" in spec
    return PIXEL_LIBRARIES + (FFMPEG_LIBRARIES if uses_ffmpeg else ())


def library_versions() -> dict:
    """Versions of Python, qrobust and every library that touches pixels or shards."""
    import importlib.metadata as md
    import sys

    import numpy
    import PIL
    from PIL import features

    import qrobust
    from qrobust.shared.video import ffmpeg_versions

    out = {"python": sys.version.split()[0], "qrobust": qrobust.__version__, "numpy": numpy.__version__,
           "Pillow": PIL.__version__, "libjpeg_turbo": features.version("libjpeg_turbo")}
    for dist in ("scipy", "scikit-image", "imagecorruptions", "webdataset", "opencv-python",
                 "opencv-python-headless"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    try:
        import cv2

        out["opencv"] = cv2.__version__
    except ImportError:
        pass
    out.update(ffmpeg_versions())
    return out


def environment_differences(manifest: dict) -> list[str]:
    """Pixel-deciding libraries (recorded in the manifest) whose installed version differs."""
    built, here = manifest.get("versions", {}), library_versions()
    libs = pixel_libraries(manifest.get("suite", {}).get("spec") or {})
    return [f"{lib}: corpus built with {built[lib]}, installed {here.get(lib)}"
            for lib in libs if built.get(lib) is not None and built[lib] != here.get(lib)]


def dumps(manifest: dict) -> str:
    return json.dumps(manifest, indent=1, sort_keys=True) + "\n"


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file under a temporary name, fsync, then rename over the target."""
    path = Path(path)
    tmp = partial_path(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


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
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{path} not found: is {corpus} a qrobust corpus (made by `qrobust generate`)?") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot read: {e}") from None
    return parse_manifest(raw, str(path))


def parse_manifest(raw: bytes, path: str) -> dict:
    """Parse and check manifest bytes (from a file or a URL): schema, types, and shard
    names that are exactly ``shard_name(variant, i)`` (so none can leave the corpus)."""
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: cannot read: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise ManifestError(f"{path}: schema is {manifest.get('schema') if isinstance(manifest, dict) else None!r}, "
                            f"expected {SCHEMA!r}")
    variants = manifest.get("variants")
    samples = manifest.get("samples")
    if not isinstance(variants, dict) or not isinstance(samples, dict) or not isinstance(samples.get("count"), int):
        raise ManifestError(f"{path}: no variants table or sample count")
    for vid, entry in variants.items():
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list) or not isinstance(entry.get("count"), int) \
                or not isinstance(entry.get("params"), dict) or not isinstance(entry.get("family"), str):
            raise ManifestError(f"{path}: variant {vid!r} has no shard list, count, family or params")
        for i, shard in enumerate(shards):
            if not isinstance(shard, dict) or not {"name", "sha256", "bytes", "count"} <= set(shard) \
                    or not all(isinstance(shard[k], int) and not isinstance(shard[k], bool) for k in ("bytes", "count")):
                raise ManifestError(f"{path}: variant {vid!r} has a malformed shard entry")
            try:
                safe_relative(Path("."), shard["name"])
            except ManifestError as e:
                raise ManifestError(f"{path}: variant {vid!r}: {e}") from None
            if shard["name"] != shard_name(vid, i):
                raise ManifestError(f"{path}: shard {i} of {vid!r} is {shard['name']!r}, "
                                    f"expected {shard_name(vid, i)!r}")
    return manifest


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_shard(corpus: Path, shard: dict, rehash: bool) -> tuple[list[str], list[str] | None]:
    """(problems, keys read or None) for one shard."""
    name = shard["name"]
    path = corpus / name
    if not path.is_file():
        return [f"{name}: missing"], None
    size = path.stat().st_size
    if size != shard["bytes"]:
        return [f"{name}: {size} bytes, manifest says {shard['bytes']}"], None
    if not rehash:
        return [], None
    try:
        found, keys = read_shard_keys(path)
    except (OSError, ValueError) as e:
        return [f"{name}: {e}"], None
    problems = []
    if found["sha256"] != shard["sha256"]:
        problems.append(f"{name}: sha256 mismatch (content changed)")
    if found["count"] != shard["count"]:
        problems.append(f"{name}: {found['count']} samples, manifest says {shard['count']}")
    elif "keys_sha256" in shard and found["keys_sha256"] != shard["keys_sha256"]:
        problems.append(f"{name}: sample keys differ from the manifest's")
    return problems, keys


def verify_corpus(corpus: str | os.PathLike, *, rehash: bool = True, workers: int | None = None,
                  progress=None) -> list[str]:
    """Check every shard of a corpus against its manifest; return the problems found.

    Each problem is one line naming the file: missing, extra, wrong size,
    wrong sha256, wrong sample count, keys out of order, and variants whose
    counts disagree with the manifest. An empty list means the corpus is
    intact. Raises :class:`ManifestError` if the manifest itself is unusable.
    """
    corpus = Path(corpus)
    manifest = load_manifest(corpus)
    problems: list[str] = []
    if manifest.get("plan_sha256") != plan_digest(plan_of(manifest)):
        problems.append(f"{MANIFEST_NAME}: edited by hand (suite, source, classes or selection do not match "
                        "the plan digest recorded when the corpus was made)")
    samples = manifest.get("samples", {})
    shards = [s for entry in manifest["variants"].values() for s in entry["shards"]]
    for vid, entry in sorted(manifest["variants"].items()):
        total = sum(s["count"] for s in entry["shards"])
        if total != entry["count"] or total != samples.get("count"):
            problems.append(f"{vid}: shards hold {total} samples, manifest says {entry['count']} "
                            f"(corpus: {samples.get('count')})")
    keys_by_shard: dict[str, list[str] | None] = {}
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for shard, (found, keys) in zip(shards, pool.map(lambda s: _check_shard(corpus, s, rehash), shards)):
            problems.extend(found)
            keys_by_shard[shard["name"]] = keys
            if progress is not None:
                progress(1)
    if rehash:  # every variant must hold exactly the corpus's samples, in order
        for vid, entry in sorted(manifest["variants"].items()):
            parts = [keys_by_shard[s["name"]] for s in entry["shards"]]
            if all(p is not None for p in parts) and keys_digest([k for p in parts for k in p]) != \
                    samples.get("keys_sha256"):
                problems.append(f"{vid}: its samples differ from the corpus's sample list")
    listed = {s["name"] for s in shards}
    for family_dir in sorted(p for p in corpus.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(family_dir.rglob("*")):
            if path.is_file():
                rel = path.relative_to(corpus).as_posix()
                if rel not in listed:
                    problems.append(f"{rel}: extra file not in the manifest")
    return problems
