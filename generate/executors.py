"""Where the jobs of ``qrobust generate`` run: local worker processes, or a Dask cluster.

Both run the same worker functions of :mod:`qrobust.generate.jobs` (scan a
chunk of sources, build one job's shards) and hand back the same results, so
the corpus is byte-identical whichever runs it. qrobust schedules nothing
itself beyond a longest-first order: on a cluster, Dask (and dask-jobqueue for
SLURM/PBS/LSF) places the tasks; for job arrays, see ``--part``
(:mod:`qrobust.generate.parts`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import queue as queue_module
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

from qrobust.generate import jobs
from qrobust.shared.versions import library_versions, pixel_libraries
from qrobust.shared.errors import NO_SPACE, QrobustError
from qrobust.shared.suites import Suite, Variant

log = logging.getLogger("qrobust.generate")

SCHEDULER_FILE_WAIT = 30  # seconds: a scheduler started just before the run may not have written its file yet

THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS", "NUMBA_NUM_THREADS")


class ExecutorError(QrobustError, RuntimeError):
    """The executor cannot be used (Dask not installed, scheduler unreachable)."""


@contextlib.contextmanager
def single_threaded_children():
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


class Progress:
    """A tqdm bar fed by the workers' ticks, or by finished tasks (or silent)."""

    def __init__(self, total: int, desc: str, enabled: bool, initial: int = 0):
        self.bar = None
        if enabled:
            from qrobust.shared.progress import bar

            self.bar = bar(total, desc, "img", initial=initial, smoothing=0.05)

    def update(self, n: int) -> None:
        if self.bar is not None and n:
            self.bar.update(n)

    def drain(self, q) -> None:
        n = 0
        while True:
            try:
                n += q.get_nowait()
            except queue_module.Empty:
                break
        self.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _failed(e: BaseException, errors: list) -> bool:
    """Record a failed task; True when the run must stop now (out of space: every other task would fail
    the same way)."""
    if isinstance(e, OSError) and e.errno in NO_SPACE:
        return True
    errors.append(str(e))
    log.error("%s", e)
    return False


class LocalExecutor:
    """``workers`` spawned processes, all started at once (the pool would start them one submission at a
    time, and the first tasks, the source scan, may be fewer than the workers), each loading the code
    that the run's variants need as it starts, while the main process cleans up and plans."""

    def __init__(self, suite: Suite, variants: list[Variant], out: Path, workers: int):
        self.suite, self.variants, self.out, self.workers = suite, variants, out, workers

    def __enter__(self):
        ctx = multiprocessing.get_context("spawn")
        self.q = ctx.Queue()
        with single_threaded_children():
            self.pool = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=ctx, initializer=jobs.init_worker,
                initargs=(self.suite, str(self.out), self.q, tuple(v.id for v in self.variants)))
            for _ in range(self.workers):  # each submission finds no idle worker and starts one
                self.pool.submit(jobs.ready)
        return self

    def __exit__(self, *exc):
        self.pool.shutdown(wait=True, cancel_futures=True)

    def run(self, fn, calls: list, progress: Progress, results: list, errors: list, sizes=None) -> None:
        """Run ``fn(*call)`` for every call; results in completion order, failures in ``errors`` (the
        rest still runs); out of space stops at once (raised). Progress comes from the workers' ticks."""
        futures: dict[Future, object] = {self.pool.submit(fn, *c): c for c in calls}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            progress.drain(self.q)
            for f in done:
                try:
                    results.append(f.result())
                except Exception as e:  # a bug or a broken worker: finish the rest, then report
                    if _failed(e, errors):
                        for other in pending:
                            other.cancel()
                        raise
        progress.drain(self.q)


class DaskExecutor:
    """The same tasks on a Dask cluster: the one at ``scheduler`` (an address such as
    ``tcp://host:8786``, or a scheduler file written by ``dask scheduler --scheduler-file`` or
    dask-jobqueue), or a local cluster of ``workers`` processes. Every worker must see ``out`` at the
    same path (a shared file system) and have qrobust installed. Tasks are submitted with
    ``pure=False``: Dask never merges two of them or caches a result, and a task lost with its worker
    is rerun (a shard is published atomically, so a rerun is harmless)."""

    def __init__(self, suite: Suite, variants: list[Variant], out: Path, workers: int, scheduler: str | None):
        self.suite, self.variants, self.out, self.workers, self.scheduler = suite, variants, out, workers, scheduler

    def __enter__(self):
        try:
            from distributed import Client, LocalCluster

            logging.getLogger("distributed").setLevel(logging.WARNING)  # its INFO lines are not the user's
        except ImportError:
            raise ExecutorError("--executor dask needs Dask: pip install 'qrobust[dask]' "
                                "(dask[distributed]; dask-jobqueue for SLURM/PBS/LSF)") from None
        self.cluster = None
        try:
            if self.scheduler is None:
                with single_threaded_children():
                    self.cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                                dashboard_address=None)
                self.client = Client(self.cluster)
            elif "://" in self.scheduler:
                self.client = Client(self.scheduler, timeout=30)
            else:  # a scheduler file, which a scheduler still starting may not have written yet
                self.client = Client(scheduler_file=self._scheduler_file(), timeout=30)
        except (OSError, TimeoutError, ValueError) as e:
            if self.cluster is not None:
                self.cluster.close()
            raise ExecutorError(f"cannot reach the Dask scheduler {self.scheduler or '(local)'}: "
                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if not self.client.scheduler_info().get("workers"):
            log.warning("no Dask worker is connected to %s yet: the tasks wait for workers (an adaptive "
                        "cluster starts them now)", self.scheduler)
        versions = library_versions()  # every worker must render with these (checked there)
        pixel = {lib: versions.get(lib) for lib in pixel_libraries(self.suite.spec)}
        # one copy of the suite for every task, not one per task: a task every other task depends on. Not
        # scatter(), which gives up when no worker is connected yet (an adaptive cluster has none until
        # tasks wait). Workers need the corpus at the client's path: an absolute one, whatever their cwd.
        setup = (self.suite, str(Path(self.out).resolve()), tuple(v.id for v in self.variants), pixel)
        self.setup = self.client.submit(_setup, setup, pure=False, priority=1)
        return self

    def _scheduler_file(self) -> str:
        """``--scheduler FILE``, waited for (``SCHEDULER_FILE_WAIT`` s) while a scheduler starting now has not
        written it, and checked to name an address: Dask fails on an empty or half-written file with a bare
        assertion."""
        import time

        path, deadline = Path(self.scheduler), time.monotonic() + SCHEDULER_FILE_WAIT
        while True:
            try:
                address = json.loads(path.read_text()).get("address")
            except (OSError, ValueError, AttributeError):
                address = None
            if isinstance(address, str) and address:
                return str(path)
            if time.monotonic() > deadline:
                state = "does not exist" if not path.exists() else "names no scheduler address"
                raise ExecutorError(f"--scheduler {self.scheduler}: {state} (after {SCHEDULER_FILE_WAIT} s); "
                                    "give the file `dask scheduler --scheduler-file` writes, or an address "
                                    "such as tcp://host:8786")
            time.sleep(0.5)

    def __exit__(self, *exc):
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def run(self, fn, calls: list, progress: Progress, results: list, errors: list, sizes=None) -> None:
        """As :meth:`LocalExecutor.run`; progress advances by ``sizes[i]`` when call ``i`` ends."""
        from distributed import as_completed

        futures = [self.client.submit(jobs.on_cluster, self.setup, fn.__name__, *c, pure=False, priority=-i)
                   for i, c in enumerate(calls)]  # submission order = priority: longest first
        size = {f.key: (sizes[i] if sizes else 0) for i, f in enumerate(futures)}
        for f in as_completed(futures):
            try:
                results.append(f.result())
            except Exception as e:
                if _failed(e, errors):
                    self.client.cancel(futures)
                    raise
            progress.update(size[f.key])


def _setup(setup: tuple) -> tuple:
    """The task that holds the run's setup on the cluster (see :meth:`DaskExecutor.__enter__`)."""
    return setup


def executor(kind: str, suite: Suite, variants: list[Variant], out: Path, workers: int,
             scheduler: str | None = None):
    """The executor named by ``--executor``: ``local`` or ``dask``."""
    if kind == "local":
        if scheduler:
            raise ExecutorError("--scheduler goes with --executor dask")
        return LocalExecutor(suite, variants, out, workers)
    if kind == "dask":
        return DaskExecutor(suite, variants, out, workers, scheduler)
    raise ExecutorError(f"--executor {kind!r}: expected local or dask")
