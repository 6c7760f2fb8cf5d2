"""The folder a corpus is written into, shared by ``generate``, ``import`` and ``pack``: created with
clear errors; for ``generate`` and ``import``, also locked against a second writer and cleared of what
killed runs half-wrote (``pack`` writes only into a new, empty folder).

``OUT/.qrobust/`` (:data:`STATE_DIR`) holds the run's state: the lock, the
recorded settings, caches and, for ``--part`` runs, their records; it is not
part of the corpus (``verify`` and ``score`` never read it).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from qrobust.shared import files
from qrobust.shared.files import PARTIAL_SUFFIX
from qrobust.shared.errors import QrobustError

STATE_DIR = ".qrobust"
log = logging.getLogger("qrobust.generate")


def create(out: str | Path, error: type[QrobustError] = QrobustError) -> Path:
    """The folder ``out``, created if needed; ``error`` with a one-line reason if it cannot be."""
    target = Path(out)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise error(f"--out {out} exists and is not a folder") from None
    except OSError as e:
        raise error(f"cannot create --out {out}: {e.strerror or e}") from None
    return target


@contextlib.contextmanager
def locked(out: Path, shared: bool = False, error: type[QrobustError] = QrobustError):
    """An advisory lock on the corpus folder, released at exit: exclusive for a whole run, shared by
    ``generate --part`` runs (they build disjoint shards side by side)."""
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    what = "a run without --part (or --finalize)" if shared else \
        "another `qrobust generate` (a whole run, or --part runs) or import"
    with files.locked(out / STATE_DIR / "lock", shared=shared, error=error,
                      busy=f"{what} is writing {out}; wait for it or use another --out"):
        yield


def remove_partials(out: Path, names: list[str] | None = None) -> None:
    """Remove half-written files left by killed runs: all of them (hold the exclusive lock), or only
    those of the shards ``names`` (a --part run must not touch the files other parts are writing)."""
    if names is None:
        found = list(out.rglob(f"*{PARTIAL_SUFFIX}-*"))
    else:
        found = [p for name in names for p in (out / name).parent.glob(f"{Path(name).name}{PARTIAL_SUFFIX}-*")]
    for p in found:
        p.unlink(missing_ok=True)
