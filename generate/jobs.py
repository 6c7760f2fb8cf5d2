"""The worker side of ``qrobust generate``: what runs in each process of the pool.

A :class:`Job` is one shard index of one variant group (or, when the planner
splits a heavy group, of one variant of it): the same slice of samples
rendered for every variant of the job (the five severities of a corruption
share one decode), each variant into its own shard. Workers also scan the
sources once (decode + crop) so unusable files are known before any shard is
planned, and load the code the run needs as they start.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from qrobust.shared import manifest as mf

from qrobust.shared.versions import library_versions
from qrobust.shared.errors import QrobustError
from qrobust.shared.shards import keys_digest, shard_summary
from qrobust.shared.seeding import sample_seed
from qrobust.shared.sources import BadImage, SourceSample
from qrobust.shared.suites import Suite, Variant


@dataclass(frozen=True)
class Job:
    group: tuple[str, ...]             # variant ids rendered together (a variant group, or part of one)
    shard: int                         # shard index, the same for every variant of the group
    samples: tuple[SourceSample, ...]  # this shard's slice of the sample list, in key order
    expected: tuple = ()               # per variant: sha256 an earlier manifest recorded, or None



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


def init_worker(suite: Suite, out: str, progress, warm: tuple[str, ...] = (), local: bool = True) -> None:
    """Set up a worker process; ``warm``: ids of the variants it may render, whose code it loads now.
    A ``local`` worker (a child of ``qrobust generate``) ends with its parent."""
    if local:
        _die_with_parent()
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # reported properly by the first corruption that needs it
        pass
    _worker.update(suite=suite, out=Path(out), progress=progress,
                   variants={v.id: v for v in suite.variants})
    _warm_up([_worker["variants"][vid] for vid in warm if vid in _worker["variants"]])


def _warm_up(variants: list[Variant]) -> None:
    """Import (and, for compiled corruptions, load) what ``variants`` need, so a worker does it while
    the main process is still listing sources rather than in its first job. Best effort: a real
    failure is reported by the job that meets it."""
    try:
        import numpy as np

        from qrobust.generate import natural, render, writer  # noqa: F401  (imported now, not in the first job)

        if any(v.family == "sequence" or v.params.get("decoder") == "ffmpeg" for v in variants):
            importlib.import_module("av")

        tiny = np.zeros((natural.MIN_SIDE, natural.MIN_SIDE, 3), np.uint8)
    except Exception:
        return
    for name in dict.fromkeys(v.params["corruption"] for v in variants if v.family == "natural"):
        try:
            natural.corrupt(tiny, name, 1, 0)
        except Exception:
            pass


def on_cluster(setup: tuple, name: str, *args):
    """Run the worker function ``name`` (:func:`scan` or :func:`run_job`) on a Dask worker, set up first
    for this corpus (once per worker process and corpus), after checking that the worker has the
    run's pixel-library versions. ``setup``: (suite, out folder, warm ids, {library: version})."""
    suite, out, warm, versions = setup
    key = (out, json.dumps(suite.spec, sort_keys=True))
    if _worker.get("key") != key:
        here = library_versions()
        differ = [f"{lib} {here.get(lib)} (the run: {v})" for lib, v in versions.items() if here.get(lib) != v]
        if differ:  # its pixels would differ from the other workers': never mix them into one corpus
            import socket

            raise QrobustError(f"Dask worker on {socket.gethostname()} has other pixel libraries than the run: "
                               f"{', '.join(differ)}; install the same versions on every worker")
        init_worker(suite, out, None, warm, local=False)
        _worker["key"] = key
    return {"scan": scan, "run_job": run_job}[name](*args)


def ready() -> None:
    """A no-op task: submitting one per worker makes the pool start every worker at once."""


def _tick(n: int) -> None:
    if _worker.get("progress") is not None and n:
        _worker["progress"].put(n)


def scan(samples: list[SourceSample]) -> dict[str, str]:
    """Decode and crop source samples; return {key: reason} for those that fail."""
    from qrobust.generate.render import SampleContext, check_sample

    suite: Suite = _worker["suite"]
    bad = {}
    for s in samples:
        try:
            check_sample(SampleContext(s, suite))
        except BadImage as e:
            bad[s.key] = str(e)
        except (ValueError, MemoryError) as e:
            bad[s.key] = f"cannot preprocess: {e}"
        _tick(1)
    return bad


def _existing_summary(path: Path, expected: str | None, keys_sha256: str, notes: list[str]) -> dict | None:
    """Summary of a shard already on disk, or None (after removing it) if it must be rebuilt:
    unreadable, not what the earlier manifest recorded, or not holding the samples this job plans
    (``keys_sha256``: a run that saw other usable sources, e.g. a --part on a node with a read error)."""
    if not path.is_file():
        return None
    try:
        summary = shard_summary(path)
    except (OSError, ValueError) as e:
        notes.append(f"rebuilding {path}: {e}")
    else:
        if summary["keys_sha256"] != keys_sha256:
            notes.append(f"rebuilding {path}: it holds other samples than planned")
        elif expected is None or summary["sha256"] == expected:
            return summary
        else:
            notes.append(f"rebuilding {path}: content differs from the manifest")
    path.unlink(missing_ok=True)
    return None


def run_job(job: Job) -> tuple[list[tuple[str, int, dict]], list[str]]:
    """Build the missing shards of one job.

    Returns (variant id, shard index, summary) for every shard of the job, and
    notes on shards that had to be rebuilt."""
    from qrobust.generate.render import RENDERERS, SampleContext
    from qrobust.generate.writer import ShardFile, encode_payload

    suite: Suite = _worker["suite"]
    out: Path = _worker["out"]
    variants: list[Variant] = [_worker["variants"][vid] for vid in job.group]
    results, todo, notes = [], [], []
    expected = job.expected or (None,) * len(variants)
    keys_sha256 = keys_digest([s.key for s in job.samples])
    for v, sha in zip(variants, expected):
        path = out / mf.shard_name(v.id, job.shard)
        summary = _existing_summary(path, sha, keys_sha256, notes)
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
                    ext, payload = encode_payload(pixels, v)
                except Exception as e:
                    raise RuntimeError(f"{v.id} failed on sample {s.key} ({s.path}): {e}") from e
                writer.add(s.key, s.label, ext, payload)
            _tick(len(todo))
        for (v, _), writer in zip(todo, writers):
            results.append((v.id, job.shard, writer.publish()))
    finally:
        for w in writers:
            w.discard()  # no-op for published shards; removes the partial file after an error
    return sorted(results, key=lambda r: job.group.index(r[0])), notes
