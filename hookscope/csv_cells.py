"""CSV cells that a spreadsheet never runs as formulas, and that read back to exactly what was written.

Layer and module names are data from the user's model, and a CSV is opened in spreadsheets: a cell that starts
with ``=``, ``+``, ``-`` or ``@`` (or a tab, a carriage return, a newline) is run as a formula by Excel, LibreOffice
and Google Sheets (CSV injection). Following OWASP's guidance, such a text cell is written with a ``'`` before it,
which spreadsheets take as "text" and do not show. So that every name reads back exactly, the rule is one-to-one:

- written: a text cell gets one ``'`` in front when it starts with one of :data:`FORMULA_STARTS`, with ``'``
  itself (a name that starts with a quote keeps it), or starts or ends with white space (which readers strip);
- read: a field that starts with ``'`` (after any spaces) loses that one ``'`` and is otherwise taken as it is;
  any other field loses the spaces around it.

Numbers are never prefixed (``-0.5`` is a number, not a formula), nor are column headers that are plain names.
"""

from __future__ import annotations

import pandas as pd

__all__ = ["FORMULA_STARTS", "QUOTE", "neutralise", "restore", "safe_for_spreadsheets"]

#: First characters that make a spreadsheet read a cell as a formula (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n")
#: The prefix that makes a spreadsheet read a cell as text.
QUOTE = "'"


def neutralise(cell: str) -> str:
    """``cell`` as written to a CSV: with :data:`QUOTE` in front when a spreadsheet would run it as a formula, when
    it starts with :data:`QUOTE`, or when it starts or ends with white space; unchanged otherwise."""
    if cell and (cell.startswith((*FORMULA_STARTS, QUOTE)) or cell[0].isspace() or cell[-1].isspace()):
        return QUOTE + cell
    return cell


def restore(field: str) -> str:
    """The cell that :func:`neutralise` wrote as ``field`` (as a CSV parser returns it); spaces around a field
    without the prefix (a file edited by hand) are dropped."""
    text = field.lstrip()
    return text[len(QUOTE) :] if text.startswith(QUOTE) else text.rstrip()


def _neutralise_any(value: object) -> object:
    return neutralise(value) if isinstance(value, str) else value


def safe_for_spreadsheets(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with every text cell and column name passed through :func:`neutralise` (a new frame when
    anything changes; numbers untouched). Each distinct value is looked at once."""
    changed: dict[object, pd.Series] = {}
    for name in frame.columns:
        column: pd.Series = frame[name]
        if pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
            continue
        codes, uniques = pd.factorize(column, use_na_sentinel=True)
        safe = [_neutralise_any(u) for u in uniques]
        if any(a is not b for a, b in zip(safe, uniques)):
            cells = pd.Series(safe, dtype=object).to_numpy()[codes]
            cells[codes < 0] = None
            changed[name] = pd.Series(cells, index=frame.index, dtype=object)
    names = [_neutralise_any(c) for c in frame.columns]
    if not changed and names == list(frame.columns):
        return frame
    out = frame.copy(deep=False)
    for key, series in changed.items():
        out[key] = series
    out.columns = pd.Index(names)
    return out
