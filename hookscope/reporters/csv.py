"""CSV output, written atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union

import pandas as pd

from hookscope.errors import StateError
from hookscope.reporters.sink import Sink

__all__ = ["CSVSink", "atomic_path", "atomic_write_text", "file_mode", "require_directory", "write_csv"]

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


def write_csv(frame: pd.DataFrame, path: PathLike) -> None:
    """Write a report frame as CSV (no index column; NaN as an empty field), atomically."""
    atomic_write_text(path, frame.to_csv(index=False))


class CSVSink(Sink):
    """Streams closed steps to a CSV file, for runs too long to keep in memory.

    The header is written once; rows are appended and flushed every ``every`` steps, and the file is fsynced
    when the manager detaches, so a crash loses at most ``every`` steps. An existing file with the same columns
    is appended to (resuming a run: give the new manager ``start_step``); one with other columns is an error.
    Pair it with ``HookManager(max_history=...)`` so that memory stays O(1) for days-long runs.

    Args:
        path: CSV file; its directory must exist.
        every: Steps between writes.

    Raises:
        OSError: The directory does not exist.

    Example:
        >>> import tempfile, os, torch, torch.nn as nn
        >>> from hookscope import HookManager
        >>> path = os.path.join(tempfile.mkdtemp(), "stats.csv")
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> with HookManager(model, sinks=[CSVSink(path, every=2)], max_history=1) as hm:
        ...     for _ in range(5):
        ...         _ = model(torch.randn(4, 2))
        ...         hm.step()
        >>> list(pd.read_csv(path)["step"])
        [0, 1, 2, 3, 4]
    """

    def __init__(self, path: PathLike, every: int = 100) -> None:
        super().__init__(every)
        self.path = Path(os.fspath(path))
        if not self.path.parent.is_dir():
            raise FileNotFoundError(
                f"cannot write {str(self.path)!r}: directory {str(self.path.parent)!r} does not exist"
            )
        self._header: list[str] | None = None
        if self.path.is_file() and self.path.stat().st_size > 0:
            with open(self.path, encoding="utf-8") as f:
                self._header = f.readline().rstrip("\r\n").split(",")
        self._file: Any = None

    def write(self, frame: pd.DataFrame) -> None:
        columns = [str(c) for c in frame.columns]
        if self._header is not None and self._header != columns:
            raise StateError(
                f"{str(self.path)!r} holds other columns ({', '.join(self._header)}) than this manager reports "
                f"({', '.join(columns)}); write to another file"
            )
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115 (kept open)
        frame.to_csv(self._file, index=False, header=self._header is None)
        self._header = columns
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def __repr__(self) -> str:
        return f"CSVSink({str(self.path)!r}, every={self.every})"
