"""Files written atomically: readers see the old file or the whole new one, never a partial file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Union

__all__ = ["PathLike", "atomic_path", "atomic_write_text", "file_mode", "require_directory"]

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
