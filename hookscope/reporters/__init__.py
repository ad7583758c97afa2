"""Presentation of reports: rich tables and files. Builders return objects; callers decide where they go."""

from __future__ import annotations

from hookscope.reporters.csv import write_csv
from hookscope.reporters.table import build_table, make_console

__all__ = ["build_table", "make_console", "write_csv"]
