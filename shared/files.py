"""Files written so a crash never leaves half of one under its final name, and read back by hash.

Every file qrobust publishes (shards, manifests, results, checkpoints) is
written under a partial name unique to its process (:func:`partial_path`),
fsynced, then renamed into place; :func:`remove_dead_partials` clears what a
killed process left. :func:`file_sha256` is the one hash of a file on disk.

Output folders may come from someone else, so nothing here writes through a
link: partial files are created new (:func:`create_new`), lock files are
opened without following one, the cleaners remove plain files only, and
:func:`odd_entry` finds what qrobust never writes (a link, a FIFO, a device)
so a caller can refuse the folder before touching it.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import socket
import stat
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
    try:
        with os.scandir(folder) as entries:
            found = [e for e in entries if prefix in e.name and e.is_file(follow_symlinks=False)]
    except FileNotFoundError:
        return 0
    for entry in found:  # plain files only: a link or a folder by that name is nothing qrobust wrote
        pid = entry.name.rpartition(prefix)[2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue  # running under another user, or not a pid at all
        Path(entry.path).unlink(missing_ok=True)
        removed += 1
    return removed


# what zarr (>= 3.1) writes a chunk or metadata file to before renaming it: `<name>.<uuid4 hex>.partial`
_ZARR_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")


def remove_store_partials(folder: Path) -> int:
    """Remove the half-written files a killed zarr writer left anywhere below ``folder``.

    Their names carry no process, so only the holder of the folder's exclusive
    :func:`locked` may call this. Links are never followed (``os.walk``'s
    default), and only plain files are removed: a link or anything else by
    such a name is nothing zarr wrote. Returns how many.
    """
    removed = 0
    for top, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(top, name)
            if _ZARR_PARTIAL.search(name) and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def odd_entry(folder: str | os.PathLike) -> tuple[Path, str] | None:
    """The first entry below ``folder`` (in name order) that is no plain file or folder, and what it is
    (``"a link"``, ``"a FIFO"``, ...); None if there is none.

    qrobust writes only plain files and folders into its output folders, so any
    other entry there came from someone else; a link would let a write, rename
    or delete inside the folder reach a file outside it, and a FIFO or device
    could block or flood a reader. Links are never followed. Entries that
    vanish while the folder is walked (another process's temporary files) are
    skipped. An unreadable folder raises :class:`OSError`.
    """
    todo = [Path(folder)]
    while todo:
        top = todo.pop()
        try:
            with os.scandir(top) as it:
                entries = sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            continue
        below = []
        for entry in entries:
            try:
                if entry.is_symlink():
                    return Path(entry.path), "a link"
                if entry.is_dir(follow_symlinks=False):
                    below.append(Path(entry.path))
                elif not entry.is_file(follow_symlinks=False):
                    return Path(entry.path), _kind(entry.stat(follow_symlinks=False).st_mode)
            except FileNotFoundError:
                continue
        todo.extend(reversed(below))
    return None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device")):
        if test(mode):
            return name
    return "no plain file"


def create_new(path: str | os.PathLike) -> int:
    """A descriptor of ``path`` opened for writing as a new, empty plain file, never through a link.

    Partial files have names others can guess (host and pid), so one planted
    under such a name as a link would make a plain ``open(path, "w")`` truncate
    whatever it points to. What is there already is removed first (a link is
    removed itself; only a dead process with this pid can have left a file).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags, 0o666)
    except FileExistsError:
        os.unlink(path)
        return os.open(path, flags, 0o666)


@contextlib.contextmanager
def locked(lock_file: Path, *, shared: bool = False, busy: str, error: type[Exception]):
    """An advisory lock (``flock``) on ``lock_file``, held for the ``with`` block: exclusive for a
    writer, ``shared`` for readers or cooperating writers. ``error(busy)`` if another process holds it
    in a conflicting mode; a warning where the file system has no locks (some network mounts).

    The lock file is opened without following a link (one pointing outside
    would have it created there) and must be a plain file: ``error`` otherwise.
    """
    lock_file = Path(lock_file)
    # never blocks on a FIFO; never through a link
    extra = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        # read and write: NFS emulates flock with byte-range locks, and a shared (read) lock needs read access
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_APPEND | extra, 0o666)
    except PermissionError:
        if not shared or not lock_file.is_file():
            raise
        fd = os.open(lock_file, os.O_RDONLY | extra)  # a reader of a folder it may not write: needs only read
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR):
            raise error(f"{lock_file} is {'a link' if e.errno == errno.ELOOP else 'a folder'}, which qrobust "
                        "never writes there; remove it") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{lock_file} is no plain file, which qrobust never writes there; remove it")
        try:
            import fcntl

            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise error(busy) from None
            logging.getLogger("qrobust").warning(
                "cannot lock %s on this file system (%s): make sure no other run writes there",
                lock_file.parent, errno.errorcode.get(e.errno, e.errno))
        yield
    finally:
        os.close(fd)


def create_folder(out: str | os.PathLike, error: type[Exception]) -> Path:
    """The output folder ``out`` (``--out``), created if needed; ``error`` with a one-line reason if it cannot
    be: a file there, a dangling link, no permission."""
    target = Path(out)
    if target.is_symlink() and not target.exists():
        raise error(f"--out {out} is a link to {os.readlink(target)}, which does not exist; give a folder")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise error(f"--out {out} exists and is not a folder") from None
    except OSError as e:
        raise error(f"cannot create --out {out}: {e.strerror or e}") from None
    return target


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
    """Write a text file under a temporary name, fsync, then rename over the target.

    Nothing is written through a link: the temporary file is created new
    (:func:`create_new`), and the rename replaces a link at ``path`` itself,
    never the file it points to.
    """
    path = Path(path)
    tmp = partial_path(path)
    try:
        with open(create_new(tmp), "w") as f:
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
