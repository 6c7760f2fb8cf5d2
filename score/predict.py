"""The results store of one model on one corpus: predictions in zarr, progress, identity.

::

    RESULTS/results.json          what was scored: model spec and sha256, corpus manifest sha256, settings
    RESULTS/predictions.zarr/     one int32 array per variant: top-5 class ids, (N, 5) or (N, T, 5)
                                  for sequences; -1 where not scored yet; plus `labels` (N,)
    RESULTS/progress.json         the (variant, shard) units whose rows are written
    RESULTS/summary.json          every metric, recomputed from the stored predictions

Each array is chunked by the corpus's shard size, so a unit's rows are one
chunk and a resumed run rewrites only chunks of unfinished units (zarr >= 3.1
writes each chunk to a temporary file and renames it). The store has one writer
(the main process); a unit is recorded in progress.json only after its rows are
written, so an interrupted run redoes at most the units in flight.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qrobust.shared.errors import QrobustError
from qrobust.shared.manifest import write_atomic

RESULTS_SCHEMA = "qrobust.results/1"
TOPK = 5


class ResultsError(QrobustError):
    """A results folder belongs to another model, corpus or setting."""


class ResultsStore:
    def __init__(self, path: str | Path, identity: dict, layout: dict[str, tuple[int, ...]], chunk_rows: int):
        """Open (or create) the store at ``path`` for ``identity``; ``layout`` maps
        variant id -> array shape. Raises :class:`ResultsError` if the folder was made for another
        identity."""
        import zarr

        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        ident_path = self.path / "results.json"
        identity = {"schema": RESULTS_SCHEMA, **identity}
        if ident_path.is_file():
            old = json.loads(ident_path.read_text())
            if old != identity:
                differ = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
                raise ResultsError(f"{self.path} holds results of another {', '.join(differ)}; "
                                   "use a new --out (one results folder per model and corpus)")
        elif any(self.path.iterdir()):
            raise ResultsError(f"{self.path} is not empty and holds no qrobust results; choose a new --out")
        else:
            write_atomic(ident_path, json.dumps(identity, indent=1, sort_keys=True))
        self.identity = identity
        self.root = zarr.open_group(str(self.path / "predictions.zarr"), mode="a")
        if dict(self.root.attrs) != identity:  # the store describes itself too, if copied without results.json
            self.root.attrs.update(identity)
        n = next(iter(layout.values()))[0] if layout else 0
        self.labels = self._array("labels", (n,), chunk_rows)
        self.arrays = {vid: self._array(vid, shape, chunk_rows) for vid, shape in layout.items()}
        progress = self.path / "progress.json"
        self.done = set(json.loads(progress.read_text())) if progress.is_file() else set()

    def _array(self, name: str, shape: tuple[int, ...], chunk_rows: int):
        if name in self.root:
            array = self.root[name]
            if tuple(array.shape) != tuple(shape):
                raise ResultsError(f"{self.path}: stored {name} has shape {array.shape}, expected {shape}")
            return array
        chunks = (min(chunk_rows, max(shape[0], 1)),) + tuple(shape[1:])
        return self.root.create_array(name, shape=shape, chunks=chunks, dtype="int32", fill_value=-1)

    @staticmethod
    def unit_id(variant: str, index: int) -> str:
        return f"{variant}#{index}"

    def write(self, variant: str, start: int, top5: np.ndarray, labels: np.ndarray) -> None:
        self.arrays[variant][start:start + len(top5)] = top5
        stored = self.labels[start:start + len(labels)]
        if (stored >= 0).any() and not np.array_equal(stored[stored >= 0], labels[stored >= 0]):
            raise ResultsError(f"{variant}: labels of rows {start}.. differ from other variants' (corpus damaged?)")
        self.labels[start:start + len(labels)] = labels

    def mark_done(self, unit_ids: list[str]) -> None:
        self.done.update(unit_ids)
        write_atomic(self.path / "progress.json", json.dumps(sorted(self.done)))

    def predictions(self, variant: str) -> np.ndarray:
        """All stored rows of a variant (also one scored by an earlier run with another --only)."""
        array = self.arrays.get(variant)
        return (array if array is not None else self.root[variant])[...]
