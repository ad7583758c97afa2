"""Reading back a CSV that hookscope wrote, checked once, with messages that name the line, column and value.

``HookManager.to_csv``, ``CSVSink`` and ``hookscope scan --csv`` write the report frame: one header line, then one
line per (step, layer). Files that were edited, joined, cut short by a full disk or are not hookscope's at all are
refused here, before anything is drawn or printed, with an :class:`~hookscope.errors.InputError`.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pandas as pd

from hookscope.errors import InputError
from hookscope.report import ROW_COLUMNS, STAT_COLUMNS

__all__ = ["REQUIRED_COLUMNS", "read_stats"]

#: Columns a CSV must have, in any order (further columns, such as custom collectors', are kept).
REQUIRED_COLUMNS: tuple[str, ...] = (*ROW_COLUMNS, *STAT_COLUMNS)
_COUNTS = ("step", "units", "calls")  # integers >= 0, never empty
_NAMES = ("layer", "kind")  # text, never empty (`shape` may be)
_RATIOS = ("dead_ratio", "inactive_fraction", "saturation_rate")  # empty (NaN) or in [0, 1]
_MISSING_VALUES = ("", "nan")  # how NaN may be written (pandas writes an empty field)


def _line_error(path: str, line: int, problem: str) -> InputError:
    return InputError(f"{path} line {line}: {problem}")


def _decode(path: str, p: Path) -> str:
    data = p.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InputError(f"{path} is not a hookscope CSV: it is UTF-16 text (hookscope writes UTF-8)")
    if b"\0" in data:
        raise InputError(f"{path} is not a hookscope CSV: it holds binary data (NUL bytes)")
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (a spreadsheet's export) is accepted
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not a hookscope CSV: byte {e.start} is not UTF-8 text") from None


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


def _rows(path: str, text: str) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, rows and each row's line number; blank lines are skipped, fields are stripped."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        for raw in reader:
            fields = [f.strip() for f in raw]
            if not any(fields):
                continue
            if header is None:
                header = fields
                _check_header(path, header)
                step_at = header.index("step")
                continue
            if len(fields) != len(header):
                raise _line_error(
                    path,
                    reader.line_num,
                    f"{len(fields)} fields where the header has {len(header)} (a line cut short or edited by hand?)",
                )
            if fields[step_at] == "step":
                raise _line_error(path, reader.line_num, "the header line again (were two CSV files joined?)")
            rows.append(fields)
            lines.append(reader.line_num)
    except csv.Error as e:
        raise InputError(f"{path} is not a hookscope CSV: line {reader.line_num}: {e}") from None
    if header is None:
        raise InputError(f"{path} is empty: a hookscope CSV starts with the header {','.join(REQUIRED_COLUMNS)}")
    return header, rows, lines


def _refuse(path: str, column: str, raw: pd.Series, bad: np.ndarray, lines: np.ndarray, allowed: str) -> None:
    """Raise naming the first line where ``bad`` holds, if any."""
    where = np.flatnonzero(bad)
    if not len(where):
        return
    i = int(where[0])
    value = "empty" if raw.iloc[i] == "" else f"{raw.iloc[i]!r}"
    more = f" ({len(where) - 1} more lines like it)" if len(where) > 1 else ""
    raise _line_error(path, int(lines[i]), f"`{column}` is {value}; expected {allowed}{more}")


def _numbers(raw: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Values as float64 (NaN for missing ones) and where a field is neither a number nor missing."""
    missing = raw.str.lower().isin(_MISSING_VALUES).to_numpy()
    values = pd.to_numeric(raw.where(~missing, "nan"), errors="coerce").to_numpy(dtype=np.float64)
    return values, np.isnan(values) & ~missing


def _column(path: str, name: str, raw: pd.Series, lines: np.ndarray) -> object:
    if name in _NAMES:
        _refuse(path, name, raw, (raw == "").to_numpy(), lines, f"the {name} name")
        return raw
    if name == "shape":
        return raw
    values, invalid = _numbers(raw)
    if name in _COUNTS:
        with np.errstate(invalid="ignore"):
            bad = ~(np.isfinite(values) & (values >= 0) & (values <= 2**53) & (values == np.floor(values)))
        _refuse(path, name, raw, bad, lines, "an integer >= 0")
        return values.astype(np.int64)
    if name in _RATIOS:
        with np.errstate(invalid="ignore"):
            bad = invalid | (values < 0) | (values > 1)
        _refuse(path, name, raw, bad, lines, "a number from 0 to 1, or empty where it does not apply")
        return values
    if name == "grad_norm":
        with np.errstate(invalid="ignore"):
            bad = invalid | (values < 0)
        _refuse(path, name, raw, bad, lines, "a number >= 0 (inf allowed), or empty where it does not apply")
        return values
    return raw if invalid.any() else values  # a custom collector's column: numbers if it holds only numbers


def read_stats(path: str) -> pd.DataFrame:
    """A CSV written by hookscope (``to_csv``, ``CSVSink``, ``scan --csv``), read back and checked.

    The file must be UTF-8 text with a header naming each column once, among them every report column
    (:data:`REQUIRED_COLUMNS`), then one line per (step, layer) with as many fields as the header: ``step``,
    ``units`` and ``calls`` integers >= 0; ``layer`` and ``kind`` not empty; ratios empty (NaN) or in [0, 1];
    ``grad_norm`` empty or >= 0; no (step, layer) twice. Blank lines are skipped; spaces around fields and a
    byte-order mark are accepted.

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
    header, rows, line_list = _rows(path, _decode(path, p))
    raw = pd.DataFrame(rows, columns=header, dtype=object) if rows else pd.DataFrame({c: [] for c in header})
    lines = np.asarray(line_list, dtype=np.int64)
    frame = pd.DataFrame({name: _column(path, name, raw[name].astype(str), lines) for name in header})
    repeated = np.flatnonzero(frame.duplicated(["step", "layer"]).to_numpy())
    if len(repeated):
        i = int(repeated[0])
        step, layer = int(frame["step"].iloc[i]), frame["layer"].iloc[i]
        first = int(np.flatnonzero(((frame["step"] == step) & (frame["layer"] == layer)).to_numpy())[0])
        raise _line_error(
            path,
            int(lines[i]),
            f"step {step}, layer {layer!r} is also on line {lines[first]} (two runs in one file? a resumed "
            f"CSVSink continues the numbering with HookManager(start_step=...))",
        )
    return frame
