"""Reading back a CSV that hookscope wrote, checked once, with messages that name the line, column and value.

``HookManager.to_csv``, ``CSVSink`` and ``hookscope scan --csv`` write the report frame: one header line, then one
line per (step, layer). Files that were edited, joined, cut short by a full disk or are not hookscope's at all are
refused here, before anything is drawn or printed, with an :class:`~hookscope.errors.InputError`.

The file is never held in memory whole. Its first :data:`HEAD_BYTES` are sniffed: binary data, UTF-16, bytes that
are not UTF-8 or a first line without hookscope's columns are refused without reading further, whatever the size
of the file. The rows are then parsed :data:`CHUNK_ROWS` at a time by the ``csv`` module (whose records and line
numbers the messages use), numbers going straight into float64 arrays and names into codes of their distinct
values, so that the peak memory stays close to the frame's own size (within ~1.3x of ``pandas.read_csv`` on the
same file; ``benchmarks/read_memory.py`` measures it).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hookscope.csv_cells import restore
from hookscope.errors import InputError
from hookscope.report import ROW_COLUMNS, STAT_COLUMNS

__all__ = ["REQUIRED_COLUMNS", "read_stats"]

#: Columns a CSV must have, in any order (further columns, such as custom collectors', are kept).
REQUIRED_COLUMNS: tuple[str, ...] = (*ROW_COLUMNS, *STAT_COLUMNS)
_COUNTS = ("step", "units", "calls")  # integers >= 0, never empty
_NAMES = ("layer", "kind")  # text, never empty (`shape` may be)
_RATIOS = ("dead_ratio", "inactive_fraction", "saturation_rate")  # empty (NaN) or in [0, 1]
_MISSING_VALUES = ("", "nan")  # how NaN may be written (pandas writes an empty field)


#: Bytes read from the start of a file to find its header; a file that is not text or has no hookscope header
#: there is refused without reading further.
HEAD_BYTES = 1 << 16
#: Rows parsed at a time: memory holds the columns read so far (as numbers, or codes of distinct names) and the
#: text of one chunk.
CHUNK_ROWS = 8192
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_UTF8_BOM = b"\xef\xbb\xbf"


def _line_error(path: str, line: int, problem: str) -> InputError:
    return InputError(f"{path} line {line}: {problem}")


def _not_utf8(path: str, offset: int) -> InputError:
    return InputError(f"{path} is not a hookscope CSV: byte {offset} is not UTF-8 text")


def _first_bad_utf8(f: io.BufferedIOBase) -> int:
    """Offset of the first byte of ``f`` that is not UTF-8, read a block at a time (called only when decoding
    failed)."""
    f.seek(0)
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    while True:
        block = f.read(1 << 20)
        pending = len(decoder.getstate()[0])  # the start of a character cut by the previous block
        try:
            decoder.decode(block, final=not block)
        except UnicodeDecodeError as e:
            return offset - pending + e.start
        if not block:
            return offset
        offset += len(block)


def _check_header(path: str, names: list[str]) -> None:
    if "" in names:
        raise InputError(f"{path} line 1: column {names.index('') + 1} of the header has no name")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"{path} line 1: column {', '.join(repeated)} appears more than once in the header")
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        sep = next((s for s in (";", "\t", "|") if s in names[0]), None)
        hint = f" (its header is separated by {sep!r}; hookscope writes commas)" if sep else ""
        raise InputError(f"{path} is not a hookscope CSV: missing columns {', '.join(missing)}{hint}")


def _sniff(path: str, head: bytes, whole: bool) -> tuple[list[str], int]:
    """The header, checked, and how many records precede the first data record, from the first bytes alone.

    Binary data, UTF-16, bytes that are not UTF-8 and a first line without hookscope's columns are refused here,
    whatever the size of the file. ``whole`` tells that ``head`` is the whole file.
    """
    if head.startswith(_UTF16_BOMS):
        raise InputError(f"{path} is not a hookscope CSV: it is UTF-16 text (hookscope writes UTF-8)")
    if b"\0" in head:
        raise InputError(f"{path} is not a hookscope CSV: it holds binary data (NUL bytes)")
    bom = len(_UTF8_BOM) if head.startswith(_UTF8_BOM) else 0
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head[bom:], final=whole)
    except UnicodeDecodeError as e:
        raise _not_utf8(path, bom + e.start) from None
    if not whole:  # the part of a line that the head cuts is read with the rest
        text = text[: text.rfind("\n") + 1]
        if not text.strip():
            raise InputError(
                f"{path} is not a hookscope CSV: its first {HEAD_BYTES} bytes hold no complete header line "
                f"(expected {','.join(REQUIRED_COLUMNS)})"
            )
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for before, raw in enumerate(reader):
            names = [restore(f) for f in raw]
            if any(names) and not names[0].lstrip().startswith("#"):  # comment lines (a FlightRecorder dump)
                _check_header(path, names)
                return names, before + 1
    except csv.Error as e:
        raise InputError(f"{path} is not a hookscope CSV: line {reader.line_num}: {e}") from None
    raise InputError(f"{path} is empty: a hookscope CSV starts with the header {','.join(REQUIRED_COLUMNS)}")


class _NoNul(io.RawIOBase):
    """A binary file read through, refusing NUL bytes (binary data after a text head) as they are read."""

    def __init__(self, path: str, f: io.BufferedIOBase) -> None:
        super().__init__()
        self._path, self._f = path, f

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._f.readinto(buffer)
        if n and memoryview(buffer)[:n].tobytes().find(b"\0") >= 0:
            raise InputError(f"{self._path} is not a hookscope CSV: it holds binary data (NUL bytes)")
        return n or 0


def _chunks(
    path: str, f: io.BufferedIOBase, header: list[str], skip: int
) -> Iterator[tuple[list[tuple[str, ...]], array[int]]]:
    """The data records of the file in chunks of :data:`CHUNK_ROWS`, as columns of raw fields, with the line on
    which each record ends; blank records are skipped, a record with another number of fields or a repeated
    header is refused (the message names its line)."""
    f.seek(0)
    text = io.TextIOWrapper(io.BufferedReader(_NoNul(path, f)), encoding="utf-8-sig", newline="")
    reader = csv.reader(text)
    n, step_at = len(header), header.index("step")
    rows: list[list[str]] = []
    lines = array("q")
    try:
        for raw in reader:
            if skip:
                skip -= 1
                continue
            if len(raw) != n or raw[step_at].strip() in ("", "step"):  # rare: look closer
                if not any(field.strip() for field in raw):
                    continue
                if len(raw) != n:
                    raise _line_error(
                        path,
                        reader.line_num,
                        f"{len(raw)} fields where the header has {n} (a line cut short or edited by hand?)",
                    )
                if raw[step_at].strip() == "step":
                    raise _line_error(path, reader.line_num, "the header line again (were two CSV files joined?)")
            rows.append(raw)
            lines.append(reader.line_num)
            if len(rows) == CHUNK_ROWS:
                yield list(zip(*rows)), lines
                rows, lines = [], array("q")
    except csv.Error as e:
        raise InputError(f"{path} is not a hookscope CSV: line {reader.line_num}: {e}") from None
    except UnicodeDecodeError:
        raise _not_utf8(path, _first_bad_utf8(f)) from None
    finally:
        with contextlib.suppress(ValueError):
            text.detach().detach()  # the file stays open for the caller (a second pass reads it again)
    if rows:
        yield list(zip(*rows)), lines


class _Problem:
    """The first offending row of a column (its index among the data rows, the field) and how many there are."""

    def __init__(self) -> None:
        self.first: tuple[int, str] | None = None
        self.count = 0

    def add(self, bad: np.ndarray, raw: tuple[str, ...], offset: int) -> None:
        where = np.flatnonzero(bad)
        if len(where):
            if self.first is None:
                self.first = (offset + int(where[0]), raw[int(where[0])].strip())
            self.count += len(where)


class _Column:
    """One column read a chunk at a time: numbers as float64 blocks, names as codes of distinct values."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.text = name in _NAMES or name == "shape"
        self.blocks: list[np.ndarray] = []
        self.distinct: dict[str, int] = {}  # raw field -> code (text columns)
        self.problem = _Problem()  # fields refused by the column's rule
        self.not_numbers = False  # a custom column with a field that is neither a number nor missing

    def add(self, raw: tuple[str, ...], offset: int) -> None:
        if self.text:
            fields = np.asarray(raw, dtype=object)
            codes, uniques = pd.factorize(fields)
            known = np.array([self.distinct.setdefault(u, len(self.distinct)) for u in uniques], dtype=np.int64)
            self.blocks.append(known[codes] if len(codes) else np.zeros(0, np.int64))
            if self.name in _NAMES:
                empty = np.array([restore(u) == "" for u in uniques], dtype=bool)
                self.problem.add(empty[codes], raw, offset)
            return
        values, invalid = _numbers(raw)
        self.blocks.append(values)
        if self.name in _COUNTS:
            with np.errstate(invalid="ignore"):
                bad = ~(np.isfinite(values) & (values >= 0) & (values <= 2**53) & (values == np.floor(values)))
        elif self.name in _RATIOS:
            with np.errstate(invalid="ignore"):
                bad = invalid | (values < 0) | (values > 1)
        elif self.name == "grad_norm":
            with np.errstate(invalid="ignore"):
                bad = invalid | (values < 0)
        else:
            self.not_numbers |= bool(invalid.any())
            return
        self.problem.add(bad, raw, offset)

    def allowed(self) -> str:
        if self.name in _NAMES:
            return f"the {self.name} name"
        if self.name in _COUNTS:
            return "an integer >= 0"
        if self.name in _RATIOS:
            return "a number from 0 to 1, or empty where it does not apply"
        return "a number >= 0 (inf allowed), or empty where it does not apply"

    def _names(self) -> tuple[np.ndarray, np.ndarray]:
        """A text column's distinct values (cleaned) and each row's index into them."""
        names = np.empty(len(self.distinct), dtype=object)
        names[:] = [restore(raw) for raw in self.distinct]
        return names, np.concatenate(self.blocks) if self.blocks else np.zeros(0, np.int64)

    def codes(self) -> np.ndarray:
        """A text column as codes: rows with equal values (once cleaned) have equal codes."""
        names, rows = self._names()
        return pd.factorize(names)[0][rows] if len(names) else rows

    def values(self) -> object:
        if self.text:
            names, rows = self._names()
            return pd.array(names[rows], dtype="str")
        joined = np.concatenate(self.blocks) if self.blocks else np.zeros(0)
        return joined.astype(np.int64) if self.name in _COUNTS else joined


def _numbers(raw: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Values as float64 (NaN for missing ones) and where a field is neither a number nor missing ("", "nan")."""
    fields = np.asarray(raw, dtype=object)
    values = np.asarray(pd.to_numeric(fields, errors="coerce"), dtype=np.float64)
    invalid = np.isnan(values)
    invalid[invalid] = fields[invalid] != ""  # most missing values are written as empty fields
    if invalid.any():
        odd = np.flatnonzero(invalid)
        invalid[odd] = [f.strip().lower() not in _MISSING_VALUES for f in fields[odd]]
    return values, invalid


def read_stats(path: str) -> pd.DataFrame:
    """A CSV written by hookscope (``to_csv``, ``CSVSink``, ``scan --csv``), read back and checked.

    The file must be UTF-8 text with a header naming each column once, among them every report column
    (:data:`REQUIRED_COLUMNS`), then one line per (step, layer) with as many fields as the header: ``step``,
    ``units`` and ``calls`` integers >= 0; ``layer`` and ``kind`` not empty; ratios empty (NaN) or in [0, 1];
    ``grad_norm`` empty or >= 0; no (step, layer) twice. Blank lines are skipped; spaces around fields and a
    byte-order mark are accepted. A text field that starts with ``'`` loses that one quote and keeps its spaces
    (:func:`hookscope.csv_cells.restore`: hookscope writes names that a spreadsheet would run as formulas that
    way), so names read back exactly as they were written. The file is read a chunk of rows at a time (see the
    module's docstring).

    Args:
        path: The CSV file.

    Returns:
        The report frame: ``step``, ``units``, ``calls`` as int64, statistics as float64, names as text.

    Raises:
        InputError: The file is missing, a directory, empty, binary or malformed; the message names the line,
            the column, the value and what is allowed.
        OSError: The file cannot be read (permissions).

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "stats.csv")
        >>> header = "step,layer,kind,shape,units,calls,dead_ratio,inactive_fraction,saturation_rate,grad_norm"
        >>> _ = open(path, "w").write(header + "\\n0,act,relu,8x4,4,1,0.25,0.5,,0.1\\n0,act,relu,8x4,4,1,,,,\\n")
        >>> read_stats(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        hookscope.errors.InputError: ...line 3: step 0, layer 'act' is also on line 2 (two runs in one file? ...
    """
    p = Path(path)
    if not path:
        raise InputError("`STATS.csv` is empty: give the path of a CSV written by hookscope")
    if p.is_dir():
        raise InputError(f"{path} is a directory, not a CSV file")
    if not p.exists():
        raise InputError(f"no such file: {path}")
    if not p.is_file():
        raise InputError(f"{path} is not a regular file")
    with open(p, "rb") as f:
        head = f.read(HEAD_BYTES)
        header, skip = _sniff(path, head, whole=len(head) < HEAD_BYTES or not f.read(1))
        columns = [_Column(name) for name in header]
        lines = array("q")
        for raw, chunk_lines in _chunks(path, f, header, skip):
            for column, fields in zip(columns, raw):
                column.add(fields, len(lines))
            lines.extend(chunk_lines)
        line_of = np.frombuffer(lines, dtype=np.int64) if len(lines) else np.zeros(0, np.int64)
        for column in columns:
            if column.problem.first is not None:
                i, raw_value = column.problem.first
                value = "empty" if raw_value == "" else repr(raw_value)
                more = column.problem.count - 1
                raise _line_error(
                    path,
                    int(line_of[i]),
                    f"`{column.name}` is {value}; expected {column.allowed()}"
                    + (f" ({more} more lines like it)" if more else ""),
                )
        text_columns = [k for k, c in enumerate(columns) if c.not_numbers]
        if text_columns:  # custom columns that are not numbers: their text, read again (a rare second pass)
            for k in text_columns:
                columns[k].text, columns[k].blocks = True, []
            offset = 0
            for raw, chunk_lines in _chunks(path, f, header, skip):
                for k in text_columns:
                    columns[k].add(raw[k], offset)
                offset += len(chunk_lines)
    frame = pd.DataFrame({c.name: c.values() for c in columns}, columns=header)
    _refuse_repeats(path, frame, columns[header.index("layer")], line_of)
    return frame


def _refuse_repeats(path: str, frame: pd.DataFrame, layer: _Column, line_of: np.ndarray) -> None:
    """Raise for a (step, layer) that appears twice, naming both lines."""
    keys = pd.DataFrame({"step": frame["step"].to_numpy(), "layer": layer.codes()})
    repeated = np.flatnonzero(keys.duplicated().to_numpy())
    if len(repeated):
        i = int(repeated[0])
        same = (keys["step"] == keys["step"].iloc[i]) & (keys["layer"] == keys["layer"].iloc[i])
        first = int(np.flatnonzero(same.to_numpy())[0])
        raise _line_error(
            path,
            int(line_of[i]),
            f"step {int(frame['step'].iloc[i])}, layer {frame['layer'].iloc[i]!r} is also on line {line_of[first]} "
            "(two runs in one file? a resumed CSVSink continues the numbering with HookManager(start_step=...))",
        )
