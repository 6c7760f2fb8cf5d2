"""The folder a corpus is written into, shared by ``generate``, ``import`` and ``pack``: created with
clear errors; for ``generate`` and ``import``, also locked against a second writer and cleared of what
killed runs half-wrote (``pack`` writes only into a new, empty folder).

``OUT/.qrobust/`` (:data:`STATE_DIR`) holds the run's state: the lock, the
recorded settings, caches and, for ``--part`` runs, their records; it is not
part of the corpus (``verify`` and ``score`` never read it).

qrobust writes only plain files and folders there, and renames, overwrites and
deletes inside the folder: a folder holding a link (or a FIFO, a device) is
refused (:func:`check_tree`) before anything is written, so nothing reaches a
file outside it.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from qrobust.shared import files
from qrobust.shared.files import PARTIAL_SUFFIX
from qrobust.shared.errors import QrobustError

STATE_DIR = ".qrobust"
log = logging.getLogger("qrobust.generate")


def create(out: str | Path, error: type[QrobustError] = QrobustError) -> Path:
    """The folder ``out``, created if needed; ``error`` with a one-line reason if it cannot be."""
    return files.create_folder(out, error)


def check_tree(out: Path, error: type[QrobustError] = QrobustError) -> None:
    """``error`` naming the first entry below ``out`` that is a link or anything but a plain file or folder.

    ``out`` itself may be a link to a folder (the user named it); what lies
    inside is written by qrobust, which never makes links.
    """
    try:
        odd = files.odd_entry(out)
    except OSError as e:
        raise error(f"cannot read {e.filename or out}: {e.strerror or e}") from None
    if odd is not None:
        raise error(f"{odd[0]} is {odd[1]}, which qrobust never writes into a corpus folder; it is refused so "
                    "that nothing is written or deleted through it: remove it, or use another --out")


@contextlib.contextmanager
def locked(out: Path, shared: bool = False, error: type[QrobustError] = QrobustError):
    """An advisory lock on the corpus folder, released at exit: exclusive for a whole run, shared by
    ``generate --part`` runs (they build disjoint shards side by side). A folder holding a link is refused
    first (:func:`check_tree`): the lock file, the state and the shards are written inside it."""
    check_tree(out, error)
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    what = "a run without --part (or --finalize)" if shared else \
        "another `qrobust generate` (a whole run, or --part runs) or import"
    with files.locked(out / STATE_DIR / "lock", shared=shared, error=error,
                      busy=f"{what} is writing {out}; wait for it or use another --out"):
        yield


def remove_partials(out: Path, names: list[str] | None = None) -> None:
    """Remove half-written files left by killed runs: all of them (hold the exclusive lock), or only
    those of the shards ``names`` (a --part run must not touch the files other parts are writing).

    Only plain files are removed, and folders are walked without following a
    link (``os.walk``'s default), so nothing outside ``out`` is reached.
    """
    if names is None:
        found = [Path(top, name) for top, _dirs, entries in os.walk(out) for name in entries
                 if f"{PARTIAL_SUFFIX}-" in name]
    else:
        found = [p for name in names for p in (out / name).parent.glob(f"{Path(name).name}{PARTIAL_SUFFIX}-*")]
    for p in found:
        if p.is_file() and not p.is_symlink() and _inside(p, out):
            p.unlink(missing_ok=True)


def _inside(path: Path, out: Path) -> bool:
    """Whether ``path``'s folder is ``out`` or below it, links resolved (a shard name cannot climb out)."""
    try:
        return path.parent.resolve().is_relative_to(out.resolve())
    except OSError:
        return False
