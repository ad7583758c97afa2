"""PNG plots of a report frame: layer × step heat maps and per-layer lines (matplotlib, optional extra)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd

from hookscope.errors import ConfigError
from hookscope.files import PathLike, atomic_path
from hookscope.report import STAT_COLUMNS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["METRICS", "plot_heatmap", "plot_lines", "save_figure"]

#: Plottable metrics (the statistic columns), with their titles; ``grad_norm`` is drawn on a log scale.
_TITLES = {"grad_norm": "gradient norm (log scale)"}
METRICS = {column: _TITLES.get(column, column.replace("_", " ")) for column in STAT_COLUMNS}


def _matplotlib() -> Any:
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "plots need matplotlib: pip install 'hookscope[plots]' (or pip install matplotlib)"
        ) from e
    return Figure


def _check(frame: pd.DataFrame, metric: str) -> None:
    if metric not in frame.columns:
        allowed = ", ".join(c for c in METRICS if c in frame.columns) or ", ".join(METRICS)
        raise ConfigError(f"`metric` {metric!r} is not a column of the report; choose one of: {allowed}")
    if frame.empty:
        raise ConfigError("the report is empty: nothing to plot (record at least one step)")
    if not frame[metric].notna().any():
        raise ConfigError(
            f"`metric` {metric!r} has no values in this report: it does not apply to these layers "
            f"({', '.join(sorted(set(map(str, frame['kind']))))}) or its collector was not attached"
        )


def _matrix(frame: pd.DataFrame, metric: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    layers = list(dict.fromkeys(frame["layer"]))  # first-seen (forward) order
    steps = np.sort(frame["step"].unique())
    pivot = frame.pivot_table(index="layer", columns="step", values=metric, aggfunc="last", dropna=False)
    return pivot.reindex(index=layers, columns=steps).to_numpy(dtype=float), layers, steps


def plot_heatmap(frame: pd.DataFrame, metric: str = "dead_ratio", title: str | None = None) -> Figure:
    """A layer × step heat map of one metric (log colour scale for ``grad_norm``)."""
    figure_cls = _matplotlib()
    from matplotlib.colors import LogNorm, Normalize

    _check(frame, metric)
    data, layers, steps = _matrix(frame, metric)
    log = metric == "grad_norm"
    if log:
        data = np.where(data > 0, data, np.nan)
    finite = data[np.isfinite(data)]
    norm: Normalize
    if log and len(finite):
        norm = LogNorm(vmin=float(finite.min()), vmax=float(max(finite.max(), finite.min() * 10)))
    else:
        norm = Normalize(vmin=0.0, vmax=1.0 if metric != "grad_norm" else None)
    fig = figure_cls(figsize=(10, max(2.5, 0.28 * len(layers) + 1.5)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(
        np.ma.masked_invalid(data),
        aspect="auto",
        interpolation="nearest",
        cmap="magma" if log else "viridis",
        norm=norm,
        extent=(float(steps[0]) - 0.5, float(steps[-1]) + 0.5, len(layers) - 0.5, -0.5),
    )
    ax.set_yticks(range(len(layers)), labels=layers, fontsize=8)
    ax.set_xlabel("step")
    ax.set_title(title or METRICS.get(metric, metric))
    fig.colorbar(image, ax=ax, label=METRICS.get(metric, metric))
    return cast("Figure", fig)


def plot_lines(frame: pd.DataFrame, metric: str = "dead_ratio", title: str | None = None) -> Figure:
    """One line per layer of a metric over steps."""
    figure_cls = _matplotlib()
    _check(frame, metric)
    data, layers, steps = _matrix(frame, metric)
    fig = figure_cls(figsize=(10, 4.5), layout="constrained")
    ax = fig.subplots()
    for row, layer in zip(data, layers):
        if np.isfinite(row).any():
            ax.plot(steps, row, label=layer, linewidth=1.2)
    if metric == "grad_norm":
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(METRICS.get(metric, metric))
    ax.set_title(title or METRICS.get(metric, metric))
    if len(layers) <= 20:
        ax.legend(fontsize=7, ncols=2 if len(layers) > 8 else 1)
    return cast("Figure", fig)


def save_figure(fig: Figure, path: PathLike, dpi: int = 100) -> Path:
    """Save a figure as PNG atomically (temporary file, then ``os.replace``).

    Raises:
        OSError: The directory does not exist or is not writable.
    """
    target = Path(os.fspath(path))
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return target
