"""``qrobust import``: the released ImageNet-C and ImageNet-P trees as qrobust corpora, bytes kept as released.

Published numbers are measured on the released files, not on a re-rendering,
so the files go into shards unchanged:

* ``imagenet-c``: ``ROOT/<corruption>/<severity 1..5>/<wnid>/<stem>.JPEG`` ->
  variant ``natural/<corruption>-<severity>`` (params ``corruption``,
  ``severity``, as ``generate`` records them, so ACC, mNR and mCE work),
  member ``jpg``; 1000 samples per shard. Any corruption folder whose name
  makes a valid variant id is taken (the 15 standard ones and the 4 extra).
* ``imagenet-p``: ``ROOT/<perturbation>/<wnid>/<stem>.mp4`` -> variant
  ``sequence/<perturbation>`` (``gaussian_noise_2`` is perturbation
  ``gaussian_noise`` at difficulty 2, as ``generate`` names it; params
  ``frames``: the videos' frame count), member ``mp4``; 100 samples per shard
  (a video is some 30 frames: shards of about the size of the images').

Class index = position of the WordNet id in the sorted class list: the class
folders found, or the names a ``--classes`` file starts its lines with (sorted,
as ``generate --classes`` does, so both give one model the same labels). A
sample's key is its file stem (dots become ``_``, as for ``generate``).

Every variant holds the same samples in key order. A sample that cannot be
used in one variant is left out of all of them and listed in the manifest's
``rejected`` with a one-line reason (and logged); ``strict`` stops at the first
one instead. Listing and probing the tree (:mod:`qrobust.generate.release_tree`)
find bad files without decoding any; here, a file is also rejected for a size
other than the corpus's square crop (the most common size) or, for videos,
another frame count than the other videos of its perturbation.

``--limit`` / ``--per-class`` select by key before probing, as ``generate``
does. Shards are written atomically and skipped when present (an interrupted
import resumes; a rerun gives identical bytes); probe results are cached in
``OUT/.qrobust``; the dataset card and then the manifest are written last.
Every payload written or kept is checked against the corpus's geometry
(:func:`~qrobust.shared.shards.check_payload`: for a video, its frame count and
the frame size of every parameter set in its stream, which probing does not
read); a shard already there is read with bounds and rebuilt unless it passes.
Nothing is written through a link: an ``--out`` holding one (or a FIFO, a
device) is refused before anything is written (:func:`qrobust.generate.outdir.locked`),
and a shard is replaced, never written into.
The manifest holds no local path (see :func:`_manifest`). Listing keeps about
200 bytes per file in memory (some 1 GB for the 3.75 million files of
ImageNet-C).
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from qrobust.generate import outdir
from qrobust.generate.release_tree import (KINDS, MEMBER, SAMPLES_PER_SHARD, Listing, ReleaseError, list_release,
                                      probe_files, select_keys, usable_keys)
from qrobust.generate.release_tree import fingerprint as release_fingerprint
from qrobust.generate.writer import ShardFile
from qrobust.shared import manifest as mf
from qrobust.shared.bounded import BoundsError, check_depth, load_json, read_at_most
from qrobust.shared.card import write_card
from qrobust.shared.files import write_atomic
from qrobust.shared.versions import library_versions, pixel_libraries
from qrobust.shared.noises import is_noise_sequence
from qrobust.shared.shards import ShardError, check_payload, keys_digest, scan_shard, shown
from qrobust.shared.sources import Rejected, read_class_list

log = logging.getLogger("qrobust.import")

CHUNK = 256  # files per probe task


def import_release(kind: str, root: str, out: str, *, classes: str | None = None, only: list[str] | None = None,
                   limit: int | None = None, per_class: int | None = None, workers: int | None = None,
                   strict: bool = False, progress: bool = True, samples_per_shard: int | None = None) -> dict:
    """Import (or finish importing) a released tree into the corpus folder ``out``; return its manifest.

    >>> import_release("imagenet-c", "/data/ImageNet-C", "corpora/imagenet-c", only=["natural/fog-*"])  # doctest: +SKIP

    ``kind``: ``imagenet-c`` or ``imagenet-p``; ``classes``: a file whose lines
    start with the class names; ``only``: variant-id globs; ``limit`` /
    ``per_class``: the first N keys / K keys of every class; ``workers``:
    processes (default: all cores); ``strict``: stop at the first unusable file;
    ``samples_per_shard``: overrides :data:`SAMPLES_PER_SHARD`.

    Raises :class:`ReleaseError` (and :class:`~qrobust.shared.sources.SourceError`
    for a bad class file) with a message saying what to change.
    """
    if kind not in KINDS:
        raise ReleaseError(f"unknown release {kind!r}; known: {', '.join(KINDS)}")
    for name, value in (("--limit", limit), ("--per-class", per_class), ("--workers", workers),
                        ("samples per shard", samples_per_shard)):
        if value is not None and value < 1:
            raise ReleaseError(f"{name} must be at least 1")
    top = Path(root).expanduser().resolve()
    if not top.is_dir():
        raise ReleaseError(f"release folder {root} does not exist or is not a folder")
    listing = list_release(kind, top, only)
    wnids = sorted({f[0] for files in listing.files.values() for f in files.values()})
    class_list = sorted(read_class_list(Path(classes))) if classes else wnids
    keys, labels = usable_keys(kind, listing, top, class_list, classes)
    for r in listing.rejected:
        log.warning("rejected %s: %s", r.path, r.reason)
    if strict and listing.rejected:
        first = min(listing.rejected, key=lambda r: r.path)
        raise ReleaseError(f"--strict: {first.path}: {first.reason}")
    keys = select_keys(keys, labels, limit, per_class)
    if not keys:
        raise ReleaseError(f"no usable samples in {root} (see the rejected files above)")
    per = samples_per_shard or SAMPLES_PER_SHARD[kind]
    fingerprint = release_fingerprint(listing, keys, labels)
    versions = library_versions()
    spec = {"name": kind, "seed": 0, "shards": {"samples": per},
            "description": f"the released {kind} files, imported as released"}
    plan = {"suite": spec, "source": fingerprint, "classes": class_list,
            "selection": {"limit": limit, "per_class": per_class},
            "versions": {lib: versions.get(lib) for lib in pixel_libraries(spec)}}
    target = outdir.create(out, ReleaseError)
    with outdir.locked(target, error=ReleaseError):
        old = _check_plan(target, plan)
        outdir.remove_partials(target)  # left by an interrupted run (we hold the lock)
        workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                              else os.cpu_count() or 1)
        crop, frames, bad = _probe_all(kind, top, listing, keys, target, fingerprint, workers, progress)
        if strict and bad:
            first = min((r for rs in bad.values() for r in rs), key=lambda r: r.path)
            raise ReleaseError(f"--strict: {first.path}: {first.reason}")
        for rs in bad.values():
            for r in rs:
                log.warning("rejected %s: %s", r.path, r.reason)
            listing.rejected.extend(rs)
        keys = [k for k in keys if k not in bad]
        if not keys:
            raise ReleaseError(f"no usable samples in {root} (see the rejected files above)")
        spec = dict(spec, geometry={"crop": crop})
        summaries = _write_all(kind, top, target, listing, keys, labels, per, old, crop, frames, workers, progress)
        manifest = _manifest(kind, top, spec, class_list, keys, listing, frames, summaries, plan, versions, classes)
        write_card(target, manifest)
        write_atomic(target / mf.MANIFEST_NAME, mf.dumps(manifest))
    return manifest


# ---- the output folder -------------------------------------------------------------------------------


def _read_state(path: Path) -> dict:
    """A JSON object this import recorded in OUT/.qrobust (read within bounds), or a one-line error saying
    to delete it."""
    try:
        state = load_json(path)
    except (OSError, ValueError, BoundsError):
        state = None
    if not isinstance(state, dict):
        raise ReleaseError(f"{path}: unreadable; delete it (the import records it again)")
    return state


def _check_plan(target: Path, plan: dict) -> dict | None:
    """Refuse an --out holding anything but an import of this very plan; record the plan; return the
    earlier manifest, if any (its shard hashes tell a finished shard from a stale one)."""
    path = target / outdir.STATE_DIR / "import.json"
    old_manifest = None
    if (target / mf.MANIFEST_NAME).is_file():
        try:
            old_manifest = mf.load_manifest(target)
            check_depth(old_manifest, str(target / mf.MANIFEST_NAME))
        except (mf.ManifestError, BoundsError) as e:
            raise ReleaseError(f"{e}; move it away to import again") from None
    if path.is_file():
        old = _read_state(path)
    elif old_manifest is not None:
        old = mf.plan_of(old_manifest)
        old["suite"] = {k: v for k, v in (old["suite"] or {}).items() if k != "geometry"}
    else:
        old = None
    if old is None and any(p.name != outdir.STATE_DIR for p in target.iterdir()):
        raise ReleaseError(f"{target} is not empty and holds no qrobust corpus; choose a new or empty --out")
    if old is not None and old != json.loads(json.dumps(plan)):
        differ = sorted(k for k in set(old) | set(plan) if old.get(k) != json.loads(json.dumps(plan.get(k))))
        old_variants = (old.get("source") or {}).get("variants") if isinstance(old.get("source"), dict) else None
        if differ == ["source"] and old_variants is not None and old_variants != plan["source"]["variants"]:
            raise ReleaseError(f"{target} holds an import of other variants ({len(old_variants)}; this run "
                               f"selects {len(plan['source']['variants'])}): another --only, or another release "
                               "tree. Import every variant you want in one run, into a new --out")
        raise ReleaseError(f"{target} already holds a corpus made with other settings ({', '.join(differ)} differ); "
                           "use a new --out, or delete that folder to import again")
    if not path.is_file():
        write_atomic(path, json.dumps(plan, indent=1, sort_keys=True))
    return old_manifest


# ---- probing every selected file (in processes; cached) -----------------------------------------------


def _probe_all(kind: str, root: Path, listing: Listing, keys: list[str], target: Path, fingerprint: dict,
               workers: int, progress: bool) -> tuple[int, dict[str, int], dict[str, list[Rejected]]]:
    """Probe every selected file (results cached per fingerprint); returns (crop, frames per sequence
    variant, key -> rejects). The crop is the most common size, which must be square; a variant's frame
    count is its videos' most common one; files that differ are rejected."""
    cache = target / outdir.STATE_DIR / "probe.json"
    if cache.is_file():
        cached = _read_state(cache)
        if cached.get("source") == fingerprint:
            try:
                bad = {k: [Rejected(p, r) for p, r in v] for k, v in cached["bad"].items()}
                return int(cached["crop"]), {k: int(v) for k, v in cached["frames"].items()}, bad
            except (KeyError, TypeError, ValueError, AttributeError):
                raise ReleaseError(f"{cache}: not a probe record; delete it (the files are probed again)") from None
    chunks = [(vid, i) for vid in sorted(listing.files) for i in range(0, len(keys), CHUNK)]

    def files(chunk):
        vid, i = chunk
        return [(vid, k, listing.path(root, vid, k)) for k in keys[i:i + CHUNK]]

    def task(chunk):
        return kind, [(str(path), listing.files[vid][k][2]) for vid, k, path in files(chunk)]

    shared: dict = {}  # one tuple object per distinct result: a few bytes per file, however many files
    results = [[shared.setdefault(r, r) for r in part] for part in
               _map(probe_files, chunks, task, [len(keys[i:i + CHUNK]) for _, i in chunks], workers, "probe",
                    progress)]
    sizes = Counter((r[0], r[1]) for part in results for r in part if isinstance(r, tuple))
    if not sizes:
        raise ReleaseError(f"no readable {MEMBER[kind]} file among those selected in {root}")
    (width, height), _ = sizes.most_common(1)[0]
    if width != height:
        raise ReleaseError(f"the files of {root} are mostly {width}x{height} pixels; a qrobust corpus holds square "
                           "crops")
    counts: dict[str, Counter] = {}
    for (vid, _), part in zip(chunks, results):
        for r in part:
            if isinstance(r, tuple) and r[2] is not None and r[:2] == (width, height):
                counts.setdefault(vid, Counter())[r[2]] += 1
    frames = {vid: c.most_common(1)[0][0] for vid, c in counts.items()}
    bad: dict[str, list[Rejected]] = {}
    for chunk, part in zip(chunks, results):
        for (vid, key, path), r in zip(files(chunk), part):
            reason = r if isinstance(r, str) else None
            if reason is None and r[:2] != (width, height):
                reason = f"{r[0]}x{r[1]} pixels, the other files are {width}x{height}"
            elif reason is None and r[2] is not None and r[2] != frames[vid]:
                reason = f"a video of {r[2]} frames, the other videos of {vid} hold {frames[vid]}"
            if reason:
                bad.setdefault(key, []).append(Rejected(str(path), f"{reason}; the sample is left out of every "
                                                                   "variant"))
    write_atomic(cache, json.dumps({"source": fingerprint, "crop": width, "frames": frames,
                                       "bad": {k: [[r.path, r.reason] for r in v] for k, v in bad.items()}},
                                      indent=1, sort_keys=True))
    return width, frames, bad


def _map(fn, tasks: list, make, sizes: list[int], workers: int, desc: str, progress: bool) -> list:
    """``fn(*make(task))`` for every task, results in order: in this process, or over ``workers`` spawned
    processes with at most two tasks per worker in flight, each task's arguments made just before it is
    submitted (those of all the files of a release at once would take gigabytes). The progress (a bar on
    a terminal, plain lines in a log) counts ``sizes[i]`` files per task."""
    from qrobust.shared.progress import bar as progress_bar

    bar = progress_bar(sum(sizes), desc, "file", enabled=progress)
    results: list = [None] * len(tasks)
    try:
        if workers <= 1 or len(tasks) <= 1:
            for i, t in enumerate(tasks):
                results[i] = fn(*make(t))
                bar.update(sizes[i])
            return results
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx) as pool:
            queued = iter(enumerate(tasks))
            pending: dict = {}

            def submit() -> None:
                for i, t in queued:
                    pending[pool.submit(fn, *make(t))] = i
                    return

            for _ in range(2 * workers):
                submit()
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        i = pending.pop(future)
                        results[i] = future.result()
                        bar.update(sizes[i])
                        submit()
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
        return results
    finally:
        bar.close()


# ---- shards and manifest -----------------------------------------------------------------------------


def _write_shard(ext: str, path: str, samples: list[tuple[str, int, str, int]], expected: str | None,
                 shape: tuple[int, ...]) -> dict:
    """Write one shard of ``(key, label, file path, listed bytes)`` (the files' bytes as they are, each
    checked against the corpus's geometry ``shape``), or keep the one already there if it holds these keys,
    payloads of the listed sizes that pass the same check, and the sha256 an earlier manifest recorded."""
    target = Path(path)
    if target.is_symlink() or (target.exists() and not target.is_file()):  # never written or read through
        raise ReleaseError(f"{target}: not a plain file where a shard goes; remove it, or import into a new --out")
    if target.is_file():
        problem, summary = _kept_shard_problem(target, samples, expected, shape)
        if problem is None:
            return summary
        log.warning("rebuilding %s: %s", target, problem)
    target.unlink(missing_ok=True)
    with ShardFile(target) as writer:
        for key, label, file, size in samples:
            with open(file, "rb") as f:
                data = read_at_most(f, size + 1)
            if len(data) != size:
                got = f"more than {size}" if len(data) > size else len(data)
                raise ReleaseError(f"{file}: {got} bytes, {size} when listed (changed during the import); delete "
                                   "--out and import again")
            try:
                check_payload(ext, data, shape)
            except ShardError as e:
                raise ReleaseError(f"{file}: {e}; leave it out of the release tree (or its variant, with --only) "
                                   "and import again") from None
            writer.add(key, label, ext, data)
        return writer.publish()


def _kept_shard_problem(target: Path, samples: list[tuple[str, int, str, int]], expected: str | None,
                        shape: tuple[int, ...]) -> tuple[str | None, dict | None]:
    """(why the shard already at ``target`` cannot be kept, or None; its summary). It is read once, its
    structure with bounds (:func:`~qrobust.shared.shards.scan_shard`)."""
    # the files, their headers (a label, a name and pax records for each member) and the end of the archive
    most = sum(s[3] for s in samples) + 4096 * len(samples) + 20480
    try:
        with open(target, "rb") as f:
            data = read_at_most(f, most + 1)
        if len(data) > most:
            return f"larger than the {most} bytes its samples take", None
        found = scan_shard(data)
    except (OSError, ShardError) as e:
        return str(e), None
    keys = [s[0] for s in samples]
    summary = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "count": len(found),
               "keys_sha256": keys_digest([s.key for s in found])}
    if summary["keys_sha256"] != keys_digest(keys) or expected not in (None, summary["sha256"]):
        return "it holds other samples or bytes than this import's", None
    for sample, (key, label, _, size) in zip(found, samples):
        for ext, (member, offset, length) in sample.members.items():
            payload = data[offset:offset + length]
            if ext != "cls" and length != size:
                return f"member {shown(member)} holds {length} bytes, the released file {size}", None
            try:
                check_payload(ext, payload, shape)
            except ShardError as e:
                return f"member {shown(member)}: {e}", None
            if ext == "cls" and int(payload) != label:
                return f"member {shown(member)}: label {int(payload)}, this import's is {label}", None
    return None, summary


def _write_all(kind: str, root: Path, target: Path, listing: Listing, keys: list[str], labels: dict[str, int],
               per: int, old: dict | None, crop: int, frames: dict[str, int], workers: int,
               progress: bool) -> dict[str, list[dict]]:
    """Write (or keep) every shard; returns variant id -> shard summaries with their names, in order.
    ``crop`` and ``frames`` (per sequence variant) are the geometry every payload is checked against."""
    recorded = {s["name"]: s["sha256"] for v in (old or {}).get("variants", {}).values() for s in v["shards"]}
    shards = [(vid, i) for vid in sorted(listing.files) for i in range(-(-len(keys) // per))]

    def task(shard):
        vid, i = shard
        name = mf.shard_name(vid, i)
        samples = [(k, labels[k], str(listing.path(root, vid, k)), listing.files[vid][k][2])
                   for k in keys[i * per:(i + 1) * per]]
        shape = (frames[vid], crop, crop, 3) if kind == "imagenet-p" else (crop, crop, 3)
        return MEMBER[kind], str(target / name), samples, recorded.get(name), shape

    done = _map(_write_shard, shards, task, [len(keys[i * per:(i + 1) * per]) for _, i in shards], workers,
                "import", progress)
    out: dict[str, list[dict]] = {}
    for (vid, i), summary in zip(shards, done):
        out.setdefault(vid, []).append(dict(summary, name=mf.shard_name(vid, i)))
    return out


def _manifest(kind: str, root: Path, spec: dict, classes: list[str], keys: list[str], listing: Listing,
              frames: dict[str, int], summaries: dict[str, list[dict]], plan: dict, versions: dict,
              class_file: str | None) -> dict:
    """The corpus manifest; ``plan_sha256`` over the same settings ``manifest_problems`` checks. It holds no
    local path: the release folder by its name, the rejected files relative to it, the class file by name."""
    family = "natural" if kind == "imagenet-c" else "sequence"
    variants = {}
    for vid, shards in sorted(summaries.items()):
        params = dict(listing.variants[vid][1])
        if family == "sequence":  # what the scorer asks of a sequence: its frames, and whether it is a noise one
            params.update(frames=frames[vid], noise=is_noise_sequence(params["perturbation"]))
        variants[vid] = {"family": family, "name": vid.split("/", 1)[1], "params": params,
                         "encoding": {"format": MEMBER[kind], "as_released": True},
                         "count": sum(s["count"] for s in shards), "shards": shards}
    manifest = mf.new_manifest(
        suite={"name": kind, "description": spec["description"], "spec": spec},
        geometry={"resize": None, "crop": spec["geometry"]["crop"]}, seed=0,
        source={"root": root.name, "layout": kind, "label_file": None, "fingerprint": plan["source"],
                "selection": plan["selection"], "label_entries_without_file": 0},
        classes=classes, keys=keys,
        rejected=mf.portable_rejected([(r.path, r.reason) for r in listing.rejected], str(root)),
        versions=versions, variants=variants, plan_sha256="",
        imported_from={"kind": kind, "root": root.name, "classes": Path(class_file).name if class_file else None})
    manifest["plan_sha256"] = mf.plan_digest(mf.plan_of(manifest))
    return manifest
