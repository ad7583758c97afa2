"""Presentation of reports: rich tables and files. Builders return objects; callers decide where they go.

The table builders load rich on first use, so that the sinks (``hookscope.reporters.csv``, ``.callback``) can be
imported, with ``import hookscope``, without any presentation library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hookscope.reporters.csv import write_csv

if TYPE_CHECKING:
    from hookscope.reporters.table import build_table, make_console

__all__ = ["build_table", "make_console", "write_csv"]


def __getattr__(name: str) -> Any:
    if name in ("build_table", "make_console"):
        from hookscope.reporters import table

        return getattr(table, name)
    raise AttributeError(f"module 'hookscope.reporters' has no attribute {name!r}")
