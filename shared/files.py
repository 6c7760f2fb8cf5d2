"""Files written so a crash never leaves half of one under its final name, and read back by hash.

Every file qrobust publishes (shards, manifests, results, checkpoints) is
written under a partial name unique to its process (:func:`partial_path`),
fsynced, then renamed into place; :func:`remove_dead_partials` clears what a
killed process left. :func:`file_sha256` is the one hash of a file on disk.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import socket
from pathlib import Path

PARTIAL_SUFFIX = ".partial"
# host and pid: parts of one corpus may run on many machines sharing its folder
_HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64] or "host"


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: unique to this
    process, so a run that resumes while an old one still writes never shares a file."""
    return path.with_name(f"{path.name}{PARTIAL_SUFFIX}-{_HOST}-{os.getpid()}")


def remove_dead_partials(folder: Path) -> int:
    """Remove the partial files in ``folder`` (not below it) of processes of this host that no longer run.

    A process killed between writing a partial file and renaming it leaves
    the partial behind; one still running (a second run on the same folder)
    keeps its own. Partials of other hosts are left alone: their processes
    cannot be asked. Returns how many were removed.
    """
    removed = 0
    prefix = f"{PARTIAL_SUFFIX}-{_HOST}-"
    for p in folder.glob(f"*{prefix}*"):
        pid = p.name.rpartition(prefix)[2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue  # running under another user, or not a pid at all
        p.unlink(missing_ok=True)  # a link is removed itself, never what it points to
        removed += 1
    return removed


# what zarr (>= 3.1) writes a chunk or metadata file to before renaming it: `<name>.<uuid4 hex>.partial`
_ZARR_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")


def remove_store_partials(folder: Path) -> int:
    """Remove the half-written files a killed zarr writer left anywhere below ``folder``.

    Their names carry no process, so only the holder of the folder's exclusive
    :func:`locked` may call this. Links are never followed (``os.walk``'s
    default); a link with a partial's name is removed itself. Returns how many.
    """
    removed = 0
    for top, _dirs, names in os.walk(folder):
        for name in names:
            if _ZARR_PARTIAL.search(name):
                Path(top, name).unlink(missing_ok=True)
                removed += 1
    return removed


@contextlib.contextmanager
def locked(lock_file: Path, *, shared: bool = False, busy: str, error: type[Exception]):
    """An advisory lock (``flock``) on ``lock_file``, held for the ``with`` block: exclusive for a
    writer, ``shared`` for readers or cooperating writers. ``error(busy)`` if another process holds it
    in a conflicting mode; a warning where the file system has no locks (some network mounts)."""
    try:
        # read and write: NFS emulates flock with byte-range locks, and a shared (read) lock needs read access
        f = open(lock_file, "a+")
    except PermissionError:
        if not shared or not lock_file.is_file():
            raise
        f = open(lock_file)  # a reader of a folder it may not write: a shared lock needs only read access
    with f:
        try:
            import fcntl

            fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise error(busy) from None
            logging.getLogger("qrobust").warning(
                "cannot lock %s on this file system (%s): make sure no other run writes there",
                lock_file.parent, errno.errorcode.get(e.errno, e.errno))
        yield


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file under a temporary name, fsync, then rename over the target."""
    path = Path(path)
    tmp = partial_path(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:  # a failed write names no file: say which one (disk full, quota)
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
