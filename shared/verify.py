"""``qrobust verify``: a corpus re-hashed and recounted against its manifest.

Every shard's presence, size, sha256, structure, sample count and keys are
checked (:mod:`qrobust.shared.shards` reads the structure without extracting
anything, its headers with bounds; a shard is read no further than the
manifest's byte count plus one), so is the dataset card (``README.md``) where the manifest records one
(corpora written before cards were record none), and files the manifest does
not name are reported.
"""
from __future__ import annotations

import hashlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qrobust.shared.bounded import check_depth, read_at_most
from qrobust.shared.files import file_sha256
from qrobust.shared.manifest import MANIFEST_NAME, load_manifest, manifest_problems
from qrobust.shared.shards import ShardError, keys_digest, scan_shard


def local_shard_problem(corpus: Path, name: str, size: int) -> str | None:
    """Why the shard file ``name`` (or the card) of a local corpus cannot be used as is, or None: missing, not a
    regular file (a FIFO or device would block or never end), resolving outside the corpus (a
    symbolic link), or of another size than the manifest's. Reads nothing."""
    path = corpus / name
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{name}: missing"
    except OSError as e:
        return f"{name}: cannot read: {e.strerror or e}"
    if not stat.S_ISREG(st.st_mode):
        return f"{name}: not a regular file"
    if not inside(corpus, path):
        return f"{name}: resolves outside the corpus ({path.resolve()}); shards must be files inside it"
    if st.st_size != size:
        return f"{name}: {st.st_size} bytes, manifest says {size}"
    return None


def inside(corpus: Path, path: Path) -> bool:
    """Whether ``path``, all links followed, lies inside ``corpus`` (itself resolved)."""
    try:
        return path.resolve().is_relative_to(corpus.resolve())
    except (OSError, RuntimeError):  # a link loop
        return False


def _check_shard(corpus: Path, shard: dict, rehash: bool) -> tuple[list[str], list[str] | None]:
    """(problems, keys read or None) for one shard."""
    name = shard["name"]
    problem = local_shard_problem(corpus, name, shard["bytes"])
    if problem:
        return [problem], None
    if not rehash:
        return [], None
    try:
        with open(corpus / name, "rb") as f:
            data = read_at_most(f, shard["bytes"] + 1)  # grown since it was sized: not read further
    except OSError as e:
        return [f"{name}: cannot read: {e.strerror or e}"], None
    if len(data) > shard["bytes"]:
        return [f"{name}: larger than the manifest's {shard['bytes']} bytes (grown while verified)"], None
    if len(data) < shard["bytes"]:
        return [f"{name}: {len(data)} bytes, manifest says {shard['bytes']}"], None
    problems = []
    if hashlib.sha256(data).hexdigest() != shard["sha256"]:
        problems.append(f"{name}: sha256 mismatch (content changed)")
    try:
        keys = [s.key for s in scan_shard(data)]
    except ShardError as e:
        return problems + [f"{name}: {e}"], None
    if len(keys) != shard["count"]:
        problems.append(f"{name}: {len(keys)} samples, manifest says {shard['count']}")
    elif "keys_sha256" in shard and keys_digest(keys) != shard["keys_sha256"]:
        problems.append(f"{name}: sample keys differ from the manifest's")
    return problems, keys


def card_problem(corpus: Path, manifest: dict, rehash: bool = True) -> str | None:
    """Why the dataset card the manifest records is not as recorded (missing, not a regular file, of
    another size or, with ``rehash``, another sha256), or None; None too when it records no card."""
    card = manifest.get("card")
    if card is None:
        return None
    problem = local_shard_problem(corpus, card["name"], card["bytes"])
    if problem is None and rehash:
        try:
            if file_sha256(corpus / card["name"]) != card["sha256"]:
                problem = f"{card['name']}: sha256 mismatch (content changed)"
        except OSError as e:
            problem = f"{card['name']}: cannot read: {e.strerror or e}"
    return problem


def extra_files(corpus: Path, manifest: dict, variants: list[str] | None = None) -> list[str]:
    """Files of a local corpus that its manifest does not list (relative paths): in the folders of
    ``variants`` only, or anywhere but ``manifest.json``, the card it records and hidden entries
    (``.qrobust/``) if None."""
    listed = {s["name"] for entry in manifest["variants"].values() for s in entry["shards"]}
    if manifest.get("card") is not None:
        listed.add(manifest["card"]["name"])
    if variants is None:
        roots = sorted(p for p in corpus.iterdir() if not p.name.startswith(".") and p.name != MANIFEST_NAME)
    else:
        roots = [corpus / v for v in variants if (corpus / v).is_dir()]
    found = []
    for root in roots:
        paths = [root] if not root.is_dir() or root.is_symlink() else sorted(root.rglob("*"))
        for path in paths:
            if path.is_dir() and not path.is_symlink():
                continue
            rel = path.relative_to(corpus).as_posix()
            if rel not in listed:
                found.append(rel)
    return found


def verify_corpus(corpus: str | os.PathLike, *, rehash: bool = True, workers: int | None = None,
                  progress=None) -> list[str]:
    """Check every shard of a corpus against its manifest; return the problems found.

    Each problem is one line naming the file: missing, extra, wrong size,
    wrong sha256 (shards and the card), wrong sample count, keys out of order or duplicated, unsafe
    or unexpected members (see :func:`scan_shard`), shards that are links out
    of the corpus, a manifest edited by hand (see :func:`manifest_problems`),
    and variants whose counts disagree with the manifest. An empty list means
    the corpus is intact. Raises :class:`ManifestError` if the manifest itself is unusable
    (:class:`~qrobust.shared.bounded.BoundsError` if it nests deeper than any manifest qrobust writes).
    """
    corpus = Path(corpus)
    manifest = load_manifest(corpus)
    check_depth(manifest, str(corpus / MANIFEST_NAME))
    problems = [message for _, message in manifest_problems(manifest)]
    samples = manifest["samples"]
    shards = [s for entry in manifest["variants"].values() for s in entry["shards"]]
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
    card = card_problem(corpus, manifest, rehash)
    problems += [card] if card else []
    problems += [f"{rel}: extra file not in the manifest" for rel in extra_files(corpus, manifest)]
    return problems
