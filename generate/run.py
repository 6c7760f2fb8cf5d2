"""``qrobust generate``: plan the shards of a corpus and build them in parallel.

The unit of work is one shard index of one variant group (see
:mod:`qrobust.generate.jobs`, which runs in the worker processes); jobs run
longest first, and a group too heavy for the worker count is split into one
job per variant (:func:`plan_jobs`), so the workers finish together. Every
(variant, sample) is seeded from (suite seed, variant id, key), each shard is
written by one job from its samples in key order, shards are published
atomically and skipped when present, and the dataset card then the manifest are
written last, so the corpus is byte-identical whatever the worker count, however
the jobs were cut, and however often a run was interrupted and resumed. The
manifest holds no local path: the source folder by its name, the label file and
rejected inputs relative to it.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from qrobust.generate import executors, jobs, outdir, parts
from qrobust.generate.writer import encoding_record
from qrobust.shared import manifest as mf
from qrobust.shared.card import write_card
from qrobust.shared.files import create_new, partial_path, write_atomic
from qrobust.shared.verify import local_shard_problem
from qrobust.shared.versions import library_versions, pixel_libraries
from qrobust.shared.errors import QrobustError
from qrobust.shared.shards import keys_digest
from qrobust.shared.sources import SourceDataset, SourceSample, one_line, open_source
from qrobust.shared.suites import Suite, Variant, load_suite

log = logging.getLogger("qrobust.generate")

SCAN_CHUNK = 64


class GenerateError(QrobustError, RuntimeError):
    """The run cannot go on (bad arguments, a different corpus in --out, --strict and a bad input)."""




# Rough CPU seconds per sample and variant at the robustmq geometry on one core, render and encoding
# included (bench/bench_families.py). They only decide the schedule: jobs run longest first and a
# group that alone would outlast the others is split into one job per variant, so no worker idles at
# the end behind one long job. The bytes never depend on them.
SOURCE_COST = 0.005  # reading, decoding and cropping one source, once per job and sample
FAMILY_COST = {"clean": 0.003, "natural": 0.01, "sequence": 0.8, "systematic": 0.006}
SEQUENCE_COST = {"gaussian_noise": 1.5, "shot_noise": 1.6, "zoom_blur": 0.5, "translate": 0.3, "tilt": 0.6}
LOSSLESS_SEQUENCE = 0.25  # the lossless recipe (veryfast, qp 0) costs about a quarter of the reference one
SPLIT = 4  # split a group whose job costs more than 1/(SPLIT x workers) of the whole run


def variant_cost(variant: Variant) -> float:
    """Estimated CPU seconds per sample of one variant (see :data:`FAMILY_COST`)."""
    if variant.family == "sequence":
        cost = SEQUENCE_COST.get(variant.params["perturbation"], FAMILY_COST["sequence"])
        return cost * (LOSSLESS_SEQUENCE if variant.encoding.get("format") == "lossless" else 1.0)
    return FAMILY_COST.get(variant.family, FAMILY_COST["natural"])


def job_cost(job: jobs.Job, variants: dict[str, Variant], built=lambda vid, shard: False) -> float:
    """Estimated CPU seconds of a job; shards already on disk (``built``) cost nothing but a hash."""
    todo = [variants[vid] for vid in job.group if not built(vid, job.shard)]
    return len(job.samples) * ((SOURCE_COST if todo else 0.0) + sum(variant_cost(v) for v in todo))


def plan_jobs(suite: Suite, variants: list[Variant], samples: list[SourceSample],
              recorded: dict[str, str] | None = None, *, workers: int = 1,
              built=lambda vid, shard: False) -> list[jobs.Job]:
    """The jobs of a run, longest (estimated) first: every shard index of every variant group.

    A variant group (e.g. the five severities of a corruption, which share the
    decode) is one job per shard, unless with several ``workers`` that job
    would cost more than 1/(SPLIT x workers) of the run: then each of its
    variants is a job of its own, so the workers finish together. ``built(vid,
    shard)`` says which shards exist (they cost almost nothing).
    ``recorded`` maps shard names to the sha256 an earlier manifest of this
    corpus recorded; existing shards that differ are rebuilt. However the
    jobs are cut and ordered, each shard is written by one job, from the same
    samples in key order: the bytes do not depend on the plan.
    """
    recorded = recorded or {}
    by_id = {v.id: v for v in variants}
    groups: dict[str, list[str]] = {}
    for v in variants:
        groups.setdefault(v.group, []).append(v.id)
    per = suite.samples_per_shard

    def job(ids, i, start):
        return jobs.Job(tuple(ids), i, tuple(samples[start:start + per]),
                        tuple(recorded.get(mf.shard_name(vid, i)) for vid in ids))

    planned = [job(ids, i, start) for ids in groups.values()
               for i, start in enumerate(range(0, len(samples), per))]
    return split_heavy(planned, by_id, workers, built)


def split_heavy(planned: list[jobs.Job], by_id: dict[str, Variant], workers: int,
                built=lambda vid, shard: False) -> list[jobs.Job]:
    """``planned`` longest first, each job of a group that would cost more than 1/(SPLIT x ``workers``)
    of them all cut into one job per variant (same shard index and samples)."""
    costs = [job_cost(j, by_id, built) for j in planned]
    if workers > 1:
        limit = sum(costs) / (SPLIT * workers)
        split = []
        for j, cost in zip(planned, costs):
            if cost > limit and len(j.group) > 1:
                split.extend(jobs.Job((vid,), j.shard, j.samples, (sha,))
                             for vid, sha in zip(j.group, j.expected or (None,) * len(j.group)))
            else:
                split.append(j)
        planned = split
        costs = [job_cost(j, by_id, built) for j in planned]
    order = sorted(range(len(planned)), key=lambda k: -costs[k])  # stable: suite order among equals
    return [planned[k] for k in order]


def _old_manifest(out: Path) -> dict | None:
    if not (out / mf.MANIFEST_NAME).is_file():
        return None
    try:
        return mf.load_manifest(out)
    except mf.ManifestError as e:
        raise GenerateError(f"{e}; move it away to rebuild the corpus from its shards") from None


def _check_plan(out: Path, plan: dict, old_manifest: dict | None) -> None:
    """Refuse an --out that holds anything but a corpus of this very plan; record the plan."""
    path = out / outdir.STATE_DIR / "plan.json"
    try:
        old = json.loads(path.read_text()) if path.is_file() else (mf.plan_of(old_manifest) if old_manifest else None)
    except (OSError, ValueError, RecursionError):
        raise GenerateError(f"{path}: unreadable; delete it (the settings are checked against the manifest, "
                            "if any)") from None
    if old is None and any(p.name != outdir.STATE_DIR for p in out.iterdir()):
        raise GenerateError(f"{out} is not empty and holds no qrobust corpus; choose a new or empty --out")
    if old is not None and old != plan:
        differ = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
        raise GenerateError(
            f"{out} already holds a corpus made with other settings ({', '.join(differ)} differ); "
            "use a new --out, or delete that folder to rebuild it")
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(plan, indent=1, sort_keys=True))


def generate(suite: str, source: str, out: str, *, labels: str | None = None, classes: str | None = None,
             only: list[str] | None = None, limit: int | None = None, per_class: int | None = None,
             workers: int | None = None, encoding: str | None = None, sequence_encoding: str | None = None,
             seed: int | None = None, strict: bool = False, progress: bool = True, part: str | None = None,
             finalize: bool = False, executor: str = "local", scheduler: str | None = None) -> dict | None:
    """Build (or finish) a corpus and return its manifest.

    ``suite``: a packaged suite name or a TOML path; ``source``: an image folder
    (see :func:`qrobust.shared.sources.open_source`); ``out``: the corpus folder.
    ``only``: variant-id globs; ``limit``/``per_class``: deterministic subset;
    ``workers``: processes (default: all cores); ``encoding``/``seed``: suite
    overrides; ``strict``: stop at the first unusable input instead of listing it
    as rejected.

    Across machines (:mod:`qrobust.generate.parts`): ``part="I/N"`` builds
    only part I of N of the shards and returns None unless it finds the whole
    corpus built, when it writes the manifest; ``finalize`` builds nothing and
    writes the manifest from the parts' records, or says what is missing.
    ``executor="dask"`` runs the jobs on the Dask cluster at ``scheduler``
    (default: a local one of ``workers`` processes).

    Raises :class:`GenerateError` (and the spec/source errors) with a message
    saying what to change.
    """
    if workers is not None and workers < 1:
        raise GenerateError("--workers must be at least 1")
    part_of = parts.parse_part(part) if part else None
    if part_of and finalize:
        raise GenerateError("--finalize writes the manifest of all parts: run it without --part")
    the_suite = load_suite(suite, seed=seed, encoding=encoding, sequence_encoding=sequence_encoding)
    variants = the_suite.select(only)
    from qrobust.generate.render import check_renderable

    for v in variants:
        check_renderable(v, the_suite)
    listed = open_source(source, labels=labels, classes=classes).select(limit=limit, per_class=per_class)
    if strict and listed.rejected:
        r = listed.rejected[0]
        raise GenerateError(f"--strict: {r.path}: {r.reason}")
    out_path = outdir.create(out, GenerateError)
    outdir.check_tree(out_path, GenerateError)  # before the plan is recorded in it
    versions = library_versions()
    plan = {"suite": the_suite.spec, "source": listed.fingerprint(), "classes": listed.classes,
            "selection": {"limit": limit, "per_class": per_class},
            "versions": {lib: versions.get(lib) for lib in pixel_libraries(the_suite.spec)}}
    old_manifest = _old_manifest(out_path)
    _check_plan(out_path, plan, old_manifest)
    if not workers:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    shards = -(-len(listed.samples) // the_suite.samples_per_shard)
    workers = max(1, min(workers, shards * len(variants)))  # never more workers than jobs can use
    with outdir.locked(out_path, shared=bool(part_of), error=GenerateError), \
            executors.executor(executor, the_suite, variants, out_path, workers, scheduler) as ex:
        return _generate_locked(ex, the_suite, variants, listed, out_path, old_manifest, plan, versions,
                                workers=workers, strict=strict, progress=progress, source=source, part_of=part_of,
                                finalize=finalize)


def _generate_locked(ex, the_suite: Suite, variants: list[Variant], listed: SourceDataset, out_path: Path,
                     old_manifest: dict | None, plan: dict, versions: dict, *, workers, strict, progress, source,
                     part_of: tuple[int, int] | None, finalize: bool) -> dict | None:
    if not part_of:
        outdir.remove_partials(out_path)
    for r in listed.rejected:
        log.warning("rejected %s: %s", r.path, r.reason)
    errors: list[str] = []
    dataset = _scan_sources(ex, listed, out_path, progress, strict, errors, workers, binding=bool(part_of))
    if errors:
        raise GenerateError("scanning the source failed: " + "; ".join(errors[:3]))
    if not dataset.samples:
        raise GenerateError(f"no usable samples in {source}")
    recorded = {s["name"]: s["sha256"] for v in (old_manifest or {}).get("variants", {}).values()
                for s in v["shards"]}
    on_disk = {p.relative_to(out_path).as_posix() for p in out_path.glob("*/*/*.tar")}

    def built(vid: str, shard: int) -> bool:
        return mf.shard_name(vid, shard) in on_disk

    state, plan_sha = out_path / outdir.STATE_DIR, mf.plan_digest(plan)
    if finalize or part_of:
        # every run deals the same jobs to the parts: planned for N workers, without regard to the disk
        counts = parts.part_counts(state)
        n = part_of[1] if part_of else (counts[0] if len(counts) == 1 else None)  # finalize: the parts' N
        by_id = {v.id: v for v in variants}
        everything = plan_jobs(the_suite, variants, dataset.samples, recorded, workers=n or 1)
        dealt = parts.deal(everything, [job_cost(j, by_id) for j in everything], n) if n else None
        if finalize:
            return _write_from_records(the_suite, variants, listed, dataset, old_manifest, plan, versions,
                                       out_path, everything, dealt, required=True)
        planned = split_heavy(dealt[part_of[0] - 1], by_id, workers, built)
        outdir.remove_partials(out_path, [mf.shard_name(vid, j.shard) for j in planned for vid in j.group])
    else:
        planned = plan_jobs(the_suite, variants, dataset.samples, recorded, workers=workers, built=built)
    total = sum(len(j.group) * len(j.samples) for j in planned)
    done_images = sum(len(j.samples) for j in planned for vid in j.group if built(vid, j.shard))
    log.info("%s%d variants x %d samples in %d jobs on %d workers (%d images already built)",
             f"part {part_of[0]}/{part_of[1]}: " if part_of else "", len(variants), len(dataset.samples),
             len(planned), workers, done_images)
    results: list = []
    bar = executors.Progress(total, "generate", progress, initial=done_images)
    try:
        ex.run(jobs.run_job, [(j,) for j in planned], bar, results, errors,
               sizes=[len(j.samples) * sum(not built(vid, j.shard) for vid in j.group) for j in planned])
    finally:
        bar.close()
    for _, notes in results:
        for note in notes:
            log.warning("%s", note)
    if errors:
        raise GenerateError(f"{len(errors)} job(s) failed; finished shards are kept, rerun to resume. "
                            f"First: {errors[0]}")
    if part_of:
        outdir.remove_partials(out_path, [mf.shard_name(vid, j.shard) for j in planned for vid in j.group])
        parts.write_record(state, *part_of, plan_sha, keys_digest([s.key for s in dataset.samples]),
                           [r for r, _ in results])
        return _write_from_records(the_suite, variants, listed, dataset, old_manifest, plan, versions, out_path,
                                   everything, dealt, required=False)
    outdir.remove_partials(out_path)  # e.g. of a Dask worker lost mid-shard (its task ran again elsewhere)
    manifest = build_manifest(the_suite, variants, listed, dataset, [r for r, _ in results], old_manifest, plan,
                              versions)
    return _write_manifest(out_path, manifest)


def _write_manifest(out: Path, manifest: dict) -> dict:
    """Write the dataset card, then the manifest (which records the card), last, after checking it as
    ``verify`` and ``score`` will."""
    problems = mf.manifest_problems(manifest)
    if problems:  # a bug, or shards cut from different sample lists: never bless them
        raise GenerateError(f"the corpus is inconsistent, no manifest written: {problems[0][1]} "
                            f"(and {len(problems) - 1} more); rerun without --part to rebuild what is wrong")
    absent = [p for v in manifest["variants"].values() for s in v["shards"]
              if (p := local_shard_problem(out, s["name"], s["bytes"]))]
    if absent:  # e.g. Dask workers that do not share this file system wrote them elsewhere
        raise GenerateError(f"{len(absent)} shard(s) the workers reported are not in {out} as reported "
                            f"(first: {absent[0]}), no manifest written: do all workers see {out.resolve()} "
                            "at that same path? Rerun to resume")
    write_card(out, manifest)
    write_atomic(out / mf.MANIFEST_NAME, mf.dumps(manifest))
    return manifest


def _write_from_records(the_suite: Suite, variants: list[Variant], listed: SourceDataset, dataset: SourceDataset,
                        old_manifest: dict | None, plan: dict, versions: dict, out: Path, everything: list,
                        dealt: list | None, *, required: bool) -> dict | None:
    """The manifest from the parts' records, if every shard is built: written and returned. Otherwise
    raise naming what is missing (``required``: --finalize), or log it and return None (a part)."""
    found, missing = parts.collect(out, out / outdir.STATE_DIR, mf.plan_digest(plan),
                                   keys_digest([s.key for s in dataset.samples]), everything, summarize=required)
    if missing:
        message = parts.missing_message(missing, dealt)
        if required:
            raise GenerateError(f"--finalize: {message}")
        log.info("%s; the part that finds every shard built (or --finalize) writes the manifest", message)
        return None
    if required:
        outdir.remove_partials(out)  # exclusive: no part is writing
    manifest = _write_manifest(out, build_manifest(the_suite, variants, listed, dataset, found, old_manifest, plan,
                                                   versions))
    log.info("manifest written from the parts' records: %d shards", len(found))
    return manifest


def _read_scan(cache: Path, fingerprint: dict) -> dict[str, str] | None:
    """The recorded scan of these sources ({key: reason}), or None."""
    if not cache.is_file():
        return None
    try:
        cached = json.loads(cache.read_text())
        bad = cached["bad"] if cached.get("source") == fingerprint else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise GenerateError(f"{cache}: unreadable; delete it (the sources are scanned again)") from None
    if bad is not None and not (isinstance(bad, dict) and all(isinstance(v, str) for v in bad.values())):
        raise GenerateError(f"{cache}: not a scan record; delete it (the sources are scanned again)")
    return bad


def _record_scan(cache: Path, fingerprint: dict, bad: dict[str, str], binding: bool) -> None:
    """Record the scan. ``binding`` (--part runs): the first recorded scan stands, and a part whose own
    scan differs stops, since its shards would be cut from another sample list."""
    text = json.dumps({"source": fingerprint, "bad": bad}, indent=1, sort_keys=True)
    if not binding:
        write_atomic(cache, text)
        return
    tmp = partial_path(cache)
    try:
        with open(create_new(tmp), "w") as f:  # never through a link planted under the partial's name
            f.write(text)
        os.link(tmp, cache)  # create only if absent, atomically, also on NFS
    except FileExistsError:
        first = _read_scan(cache, fingerprint)
        if first is not None and first != bad:
            differ = sorted(set(first) ^ set(bad))
            raise GenerateError(
                f"this run's scan of the sources differs from the one recorded in {cache} (first: {differ[0]}): "
                "a read error here, or other files on this node? The corpus needs one sample list: fix the "
                "sources (or delete scan.json and every part's output) and rerun") from None
    finally:
        tmp.unlink(missing_ok=True)


def _scan_sources(ex, listed: SourceDataset, out: Path, progress: bool, strict: bool,
                  errors: list, workers: int = 1, binding: bool = False) -> SourceDataset:
    """Decode every selected source once (cached per source fingerprint); move failures to the rejects."""
    cache = out / outdir.STATE_DIR / "scan.json"
    fingerprint = listed.fingerprint()
    bad = _read_scan(cache, fingerprint)
    if bad is None:
        n = len(listed.samples)
        chunk = max(1, min(SCAN_CHUNK, -(-n // (4 * workers))))  # several chunks per worker: all of them scan
        results: list = []
        bar = executors.Progress(n, "scan sources", progress)
        calls = [(listed.samples[i:i + chunk],) for i in range(0, n, chunk)]
        try:
            ex.run(jobs.scan, calls, bar, results, errors, sizes=[len(c[0]) for c in calls])
        finally:
            bar.close()
        bad = {k: one_line(v) for part in results for k, v in part.items()}  # the log and --strict: one line
        if not errors:
            _record_scan(cache, fingerprint, bad, binding)
    if strict and bad:
        key = sorted(bad)[0]
        path = next(s.path for s in listed.samples if s.key == key)
        raise GenerateError(f"--strict: {path}: {bad[key]}")
    for s in listed.samples:
        if s.key in bad:
            log.warning("rejected %s: %s", s.path, bad[s.key])
    return listed.without(bad)


def build_manifest(suite: Suite, variants: list[Variant], listed: SourceDataset, dataset: SourceDataset,
                   results: list, old_manifest: dict | None, plan: dict, versions: dict) -> dict:
    """Assemble the manifest from this run's shard summaries plus variants finished by earlier runs."""
    by_variant: dict[str, list[tuple[int, dict]]] = {}
    for job_result in results:
        for vid, index, summary in job_result:
            by_variant.setdefault(vid, []).append((index, summary))
    entries = dict(old_manifest["variants"]) if old_manifest else {}  # same plan (checked): still valid
    for v in variants:
        shards = [dict(summary, name=mf.shard_name(v.id, i)) for i, summary in sorted(by_variant.get(v.id, []))]
        entries[v.id] = dict(v.as_record(), encoding=encoding_record(v), count=sum(s["count"] for s in shards),
                             shards=shards)
    root = listed.root  # no local path goes into the manifest: the folder's name, the rest relative to it
    return mf.new_manifest(
        suite={"name": suite.name, "description": suite.description, "spec": suite.spec},
        geometry={"resize": suite.resize, "crop": suite.crop}, seed=suite.seed,
        source={"root": Path(root).name, "layout": listed.layout,
                "label_file": mf.portable_path(listed.label_file, root) if listed.label_file else None,
                "fingerprint": plan["source"], "selection": plan["selection"],
                "label_entries_without_file": listed.label_entries_without_file},
        classes=listed.classes, keys=[s.key for s in dataset.samples],
        rejected=mf.portable_rejected([(r.path, r.reason) for r in dataset.rejected], root), versions=versions,
        variants=entries, plan_sha256=mf.plan_digest(plan))
