"""The results store of one model on one corpus: predictions in zarr, progress, identity.

::

    RESULTS/results.json          what was scored: model spec and sha256, corpus manifest sha256, settings
    RESULTS/predictions.zarr/     one int32 array per variant: top-5 class ids, (N, 5) or (N, T, 5)
                                  for sequences; -1 where not scored yet; plus `labels` (N,), the sample
                                  keys `sample` (N,) and `columns` (N, C); dimension names sample, frame,
                                  rank, attacked_row, column, so xarray opens it (``open_datatree``); the
                                  root attributes hold the class names and what each code means
    RESULTS/predictions.zarr/attacks/<attack>/<budget>/{outcome,pred}
                                  per attacked row: int8 outcome (1 fooled, 0 robust, 2 skipped by a
                                  cascade, -1 not yet) and the int32 final prediction; `attacks/rows`
                                  holds the corpus rows attacked, group attributes each job's settings
    RESULTS/progress.json         the (variant, shard) units and (attack job, batch) units written
    RESULTS/summary.json          every metric, recomputed from the stored predictions
    RESULTS/.lock                 held by the one `qrobust score` writing the folder (:func:`writing`);
                                  `report` reads a folder only while no run holds it (:func:`reading`)
    RESULTS/parts/rank-R-of-W/    only during a distributed run (or after one was interrupted): rank R's
                                  own store of the same layout (:class:`PartStore`), merged into the main
                                  one by rank 0 (:meth:`ResultsStore.absorb_parts`) and then deleted

Each array is chunked by the corpus's shard size, so a unit's rows are one
chunk and a resumed run rewrites only chunks of unfinished units (zarr >= 3.1
writes each chunk to a temporary file and renames it). The store has one writer
(the main process; rank 0 of a distributed run, the other ranks writing their
own parts: two writers into one zarr chunk would lose data); a unit is recorded
in progress.json only after its rows are written, so an interrupted run redoes
at most the units in flight.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from qrobust.shared.errors import QrobustError
from qrobust.shared.files import locked, remove_dead_partials, remove_store_partials, write_atomic

RESULTS_SCHEMA = "qrobust.results/1"
TOPK = 5
PARTS = "parts"  # RESULTS/parts/rank-R-of-W: the stores of the ranks of a distributed run
SAMPLES = "columns"  # predictions.zarr/columns: the per-sample columns of the summary's intervals
LOCK = ".lock"  # RESULTS/.lock: the one writer's lock
KEYS = "sample"  # predictions.zarr/sample: the sample keys, the coordinate of every array's first dimension
# what the stored numbers mean, for anyone opening the store without qrobust (xarray, zarr)
CODES = {"top5": "class ids (indices into the root attribute 'classes'), best first: rank 0 is the top-1; "
                 "-1 where not scored yet, or no class (a model with fewer than 5 classes)",
         "labels": "the corpus label of each sample (an index into 'classes'); -1 where not scored yet",
         "outcome": "per attacked row: 0 robust, 1 fooled, 2 skipped by a cascade (an earlier attack fooled it), "
                    "3 not among this attack's rows, -1 not yet",
         "pred": "per attacked row: the final top-1 class id (the clean one where the sample was not attacked)",
         "columns": "per sample, the summary's base quantities (names in the 'columns' attribute); NaN where "
                    "undefined"}

log = logging.getLogger("qrobust.score")


class ResultsError(QrobustError):
    """A results folder belongs to another model, corpus or setting."""


@contextlib.contextmanager
def writing(path: str | Path):
    """Hold the results folder ``path`` (created if needed) as its one writer for the ``with`` block.

    A second ``qrobust score`` on the same folder (another ``--only``, say) is
    refused with :class:`ResultsError` instead of both writing progress.json
    and losing each other's units. Holding the lock, the writer clears what a
    killed run half-wrote inside the zarr store (those files name no process).
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ResultsError(f"--out {path} exists and is not a folder") from None
    except OSError as e:
        raise ResultsError(f"cannot create --out {path}: {e.strerror or e}") from None
    if (path / LOCK).is_symlink():
        raise ResultsError(f"{path / LOCK} is a link, which `qrobust score` never writes; use a new --out")
    with locked(path / LOCK, error=ResultsError,
                busy=f"another `qrobust score` is writing {path}; wait for it, or give this run its own --out"):
        remove_store_partials(path)
        yield path


@contextlib.contextmanager
def reading(path: str | Path):
    """Read the results folder ``path`` for the ``with`` block only while no ``score`` writes it: a
    summary and predictions read mid-run could belong to two different moments."""
    lock = Path(path) / LOCK
    if not lock.is_file() or lock.is_symlink():  # never written by a locking qrobust: nothing to wait for
        yield Path(path)
        return
    with locked(lock, shared=True, error=ResultsError,
                busy=f"{path}: a `qrobust score` is writing it; report it when the run has finished"):
        yield Path(path)


def _read_json(path: Path):
    """A results-folder JSON file, or :class:`ResultsError` naming it (never a traceback)."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise ResultsError(f"{path}: unreadable ({str(e)[:120]}); it is not what `qrobust score` wrote: "
                           "use a new --out, or delete the file to start over") from None


class ResultsStore:
    def __init__(self, path: str | Path, identity: dict, layout: dict[str, tuple[int, ...]], chunk_rows: int):
        """Open (or create) the store at ``path`` for ``identity``; ``layout`` maps
        variant id -> array shape. Raises :class:`ResultsError` if the folder was made for another
        identity."""
        import zarr

        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        remove_dead_partials(self.path)  # what a run killed mid-write left (it never becomes a result)
        ident_path = self.path / "results.json"
        identity = {"schema": RESULTS_SCHEMA, **identity}
        if ident_path.is_file():
            old = _upgraded(_read_json(ident_path), identity)
            if old != identity:
                differ = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
                raise ResultsError(f"{self.path} holds results of another {', '.join(differ)}; "
                                   "use a new --out (one results folder per model and corpus)")
        elif any(p.name != LOCK for p in self.path.iterdir()):
            raise ResultsError(f"{self.path} is not empty and holds no qrobust results; choose a new --out")
        else:
            write_atomic(ident_path, json.dumps(identity, indent=1, sort_keys=True))
        self.identity = identity
        self.root = zarr.open_group(str(self.path / "predictions.zarr"), mode="a")
        if dict(self.root.attrs) != identity:  # the store describes itself too, if copied without results.json
            self.root.attrs.update(identity)
        n = next(iter(layout.values()))[0] if layout else 0
        if self.root.attrs.get("codes") != CODES:
            self.root.attrs["codes"] = CODES
        self.labels = self._array("labels", (n,), chunk_rows)
        self.keys = self.root[KEYS] if KEYS in self.root else self.root.create_array(
            KEYS, shape=(n,), chunks=(min(chunk_rows, max(n, 1)),), dtype=str, dimension_names=("sample",))
        self.arrays = {vid: self._array(vid, shape, chunk_rows) for vid, shape in layout.items()}
        progress = self.path / "progress.json"
        done = _read_json(progress) if progress.is_file() else []
        if not isinstance(done, list) or not all(isinstance(u, str) for u in done):
            raise ResultsError(f"{progress}: not a list of finished units; delete it to score every unit again")
        self.done = set(done)

    def _array(self, name: str, shape: tuple[int, ...], chunk_rows: int):
        if name in self.root:
            array = self.root[name]
            if tuple(array.shape) != tuple(shape):
                raise ResultsError(f"{self.path}: stored {name} has shape {array.shape}, expected {shape}")
            return array
        chunks = (min(chunk_rows, max(shape[0], 1)),) + tuple(shape[1:])
        dims = {1: ("sample",), 2: ("sample", "rank"), 3: ("sample", "frame", "rank")}[len(shape)]
        return self.root.create_array(name, shape=shape, chunks=chunks, dtype="int32", fill_value=-1,
                                      dimension_names=dims)

    @staticmethod
    def unit_id(variant: str, index: int) -> str:
        return f"{variant}#{index}"

    def describe(self, classes: list[str]) -> None:
        """Record the corpus's class names (what the class ids index) in the store's attributes."""
        if self.root.attrs.get("classes") != list(classes):
            self.root.attrs["classes"] = list(classes)

    def write(self, variant: str, start: int, top5: np.ndarray, labels: np.ndarray, keys=None) -> None:
        self.arrays[variant][start:start + len(top5)] = top5
        if keys is not None:
            self.keys[start:start + len(keys)] = np.array([str(k) for k in keys], dtype=str)
        stored = self.labels[start:start + len(labels)]
        if (stored >= 0).any() and not np.array_equal(stored[stored >= 0], labels[stored >= 0]):
            raise ResultsError(f"{variant}: labels of rows {start}.. differ from other variants' (corpus damaged?)")
        self.labels[start:start + len(labels)] = labels

    def mark_done(self, unit_ids: list[str]) -> None:
        self.done.update(unit_ids)
        write_atomic(self.path / "progress.json", json.dumps(sorted(self.done)))

    def part_paths(self) -> list[Path]:
        """The part stores of ranks of a distributed run not merged yet, rank 0 first."""
        folder = self.path / PARTS
        parts = [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []

        def rank(p: Path) -> tuple:
            head, _, world = p.name.removeprefix("rank-").partition("-of-")
            return (int(head), int(world)) if head.isdigit() and world.isdigit() else (1 << 62, 0, p.name)

        return sorted(parts, key=rank)

    def absorb_parts(self, units: dict) -> int:
        """Merge every part store (rank 0's first) into this one, then delete them; returns how many units.

        ``units`` maps unit id -> :class:`~qrobust.score.stream.Unit` for the rows
        of each (variant, shard) unit. Used by rank 0 at the end of a distributed
        run, and at the start of any run on this folder (one process or several,
        of any number), so the units finished by an interrupted distributed run
        are kept. A part is deleted only after its units are in progress.json,
        so a merge that is itself interrupted is simply done again.
        """
        count = 0
        for part in self.part_paths():
            count += self._absorb(part, units)
            shutil.rmtree(part)
        if (self.path / PARTS).is_dir() and not any((self.path / PARTS).iterdir()):
            (self.path / PARTS).rmdir()
        return count

    def _absorb(self, part: Path, units: dict) -> int:
        import zarr

        ident = part / "results.json"
        if not ident.is_file():  # a rank stopped before writing anything: nothing to keep
            return 0
        if _upgraded(_read_json(ident), self.identity) != self.identity:
            raise ResultsError(f"{part} holds results of another model, corpus or setting than {self.path}; "
                               "delete it (or the whole --out) to score again")
        progress = part / "progress.json"
        done = _read_json(progress) if progress.is_file() else []
        if not isinstance(done, list) or not all(isinstance(u, str) for u in done):
            raise ResultsError(f"{progress}: not a list of finished units; delete {part} to redo its units")
        root = zarr.open_group(str(part / "predictions.zarr"), mode="r")
        merged = []
        for uid in sorted(u for u in done if not u.startswith("attack/")):
            unit = units.get(uid)
            if unit is None:  # a variant no longer planned (damaged manifest entry): redone when it is
                log.warning("%s: unit %s is not in the corpus plan; not merged", part, uid)
                continue
            src = root[unit.variant]
            if unit.variant not in self.arrays:  # scored by an interrupted run with another --only
                self.arrays[unit.variant] = self._array(unit.variant, tuple(src.shape), src.chunks[0])
            rows = slice(unit.start, unit.start + unit.count)
            self.write(unit.variant, unit.start, src[rows], root["labels"][rows],
                       root[KEYS][rows] if KEYS in root else None)
            merged.append(uid)
        attack_units = [u for u in done if u.startswith("attack/")]
        if "attacks" in root:
            group = root["attacks"]
            rows, batch = group["rows"][...], int(group.attrs["batch_size"])
            self.open_attacks(rows, dict(group.attrs.get("jobs", {})), batch)
            for uid in sorted(attack_units):
                job_id, _, b = uid.removeprefix("attack/").rpartition("#")
                lo = int(b) * batch
                hi = min(lo + batch, len(rows))
                self.write_attack(job_id, lo, group[f"{job_id}/outcome"][lo:hi], group[f"{job_id}/pred"][lo:hi])
                merged.append(uid)
            mine = self.root["attacks"].attrs
            if "zero_grad_share" not in mine and "zero_grad_share" in group.attrs:  # the lowest rank's probe:
                mine["zero_grad_share"] = group.attrs["zero_grad_share"]  # its first batch is one process's first
            flags = set(group.attrs.get("reference_flags", []))
            if flags - set(mine.get("reference_flags", [])):
                mine["reference_flags"] = sorted(set(mine.get("reference_flags", [])) | flags)
        self.mark_done(merged)
        return len(merged)

    def predictions(self, variant: str) -> np.ndarray:
        """All stored rows of a variant (also one scored by an earlier run with another --only)."""
        array = self.arrays.get(variant)
        return (array if array is not None else self.root[variant])[...]

    # --- attacks ----------------------------------------------------------------

    def open_attacks(self, rows: np.ndarray, jobs: dict[str, dict], batch_size: int) -> None:
        """Create (or check) the arrays of the attack jobs ``{job id: settings}`` on ``rows``.

        A job already stored with other settings, rows or batch size is an error:
        its outcomes would mix two experiments.
        """
        group = self.root.require_group("attacks")
        if "rows" in group:
            if not np.array_equal(group["rows"][...], rows) or group.attrs.get("batch_size") != batch_size:
                raise ResultsError(f"{self.path} holds attacks on other rows or with another batch size; "
                                   "use the --attack-limit and --batch-size of the first run, or a new --out")
        else:
            group.create_array("rows", shape=rows.shape, chunks=(max(len(rows), 1),), dtype="int32",
                               dimension_names=("attacked_row",))[...] = rows
            group.attrs["batch_size"] = batch_size
        stored = dict(group.attrs.get("jobs", {}))
        for job_id, settings in jobs.items():
            settings = json.loads(json.dumps(settings))  # as it reads back from the attributes
            if job_id in stored and stored[job_id] != settings:
                raise ResultsError(f"{self.path}: {job_id} was run with other settings ({stored[job_id]} vs "
                                   f"{settings}); use a new --out to compare settings")
            stored[job_id] = settings
            for name, dtype in (("outcome", "int8"), ("pred", "int32")):
                if f"{job_id}/{name}" not in group:
                    group.create_array(f"{job_id}/{name}", shape=rows.shape, chunks=(max(batch_size, 1),),
                                       dtype=dtype, fill_value=-1, dimension_names=("attacked_row",))
        group.attrs["jobs"] = stored

    @staticmethod
    def attack_unit_id(job_id: str, batch: int) -> str:
        return f"attack/{job_id}#{batch}"

    def attack_jobs(self) -> dict[str, dict]:
        """Settings of every attack job in the store (this run's and earlier ones)."""
        return dict(self.root["attacks"].attrs.get("jobs", {})) if "attacks" in self.root else {}

    def write_attack(self, job_id: str, start: int, outcome: np.ndarray, pred: np.ndarray) -> None:
        group = self.root["attacks"]
        group[f"{job_id}/outcome"][start:start + len(outcome)] = outcome
        group[f"{job_id}/pred"][start:start + len(pred)] = pred

    def write_samples(self, names: list[str], values: np.ndarray) -> None:
        """The per-sample columns behind the summary's intervals (:mod:`qrobust.score.uncertainty`), replaced
        whenever the summary is: derived from the stored predictions, kept so ``report`` can pair models."""
        array = self.root.create_array(SAMPLES, shape=values.shape, dtype="float32", overwrite=True,
                                       chunks=(max(1, values.shape[0]), max(1, values.shape[1])),
                                       dimension_names=("sample", "column"))
        array[...] = values
        array.attrs["columns"] = list(names)

    def attack_outcome(self, job_id: str) -> np.ndarray | None:
        group = self.root.get("attacks")
        return None if group is None or f"{job_id}/outcome" not in group else group[f"{job_id}/outcome"][...]

    def fooled_by_others(self, job_id: str, start: int, count: int) -> np.ndarray:
        """Rows start..start+count fooled by any other stored job at the same budget (for cascades)."""
        budget = job_id.split("/")[1]
        hit = np.zeros(count, bool)
        for other in self.attack_jobs():
            if other != job_id and other.split("/")[1] == budget and not other.startswith("transfer-"):
                hit |= self.root["attacks"][f"{other}/outcome"][start:start + count] == 1
        return hit


class PartStore(ResultsStore):
    """One rank's own store in a distributed run: ``main.path/parts/rank-R-of-W``, same identity and layout.

    Its ``done`` also holds the main store's units, so nothing finished is
    redone, while its progress.json lists only the units this part holds (what
    :meth:`ResultsStore.absorb_parts` copies). A cascade looks for rows fooled
    by other jobs in both stores: earlier runs' jobs are in the main one.
    """

    def __init__(self, main: ResultsStore, rank: int, world: int, layout: dict[str, tuple[int, ...]],
                 chunk_rows: int):
        identity = {k: v for k, v in main.identity.items() if k != "schema"}
        super().__init__(main.path / PARTS / f"rank-{rank}-of-{world}", identity, layout, chunk_rows)
        self.main = main
        self.own = set(self.done)
        self.done = self.own | main.done

    def mark_done(self, unit_ids: list[str]) -> None:
        self.own.update(unit_ids)
        self.done.update(unit_ids)
        write_atomic(self.path / "progress.json", json.dumps(sorted(self.own)))

    def open_attacks(self, rows: np.ndarray, jobs: dict[str, dict], batch_size: int) -> None:
        super().open_attacks(rows, jobs, batch_size)
        zero = self.main.root["attacks"].attrs.get("zero_grad_share") if "attacks" in self.main.root else None
        if zero is not None:  # measured by an earlier run: kept, not measured again on another batch
            self.root["attacks"].attrs["zero_grad_share"] = zero

    def fooled_by_others(self, job_id: str, start: int, count: int) -> np.ndarray:
        return super().fooled_by_others(job_id, start, count) | self.main.fooled_by_others(job_id, start, count)


def read_samples(folder: str | Path) -> tuple[list[str], np.ndarray] | None:
    """``(column names, (N, columns) values)`` of a results folder, read only; None if it has none (a folder
    written before intervals were computed)."""
    import zarr

    path = Path(folder) / "predictions.zarr"
    if not path.is_dir():
        return None
    try:
        root = zarr.open_group(str(path), mode="r")
        if SAMPLES not in root:
            return None
        array = root[SAMPLES]
        names = array.attrs.get("columns")
        values = np.asarray(array[...], dtype=np.float32)
    except Exception as e:  # a damaged store: the caller reports it cannot pair this model
        raise ResultsError(f"{path}: cannot read its per-sample columns ({type(e).__name__}: {e})") from None
    if not isinstance(names, list) or values.ndim != 2 or values.shape[1] != len(names):
        raise ResultsError(f"{path}: malformed per-sample columns")
    return [str(n) for n in names], values


def _upgraded(identity, current: dict):
    """A results folder's identity written by an earlier qrobust, read with what it did not record yet.

    A registered architecture has always been given ImageNet-normalized inputs,
    and its weights file's sha256 pinned what it computes; such a folder is
    read with today's ``normalize`` and state digest instead of refused. A
    ``module:callable`` model's convention and weights were not pinned (its
    code could change under the same name), so its old folder stays refused.
    """
    model = identity.get("model") if isinstance(identity, dict) else None
    if not isinstance(model, dict) or ":" in str(model.get("arch", ":")):
        return identity
    if "normalize" not in model:
        identity = {**identity, "model": {**model, "normalize": "imagenet"}}
    if "model_state_sha256" not in identity and identity.get("model_sha256") is not None:
        identity = {**identity, "model_state_sha256": current.get("model_state_sha256")}
    return identity
