"""CSV output: a whole report written atomically, and a sink that streams closed steps."""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from hookscope.csv_cells import safe_for_spreadsheets
from hookscope.errors import ConfigError, ConfigPathError, StateError
from hookscope.files import AppendFile, PathLike, atomic_write_text, check_output_file
from hookscope.sinks import Sink, SinkSource
from hookscope.warn import warn_once

__all__ = ["CSVSink", "csv_text", "write_csv"]

#: The CSV sinks that hold a file now, by resolved path: two writers on one file would interleave their rows.
_IN_USE: weakref.WeakValueDictionary[str, CSVSink] = weakref.WeakValueDictionary()


def write_csv(frame: pd.DataFrame, path: PathLike) -> None:
    """Write a report frame as CSV (no index column; NaN as an empty field), atomically; text cells that a
    spreadsheet would run as formulas are prefixed with ``'`` (see :mod:`hookscope.csv_cells`)."""
    atomic_write_text(path, csv_text(frame))


def csv_text(frame: pd.DataFrame, *, header: bool = True, lineterminator: str | None = None) -> str:
    """``frame`` as the text of a CSV file (or of rows appended to one): no index column, NaN as an empty field,
    text cells and column names safe for spreadsheets (:func:`hookscope.csv_cells.safe_for_spreadsheets`)."""
    return safe_for_spreadsheets(frame).to_csv(index=False, header=header, lineterminator=lineterminator)


#: Bytes read from the start of an existing file to find its header.
HEAD_BYTES = 1 << 16


def _head_of(path: Path) -> tuple[bytes, int]:
    """The first :data:`HEAD_BYTES` of an existing file and its size (``b"", 0`` when there is no file)."""
    try:
        with open(path, "rb") as f:
            return f.read(HEAD_BYTES), os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return b"", 0


def _header_line(columns: Sequence[str]) -> bytes:
    """The header line this sink writes for ``columns``, newline included."""
    return csv_text(pd.DataFrame(columns=list(columns)), lineterminator="\n").encode("utf-8")


def _header_problem(head: bytes, size: int, header: bytes) -> str | None:
    """Why a file that starts with ``head`` (``size`` bytes in all) cannot take rows under ``header``, or ``None``:
    it is empty, starts with exactly that header line, or holds a torn start of it (a run killed while writing
    the header; it is dropped before appending)."""
    newline = head.find(b"\n")
    if newline >= 0:
        first = head[: newline + 1]
        if first.rstrip(b"\r\n") == header.rstrip(b"\n"):
            return None
        return f"holds other columns ({first.decode('utf-8', errors='replace').rstrip()})"
    if size <= len(head) and header.startswith(head):
        return None
    return "does not start with a CSV header line"


def drop_steps_from(path: Path, step: int) -> int:
    """Cut a report CSV just before its first row of ``step`` or later (rows are in step order; the step is the
    first field), in one ``truncate`` (atomic: a reader sees the file before or after, never between). Reads from
    the end, only as far back as the last row it keeps. Returns the bytes dropped (0 when there is no such row)."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return 0
    buf, end, cut = b"", size, None
    with open(path, "rb") as f:
        while end > 0:
            start = max(0, end - (1 << 16))
            f.seek(start)
            buf = f.read(end - start) + buf
            end = start
            first = 0 if end == 0 else buf.find(b"\n") + 1  # the first line that surely starts at a line start
            if first == 0 and end > 0:
                continue
            pos, cut, earlier = first, None, False
            for line in buf[first:].split(b"\n"):
                field = line.split(b",", 1)[0].strip()
                if field:
                    if not field.isdigit() or int(field) < step:  # the header, or a row of an earlier step
                        earlier, cut = True, None
                    elif cut is None:
                        cut = pos
                pos += len(line) + 1
            if earlier:
                break
    keep = size if cut is None else end + cut
    if keep < size:
        os.truncate(path, keep)
    return size - keep


class CSVSink(Sink):
    """Streams closed steps to a CSV file, for runs too long to keep in memory.

    The header is written once; every ``every`` steps the new rows are appended in one write, and the file is
    fsynced when the manager detaches. A reader never sees a torn line: a write that fails half-way is truncated
    back, and a file left with a torn last line by a killed run is repaired (the partial line dropped, with a
    warning) before a resumed run appends to it. An existing file with the same columns is appended to (resuming
    a run: give the new manager ``start_step``). Pair it with ``HookManager(max_history=...)`` so that memory
    stays O(1) for days-long runs.

    Failures of the environment never stop training: when the disk is full, the file or its directory vanishes
    or becomes unwritable, the sink warns once (naming the file and the error), releases the file with the whole
    rows written so far, and writes no more; the manager's reports still hold the statistics in memory.

    Args:
        path: CSV file; its directory must exist. One sink per file: a second sink on the same (resolved) path
            while the first is open is an error.
        every: Steps between writes (a crash loses at most this many steps).

    Raises:
        ConfigTypeError: ``path`` is not a str or ``os.PathLike``.
        ConfigPathError: The directory is missing or not writable, or ``path`` is a directory, not a regular file,
            or not writable (also an ``OSError``).
        ConfigError: Another open ``CSVSink`` writes to the same file.
        StateError: When bound to a manager: the existing file holds other columns than the manager reports.

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
        self.path = check_output_file("path", path)
        self._key = os.path.realpath(self.path)
        self._columns: list[str] | None = None  # those of the manager, or of the first frame when unbound
        try:
            self._head = _head_of(self.path)  # checked against the manager's columns at bind
        except OSError as e:
            raise ConfigPathError(f"`path` must be a readable CSV file, got {str(self.path)!r}: {e}") from e
        self._file: AppendFile | None = None
        self._stopped = False
        self._resume_step: int | None = None  # rows of this step and later are dropped before the next append
        self._claim()

    def _claim(self) -> None:
        holder = _IN_USE.get(self._key)
        if holder is not None and holder is not self:
            raise ConfigError(
                f"`path` {str(self.path)!r} is already written by another open {holder!r}; two sinks on one file "
                "would interleave their rows: use another file, or close the other sink (detach its manager) first"
            )
        _IN_USE[self._key] = self

    def _release(self) -> None:
        if _IN_USE.get(self._key) is self:
            del _IN_USE[self._key]

    def bind(self, source: SinkSource) -> None:
        """Check that an existing file has the columns of ``source`` (its header), then bind.

        Raises:
            StateError: The file holds other columns, or the sink already feeds another manager.
        """
        columns = [str(c) for c in source.columns]
        problem = _header_problem(*self._head, _header_line(columns))
        if problem is not None:
            raise StateError(
                f"`path` {str(self.path)!r} {problem}, not the columns this manager reports "
                f"({', '.join(columns)}); write to another file, or give the manager the collectors of the run "
                "that wrote it"
            )
        super().bind(source)
        self._columns = columns

    def write(self, frame: pd.DataFrame) -> None:
        """Append the rows of ``frame`` (one write); after an environment failure, drop them silently.

        Raises:
            StateError: ``frame`` has other columns than the manager reports (or than the first frame written,
                when the sink is used without a manager).
        """
        if self._stopped:
            return
        columns = [str(c) for c in frame.columns]
        self._check_columns(columns)
        try:
            file = self._open(columns)
            file.check_in_place()
            header = file.size() == 0
            text = csv_text(frame, header=header, lineterminator="\n")
            file.append(text.encode("utf-8"))
        except OSError as e:
            self._stop(str(e))

    def _check_columns(self, columns: list[str]) -> None:
        if self._columns is not None and self._columns != columns:
            raise StateError(
                f"{self!r} was handed a frame with columns ({', '.join(columns)}) other than those it writes "
                f"({', '.join(self._columns)}); a sink receives the frames of one manager"
            )
        self._columns = columns

    def _open(self, columns: list[str]) -> AppendFile:
        """The open file, opened on first use: its header checked and a torn last line dropped."""
        if self._file is not None:
            return self._file
        holder = _IN_USE.get(self._key)
        if holder is not None and holder is not self:  # released at close(), taken since
            raise OSError(f"another {holder!r} writes to this file now")
        file = AppendFile(self.path)
        try:
            size = file.size()
            if size > 0:
                problem = _header_problem(file.head(HEAD_BYTES), size, _header_line(columns))
                if problem is not None:  # the file was replaced since the sink was bound
                    raise OSError(f"the file now {problem}")
                dropped = file.drop_torn_tail()
                if dropped:
                    warn_once(
                        f"hookscope: {str(self.path)!r} ended in a torn line (a run stopped in the middle of a "
                        f"write); dropped its last {dropped} bytes so that the new rows start on a line of their "
                        "own"
                    )
            if self._resume_step is not None:  # the interrupted run's rows after its checkpoint: one run in the file
                drop_steps_from(self.path, self._resume_step)
                self._resume_step = None
        except BaseException:
            with contextlib.suppress(OSError):
                file.close()
            raise
        _IN_USE[self._key] = self
        self._file = file
        return file

    def _stop(self, reason: str) -> None:
        """Warn once, release the file and write no more."""
        self._stopped = True
        if self._file is not None:
            file, self._file = self._file, None
            with contextlib.suppress(OSError):
                file.close()
        self._release()
        warn_once(
            f"hookscope: CSVSink stopped writing {str(self.path)!r}: {reason}. The file keeps the whole rows "
            "written before; later steps are not written to it. The statistics stay available in memory through "
            "the manager's reports (HookManager.to_dataframe(), .to_csv(); the last `max_history` steps)."
        )

    def resume_from(self, step: int) -> None:
        """Before its next append, drop the file's rows of ``step`` and later (written by the interrupted run after
        the checkpoint the manager resumes from), so that the file reads as one run."""
        if self._file is not None:  # reopened (and cut) at the next write
            self.close()
        self._resume_step = step

    def close(self) -> None:
        """Fsync and close the file, and release the path for another sink (idempotent). A later write (the
        manager attached again) reopens the file and appends."""
        if self._file is not None:
            try:
                self._file.sync()
            except OSError as e:
                self._stop(f"{e} (while making the file durable with fsync)")
            else:
                file, self._file = self._file, None
                with contextlib.suppress(OSError):
                    file.close()
        self._release()

    def __repr__(self) -> str:
        return f"CSVSink({str(self.path)!r}, every={self.every})"
