"""Rows → pandas DataFrame, and the one list of column names that everything else uses.

Pure data: nothing here renders, prints or touches the device. The CLI, the table, the plots and the logging
integrations take their column names from :data:`ROW_COLUMNS` and :data:`STAT_COLUMNS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from hookscope.checks import describe
from hookscope.collectors.base import check_computed
from hookscope.errors import ConfigError, ConfigTypeError
from hookscope.history import FieldLayout, Rows

if TYPE_CHECKING:
    from hookscope.collectors.base import Collector
    from hookscope.sites import Site

__all__ = [
    "EVIDENCE_COLUMNS",
    "ROW_COLUMNS",
    "STAT_COLUMNS",
    "build_frame",
    "check_stat_names",
    "report_columns",
    "scalars",
    "stat_names",
]

#: Columns describing the row, in order.
ROW_COLUMNS: tuple[str, ...] = ("step", "layer", "kind", "shape", "units", "calls")
#: Columns of the built-in collectors, always present (NaN when the collector is not attached), in order.
STAT_COLUMNS: tuple[str, ...] = ("dead_ratio", "inactive_fraction", "saturation_rate", "grad_norm")
#: Further built-in columns, always present after :data:`STAT_COLUMNS` (``DeadReLU``'s dead units judged on
#: enough evidence, which the default dead-unit alert uses); custom collectors' columns follow them.
EVIDENCE_COLUMNS: tuple[str, ...] = ("confirmed_dead_ratio",)


def report_columns(collectors: Sequence[Collector]) -> tuple[str, ...]:
    """The columns of a report frame: the row columns, the built-in statistics, then custom collectors' columns."""
    builtin = (*STAT_COLUMNS, *EVIDENCE_COLUMNS)
    extra = [col for c in collectors for col in c.columns if col not in builtin]
    return (*ROW_COLUMNS, *builtin, *extra)


def scalars(
    frame: pd.DataFrame, stats: Sequence[str] = STAT_COLUMNS, *, key: str = "layer", prefix: str = "hookscope"
) -> list[tuple[str, int, float]]:
    """``(tag, step, value)`` for each finite statistic of each row, tagged ``{prefix}/{row[key]}/{stat}``: the
    names that the logging integrations use (``hookscope/{layer}/{stat}``; for ``param_frame()`` rows,
    ``key="module", prefix="hookscope/params"``)."""
    out = []
    for stat in stats:
        if stat not in frame.columns:
            continue
        values = frame[stat].to_numpy(dtype=np.float64)
        for name, step, value in zip(frame[key], frame["step"], values):
            if not np.isnan(value):
                out.append((f"{prefix}/{name}/{stat}", int(step), float(value)))
    return out


def build_frame(
    rows: Rows,
    sites: Sequence[Site],
    collectors: Sequence[Collector],
    layout: FieldLayout,
    applies: Sequence[Sequence[bool]],
) -> pd.DataFrame:
    """A report frame: one row per (step, site) with the manager's columns, computed on the host.

    ``applies[i][c]`` tells whether collector ``c`` records site ``i`` (its columns are NaN where it does not).
    """
    columns = report_columns(collectors)
    idx = rows.site
    out: dict[str, object] = {
        "step": rows.step.astype(np.int64),
        "layer": [sites[i].layer for i in idx],
        "kind": [sites[i].kind for i in idx],
        "shape": rows.shape,
        "units": rows.units.astype(np.int64),
        "calls": rows.calls.astype(np.int64),
    }
    for col in columns[len(ROW_COLUMNS) :]:
        out[col] = np.full(len(idx), np.nan)
    if len(idx):
        applies_arr = np.asarray(applies, dtype=bool).reshape(len(sites), len(collectors))[idx]
        base = {"calls": rows.calls, "elements": rows.elements, "backward": rows.backward, "units": rows.units}
        for ci, collector in enumerate(collectors):
            record = dict(base)
            for name, k in layout.collector_columns(ci).items():
                record[name] = rows.values[:, k]
            computed = collector.compute(record)
            check_computed(collector, computed)
            mask = applies_arr[:, ci]
            for col in collector.columns:
                out[col] = np.where(mask, np.asarray(computed[col], dtype=np.float64), np.nan)
    # step, units and calls are int64 arrays already: an astype() here cost 70% of building the frame
    return pd.DataFrame(out, columns=list(columns))


def stat_names(stats: object) -> tuple[str, ...]:
    """``stats`` as a tuple of column names: one name, or a sequence of names (duplicates dropped)."""
    if isinstance(stats, str):
        return (stats,)
    allowed = "a statistic column name or a sequence of them (e.g. ('dead_ratio', 'grad_norm'))"
    if isinstance(stats, bytes) or not isinstance(stats, Sequence):
        raise ConfigTypeError(f"`stats` must be {allowed}, got {describe(stats)}")
    names = list(stats)
    for name in names:
        if not isinstance(name, str):
            raise ConfigTypeError(f"`stats` must be {allowed}, got {describe(name)} in {describe(stats)}")
    return tuple(dict.fromkeys(names))


def check_stat_names(stats: tuple[str, ...], allowed: tuple[str, ...], *, final: bool) -> None:
    """Raise for a name of ``stats`` not in ``allowed``; before binding (``final=False``) the names that a custom
    collector may still provide pass."""
    unknown = [s for s in stats if s not in allowed and (final or s in ROW_COLUMNS)]
    if unknown:
        where = "this manager's statistic columns" if final else "statistic columns"
        raise ConfigError(
            f"`stats` must name statistic columns, got {describe(unknown[0])} in {describe(stats)}; "
            f"{where}: {', '.join(allowed)}"
        )
