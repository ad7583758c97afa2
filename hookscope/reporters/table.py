"""The per-layer rich table."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from hookscope.alerts import (
    DEAD_RATIO_ALERT,
    DORMANT_RATIO_ALERT,
    ENTROPY_COLLAPSE,
    SATURATION_ALERT,
    gradient_median,
    gradient_outliers,
)
from hookscope.checks import check_int

__all__ = ["MAX_ROWS", "PrintableTable", "build_param_table", "build_table", "make_console"]

#: Width used when output does not go to a terminal (files, pipes, CI logs), so that rows are not cut.
PIPE_WIDTH = 140


def make_console(ascii: bool = False, **kwargs: Any) -> Console:
    """A console for tables: the terminal's width, or :data:`PIPE_WIDTH` columns when not a terminal."""
    probe = Console(**kwargs)
    width = None if probe.is_terminal else max(PIPE_WIDTH, probe.width)
    return Console(width=width, no_color=ascii, highlight=False, emoji=False, **kwargs)


class PrintableTable(Table):
    """A ``rich.table.Table`` that ``print()`` and ``str()`` render as text (at the terminal's width, or
    :data:`PIPE_WIDTH` columns elsewhere), so that ``print(hm.table())`` shows the table rather than an object;
    ``rich.print`` and ``Console.print`` render it as any rich table."""

    def __str__(self) -> str:
        console = make_console(ascii=self.box is box.ASCII)
        with console.capture() as captured:
            console.print(self)
        return captured.get().rstrip("\n")


def _pct(value: float, missing: str) -> str:
    return missing if math.isnan(value) else f"{100.0 * value:.1f}%"


def _num(value: float, missing: str) -> str:
    return missing if math.isnan(value) else f"{value:.3g}"


def _float(value: Any) -> float:
    return float(value)


def _styled(text: str, alert: bool, ascii: bool) -> Text | str:
    if ascii:
        return text + (" !" if alert else "")
    return Text(text, style="bold red" if alert else "")


#: Rows a table shows at most by default; beyond it, the worst layers, worst first (see :func:`build_table`).
MAX_ROWS = 50


def _column(rows: pd.DataFrame, name: str) -> np.ndarray:
    return rows[name].to_numpy(dtype=np.float64) if name in rows.columns else np.full(len(rows), np.nan)


def _gradient_distance(grads: np.ndarray) -> np.ndarray:
    """Orders of magnitude between each gradient norm and the median layer's (inf for 0 or inf; 0 without one)."""
    median = gradient_median(grads)
    if math.isnan(median):
        return np.zeros(len(grads))
    with np.errstate(divide="ignore", invalid="ignore"):
        distance = np.abs(np.log10(grads) - math.log10(median))
    return np.where(np.isnan(grads), 0.0, np.where(np.isnan(distance), np.inf, distance))


def _shown(flagged: np.ndarray, keys: list[np.ndarray], max_rows: int | None) -> np.ndarray:
    """Positions of the rows to show: all in order when they fit in ``max_rows``, else the ``max_rows`` worst,
    worst first (marked rows, then ``keys`` descending, in order; ties keep the forward order)."""
    check_int("max_rows", max_rows, minimum=1, optional=True, meaning="None shows every row")
    n = len(flagged)
    if max_rows is None or n <= max_rows:
        return np.arange(n)
    order = np.lexsort([np.arange(n), *(-np.nan_to_num(k, nan=-np.inf) for k in reversed(keys)), ~flagged])
    return order[:max_rows]


def _caption(shown: int, total: int, what: str) -> str | None:
    if shown == total:
        return None
    more = total - shown
    return f"... {more:,} more {what}{'s' if more != 1 else ''} (the {shown} worst of {total:,} are shown, worst first)"


def build_table(
    frame: pd.DataFrame, step: int | None = None, *, ascii: bool = False, max_rows: int | None = MAX_ROWS
) -> Table:
    """A table with one row per layer for one step of a report frame.

    Args:
        frame: A frame from ``HookManager.to_dataframe()`` (or read back from its CSV).
        step: The step to show; ``None`` shows the latest.
        ascii: Plain ASCII borders and no colour (alerts are marked with ``!``).
        max_rows: At most this many layers (``None``: all). A step with more layers shows the ``max_rows``
            worst, worst first, and a caption says how many more there are: first the layers that a mark below
            highlights, then by the higher of the judged dead ratio and the saturation rate, then by how many
            orders of magnitude the gradient norm is from the median layer's; ties keep the forward order. A
            step that fits shows every layer in forward order.

    Highlighted (red, or ``!``): dead ratio >= 10% (judged on the units confirmed dead, as the alert does, when
    the frame has ``confirmed_dead_ratio``), saturation >= 50%, gradient norm more than three orders of
    magnitude below or above the median layer's, as in the default alert rules. Names are shown as they are,
    never read as rich markup.

    When the step has ``Magnitude`` values (module sites), four more columns show them: ``rms``, ``abs max``,
    ``kurt`` (the kurtosis) and ``massive/dormant`` (the massive units and the dormant share in one cell;
    dormant >= 10% highlighted); with ``Entropy`` values, ``entropy`` (the site's, and the lowest head's after
    a slash, highlighted below 0.1 nats). Columns without a value in the step are left out of that group.

    Returns:
        A ``rich.table.Table``; print it with ``rich.print`` or ``Console.print``.
    """
    if step is None and len(frame):
        step = int(frame["step"].max())
    rows = frame[frame["step"] == step] if len(frame) else frame
    missing, dot = ("-", "-") if ascii else ("–", "·")
    title = "hookscope: no data recorded yet" if step is None else f"hookscope {dot} step {step}"
    dead, sat, grads = _column(rows, "dead_ratio"), _column(rows, "saturation_rate"), _column(rows, "grad_norm")
    # marked as the default alert judges: on the units confirmed dead when the column is there
    judged = _column(rows, "confirmed_dead_ratio") if "confirmed_dead_ratio" in rows.columns else dead
    vanishing, exploding = gradient_outliers(grads)
    with np.errstate(invalid="ignore"):
        dead_mark, sat_mark = judged >= DEAD_RATIO_ALERT, sat >= SATURATION_ALERT
    grad_mark = vanishing | exploding | np.isinf(grads)
    keys = [np.fmax(judged, sat), _gradient_distance(grads)]
    shown = _shown(dead_mark | sat_mark | grad_mark, keys, max_rows)
    table = PrintableTable(
        title=title, caption=_caption(len(shown), len(rows), "layer"), box=box.ASCII if ascii else box.SIMPLE_HEAVY,
        title_justify="left", caption_justify="left",
    )  # fmt: skip
    table.add_column("layer", overflow="fold")
    table.add_column("kind", no_wrap=True)
    table.add_column("shape", justify="right", overflow="fold")
    for header in ("calls", "dead", "inactive", "saturated", "grad norm"):
        table.add_column(header, justify="right", no_wrap=True)
    magnitude = _has_values(rows, "rms")
    entropy = _has_values(rows, "entropy")
    for header in ("rms", "abs max", "kurt", "massive/dormant") if magnitude else ():
        table.add_column(header, justify="right", no_wrap=True)
    if entropy:
        table.add_column("entropy", justify="right", no_wrap=True)
    picked = rows.iloc[shown]
    inactive = _column(picked, "inactive_fraction")
    for k, (i, r) in enumerate(zip(shown, picked.itertuples(index=False))):
        cells: list[Text | str] = [
            Text(str(r.layer)),  # names are data, never rich markup: "[bold]x" or "[/]" shows as it is
            Text(str(r.kind)),
            Text(str(r.shape)),
            str(r.calls),
            _styled(_pct(float(dead[i]), missing), bool(dead_mark[i]), ascii),
            _pct(float(inactive[k]), missing),
            _styled(_pct(float(sat[i]), missing), bool(sat_mark[i]), ascii),
            _styled(_num(float(grads[i]), missing), bool(grad_mark[i]), ascii),
        ]
        if magnitude:
            cells.extend(_magnitude_cells(r, missing, ascii))
        if entropy:
            low = _float(getattr(r, "entropy_min", math.nan))
            text = _num(_float(r.entropy), missing) + ("" if math.isnan(low) else f"/{low:.3g}")
            cells.append(_styled(text, low < ENTROPY_COLLAPSE, ascii))
        table.add_row(*cells)
    return table


def _has_values(rows: pd.DataFrame, column: str) -> bool:
    return column in rows.columns and bool(rows[column].notna().any())


def _magnitude_cells(r: Any, missing: str, ascii: bool) -> list[Text | str]:
    """``rms``, ``abs max``, ``kurt`` and ``massive/dormant`` cells of a row (``Magnitude``'s columns)."""
    massive, dormant = _float(r.massive_units), _float(r.dormant_ratio)
    both = missing if math.isnan(massive) else f"{int(massive)}/{_pct(dormant, missing)}"
    return [
        _num(_float(r.rms), missing),
        _num(_float(r.abs_max), missing),
        _num(_float(r.kurtosis), missing),
        _styled(both, not math.isnan(dormant) and dormant >= DORMANT_RATIO_ALERT, ascii),
    ]


def build_param_table(frame: pd.DataFrame, *, ascii: bool = False, max_rows: int | None = MAX_ROWS) -> Table:
    """A table of one step of ``HookManager.param_frame()``: one row per module (weight norm, weight-gradient
    norm, update ratio), gradient outliers and update ratios outside the alert range marked as the alerts do.
    With more than ``max_rows`` modules (``None``: no limit), the ``max_rows`` worst are shown, worst first
    (marked modules, then by how far the gradient norm is from the median module's) and a caption says how many
    more there are."""
    from hookscope.alerts import PARAM_GRADIENT_ORDERS, UPDATE_RATIO_RANGE

    missing, dot = ("-", "-") if ascii else ("–", "·")
    step = int(_float(frame["step"].max())) if len(frame) else None
    title = "hookscope parameters: no data recorded yet" if step is None else f"hookscope parameters {dot} step {step}"
    grads, ratios = _column(frame, "grad_norm"), _column(frame, "update_ratio")
    low, high = gradient_outliers(grads, PARAM_GRADIENT_ORDERS)
    lo, hi = UPDATE_RATIO_RANGE
    with np.errstate(invalid="ignore"):
        odd_ratio = ~np.isnan(ratios) & (grads > 0) & ~((lo <= ratios) & (ratios <= hi))
    shown = _shown(low | high | odd_ratio, [_gradient_distance(grads)], max_rows)
    table = PrintableTable(
        title=title, caption=_caption(len(shown), len(frame), "module"), box=box.ASCII if ascii else box.SIMPLE_HEAVY,
        title_justify="left", caption_justify="left",
    )  # fmt: skip
    table.add_column("module", overflow="fold")
    table.add_column("kind", no_wrap=True)
    for header in ("params", "weight norm", "grad norm", "update ratio"):
        table.add_column(header, justify="right", no_wrap=True)
    for i, r in zip(shown, frame.iloc[shown].itertuples(index=False)):
        table.add_row(
            Text(str(r.module)),
            Text(str(r.kind)),
            f"{int(_float(r.params)):,}",
            _num(_float(r.weight_norm), missing),
            _styled(_num(float(grads[i]), missing), bool(low[i] | high[i]), ascii),
            _styled(_num(float(ratios[i]), missing), bool(odd_ratio[i]), ascii),
        )
    return table
