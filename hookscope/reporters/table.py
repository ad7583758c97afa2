"""The per-layer rich table."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
from rich import box
from rich.table import Table
from rich.text import Text

__all__ = ["DEAD_RATIO_ALERT", "SATURATION_ALERT", "build_table"]

#: Dead ratio at or above which a layer is highlighted (keras-contrib's DeadReluDetector threshold).
DEAD_RATIO_ALERT = 0.10
#: Saturation rate at or above which a layer is highlighted.
SATURATION_ALERT = 0.50


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

    Returns:
        A ``rich.table.Table``; print it with ``rich.print`` or ``Console.print``.
    """
    if step is None and len(frame):
        step = int(frame["step"].max())
    rows = frame[frame["step"] == step] if len(frame) else frame
    missing, dot = ("-", "-") if ascii else ("–", "·")
    title = "hookscope: no data recorded yet" if step is None else f"hookscope {dot} step {step}"
    table = Table(title=title, box=box.ASCII if ascii else box.SIMPLE_HEAVY)
    table.add_column("layer", no_wrap=True)
    table.add_column("kind")
    table.add_column("shape", justify="right")
    table.add_column("calls", justify="right")
    table.add_column("dead", justify="right")
    table.add_column("inactive", justify="right")
    table.add_column("saturated", justify="right")
    table.add_column("grad norm", justify="right")
    for r in rows.itertuples(index=False):
        dead, sat = _float(r.dead_ratio), _float(r.saturation_rate)
        table.add_row(
            str(r.layer),
            str(r.kind),
            str(r.shape),
            str(r.calls),
            _styled(_pct(dead, missing), not math.isnan(dead) and dead >= DEAD_RATIO_ALERT, ascii),
            _pct(_float(r.inactive_fraction), missing),
            _styled(_pct(sat, missing), not math.isnan(sat) and sat >= SATURATION_ALERT, ascii),
            _num(_float(r.grad_norm), missing),
        )
    return table
