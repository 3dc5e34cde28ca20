"""Atomic writes: a file or a directory appears whole under its name, or not at all (the old one stays); locks and
disk-full errors that name the file (docs/faults.md)."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from .errors import UserError

_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(UserError, OSError):
    """The disk (or quota) filled up while writing ``path``; still an OSError with errno ENOSPC."""

    def __init__(self, path: Path, cell: str = "") -> None:
        OSError.__init__(self, errno.ENOSPC, "disk full", str(path))
        self.path, self.cell = Path(path), cell

    def __str__(self) -> str:
        cell = f" for cell {self.cell}" if self.cell else ""
        return f"disk full while writing {self.path}{cell}: free space and re-run; finished records are intact"

    def __reduce__(self) -> tuple:  # pickled (process pools, Ray) with its own arguments, not OSError's
        return type(self), (self.path, self.cell)


@contextmanager
def naming_disk_full(path: Path) -> Iterator[None]:
    """Turn an ENOSPC/EDQUOT OSError raised in the block into a DiskFullError naming ``path``."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as e:
        if e.errno in _FULL:
            raise DiskFullError(path) from e
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umasked(mode: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _hold(fd: int) -> bool:
    """Lock a new temporary file (or folder) for as long as its writer lives, so ``remove_stale_temporaries`` can
    tell it from one a killed writer left; False if a cleaner deleted it first (then make another)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # a filesystem without flock: the file is written all the same, just not cleanable
        return True
    return os.fstat(fd).st_nlink > 0


def _temporary_file(folder: Path, prefix: str) -> tuple[int, str]:
    """A new ``<prefix>*.tmp`` file in ``folder``, open and held (``_hold``)."""
    while True:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
        if _hold(fd):
            return fd, tmp
        os.close(fd)


def write_with(path: Path, write: Callable[[IO], Any], binary: bool = False) -> None:
    """Run ``write`` on a temporary file beside ``path``, sync it, then rename it into place: readers see the old
    file or the whole new one, never a part; a failure leaves the old file and no temporary one (a full disk raises
    a DiskFullError naming ``path``)."""
    path = Path(path)
    with naming_disk_full(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _temporary_file(path.parent, f".{path.name}.")
        try:
            with os.fdopen(fd, "wb" if binary else "w") as f:
                write(f)
                f.flush()
                os.fchmod(f.fileno(), _umasked(0o666))  # mkstemp makes it private; the result is an ordinary file
                os.fsync(f.fileno())
                os.replace(tmp, path)  # while still locked: a cleaner never sees it unlocked under its tmp name
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    write_with(path, lambda f: f.write(text))


def write_bytes(path: Path, data: bytes) -> None:
    """Write a binary file atomically."""
    write_with(path, lambda f: f.write(data), binary=True)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically; NaN and infinities are refused."""
    write_with(path, lambda f: json.dump(obj, f, indent=1, allow_nan=False))


def save_figure(fig: Any, path: Path, **savefig: Any) -> Path:
    """``fig.savefig`` (a matplotlib Figure) as a PNG, atomically."""
    write_with(path, lambda f: fig.savefig(f, format="png", **savefig), binary=True)
    return Path(path)


def write_dir(dest: Path, fill: Callable[[Path], Any], replace: bool = True) -> bool:
    """Fill a temporary directory beside ``dest`` with ``fill(tmp)``, then rename it to ``dest``. ``replace``: an
    existing ``dest`` is replaced; otherwise a ``dest`` another process finished first is kept. True if ours landed."""
    dest = Path(dest)
    with naming_disk_full(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        while True:
            tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
            fd = os.open(tmp, os.O_RDONLY)
            if _hold(fd):
                break
            os.close(fd)
        try:
            fill(tmp)
            os.chmod(tmp, _umasked(0o777))  # mkdtemp makes it private; the result is an ordinary folder
            if replace and dest.exists():
                old = dest.with_name(f".{dest.name}.old-{os.getpid()}.tmp")
                os.replace(dest, old)
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                try:
                    os.rename(tmp, dest)
                except OSError:
                    if dest.exists():
                        return False  # another process finished first; keep its copy
                    raise
            _fsync_dir(dest.parent)
            return True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            os.close(fd)


def probe_writable(folder: Path) -> None:
    """Create ``folder`` if missing, then write, sync and delete a file in it: an OSError (a DiskFullError when it
    is full) if it is not writable. A probe left by a killed process is removed here first."""
    folder = Path(folder)
    with naming_disk_full(folder):
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder, (".write-probe.",))
        fd, probe = _temporary_file(folder, ".write-probe.")
        try:
            os.write(fd, b"clsuite")
            os.fsync(fd)
        finally:
            os.unlink(probe)
            os.close(fd)


def remove_stale_temporaries(folder: Path, prefixes: tuple[str, ...] = (".",)) -> list[Path]:
    """Delete the ``<prefix>*.tmp`` files and folders in ``folder`` that a killed writer left (those no live writer
    holds locked); returns them."""
    removed = []
    try:
        names = [n for n in os.listdir(folder) if n.startswith(prefixes) and n.endswith(".tmp")]
    except FileNotFoundError:
        return removed
    for name in names:
        p = Path(folder) / name
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:  # its writer just renamed it into place
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a live writer (or no flock here: leave it)
            os.close(fd)
            continue
        try:  # deleted while locked: a writer that locks it after us sees it unlinked and makes another
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
    return removed


class FileLock:
    """An exclusive ``fcntl.flock`` on a lock file, deleted on release. The kernel drops the lock when its process
    dies, so a killed holder leaves at most an unlocked file, which the next holder takes over."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = Path(path), fd

    @classmethod
    def acquire(cls, path: Path, wait: bool = True, note: str = "") -> FileLock | None:
        """Lock ``path`` (created with its parents); None if another process holds it and not ``wait``. ``note``
        (e.g. host and pid) is written into the file for whoever wonders who holds it."""
        path = Path(path)
        with naming_disk_full(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                except BlockingIOError:
                    os.close(fd)
                    return None
                except BaseException:
                    os.close(fd)
                    raise
                try:  # the holder we waited for may have deleted the file: lock the one now under the name
                    same = os.stat(path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, note.encode())
        return cls(path, fd)

    def release(self) -> None:
        """Delete the lock file (while still holding it) and unlock."""
        if self._fd < 0:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
