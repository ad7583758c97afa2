"""Files that a reader never sees half-written: whole files replaced atomically, and CSV files that grow by whole
records (a failed append is truncated back, a torn tail left by a crash is dropped before appending again)."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Union

from hookscope.checks import describe
from hookscope.errors import ConfigError, ConfigPathError, ConfigTypeError

__all__ = [
    "AppendFile",
    "PathLike",
    "atomic_path",
    "atomic_write_text",
    "check_output_file",
    "creation_problem",
    "file_mode",
    "last_record_end",
    "require_directory",
]

PathLike = Union[str, "os.PathLike[str]"]


def file_mode(target: Path) -> int:
    """The mode a new file gets (0o666 less the umask), or the existing target's mode."""
    try:
        return target.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def require_directory(target: Path) -> None:
    """Raise ``FileNotFoundError`` (an ``OSError``) naming the file when its directory does not exist."""
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(target)!r}: directory {str(target.parent)!r} does not exist")


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` (``os.replace``), on any error it
    is removed and ``path`` is untouched. Readers see the old file or the whole new one, never a partial file.

    Raises:
        OSError: The directory does not exist or is not writable.
    """
    target = Path(os.fspath(path))
    require_directory(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, file_mode(target))  # mkstemp creates 0600 files
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`), fsynced before the rename."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def creation_problem(target: Path) -> str | None:
    """Why ``target`` cannot be written, found by trying, or ``None``: an existing file is opened for appending
    (nothing is written), a missing one is created (exclusively, so nothing is clobbered) and removed again.

    Permission bits alone do not tell: root passes ``os.access`` everywhere, and ``/proc``, ``/sys`` or a
    read-only mount refuse the file only when it is opened.
    """
    existed = target.exists()
    flags = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0) | (os.O_APPEND if existed else os.O_CREAT | os.O_EXCL)
    try:
        fd = os.open(target, flags, 0o666)
    except FileExistsError:  # created by someone else in between: it exists, which is all a writer needs
        return None
    except OSError as e:
        return f"{'opening' if existed else 'creating'} it fails: {e.strerror or e}"
    os.close(fd)
    if not existed:
        with contextlib.suppress(OSError):
            os.unlink(target)
    return None


def check_output_file(arg: str, value: object) -> Path:
    """``value`` as the path of a file that can be created or appended to: a str or ``os.PathLike`` naming a
    regular file (existing and writable, or not yet there) in an existing, writable directory. Writing is tried
    (:func:`creation_problem`): a file that would be created is created and removed again.

    Raises:
        ConfigTypeError: Not a str or ``os.PathLike`` of a str.
        ConfigPathError: The directory is missing or not writable, or the target is a directory, another kind of
            file (a device, a pipe), or a file that cannot be written or created (``/proc``, a read-only mount).
    """
    raw = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(raw, str):
        raise ConfigTypeError(f"`{arg}` must be a file path (a str or os.PathLike), got {describe(value)}")
    if not raw:
        raise ConfigError(f"`{arg}` must be a file path, got an empty string")
    target = Path(raw)
    directory = target.parent

    def fail(problem: str, fix: str) -> ConfigPathError:
        return ConfigPathError(
            f"`{arg}` must be a writable file in an existing directory, got {raw!r}: {problem}; {fix}"
        )

    if not directory.is_dir():
        raise fail(f"directory {str(directory)!r} does not exist", "create it first (os.makedirs)")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise fail(f"directory {str(directory)!r} is not writable", "choose a directory this process can write")
    if target.is_dir():
        raise fail("it is a directory", "name a file inside it")
    if target.exists():
        if not target.is_file():
            raise fail("it is not a regular file (a device, a pipe or a socket)", "name a regular file")
        if not os.access(target, os.W_OK):
            raise fail("the file is not writable", "fix its permissions or choose another file")
    problem = creation_problem(target)
    if problem is not None:
        raise fail(problem, "choose a file on a writable file system")
    return target


def last_record_end(fd: int, size: int, chunk: int = 1 << 20) -> int:
    """The offset just after the last complete CSV record among the first ``size`` bytes of ``fd`` (0 if none).

    A record ends at a newline outside quotes, as a CSV parser reads it (RFC 4180; what pandas and the ``csv``
    module write): a field holding a newline, a comma or a quote is quoted, and its quotes are doubled, so a
    newline is outside quotes exactly when an even number of ``"`` precede it. The last newline byte is not
    enough: a record torn inside a quoted multi-line field (a layer name holding a newline) ends in a newline
    too, and its open quote would swallow every row appended after it. The quotes are counted in one forward pass
    (a ``bytes.count`` per megabyte), then newlines are tried from the end.
    """
    total = offset = 0
    while offset < size:
        data = os.pread(fd, min(chunk, size - offset), offset)
        if not data:
            break
        total += data.count(b'"')
        offset += len(data)
    after = 0  # quotes from the newline being tried to the end
    end = offset
    while end > 0:
        start = max(0, end - chunk)
        data = os.pread(fd, end - start, start)
        stop = len(data)
        while (newline := data.rfind(b"\n", 0, stop)) >= 0:
            after += data.count(b'"', newline, stop)
            if (total - after) % 2 == 0:
                return start + newline + 1
            stop = newline
        after += data.count(b'"', 0, stop)
        end = start
    return 0


class AppendFile:
    """A CSV file that grows by whole batches of records, so that a reader never sees a torn one.

    :meth:`append` writes a batch with as few ``write`` calls as the system allows (one, for a regular file) and,
    when one of them fails (a full disk), truncates the file back to where the batch began. A process killed in
    the middle of a batch can still leave a torn last record: :meth:`drop_torn_tail` removes it before appending
    again. The file is opened for reading and appending (created if missing); every method raises ``OSError`` as
    the system calls do, and the descriptor is closed when the object is garbage-collected without
    :meth:`close`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        self._fd: int | None = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

    @property
    def closed(self) -> bool:
        return self._fd is None

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError(f"{str(self.path)!r} is closed")
        return self._fd

    def size(self) -> int:
        """Bytes in the file now (0 for a device)."""
        return os.fstat(self.fileno()).st_size

    def head(self, limit: int = 1 << 16) -> bytes:
        """The first ``limit`` bytes (fewer if the file is shorter)."""
        data = b""
        while len(data) < limit:
            chunk = os.pread(self.fileno(), limit - len(data), len(data))
            if not chunk:
                break
            data += chunk
        return data

    def drop_torn_tail(self) -> int:
        """Truncate the file just after its last complete CSV record (to nothing if it holds none; see
        :func:`last_record_end`); returns the number of bytes dropped."""
        size = self.size()
        keep = last_record_end(self.fileno(), size)
        if keep < size:
            os.ftruncate(self.fileno(), keep)
        return size - keep

    def check_in_place(self) -> None:
        """Raise ``OSError`` when the path no longer names this file (removed, its directory removed, or replaced
        by another file or a directory): writes to the open descriptor would then reach no reader."""
        opened = os.fstat(self.fileno())
        now = os.stat(self.path)  # FileNotFoundError when removed
        if (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
            raise OSError(f"{str(self.path)!r} no longer names the file being written (it was replaced)")

    def append(self, data: bytes) -> None:
        """Append ``data`` whole; on any failure the file is truncated back to its previous length (when the
        system allows it) and the error is raised."""
        fd = self.fileno()
        start = os.fstat(fd).st_size
        view = memoryview(data)
        try:
            while view:
                written = os.write(fd, view)
                if written <= 0:  # never for a regular file; a loop that cannot end would hang training
                    raise OSError(errno.EIO, f"writing to {str(self.path)!r} made no progress")
                view = view[written:]
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise

    def sync(self) -> None:
        """Make what was appended durable (``fsync``)."""
        os.fsync(self.fileno())

    def close(self) -> None:
        """Release the descriptor (idempotent; the descriptor is released even when ``close`` reports an error)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            self._finalizer.detach()
            os.close(fd)
