"""CSV output: a whole report written atomically, and a sink that streams closed steps."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from hookscope.errors import StateError
from hookscope.files import PathLike, atomic_write_text, require_directory
from hookscope.sinks import Sink

__all__ = ["CSVSink", "write_csv"]


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
        require_directory(self.path)
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
