"""``qrobust generate``: plan the shards of a corpus and build them in parallel.

The unit of work is one shard index of one variant group: the same slice of
samples (in key order) rendered for every variant of the group (e.g. the five
severities of glass_blur share one decode), each variant into its own shard.
Every (variant, sample) is seeded from (suite seed, variant id, key), shards
are published atomically and skipped when present, and the manifest is
written last, so the corpus is byte-identical whatever the worker count and
however often a run was interrupted and resumed.
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
from dataclasses import dataclass
from pathlib import Path

from qrobust.shared import manifest as mf
from qrobust.shared.errors import QrobustError
from qrobust.shared.seeding import sample_seed
from qrobust.shared.sources import BadImage, SourceDataset, SourceSample, open_source
from qrobust.shared.spec import Suite, Variant, load_suite

log = logging.getLogger("qrobust.generate")

STATE_DIR = ".qrobust"
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS", "NUMBA_NUM_THREADS")
SCAN_CHUNK = 64


class GenerateError(QrobustError, RuntimeError):
    """The run cannot go on (bad arguments, a different corpus in --out, --strict and a bad input)."""


@dataclass(frozen=True)
class Job:
    group: tuple[str, ...]             # variant ids rendered together
    shard: int                         # shard index, the same for every variant of the group
    samples: tuple[SourceSample, ...]  # this shard's slice of the sample list, in key order
    expected: tuple = ()               # per variant: sha256 an earlier manifest recorded, or None


# ---------------------------------------------------------------- worker side

_worker: dict = {}


def _die_with_parent() -> None:
    """Linux: end this worker when the main process dies (even by SIGKILL), so no
    orphan keeps writing into a corpus that a resumed run is finishing."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _init_worker(suite: Suite, out: str, progress) -> None:
    _die_with_parent()
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # reported properly by the first corruption that needs it
        pass
    _worker.update(suite=suite, out=Path(out), progress=progress,
                   variants={v.id: v for v in suite.variants})


def _tick(n: int) -> None:
    if _worker.get("progress") is not None and n:
        _worker["progress"].put(n)


def _scan(samples: list[SourceSample]) -> dict[str, str]:
    """Decode and crop source samples; return {key: reason} for those that fail."""
    from qrobust.shared.preprocess import onecrop
    from qrobust.shared.sources import load_rgb

    suite: Suite = _worker["suite"]
    bad = {}
    for s in samples:
        try:
            onecrop(load_rgb(s.path), suite.resize, suite.crop)
        except BadImage as e:
            bad[s.key] = str(e)
        except (ValueError, MemoryError) as e:
            bad[s.key] = f"cannot preprocess: {e}"
        _tick(1)
    return bad


def _existing_summary(path: Path, expected: str | None, notes: list[str]) -> dict | None:
    """Summary of a shard already on disk, or None (after removing it) if it must be rebuilt:
    unreadable, or not what the earlier manifest recorded."""
    if not path.is_file():
        return None
    try:
        summary = mf.shard_summary(path)
    except (OSError, ValueError) as e:
        notes.append(f"rebuilding {path}: {e}")
    else:
        if expected is None or summary["sha256"] == expected:
            return summary
        notes.append(f"rebuilding {path}: content differs from the manifest")
    path.unlink(missing_ok=True)
    return None


def _run_job(job: Job) -> tuple[list[tuple[str, int, dict]], list[str]]:
    """Build the missing shards of one job.

    Returns (variant id, shard index, summary) for every shard of the job, and
    notes on shards that had to be rebuilt."""
    from qrobust.generate.render import RENDERERS, SampleContext
    from qrobust.generate.writer import ShardFile, encode_image

    suite: Suite = _worker["suite"]
    out: Path = _worker["out"]
    variants: list[Variant] = [_worker["variants"][vid] for vid in job.group]
    results, todo, notes = [], [], []
    expected = job.expected or (None,) * len(variants)
    for v, sha in zip(variants, expected):
        path = out / mf.shard_name(v.id, job.shard)
        summary = _existing_summary(path, sha, notes)
        if summary is not None:
            results.append((v.id, job.shard, summary))
        else:
            todo.append((v, path))
    if not todo:
        return results, notes
    writers: list[ShardFile] = []
    try:
        for _, path in todo:
            writers.append(ShardFile(path))
        for s in job.samples:
            ctx = SampleContext(s, suite)
            for (v, _), writer in zip(todo, writers):
                try:
                    pixels = RENDERERS.get(v.family)(v, ctx, sample_seed(suite.seed, v.id, s.key))
                except Exception as e:
                    raise RuntimeError(f"{v.id} failed on sample {s.key} ({s.path}): {e}") from e
                ext, payload = encode_image(pixels, v.encoding)
                writer.add(s.key, s.label, ext, payload)
            _tick(len(todo))
        for (v, _), writer in zip(todo, writers):
            results.append((v.id, job.shard, writer.publish()))
    finally:
        for w in writers:
            w.discard()  # no-op for published shards; removes the partial file after an error
    return sorted(results, key=lambda r: job.group.index(r[0])), notes


# ---------------------------------------------------------------- main side


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


def _versions() -> dict:
    import importlib.metadata as md

    import numpy
    import PIL
    from PIL import features

    import qrobust

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
    return out


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
            except Exception as e:  # a bug or a broken worker: finish the rest, then report
                errors.append(str(e))
                log.error("%s", e)
    progress.drain(q)


def plan_jobs(suite: Suite, variants: list[Variant], samples: list[SourceSample],
              recorded: dict[str, str] | None = None) -> list[Job]:
    """Jobs in suite order: every shard index of every variant group.

    ``recorded`` maps shard names to the sha256 an earlier manifest of this
    corpus recorded; existing shards that differ are rebuilt."""
    recorded = recorded or {}
    groups: dict[str, list[str]] = {}
    for v in variants:
        groups.setdefault(v.group, []).append(v.id)
    per = suite.samples_per_shard
    return [Job(tuple(ids), i, tuple(samples[start:start + per]),
                tuple(recorded.get(mf.shard_name(vid, i)) for vid in ids))
            for ids in groups.values()
            for i, start in enumerate(range(0, len(samples), per))]


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
             workers: int | None = None, encoding: str | None = None, seed: int | None = None,
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
    the_suite = load_suite(suite, seed=seed, encoding=encoding)
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
    plan = {"suite": the_suite.spec, "source": listed.fingerprint(), "classes": listed.classes,
            "selection": {"limit": limit, "per_class": per_class}}
    old_manifest = _old_manifest(out_path)
    _check_plan(out_path, plan, old_manifest)
    with _exclusive(out_path):
        return _generate_locked(the_suite, variants, listed, out_path, old_manifest, plan, workers=workers,
                                strict=strict, progress=progress, source=source)


def _generate_locked(the_suite: Suite, variants: list[Variant], listed: SourceDataset, out_path: Path,
                     old_manifest: dict | None, plan: dict, *, workers, strict, progress, source) -> dict:
    _remove_partials(out_path)
    if not workers:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for r in listed.rejected:
        log.warning("rejected %s: %s", r.path, r.reason)

    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    errors: list[str] = []
    with _single_threaded_children(), ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_init_worker,
            initargs=(the_suite, str(out_path), q)) as pool:
        dataset = _scan_sources(pool, listed, out_path, q, progress, strict, errors)
        if errors:
            raise GenerateError("scanning the source failed: " + "; ".join(errors[:3]))
        if not dataset.samples:
            raise GenerateError(f"no usable samples in {source}")
        recorded = {s["name"]: s["sha256"] for v in (old_manifest or {}).get("variants", {}).values()
                    for s in v["shards"]}
        jobs = plan_jobs(the_suite, variants, dataset.samples, recorded)
        sizes = [len(j.group) * len(j.samples) for j in jobs]
        done_images = sum(n for j, n in zip(jobs, sizes)
                          if all((out_path / mf.shard_name(v, j.shard)).is_file() for v in j.group))
        log.info("%d variants x %d samples in %d jobs on %d workers (%d images already built)",
                 len(variants), len(dataset.samples), len(jobs), workers, done_images)
        results: list = []
        bar = _Progress(sum(sizes), "generate", progress, initial=done_images)
        try:
            _run_pool(pool, _run_job, [(j,) for j in jobs], q, bar, results, errors)
        finally:
            bar.close()
    for _, notes in results:
        for note in notes:
            log.warning("%s", note)
    if errors:
        raise GenerateError(f"{len(errors)} job(s) failed; finished shards are kept, rerun to resume. "
                            f"First: {errors[0]}")
    manifest = build_manifest(the_suite, variants, listed, dataset, [r for r, _ in results], old_manifest, plan)
    mf.write_atomic(out_path / mf.MANIFEST_NAME, mf.dumps(manifest))
    return manifest


def _scan_sources(pool, listed: SourceDataset, out: Path, q, progress: bool, strict: bool,
                  errors: list) -> SourceDataset:
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
        results: list = []
        bar = _Progress(n, "scan sources", progress)
        try:
            _run_pool(pool, _scan, [(listed.samples[i:i + SCAN_CHUNK],) for i in range(0, n, SCAN_CHUNK)], q,
                      bar, results, errors)
        finally:
            bar.close()
        bad = {k: v for part in results for k, v in part.items()}
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
                   results: list, old_manifest: dict | None, plan: dict) -> dict:
    """Assemble the manifest from this run's shard summaries plus variants finished by earlier runs."""
    by_variant: dict[str, list[tuple[int, dict]]] = {}
    for job_result in results:
        for vid, index, summary in job_result:
            by_variant.setdefault(vid, []).append((index, summary))
    entries = dict(old_manifest["variants"]) if old_manifest else {}  # same plan (checked): still valid
    for v in variants:
        shards = [dict(summary, name=mf.shard_name(v.id, i)) for i, summary in sorted(by_variant.get(v.id, []))]
        entries[v.id] = dict(v.as_record(), count=sum(s["count"] for s in shards), shards=shards)
    return {
        "schema": mf.SCHEMA,
        "suite": {"name": suite.name, "description": suite.description, "spec": suite.spec},
        "geometry": {"resize": suite.resize, "crop": suite.crop},
        "seed": suite.seed,
        "source": {"root": listed.root, "layout": listed.layout, "label_file": listed.label_file,
                   "fingerprint": plan["source"], "selection": plan["selection"],
                   "label_entries_without_file": listed.label_entries_without_file},
        "classes": listed.classes,
        "samples": {"count": len(dataset.samples), "keys_sha256": mf.keys_digest([s.key for s in dataset.samples])},
        "rejected": [{"path": r.path, "reason": r.reason} for r in dataset.rejected],
        "versions": _versions(),
        "plan_sha256": mf.plan_digest(plan),
        "variants": dict(sorted(entries.items())),
    }
