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
    RESULTS/digests.json          the sha256 of every file above and in predictions.zarr that a finished
                                  unit or run vouches for (:func:`check_folder`)
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

The folder is tamper-evident. When a unit is marked done, the sha256 of the
zarr chunk files holding its rows (its variant's, and the labels' and sample
keys') go into digests.json, before the unit goes into progress.json; a
finished run adds those of results.json, progress.json, summary.json,
results.csv, the zarr metadata and the per-sample columns, which the next run
rewrites (they leave the record when it opens the folder). A run, and
``report`` (:func:`check_folder`), refuse a folder whose files differ from
their recorded digests, naming the array or file: its summary would not be the
one its predictions give. Nothing is decoded to check it.

Everything qrobust writes there is a plain file or folder, and it renames,
overwrites, merges and deletes inside the folder; a folder holding a link, a
FIFO or a device, or one of its own names as the wrong kind of entry, is
refused when opened, so nothing is written, merged or deleted through a link
or outside the folder.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np

from qrobust.shared.bounded import BoundsError, load_json
from qrobust.shared.errors import QrobustError
from qrobust.shared.files import (PARTIAL_SUFFIX, create_folder, file_sha256, locked, odd_entry, remove_dead_partials,
                                  remove_store_partials, write_atomic)

RESULTS_SCHEMA = "qrobust.results/1"
TOPK = 5
PARTS = "parts"  # RESULTS/parts/rank-R-of-W: the stores of the ranks of a distributed run
SAMPLES = "columns"  # predictions.zarr/columns: the per-sample columns of the summary's intervals
LOCK = ".lock"  # RESULTS/.lock: the one writer's lock
DIGESTS = "digests.json"  # RESULTS/digests.json: the sha256 of the files, by path relative to the folder
DIGESTS_SCHEMA = "qrobust.digests/1"
STORE = "predictions.zarr"
# what qrobust writes at the top of a results folder (and of a part), and whether each is a folder
OWN = {"results.json": False, "progress.json": False, "summary.json": False, "results.csv": False,
       DIGESTS: False, LOCK: False, STORE: True, PARTS: True}
PART_NAME = re.compile(r"rank-(0|[1-9][0-9]*)-of-([1-9][0-9]*)")
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
    path = create_folder(path, ResultsError)
    if (path / LOCK).is_symlink():
        raise ResultsError(f"{path / LOCK} is a link, which `qrobust score` never writes; use a new --out")
    with locked(path / LOCK, error=ResultsError,
                busy=f"another `qrobust score` is writing {path}; wait for it, or give this run its own --out"):
        check_tree(path)  # before anything is cleaned: a folder with a link is refused, not tidied
        remove_store_partials(path)
        yield path


def check_place(out: str | Path, corpus: str | Path) -> None:
    """:class:`ResultsError` if the results folder ``out`` would be the local corpus folder ``corpus``, lie
    inside it, or hold it (links resolved): a run writes, renames and deletes inside its folder, and a corpus
    is read as it was published."""
    try:
        place, source = Path(out).resolve(), Path(corpus).resolve()
    except (OSError, RuntimeError) as e:  # a loop of links
        raise ResultsError(f"--out {out}: cannot resolve it ({e})") from None
    if place == source or place.is_relative_to(source):
        raise ResultsError(f"--out {out} lies inside the corpus folder {corpus}; give the results a folder "
                           "outside the corpus")
    if source.is_relative_to(place):
        raise ResultsError(f"--out {out} holds the corpus folder {corpus}; give the results a folder of their own")


def check_tree(path: str | Path) -> None:
    """:class:`ResultsError` if the results folder ``path`` holds a link, a FIFO or a device anywhere, or one
    of qrobust's own names (results.json, parts/, ...) as the wrong kind of entry; ``path`` itself may be
    a link to a folder (the user named it)."""
    path = Path(path)
    try:
        odd = odd_entry(path)
        kinds = {name: os.lstat(path / name).st_mode for name in OWN if os.path.lexists(path / name)}
    except OSError as e:
        raise ResultsError(f"cannot read {e.filename or path}: {e.strerror or e}") from None
    if odd is not None:
        raise ResultsError(f"{odd[0]} is {odd[1]}, which `qrobust score` never writes into a results folder; "
                           "it is refused so that nothing is written, merged or deleted through it: remove it, "
                           "or use a new --out")
    for name, mode in sorted(kinds.items()):
        if stat.S_ISDIR(mode) != OWN[name]:
            raise ResultsError(f"{path / name} is {'a folder' if stat.S_ISDIR(mode) else 'a file'}, where "
                               f"`qrobust score` writes {'a folder' if OWN[name] else 'a file'}; it is not a "
                               "results folder qrobust wrote: use a new --out")


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
        return load_json(path)  # within a size and nesting bound: the folder may come from anyone
    except BoundsError as e:
        raise ResultsError(f"{e}; it is not what `qrobust score` wrote: use a new --out") from None
    except (OSError, ValueError) as e:
        raise ResultsError(f"{path}: unreadable ({str(e)[:120]}); it is not what `qrobust score` wrote: "
                           "use a new --out, or delete the file to start over") from None


def _covered(lo: int, hi: int, ranges: list[tuple[int, int]]) -> bool:
    """Whether the row ranges ``ranges`` cover rows lo..hi."""
    for start, stop in sorted(ranges):
        if start > lo:
            return False
        lo = max(lo, stop)
        if lo >= hi:
            return True
    return lo >= hi


def _final(rel: str) -> bool:
    """Whether the recorded file ``rel`` is one a run rewrites without finishing a unit (recorded by
    :meth:`ResultsStore.seal`), not a unit's chunk."""
    return not rel.startswith(f"{STORE}/") or rel.rpartition("/")[2] == "zarr.json" \
        or rel.startswith(f"{STORE}/{SAMPLES}/")


def _digest(path: Path) -> str | None:
    """The sha256 of the file at ``path``; None if there is none (zarr stores no chunk that is all fill)."""
    try:
        return file_sha256(path)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        return "a folder"


def _what(rel: str) -> str:
    """A recorded file, as a reader knows it: the array a chunk belongs to, or the file."""
    if not rel.startswith(f"{STORE}/"):
        return rel
    inner = rel.removeprefix(f"{STORE}/")
    if inner.rpartition("/")[2] == "zarr.json":
        node = inner.rpartition("/")[0]
        return f"the metadata of {'array or group ' + node if node else 'the store'} ({rel})"
    array, sep, _ = inner.rpartition("/c/") if "/c/" in inner else (inner, "", "")
    return f"array {array} ({rel})" if sep else rel


def _read_record(folder: Path) -> dict[str, str | None] | None:
    """The digests recorded in ``folder``'s digests.json ({path: sha256 or None}); None if it has none."""
    path = folder / DIGESTS
    if not path.is_file():
        return None
    record = _read_json(path)
    files = record.get("files") if isinstance(record, dict) and record.get("schema") == DIGESTS_SCHEMA else None
    if not isinstance(files, dict) or not all(isinstance(v, str) or v is None for v in files.values()) \
            or not all(_safe(rel) for rel in files):
        raise ResultsError(f"{path}: not a record of digests qrobust writes; the folder cannot be checked: "
                           "score the model again into a new --out")
    return files


def _safe(rel: str) -> bool:
    """Whether ``rel`` names a file inside the folder (a record from elsewhere must not make us read outside)."""
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and "\\" not in rel and all(p not in ("", ".", "..") for p in parts)


def _verify(folder: Path, record: dict[str, str | None]) -> None:
    """:class:`ResultsError` naming the first recorded file (in path order) that differs from its digest."""
    for rel in sorted(record):
        try:
            got = _digest(folder / rel)
        except OSError as e:
            raise ResultsError(f"{folder / rel}: unreadable ({e.strerror or e}); the folder cannot be checked "
                               "against its digests") from None
        if got != record[rel]:
            how = f"is missing, though {DIGESTS} records it" if got is None else \
                f"is there, though {DIGESTS} records none" if record[rel] is None else \
                f"differs from its digest in {DIGESTS}"
            what = _what(rel)  # an array by its name; a file by its path, as every other error names it
            where = f"{folder}: {what} {how}" if what != rel else f"{folder / rel}: {how}"
            raise ResultsError(f"{where} (edited after qrobust wrote it?); its results "
                               "cannot be trusted: score the model again into a new --out")


def _check_part(part: Path) -> None:
    """:class:`ResultsError` unless the part folder ``part`` holds only what a rank writes there (its
    results.json, progress.json, digests.json and their partial files, predictions.zarr/), no link."""
    files = {"results.json", "progress.json", DIGESTS}
    for entry in sorted(os.scandir(part), key=lambda e: e.name):
        partial = PARTIAL_SUFFIX in entry.name  # write_atomic's, of a rank killed mid-write
        name = entry.name.partition(PARTIAL_SUFFIX)[0]
        want_folder = name == STORE and not partial
        if entry.is_symlink() or name not in (files if partial else files | {STORE}) or \
                entry.is_dir(follow_symlinks=False) != want_folder:
            raise ResultsError(f"{entry.path}: not something qrobust writes into a part of a distributed run, "
                               "which it deletes once merged; it refuses to merge or delete the part: move it "
                               "away")
    try:
        odd = odd_entry(part)
    except OSError as e:
        raise ResultsError(f"cannot read {e.filename or part}: {e.strerror or e}") from None
    if odd is not None:
        raise ResultsError(f"{odd[0]} is {odd[1]}, which qrobust never writes into a part; it refuses to merge "
                           "or delete the part: remove it")


def check_folder(folder: str | Path) -> list[str]:
    """Check a results folder (or its summary.json) before its summary is used; returns warnings.

    Raises :class:`ResultsError` (one line, naming the array or file) if the
    folder holds a link, a FIFO or a device, if its digests.json is malformed,
    or if a file it records (a finished unit's chunk, the metadata, summary.json,
    progress.json, ...) differs from its digest or is missing, and if a
    ``qrobust score`` is writing the folder now. Returns a warning when the
    summary cannot be checked against the predictions: a folder scored by a
    qrobust that recorded no digests, or one whose last run did not finish
    (its summary.json is an earlier run's). Reads every recorded file once,
    decodes nothing.

    ``folder`` itself may be a link to a folder; nothing is written.
    """
    folder = Path(folder)
    if folder.name == "summary.json" and not folder.is_dir():
        folder = folder.parent
    if not folder.is_dir():
        raise ResultsError(f"{folder}: no such results folder")
    with reading(folder):
        check_tree(folder)
        record = _read_record(folder)
        summary = (folder / "summary.json").is_file()
        if record is None:
            return [(f"{folder}: scored by a qrobust that recorded no digests ({DIGESTS}): its summary cannot be "
                     "checked against its predictions")] if summary else []
        _verify(folder, record)
        if summary and "summary.json" not in record:
            return [(f"{folder}: its last `qrobust score` did not finish, so its summary.json is an earlier run's "
                     "and cannot be checked against the predictions now stored; rerun it to finish")]
        return []


class ResultsStore:
    def __init__(self, path: str | Path, identity: dict, layout: dict[str, tuple[int, ...]], chunk_rows: int,
                 *, units: dict | None = None, writer: bool = True):
        """Open (or create) the store at ``path`` for ``identity``; ``layout`` maps
        variant id -> array shape. Raises :class:`ResultsError` if the folder was made for another
        identity, holds a link (:func:`check_tree`), or differs from its recorded digests.

        ``units`` maps unit id -> :class:`~qrobust.score.stream.Unit` (the rows
        of each (variant, shard) unit), so a finished unit's chunk files can be
        told; without it a unit is taken to be one chunk. ``writer`` False
        opens the folder of another process's run (the other ranks of a
        distributed run read rank 0's): nothing is checked or recorded then.
        """
        import zarr

        self.path = Path(path)
        self.units = dict(units or {})
        self.writer = writer
        self.path.mkdir(parents=True, exist_ok=True)
        if writer:
            check_tree(self.path)
            self.part_paths()  # refused before anything is written, not when the parts are merged
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
        record = _read_record(self.path)
        self.digests: dict[str, str | None] = dict(record or {})
        if writer and record is not None:
            _verify(self.path, record)  # before this run builds on what is stored
            # what this run rewrites without finishing a unit (the metadata, the summary) leaves the record,
            # before anything is written, until the run is finished (:meth:`seal`): a run killed in between
            # leaves nothing stale in it
            self.digests = {rel: d for rel, d in record.items() if not _final(rel)}
            if self.digests != record:
                self._write_digests()
        self.root = zarr.open_group(str(self.path / STORE), mode="a")
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
        if writer and record is None and self.done:
            log.warning("%s was scored by a qrobust that recorded no digests: its %d finished units are kept "
                        "as they are, and their digests recorded from now on", self.path, len(self.done))
            self._record(self.done)
            self._write_digests()

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
        """Record ``unit_ids`` as finished: their chunk files' digests first, then progress.json (so a
        finished unit's chunks always have digests, whenever the run is killed)."""
        self.done.update(unit_ids)
        self._record(unit_ids)
        self._write_digests()
        write_atomic(self.path / "progress.json", json.dumps(sorted(self._listed())))

    def _listed(self) -> set[str]:
        """The units this store's progress.json lists (and whose rows its arrays hold)."""
        return self.done

    # --- digests ----------------------------------------------------------------

    def _record(self, unit_ids) -> None:
        """Put the digests of the chunk files of ``unit_ids`` in :attr:`digests` (not written yet)."""
        for uid in sorted(unit_ids):
            try:
                files = self._unit_files(uid)
            except (KeyError, ValueError):  # a name zarr refuses (from an edited progress.json): nothing stored
                continue
            for rel in files:
                self.digests[rel] = _digest(self.path / rel)

    def _unit_files(self, uid: str) -> list[str]:
        """The chunk files (relative to the folder) holding unit ``uid``'s rows whose every row belongs to a
        finished unit: those are final (a chunk shared with an unfinished unit would still change)."""
        if uid.startswith("attack/"):  # an attack batch is one chunk of its job's outcome and pred arrays
            job_id, _, b = uid.removeprefix("attack/").rpartition("#")
            group = self.root.get("attacks")
            if group is None or not b.isdigit() or "rows" not in group:
                return []
            files = []
            for name in ("outcome", "pred"):
                array = group.get(f"{job_id}/{name}") if job_id else None
                if array is not None and hasattr(array, "chunks"):
                    files += self._chunk_files(array, int(b) * array.chunks[0], (int(b) + 1) * array.chunks[0])
            return files + self._chunk_files(group["rows"], 0, group["rows"].shape[0]) if files else []
        import zarr

        variant, _, index = uid.rpartition("#")
        array = self.arrays.get(variant) if variant in self.arrays else self.root.get(variant) if variant else None
        if not isinstance(array, zarr.Array) or not index.isdigit():
            return []
        unit = self.units.get(uid)
        lo, hi = (unit.start, unit.start + unit.count) if unit is not None else \
            (int(index) * array.chunks[0], (int(index) + 1) * array.chunks[0])

        def finished(same_variant: bool):  # row ranges of the finished units (only for a chunk shared by units)
            listed = self._listed()
            return lambda: [(u.start, u.start + u.count) for k, u in self.units.items()
                            if k in listed and (u.variant == variant or not same_variant)]

        return (self._chunk_files(array, lo, hi, finished(True)) + self._chunk_files(self.labels, lo, hi,
                                                                                   finished(False))
                + self._chunk_files(self.keys, lo, hi, finished(False)))

    @staticmethod
    def _chunk_files(array, lo: int, hi: int, finished=None) -> list[str]:
        """The chunk files of ``array`` holding rows lo..hi, those whose rows all lie in lo..hi, or in the
        row ranges ``finished()`` gives."""
        n, step = array.shape[0], array.chunks[0]
        hi = min(hi, n)
        if hi <= lo:
            return []
        rest = [range(-(-size // c)) for size, c in zip(array.shape[1:], array.chunks[1:])]
        out = []
        for k in range(lo // step, (hi - 1) // step + 1):
            first, last = k * step, min((k + 1) * step, n)
            if not lo <= first <= last <= hi and (finished is None or not _covered(first, last, finished())):
                continue
            for more in itertools.product(*rest):
                out.append(f"{STORE}/{array.path}/{array.metadata.encode_chunk_key((k, *more))}")
        return out

    def _write_digests(self) -> None:
        write_atomic(self.path / DIGESTS, json.dumps({"schema": DIGESTS_SCHEMA, "files": self.digests},
                                                     indent=1, sort_keys=True))

    def seal(self) -> None:
        """Record the digests of what a finished run wrote besides its units' chunks: results.json,
        progress.json, summary.json and results.csv, the zarr metadata and the per-sample columns. Called
        after summary.json and results.csv are written; the next run to open the folder drops them again."""
        files = {rel: d for rel, d in self.digests.items() if not _final(rel)}
        for name in ("results.json", "progress.json", "summary.json", "results.csv"):
            if (self.path / name).is_file():
                files[name] = _digest(self.path / name)
        for top, dirs, names in os.walk(self.path / STORE):
            dirs.sort()
            for name in sorted(names):
                rel = Path(top, name).relative_to(self.path).as_posix()
                if _final(rel):
                    files[rel] = _digest(self.path / rel)
        self.digests = files
        self._write_digests()

    def part_paths(self) -> list[Path]:
        """The part stores of ranks of a distributed run not merged yet, rank 0 first.

        They are deleted once merged, so ``parts/`` must hold nothing but
        ``rank-R-of-W`` folders holding nothing but what a rank writes, none of
        them a link: anything else is refused (:class:`ResultsError`), never
        followed, merged or deleted.
        """
        folder = self.path / PARTS
        if not os.path.lexists(folder):
            return []
        if folder.is_symlink() or not folder.is_dir():
            raise ResultsError(f"{folder} is {'a link' if folder.is_symlink() else 'a file'}, where qrobust keeps "
                               "the parts of a distributed run; it is refused, never followed or deleted: remove "
                               "it, or use a new --out")
        parts = []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            match = PART_NAME.fullmatch(entry.name)
            if not match or int(match[1]) >= int(match[2]) or entry.is_symlink() or \
                    not entry.is_dir(follow_symlinks=False):
                raise ResultsError(f"{entry.path}: {folder} holds only the rank-R-of-W folders of a distributed "
                                   "run, which qrobust deletes once merged; it refuses to merge or delete anything "
                                   "else there: move it away")
            _check_part(Path(entry.path))
            parts.append(((int(match[1]), int(match[2])), Path(entry.path)))
        return [p for _, p in sorted(parts)]

    def absorb_parts(self, units: dict) -> int:
        """Merge every part store (rank 0's first) into this one, then delete them; returns how many units.

        ``units`` maps unit id -> :class:`~qrobust.score.stream.Unit` for the rows
        of each (variant, shard) unit. Used by rank 0 at the end of a distributed
        run, and at the start of any run on this folder (one process or several,
        of any number), so the units finished by an interrupted distributed run
        are kept. A part is deleted only after its units are in progress.json,
        so a merge that is itself interrupted is simply done again. A part is
        checked against its own digests before it is merged, and anything in
        ``parts/`` that qrobust did not write is refused (:meth:`part_paths`).
        """
        self.units.update(units)
        count = 0
        for part in self.part_paths():
            count += self._absorb(part, units)
            shutil.rmtree(part)  # checked by part_paths: a folder of plain files and folders, no link
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
        record = _read_record(part)
        if record is not None:
            _verify(part, record)  # what is merged is what the rank wrote
        elif done:
            log.warning("%s was written by a qrobust that recorded no digests; merged unchecked", part)
        if not (part / STORE).is_dir():
            if done:
                raise ResultsError(f"{part}: progress.json lists finished units but there is no {STORE}; "
                                   f"delete {part} to redo its units")
            return 0
        root = zarr.open_group(str(part / STORE), mode="r")
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
        self.own = set()  # until the part's own progress is read
        super().__init__(main.path / PARTS / f"rank-{rank}-of-{world}", identity, layout, chunk_rows,
                         units=main.units)
        self.main = main
        self.own = set(self.done)
        self.done = self.own | main.done

    def mark_done(self, unit_ids: list[str]) -> None:
        self.own.update(unit_ids)
        super().mark_done(unit_ids)

    def _listed(self) -> set[str]:
        return self.own

    def open_attacks(self, rows: np.ndarray, jobs: dict[str, dict], batch_size: int) -> None:
        super().open_attacks(rows, jobs, batch_size)
        zero = self.main.root["attacks"].attrs.get("zero_grad_share") if "attacks" in self.main.root else None
        if zero is not None:  # measured by an earlier run: kept, not measured again on another batch
            self.root["attacks"].attrs["zero_grad_share"] = zero

    def fooled_by_others(self, job_id: str, start: int, count: int) -> np.ndarray:
        return super().fooled_by_others(job_id, start, count) | self.main.fooled_by_others(job_id, start, count)


MAX_COLUMNS = 4096  # far above the ~140 columns of the full benchmark


def read_samples(folder: str | Path, rows: int | None = None) -> tuple[list[str], np.ndarray] | None:
    """``(column names, (N, columns) values)`` of a results folder, read only; None if it has none (a folder
    written before intervals were computed). The array's declared shape is checked (``rows``: the summary's
    sample count) before anything is read: a few bytes of metadata can declare billions of rows."""
    import zarr

    path = Path(folder) / "predictions.zarr"
    if not path.is_dir():
        return None
    try:
        root = zarr.open_group(str(path), mode="r")
        if SAMPLES not in root:
            return None
        array = root[SAMPLES]
        shape = tuple(array.shape)
        if len(shape) != 2 or shape[1] > MAX_COLUMNS or (rows is not None and shape[0] != rows):
            raise ResultsError(f"{path}: per-sample columns of shape {shape}, expected ({rows}, at most "
                               f"{MAX_COLUMNS})")
        names = array.attrs.get("columns")
        values = np.asarray(array[...], dtype=np.float32)
    except ResultsError:
        raise
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
