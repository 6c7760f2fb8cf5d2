"""``qrobust generate``: plan the shards of a corpus and build them in parallel.

The unit of work is one shard index of one variant group (see
:mod:`qrobust.generate.jobs`, which runs in the worker processes); jobs run
longest first, and a group too heavy for the worker count is split into one
job per variant (:func:`plan_jobs`), so the workers finish together. Every
(variant, sample) is seeded from (suite seed, variant id, key), each shard is
written by one job from its samples in key order, shards are published
atomically and skipped when present, and the manifest is written last, so the
corpus is byte-identical whatever the worker count, however the jobs were cut,
and however often a run was interrupted and resumed.
"""
from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import queue as queue_module
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

from qrobust.generate import jobs
from qrobust.generate.writer import encoding_record
from qrobust.shared import manifest as mf
from qrobust.shared.errors import NO_SPACE, QrobustError
from qrobust.shared.shards import keys_digest
from qrobust.shared.sources import SourceDataset, SourceSample, one_line, open_source
from qrobust.shared.spec import Suite, Variant, load_suite

log = logging.getLogger("qrobust.generate")

STATE_DIR = ".qrobust"
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS", "NUMBA_NUM_THREADS")
SCAN_CHUNK = 64


class GenerateError(QrobustError, RuntimeError):
    """The run cannot go on (bad arguments, a different corpus in --out, --strict and a bad input)."""




@contextlib.contextmanager
def _single_threaded_children():
    """Children inherit the environment at spawn: one BLAS/OpenMP thread each."""
    saved = {k: os.environ.get(k) for k in THREAD_ENV}
    os.environ.update({k: "1" for k in THREAD_ENV})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Progress:
    """A tqdm bar fed from the workers' queue (or silent)."""

    def __init__(self, total: int, desc: str, enabled: bool, initial: int = 0):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="img", dynamic_ncols=True,
                            smoothing=0.05, file=sys.stderr)

    def drain(self, q) -> None:
        n = 0
        while True:
            try:
                n += q.get_nowait()
            except queue_module.Empty:
                break
        if self.bar is not None and n:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_pool(pool: ProcessPoolExecutor, fn, calls: list, q, progress: _Progress, results: list,
              errors: list) -> None:
    futures: dict[Future, object] = {pool.submit(fn, *c): c for c in calls}
    pending = set(futures)
    while pending:
        done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
        progress.drain(q)
        for f in done:
            try:
                results.append(f.result())
            except OSError as e:
                if e.errno not in NO_SPACE:
                    errors.append(str(e))
                    log.error("%s", e)
                    continue
                for other in pending:  # out of space: every other job would fail the same way
                    other.cancel()
                raise
            except Exception as e:  # a bug or a broken worker: finish the rest, then report
                errors.append(str(e))
                log.error("%s", e)
    progress.drain(q)


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
    costs = [job_cost(j, by_id, built) for j in planned]
    if workers > 1:
        limit = sum(costs) / (SPLIT * workers)
        split = []
        for j, cost in zip(planned, costs):
            if cost > limit and len(j.group) > 1:
                split.extend(job([vid], j.shard, j.shard * per) for vid in j.group)
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
    path = out / STATE_DIR / "plan.json"
    old = json.loads(path.read_text()) if path.is_file() else (mf.plan_of(old_manifest) if old_manifest else None)
    if old is None and any(p.name != STATE_DIR for p in out.iterdir()):
        raise GenerateError(f"{out} is not empty and holds no qrobust corpus; choose a new or empty --out")
    if old is not None and old != plan:
        differ = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
        raise GenerateError(
            f"{out} already holds a corpus made with other settings ({', '.join(differ)} differ); "
            "use a new --out, or delete that folder to rebuild it")
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        mf.write_atomic(path, json.dumps(plan, indent=1, sort_keys=True))


@contextlib.contextmanager
def _exclusive(out: Path):
    """One generate at a time per corpus folder (an advisory lock, released at exit)."""
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    with open(out / STATE_DIR / "lock", "w") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError:
            raise GenerateError(f"another `qrobust generate` is writing {out}; wait for it or use another --out") \
                from None
        yield


def _remove_partials(out: Path) -> None:
    for p in out.rglob(f"*{mf.PARTIAL_SUFFIX}-*"):
        p.unlink(missing_ok=True)


def generate(suite: str, source: str, out: str, *, labels: str | None = None, classes: str | None = None,
             only: list[str] | None = None, limit: int | None = None, per_class: int | None = None,
             workers: int | None = None, encoding: str | None = None, sequence_encoding: str | None = None,
             seed: int | None = None,
             strict: bool = False, progress: bool = True) -> dict:
    """Build (or finish) a corpus and return its manifest.

    ``suite``: a packaged suite name or a TOML path; ``source``: an image folder
    (see :func:`qrobust.shared.sources.open_source`); ``out``: the corpus folder.
    ``only``: variant-id globs; ``limit``/``per_class``: deterministic subset;
    ``workers``: processes (default: all cores); ``encoding``/``seed``: suite
    overrides; ``strict``: stop at the first unusable input instead of listing it
    as rejected.

    Raises :class:`GenerateError` (and the spec/source errors) with a message
    saying what to change.
    """
    if workers is not None and workers < 1:
        raise GenerateError("--workers must be at least 1")
    the_suite = load_suite(suite, seed=seed, encoding=encoding, sequence_encoding=sequence_encoding)
    variants = the_suite.select(only)
    from qrobust.generate.render import check_renderable

    for v in variants:
        check_renderable(v, the_suite)
    listed = open_source(source, labels=labels, classes=classes).select(limit=limit, per_class=per_class)
    if strict and listed.rejected:
        r = listed.rejected[0]
        raise GenerateError(f"--strict: {r.path}: {r.reason}")
    out_path = Path(out)
    try:
        out_path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise GenerateError(f"--out {out} exists and is not a folder") from None
    except OSError as e:
        raise GenerateError(f"cannot create --out {out}: {e.strerror}") from None
    versions = mf.library_versions()
    plan = {"suite": the_suite.spec, "source": listed.fingerprint(), "classes": listed.classes,
            "selection": {"limit": limit, "per_class": per_class},
            "versions": {lib: versions.get(lib) for lib in mf.pixel_libraries(the_suite.spec)}}
    old_manifest = _old_manifest(out_path)
    _check_plan(out_path, plan, old_manifest)
    if not workers:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    shards = -(-len(listed.samples) // the_suite.samples_per_shard)
    workers = max(1, min(workers, shards * len(variants)))  # never more workers than jobs can use
    with _exclusive(out_path), _worker_pool(the_suite, variants, out_path, workers) as (pool, q):
        return _generate_locked(pool, q, the_suite, variants, listed, out_path, old_manifest, plan, versions,
                                workers=workers, strict=strict, progress=progress, source=source)


@contextlib.contextmanager
def _worker_pool(suite: Suite, variants: list[Variant], out: Path, workers: int):
    """A pool of ``workers`` spawned processes, all started at once (the executor would start them one
    submission at a time, and the first tasks, the source scan, may be fewer than the workers), each
    loading the code that ``variants`` need as it starts, while this process cleans up and plans."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    with _single_threaded_children(), ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=jobs.init_worker,
            initargs=(suite, str(out), q, tuple(v.id for v in variants))) as pool:
        for _ in range(workers):  # each submission finds no idle worker and starts one
            pool.submit(jobs.ready)
        yield pool, q


def _generate_locked(pool: ProcessPoolExecutor, q, the_suite: Suite, variants: list[Variant],
                     listed: SourceDataset, out_path: Path, old_manifest: dict | None, plan: dict, versions: dict,
                     *, workers, strict, progress, source) -> dict:
    _remove_partials(out_path)
    for r in listed.rejected:
        log.warning("rejected %s: %s", r.path, r.reason)
    errors: list[str] = []
    dataset = _scan_sources(pool, listed, out_path, q, progress, strict, errors, workers)
    if errors:
        raise GenerateError("scanning the source failed: " + "; ".join(errors[:3]))
    if not dataset.samples:
        raise GenerateError(f"no usable samples in {source}")
    recorded = {s["name"]: s["sha256"] for v in (old_manifest or {}).get("variants", {}).values()
                for s in v["shards"]}
    on_disk = {p.relative_to(out_path).as_posix() for p in out_path.glob("*/*/*.tar")}

    def built(vid: str, shard: int) -> bool:
        return mf.shard_name(vid, shard) in on_disk

    planned = plan_jobs(the_suite, variants, dataset.samples, recorded, workers=workers, built=built)
    total = sum(len(j.group) * len(j.samples) for j in planned)
    done_images = sum(len(j.samples) for j in planned for vid in j.group if built(vid, j.shard))
    log.info("%d variants x %d samples in %d jobs on %d workers (%d images already built)",
             len(variants), len(dataset.samples), len(planned), workers, done_images)
    results: list = []
    bar = _Progress(total, "generate", progress, initial=done_images)
    try:
        _run_pool(pool, jobs.run_job, [(j,) for j in planned], q, bar, results, errors)
    finally:
        bar.close()
    for _, notes in results:
        for note in notes:
            log.warning("%s", note)
    if errors:
        raise GenerateError(f"{len(errors)} job(s) failed; finished shards are kept, rerun to resume. "
                            f"First: {errors[0]}")
    manifest = build_manifest(the_suite, variants, listed, dataset, [r for r, _ in results], old_manifest, plan,
                              versions)
    mf.write_atomic(out_path / mf.MANIFEST_NAME, mf.dumps(manifest))
    return manifest


def _scan_sources(pool, listed: SourceDataset, out: Path, q, progress: bool, strict: bool,
                  errors: list, workers: int = 1) -> SourceDataset:
    """Decode every selected source once (cached per source fingerprint); move failures to the rejects."""
    cache = out / STATE_DIR / "scan.json"
    fingerprint = listed.fingerprint()
    bad: dict[str, str] | None = None
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("source") == fingerprint:
            bad = cached["bad"]
    if bad is None:
        n = len(listed.samples)
        chunk = max(1, min(SCAN_CHUNK, -(-n // (4 * workers))))  # several chunks per worker: all of them scan
        results: list = []
        bar = _Progress(n, "scan sources", progress)
        try:
            _run_pool(pool, jobs.scan, [(listed.samples[i:i + chunk],) for i in range(0, n, chunk)], q,
                      bar, results, errors)
        finally:
            bar.close()
        bad = {k: one_line(v) for part in results for k, v in part.items()}  # the log and --strict: one line
        if not errors:
            mf.write_atomic(cache, json.dumps({"source": fingerprint, "bad": bad}, indent=1, sort_keys=True))
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
        entries[v.id] = dict(v.as_record(), encoding=encoding_record(v), count=sum(s["count"] for s in shards), shards=shards)
    return {
        "schema": mf.SCHEMA,
        "suite": {"name": suite.name, "description": suite.description, "spec": suite.spec},
        "geometry": {"resize": suite.resize, "crop": suite.crop},
        "seed": suite.seed,
        "source": {"root": listed.root, "layout": listed.layout, "label_file": listed.label_file,
                   "fingerprint": plan["source"], "selection": plan["selection"],
                   "label_entries_without_file": listed.label_entries_without_file},
        "classes": listed.classes,
        "samples": {"count": len(dataset.samples), "keys_sha256": keys_digest([s.key for s in dataset.samples])},
        "rejected": [{"path": r.path, "reason": r.reason} for r in dataset.rejected],
        "versions": versions,
        "plan_sha256": mf.plan_digest(plan),
        "variants": dict(sorted(entries.items())),
    }
