"""CSV output, written atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Union

import pandas as pd

__all__ = ["atomic_write_text", "file_mode", "write_csv"]

PathLike = Union[str, "os.PathLike[str]"]


def file_mode(target: Path) -> int:
    """The mode a new file gets (0o666 less the umask), or the existing target's mode."""
    try:
        return target.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and ``os.replace``.

    Readers see the old file or the whole new one, never a partial file; on any error the temporary file is
    removed and the target is untouched.

    Raises:
        OSError: The directory does not exist or is not writable.
    """
    target = Path(os.fspath(path))
    directory = target.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot write {str(target)!r}: directory {str(directory)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode(target))  # mkstemp creates 0600 files
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_csv(frame: pd.DataFrame, path: PathLike) -> None:
    """Write a report frame as CSV (no index column; NaN as an empty field), atomically."""
    atomic_write_text(path, frame.to_csv(index=False))
