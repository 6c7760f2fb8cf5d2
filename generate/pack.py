"""``qrobust pack``: a smaller corpus to share, cut from a bigger one, with its own valid manifest.

Collaborators rarely need all 101 variants of 50,000 samples: ``pack`` keeps a
subset of the variants (``only`` / ``exclude`` globs over variant ids) and/or
of the samples (``per_class``: the first K samples of every class, then
``limit``: the first N, both in corpus order, i.e. key order, as
``generate --per-class/--limit`` select).

Bytes are never re-encoded, so a model predicts exactly what it predicts on
the original corpus:

* without a sample subset, shards are hard-linked (copied across file
  systems) and each one's sha256 is checked against the source manifest, so
  a damaged source shard is refused, not propagated; the manifest keeps its
  settings digest, so ``generate`` can still add variants to the packed corpus;
* with a sample subset, every kept variant is re-sharded: the kept samples'
  payload members are copied as they are, in order, into new shards of the
  source's samples-per-shard, written with the project's tar writer
  (:class:`~qrobust.generate.writer.ShardFile`: reproducible, atomic); labels
  are rewritten as the canonical integer text. A shard whose samples are
  exactly those of a source shard comes out byte-identical to it. The
  selection is recorded under ``source.selection.packs`` (so the settings
  digest changes: ``generate`` will not mistake the packed corpus for a
  resumable run of the full one).

Every kept shard, linked or re-sharded, is read and checked before it is
published: its size and sha256 against the source manifest, its tar structure
(bounded parsing, :func:`~qrobust.shared.shards.scan_shard`), its samples and,
for every payload, the header against the corpus's declared geometry
(:func:`~qrobust.shared.shards.check_payload`: image size; a video's frame
count and the frame size of its container and of every parameter set in its
stream), so a hostile payload is refused here, not passed on under a new
manifest. No pixel is decoded.

The packed manifest records where it came from under ``packed_from`` (the
source manifest's sha256 and the selection) and is written last, after the
packed corpus's own dataset card; it passes ``qrobust verify``. It holds no
local path, even when the source corpus (written before) recorded some. The
output folder must be new or empty (so no link inside it can be written
through: pack creates every file and folder it writes to); after a failure the
files this run wrote are removed again.
"""
from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import shutil
from pathlib import Path

from qrobust.generate import outdir
from qrobust.generate.writer import ShardFile
from qrobust.shared import manifest as mf
from qrobust.shared.bounded import check_depth, read_at_most
from qrobust.shared.card import CARD_NAME, write_card
from qrobust.shared.errors import QrobustError
from qrobust.shared.files import partial_path, write_atomic
from qrobust.shared.shards import (LABEL, LABEL_EXT, ShardError, check_payload, keys_digest, payload_shape,
                                   scan_shard, shown)
from qrobust.shared.verify import local_shard_problem

log = logging.getLogger("qrobust.pack")


class PackError(QrobustError, ValueError):
    """The corpus cannot be packed as asked (bad selection, damaged source, --out in use)."""


def pack(corpus: str, out: str, *, only: list[str] | None = None, exclude: list[str] | None = None,
         limit: int | None = None, per_class: int | None = None, progress: bool = True) -> dict:
    """Write a subset of the local corpus ``corpus`` to the new folder ``out``; return its manifest.

    >>> pack("corpora/robustmq", "corpora/small", only=["clean/*", "natural/*-3"], per_class=5)  # doctest: +SKIP

    ``only`` / ``exclude``: globs over variant ids (each must match a variant);
    ``per_class`` then ``limit``: keep the first K samples of every class, then
    the first N samples, in corpus order. Raises :class:`PackError` for a
    selection that matches nothing, an ``out`` that is not new or empty, or a
    damaged source (a manifest with problems, a shard whose sha256, structure
    or keys differ from the manifest's, a payload whose header disagrees with
    the corpus's geometry), and
    :class:`~qrobust.shared.manifest.ManifestError` for an unreadable manifest
    (:class:`~qrobust.shared.bounded.BoundsError` for one nested too deep).
    """
    if "://" in str(corpus):
        raise PackError(f"{corpus}: pack reads a local corpus folder; copy the corpus here first")
    root = Path(corpus)
    if not root.is_dir():
        raise PackError(f"corpus folder {corpus} does not exist or is not a folder")
    for name, value in (("--limit", limit), ("--per-class", per_class)):
        if value is not None and value < 1:
            raise PackError(f"{name} must be at least 1")
    manifest = mf.load_manifest(root)
    check_depth(manifest, str(root / mf.MANIFEST_NAME))  # it is deep-copied below
    with open(root / mf.MANIFEST_NAME, "rb") as f:  # load_manifest refused anything but a regular file
        raw = read_at_most(f, mf.MAX_MANIFEST_BYTES + 1)
    kept = select_variants(sorted(manifest["variants"]), only, exclude, corpus)
    _check_source(root, manifest, kept)
    target = _empty_folder(out)
    written: list[Path] = []
    try:
        result = _pack(root, manifest, kept, target, written, limit=limit, per_class=per_class, progress=progress)
        result["packed_from"] = {"manifest_sha256": hashlib.sha256(raw).hexdigest(), "only": only,
                                 "exclude": exclude, "limit": limit, "per_class": per_class,
                                 **({"previous": manifest["packed_from"]} if "packed_from" in manifest else {})}
        problems = mf.manifest_problems(result)
        if problems:  # a bug of pack's, never the user's: keep nothing that claims to be valid
            raise RuntimeError(f"packed manifest is inconsistent: {problems[0][1]}")
        written.append(target / CARD_NAME)
        write_card(target, result)
        write_atomic(target / mf.MANIFEST_NAME, mf.dumps(result))
    except BaseException:
        _remove(target, written)
        raise
    return result


def select_variants(ids: list[str], only: list[str] | None, exclude: list[str] | None, corpus: str) -> list[str]:
    """The ids kept by ``only`` (all if none) minus those matched by ``exclude``; a glob that matches
    no variant of the corpus, or a selection that leaves none, raises :class:`PackError`."""
    for flag, patterns in (("--only", only), ("--exclude", exclude)):
        for pattern in patterns or []:
            if not any(fnmatch.fnmatchcase(i, pattern) for i in ids):
                more = ", ..." if len(ids) > 4 else ""
                raise PackError(f"{flag} {pattern!r} matches no variant of {corpus} (its {len(ids)} variants: "
                                f"{', '.join(ids[:4])}{more})")
    kept = [i for i in ids if not only or any(fnmatch.fnmatchcase(i, p) for p in only)]
    kept = [i for i in kept if not any(fnmatch.fnmatchcase(i, p) for p in exclude or [])]
    if not kept:
        raise PackError("--only and --exclude leave no variant to pack")
    return kept


def _check_source(root: Path, manifest: dict, kept: list[str]) -> None:
    """Refuse a source whose manifest disagrees with itself, or whose kept shards are missing, of another
    size, links out of it or no regular files (problems of variants left out do not matter)."""
    problems = [msg for vid, msg in mf.manifest_problems(manifest) if vid is None or vid in kept]
    for vid in kept:
        problems += [p for s in manifest["variants"][vid]["shards"]
                     if (p := local_shard_problem(root, s["name"], s["bytes"]))]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise PackError(f"{root} is damaged: {problems[0]}{more}; `qrobust verify {root}` lists every problem "
                        "(--exclude the damaged variants to pack the rest)")


def _empty_folder(out: str) -> Path:
    target = outdir.create(out, PackError)
    if any(target.iterdir()):
        raise PackError(f"--out {out} is not empty; choose a new or empty folder")
    return target


def _remove(target: Path, written: list[Path]) -> None:
    """Undo a failed pack: the files it wrote, then the folders they emptied (never anything else)."""
    for path in written:
        path.unlink(missing_ok=True)
    for folder in sorted({p.parent for p in written}, key=lambda p: -len(p.parts)):
        while folder != target and folder.is_relative_to(target):
            try:
                folder.rmdir()
            except OSError:
                break
            folder = folder.parent


def _bar(total: int, enabled: bool):
    from qrobust.shared.progress import bar

    return bar(total, "pack", "shard", enabled=enabled)


def _pack(root: Path, manifest: dict, kept: list[str], target: Path, written: list[Path], *, limit, per_class,
          progress) -> dict:
    result = mf.portable(manifest)  # a copy; the local paths a corpus written before recorded, made relative
    result["variants"] = {vid: result["variants"][vid] for vid in kept}
    result.pop("packed_from", None)
    result.pop("card", None)  # the packed corpus gets a card of its own
    n_shards = sum(len(manifest["variants"][vid]["shards"]) for vid in kept)
    subset = None
    if limit is not None or per_class is not None:
        reference = min(kept, key=lambda v: sum(s["bytes"] for s in manifest["variants"][v]["shards"]))
        shape = payload_shape(manifest, reference)
        samples = [(key, label) for shard in manifest["variants"][reference]["shards"]
                   for key, label, _ in _read_shard(root, shard, shape)]
        wanted = _select(samples, limit, per_class)
        if len(wanted) < len(samples):
            subset = (samples, wanted)
    if subset is None:
        with _bar(n_shards, progress) as bar:
            for vid in kept:
                shape = payload_shape(manifest, vid)
                for shard in manifest["variants"][vid]["shards"]:
                    _link_or_copy(root, target, shard, shape, written)
                    bar.update(1)
        log.info("packed %d variants, %d shards linked or copied", len(kept), n_shards)
        return result
    samples, wanted = subset
    with _bar(n_shards, progress) as bar:
        per = manifest["suite"]["spec"].get("shards", {}).get("samples", 1000)
        for vid in kept:
            result["variants"][vid]["shards"] = _reshard(root, target, vid, manifest["variants"][vid]["shards"],
                                                         payload_shape(manifest, vid), samples, wanted, per,
                                                         written, bar)
            result["variants"][vid]["count"] = len(wanted)
    keys = [key for key, _ in samples if key in wanted]
    result["samples"] = {"count": len(keys), "keys_sha256": keys_digest(keys)}
    source = dict(result.get("source") or {})
    selection = dict(source.get("selection") or {})
    selection["packs"] = [*selection.get("packs", []), {"limit": limit, "per_class": per_class}]
    result["source"] = dict(source, selection=selection)
    result["plan_sha256"] = mf.plan_digest(mf.plan_of(result))
    log.info("packed %d variants x %d of %d samples", len(kept), len(keys), len(samples))
    return result


def _select(samples: list[tuple[str, int]], limit: int | None, per_class: int | None) -> set[str]:
    """Keys of the first ``per_class`` samples of every class, then of the first ``limit`` of those."""
    keys = [key for key, _ in samples]
    if per_class is not None:
        seen: dict[int, int] = {}
        keys = []
        for key, label in samples:
            seen[label] = seen.get(label, 0) + 1
            if seen[label] <= per_class:
                keys.append(key)
    return set(keys[:limit] if limit is not None else keys)


def _read_shard(root: Path, shard: dict, shape: tuple[int, ...]):
    """(key, label, (payload extension, payload bytes)) of every sample of a source shard, checked
    (:func:`_checked_samples`)."""
    try:
        with open(root / shard["name"], "rb") as f:
            data = read_at_most(f, shard["bytes"] + 1)
    except OSError as e:
        raise PackError(f"cannot read {root / shard['name']}: {e.strerror or e}") from None
    return _checked_samples(root, shard, data, shape)


def _checked_samples(root: Path, shard: dict, data: bytes, shape: tuple[int, ...]):
    """(key, label, (payload extension, payload bytes)) of every sample of a shard's bytes ``data``, after
    its size, sha256, structure, sample count and keys are checked against the manifest and every
    payload's header against the declared geometry ``shape`` (a damaged shard raises PackError)."""
    name = shard["name"]

    def damaged(what: str) -> PackError:
        return PackError(f"{root}: {name}: {what}; `qrobust verify {root}` lists every problem")

    if len(data) != shard["bytes"]:
        got = f"more than {shard['bytes']}" if len(data) > shard["bytes"] else len(data)
        raise damaged(f"{got} bytes, manifest says {shard['bytes']}")
    if hashlib.sha256(data).hexdigest() != shard["sha256"]:
        raise damaged("sha256 differs from the manifest (content changed)")
    try:
        samples = scan_shard(data)
    except ShardError as e:
        raise damaged(str(e)) from None
    keys = [s.key for s in samples]
    if len(keys) != shard["count"] or shard.get("keys_sha256", keys_digest(keys)) != keys_digest(keys):
        raise damaged("its samples differ from the manifest's")
    out = []
    for s in samples:
        _, offset, size = s.members[LABEL_EXT]
        match = LABEL.fullmatch(data[offset:offset + size])
        if not match:
            raise damaged(f"member {s.key}.{LABEL_EXT} is not an integer label")
        ext = next(e for e in s.members if e != LABEL_EXT)
        member, offset, size = s.members[ext]
        payload = data[offset:offset + size]
        try:
            check_payload(ext, payload, shape)
        except ShardError as e:
            raise damaged(f"member {shown(member)}: {e}") from None
        out.append((s.key, int(match.group(1)), (ext, payload)))
    return out


def _reshard(root: Path, target: Path, vid: str, shards: list[dict], shape: tuple[int, ...],
             samples: list[tuple[str, int]], wanted: set[str], per: int, written: list[Path], bar) -> list[dict]:
    """Copy the ``wanted`` samples of one variant, in order, into new shards of ``per`` samples."""
    expected = iter(samples)
    out: list[dict] = []
    writer: ShardFile | None = None
    held = 0

    def publish() -> None:
        out.append(dict(writer.publish(), name=mf.shard_name(vid, len(out))))

    try:
        for shard in shards:
            for key, label, (ext, payload) in _read_shard(root, shard, shape):
                if next(expected, None) != (key, label):  # every variant holds the same samples and labels
                    raise PackError(f"{root}: {vid}: sample {key!r} differs from the other variants' (keys or "
                                    f"labels); `qrobust verify {root}` lists every problem")
                if key not in wanted:
                    continue
                if writer is None:
                    path = target / mf.shard_name(vid, len(out))
                    written.append(path)
                    writer, held = ShardFile(path), 0
                writer.add(key, label, ext, payload)
                held += 1
                if held == per:
                    publish()
                    writer = None
            bar.update(1)
        if writer is not None:
            publish()
            writer = None
    finally:
        if writer is not None:
            writer.discard()
    return out


def _link_or_copy(root: Path, target: Path, shard: dict, shape: tuple[int, ...], written: list[Path]) -> None:
    """Put a source shard into ``target`` (a hard link, or a copy across file systems), atomically, after
    checking the very bytes it links (:func:`_checked_samples`)."""
    source, dest = root / shard["name"], target / shard["name"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(dest)
    written += [partial, dest]
    try:
        os.link(source, partial)
    except OSError:  # another file system, or links not allowed: a copy, made durable
        shutil.copyfile(source, partial)
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
    try:
        try:
            with open(partial, "rb") as f:
                data = read_at_most(f, shard["bytes"] + 1)
        except OSError as e:
            raise PackError(f"cannot read {partial}: {e.strerror or e}") from None
        _checked_samples(root, shard, data, shape)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, dest)
