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

from hookscope.alerts import DEAD_RATIO_ALERT, SATURATION_ALERT, gradient_outliers

__all__ = ["PrintableTable", "build_param_table", "build_table", "make_console"]

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


def build_table(frame: pd.DataFrame, step: int | None = None, *, ascii: bool = False) -> Table:
    """A table with one row per layer for one step of a report frame.

    Args:
        frame: A frame from ``HookManager.to_dataframe()`` (or read back from its CSV).
        step: The step to show; ``None`` shows the latest.
        ascii: Plain ASCII borders and no colour (alerts are marked with ``!``).

    Highlighted (red, or ``!``): dead ratio >= 10% (judged on the units confirmed dead, as the alert does, when
    the frame has ``confirmed_dead_ratio``), saturation >= 50%, gradient norm more than three orders of
    magnitude below or above the median layer's, as in the default alert rules.

    Returns:
        A ``rich.table.Table``; print it with ``rich.print`` or ``Console.print``.
    """
    if step is None and len(frame):
        step = int(frame["step"].max())
    rows = frame[frame["step"] == step] if len(frame) else frame
    missing, dot = ("-", "-") if ascii else ("–", "·")
    title = "hookscope: no data recorded yet" if step is None else f"hookscope {dot} step {step}"
    table = PrintableTable(title=title, box=box.ASCII if ascii else box.SIMPLE_HEAVY, title_justify="left")
    table.add_column("layer", overflow="fold")
    table.add_column("kind", no_wrap=True)
    table.add_column("shape", justify="right", overflow="fold")
    for header in ("calls", "dead", "inactive", "saturated", "grad norm"):
        table.add_column(header, justify="right", no_wrap=True)
    grads = rows["grad_norm"].to_numpy(dtype=float) if len(rows) else np.zeros(0)
    vanishing, exploding = gradient_outliers(grads)
    for r, grad_alert in zip(rows.itertuples(index=False), vanishing | exploding):
        dead, sat, grad = _float(r.dead_ratio), _float(r.saturation_rate), _float(r.grad_norm)
        # marked as the default alert judges: on the units confirmed dead when the column is there
        judged = _float(getattr(r, "confirmed_dead_ratio", dead))
        table.add_row(
            Text(str(r.layer)),  # names are data, never rich markup: "[bold]x" or "[/]" shows as it is
            Text(str(r.kind)),
            Text(str(r.shape)),
            str(r.calls),
            _styled(_pct(dead, missing), not math.isnan(judged) and judged >= DEAD_RATIO_ALERT, ascii),
            _pct(_float(r.inactive_fraction), missing),
            _styled(_pct(sat, missing), not math.isnan(sat) and sat >= SATURATION_ALERT, ascii),
            _styled(_num(grad, missing), bool(grad_alert) or math.isinf(grad), ascii),
        )
    return table


def build_param_table(frame: pd.DataFrame, *, ascii: bool = False) -> Table:
    """A table of one step of ``HookManager.param_frame()``: one row per module (weight norm, weight-gradient
    norm, update ratio), gradient outliers and update ratios outside the alert range marked as the alerts do."""
    from hookscope.alerts import PARAM_GRADIENT_ORDERS, UPDATE_RATIO_RANGE

    missing, dot = ("-", "-") if ascii else ("–", "·")
    step = int(_float(frame["step"].max())) if len(frame) else None
    title = "hookscope parameters: no data recorded yet" if step is None else f"hookscope parameters {dot} step {step}"
    table = PrintableTable(title=title, box=box.ASCII if ascii else box.SIMPLE_HEAVY, title_justify="left")
    table.add_column("module", overflow="fold")
    table.add_column("kind", no_wrap=True)
    for header in ("params", "weight norm", "grad norm", "update ratio"):
        table.add_column(header, justify="right", no_wrap=True)
    grads = frame["grad_norm"].to_numpy(dtype=float) if len(frame) else np.zeros(0)
    low, high = gradient_outliers(grads, PARAM_GRADIENT_ORDERS)
    lo, hi = UPDATE_RATIO_RANGE
    for r, outlier in zip(frame.itertuples(index=False), low | high):
        ratio = _float(r.update_ratio)
        odd_ratio = not math.isnan(ratio) and _float(r.grad_norm) > 0 and not lo <= ratio <= hi
        table.add_row(
            Text(str(r.module)),
            Text(str(r.kind)),
            f"{int(_float(r.params)):,}",
            _num(_float(r.weight_norm), missing),
            _styled(_num(_float(r.grad_norm), missing), bool(outlier), ascii),
            _styled(_num(ratio, missing), odd_ratio, ascii),
        )
    return table
