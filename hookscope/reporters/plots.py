"""PNG plots of a report frame: layer × step heat maps and per-layer lines (matplotlib, optional extra).

What each mark means, in both kinds of plot:

- Steps are whole numbers: the step axis only has integer ticks.
- Names are data: layer and metric names are shown as they are (a ``$`` never starts mathtext, a leading ``_``
  never hides a legend entry).
- Heat map: a layer with no value of the metric at any step (the statistic does not apply to its kind, such as
  the saturation of a relu, or its collector was not attached) is a grey hatched row whose label ends in
  ``(n/a)``; a step at which a layer has no row (it did not run, or the step was not recorded) is a white cell;
  for ``grad_norm`` (log colour scale) a zero norm is drawn in :data:`ZERO_COLOUR`, below the scale.
- Lines: when more than :data:`MAX_LABELLED` layers have values, only the :data:`MAX_LABELLED` most extreme are
  coloured and named in the legend (the highest maximum; for ``grad_norm``, the last value farthest from the
  median layer's on the log scale), the others are thin grey lines, and the legend's title says how many. Named
  lines take :data:`LINE_COLOURS`, none of them grey. ``dead_ratio`` lines can jump ``window`` recorded steps after
  the first (the window rule): a dotted line marks that step when the window is given, else the axis caption says
  so.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd

from hookscope.checks import check_int, describe
from hookscope.errors import ConfigError, ConfigTypeError
from hookscope.files import PathLike, atomic_path
from hookscope.report import EVIDENCE_COLUMNS, STAT_COLUMNS

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

__all__ = [
    "LINE_COLOURS",
    "MAX_LABELLED",
    "METRICS",
    "MISSING_COLOUR",
    "NA_COLOUR",
    "NA_HATCH",
    "ZERO_COLOUR",
    "check_png_path",
    "plain",
    "plot_heatmap",
    "plot_lines",
    "save_figure",
]

#: Plottable metrics (the statistic columns and ``confirmed_dead_ratio``, which the default dead-unit alert
#: judges), with their titles; ``grad_norm`` is drawn on a log scale, the others are ratios in [0, 1].
_TITLES = {"grad_norm": "gradient norm (log scale)"}
METRICS = {column: _TITLES.get(column, column.replace("_", " ")) for column in (*STAT_COLUMNS, *EVIDENCE_COLUMNS)}
#: At most this many layers are coloured and named in a line plot; the others are drawn in grey.
MAX_LABELLED = 10
#: The colours of named lines, in order: matplotlib's ``tab10`` without its grey (``tab:gray``, the 8th, would look
#: like the unnamed layers' grey), and black.
LINE_COLOURS = (
    "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
    "tab:cyan", "black",
)  # fmt: skip
#: Heat-map cells: a layer's row where the metric has no value at any step, and a step where the layer has no row.
NA_COLOUR, NA_HATCH, MISSING_COLOUR = "0.82", "//", "white"
#: A zero gradient norm on the log colour scale.
ZERO_COLOUR = "tab:cyan"
_GREY = "0.72"


def plain(text: str) -> str:
    """``text`` as matplotlib shows it verbatim: every ``$`` escaped, so that a name holding two of them is not
    typeset as mathtext (or refused by its parser). Layer names and column names are data; only the caller's own
    ``title`` is matplotlib text."""
    return text.replace("$", r"\$")


def _label(metric: str) -> str:
    return plain(METRICS.get(metric, metric))


def _matplotlib() -> Any:
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "plots need matplotlib: pip install 'hookscope[plots]' (or pip install matplotlib)"
        ) from e
    return Figure


def _check(frame: object, metric: object, title: object) -> pd.DataFrame:
    """The argument checks of both plots, in the order a reader would fix them."""
    if not isinstance(frame, pd.DataFrame):
        raise ConfigTypeError(
            f"`frame` must be a pandas DataFrame (HookManager.to_dataframe(), or its CSV read back), got "
            f"{type(frame).__name__}"
        )
    if not isinstance(metric, str):
        raise ConfigTypeError(f"`metric` must be a column name (a str), got {describe(metric)}")
    if title is not None and not isinstance(title, str):
        raise ConfigTypeError(f"`title` must be None or a str, got {describe(title)}")
    missing = [c for c in ("step", "layer") if c not in frame.columns]
    if missing:
        raise ConfigError(f"`frame` lacks the columns {', '.join(missing)} of a report; got {list(frame.columns)}")
    if metric not in frame.columns:
        allowed = ", ".join(c for c in METRICS if c in frame.columns) or ", ".join(METRICS)
        raise ConfigError(f"`metric` {metric!r} is not a column of the report; choose one of: {allowed}")
    if not pd.api.types.is_numeric_dtype(frame[metric]) or pd.api.types.is_bool_dtype(frame[metric]):
        raise ConfigError(f"`metric` {metric!r} is not a numeric column (dtype {frame[metric].dtype})")
    if frame.empty:
        raise ConfigError("the report is empty: nothing to plot (record at least one step)")
    steps = pd.to_numeric(frame["step"], errors="coerce").to_numpy(dtype=np.float64)
    if not (np.isfinite(steps) & (steps == np.floor(steps))).all():
        raise ConfigError(f"`frame` column `step` must hold whole step numbers, got {describe(list(frame['step']))}")
    if not frame[metric].notna().any():
        kinds = sorted(set(map(str, frame["kind"]))) if "kind" in frame.columns else []
        raise ConfigError(
            f"`metric` {metric!r} has no values in this report: it does not apply to these layers "
            f"({', '.join(kinds)}) or its collector was not attached"
        )
    return frame


def _matrix(frame: pd.DataFrame, metric: str) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Values (layer × step), layers in first-seen (forward) order, steps, and whether each layer has a value."""
    frame = frame.assign(step=frame["step"].astype(np.int64), layer=frame["layer"].astype(str))
    layers = list(dict.fromkeys(frame["layer"]))
    steps = np.sort(frame["step"].unique())
    pivot = frame.pivot_table(index="layer", columns="step", values=metric, aggfunc="last", dropna=False)
    data = pivot.reindex(index=layers, columns=steps).to_numpy(dtype=float)
    return data, layers, steps, ~np.isnan(data).all(axis=1)


def _cell_edges(steps: np.ndarray) -> np.ndarray:
    """Column edges halfway between recorded steps (steps 0, 4, 8 of ``every=4`` are cells 4 wide)."""
    s = steps.astype(float)
    if len(s) == 1:
        return np.array([s[0] - 0.5, s[0] + 0.5])
    mids = (s[1:] + s[:-1]) / 2
    return np.concatenate([[s[0] - (mids[0] - s[0])], mids, [s[-1] + (s[-1] - mids[-1])]])


def _integer_steps(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")


def plot_heatmap(frame: pd.DataFrame, metric: str = "dead_ratio", title: str | None = None) -> Figure:
    """A layer × step heat map of one metric (log colour scale for ``grad_norm``).

    Rows where the metric has no value at any step are grey, hatched and labelled ``(n/a)``; steps at which a
    layer has no row are white (see the module's docstring).

    Args:
        frame: A report frame (``HookManager.to_dataframe()``, or its CSV read back).
        metric: The column to draw, one of :data:`METRICS` or a custom collector's numeric column.
        title: The axes' title, matplotlib text (``$...$`` is mathtext); ``None`` uses the metric's name. Layer
            and metric names are always shown verbatim (:func:`plain`).

    Returns:
        A matplotlib ``Figure`` (save it with :func:`save_figure`).

    Raises:
        ConfigTypeError: ``frame`` is not a DataFrame, ``metric`` not a str, ``title`` neither None nor a str.
        ConfigError: Columns are missing, the metric is not numeric or has no value, the frame is empty.
    """
    figure_cls = _matplotlib()
    import matplotlib
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.patches import Rectangle

    _check(frame, metric, title)
    data, layers, steps, has_values = _matrix(frame, metric)
    log = metric == "grad_norm"
    cmap = matplotlib.colormaps["magma" if log else "viridis"].with_extremes(bad=MISSING_COLOUR)
    norm: Normalize
    zeros = bool(log and (data <= 0).any())
    if log:
        positive = data[np.isfinite(data) & (data > 0)]
        low = float(positive.min()) if len(positive) else 1.0
        norm = LogNorm(vmin=low, vmax=float(max(positive.max(), low * 10)) if len(positive) else low * 10)
        cmap = cmap.with_extremes(under=ZERO_COLOUR)
        data = np.where(data <= 0, low / 10, data)  # zero norms: below the scale, in the `under` colour
    else:
        finite = data[np.isfinite(data)]
        if metric in METRICS or not len(finite):  # ratios
            norm = Normalize(vmin=0.0, vmax=1.0)
        else:
            norm = Normalize(vmin=float(finite.min()), vmax=float(finite.max()))
    fig = figure_cls(figsize=(10, max(2.5, 0.28 * len(layers) + 1.5)), layout="constrained")
    ax = fig.subplots()
    x_edges = _cell_edges(steps)
    mesh = ax.pcolormesh(x_edges, np.arange(len(layers) + 1) - 0.5, np.ma.masked_invalid(data), cmap=cmap, norm=norm)
    for row in np.flatnonzero(~has_values):
        ax.add_patch(
            Rectangle(
                (float(x_edges[0]), row - 0.5), float(x_edges[-1] - x_edges[0]), 1.0,
                facecolor=NA_COLOUR, edgecolor="0.5", hatch=NA_HATCH, linewidth=0, label="n/a",
            )
        )  # fmt: skip
    ax.set_ylim(len(layers) - 0.5, -0.5)  # the first layer at the top
    labels = [plain(layer) if ok else f"{plain(layer)} (n/a)" for layer, ok in zip(layers, has_values)]
    ax.set_yticks(range(len(layers)), labels=labels, fontsize=8)
    _integer_steps(ax)
    ax.set_title(title or _label(metric))
    for row in np.flatnonzero(~has_values):
        ax.text(
            float(x_edges[0] + x_edges[-1]) / 2, row, f"n/a: no {_label(metric)} at any step",
            ha="center", va="center", fontsize=7, bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.5},
        )  # fmt: skip
    label = _label(metric)
    if zeros:
        label += f"; {ZERO_COLOUR.removeprefix('tab:')}: 0"
    fig.colorbar(mesh, ax=ax, label=label, extend="min" if zeros else "neither")
    return cast("Figure", fig)


def _extremes(data: np.ndarray, metric: str) -> np.ndarray:
    """Rank of each layer's extremity, most extreme first (stable: forward order among ties)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric == "grad_norm":  # vanishing and exploding alike: the last value's distance from the median's
            last = np.array([row[~np.isnan(row)][-1] for row in data])
            logs = np.log10(last)
            score = np.abs(logs - np.nanmedian(logs[np.isfinite(logs)])) if np.isfinite(logs).any() else logs
            score = np.where(np.isnan(score), np.inf, score)  # log of 0 or inf: as extreme as it gets
        else:
            score = np.nanmax(data, axis=1)
    return np.argsort(-score, kind="stable")


def plot_lines(
    frame: pd.DataFrame, metric: str = "dead_ratio", title: str | None = None, *, window: int | None = None
) -> Figure:
    """One line per layer of a metric over steps.

    With more than :data:`MAX_LABELLED` layers, the :data:`MAX_LABELLED` most extreme are coloured and named in
    the legend (the highest maximum; for ``grad_norm`` the last value farthest from the median layer's on the log
    scale) and the others are grey; the legend's title says how many are unlabelled. Layers without any value are
    not drawn and are counted in the title too.

    ``dead_ratio`` can jump ``window`` recorded steps after the first: until then a unit counts as dead only when it
    was silent since the first step (earlier steps count as silent), from then on also a unit that fired and
    then fell silent for ``window`` steps. With ``window`` given, a dotted line marks that step (named in the
    legend); without it, the axis caption says so.

    Args:
        frame: A report frame (``HookManager.to_dataframe()``, or its CSV read back).
        metric: The column to draw, one of :data:`METRICS` or a custom collector's numeric column.
        title: The axes' title, matplotlib text (``$...$`` is mathtext); ``None`` uses the metric's name. Layer
            and metric names are always shown verbatim (:func:`plain`).
        window: The ``DeadReLU(window=)`` the frame was recorded with (for ``dead_ratio`` only), an int >= 1.

    Returns:
        A matplotlib ``Figure`` (save it with :func:`save_figure`).

    Raises:
        ConfigTypeError: ``frame`` is not a DataFrame, ``metric`` not a str, ``title`` neither None nor a str,
            ``window`` not an int.
        ConfigError: Columns are missing, the metric is not numeric or has no value, the frame is empty,
            ``window`` < 1.
    """
    figure_cls = _matplotlib()

    _check(frame, metric, title)
    window = check_int("window", window, minimum=1, meaning="the frame's DeadReLU window", optional=True)
    data, layers, steps, has_values = _matrix(frame, metric)
    drawn = np.flatnonzero(has_values)
    named = set(drawn[_extremes(data[drawn], metric)[:MAX_LABELLED]].tolist())
    colours = iter(LINE_COLOURS)
    fig = figure_cls(figsize=(10, 4.5), layout="constrained")
    ax = fig.subplots()
    marker = "o" if len(steps) == 1 else None
    handles, labels = [], []
    for i in drawn:  # forward order, so colours follow the layers
        if i in named:
            label = plain(layers[i])
            (line,) = ax.plot(steps, data[i], label=label, color=next(colours), linewidth=1.4, marker=marker, zorder=3)
            handles.append(line)
            labels.append(label)  # given with its handle, so that a name starting with "_" is not left out
        else:
            ax.plot(steps, data[i], label="_nolegend_", color=_GREY, linewidth=0.8, marker=marker, zorder=2)
    if metric == "grad_norm" and (data[drawn] > 0).any():  # all zero: no log scale can show it
        ax.set_yscale("log")
    _integer_steps(ax)
    if metric == "dead_ratio":
        mark = _mark_window(ax, steps, window)
        if mark is not None:
            handles.append(mark)
            labels.append(str(mark.get_label()))
    ax.set_ylabel(_label(metric))
    ax.set_title(title or _label(metric))
    notes = []
    if len(drawn) > len(named):
        rule = "last value farthest\nfrom the median's" if metric == "grad_norm" else "highest maximum"
        notes.append(f"{len(named)} of {len(drawn)} layers named\n({rule});\n{len(drawn) - len(named)} others in grey")
    if len(drawn) < len(layers):
        blank = len(layers) - len(drawn)
        notes.append(f"{blank} layer{'s' if blank != 1 else ''} without values not drawn")
    ax.legend(
        handles, labels, title="\n".join(notes) or None, fontsize=7, title_fontsize=7, loc="upper left",
        bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
    )  # fmt: skip
    return cast("Figure", fig)


def _mark_window(ax: Axes, steps: np.ndarray, window: int | None) -> Line2D | None:
    """Explain the jump of ``dead_ratio`` ``window`` recorded steps after the first (see :func:`plot_lines`): the
    marker line (for the legend), or ``None`` when the axis caption explains it instead."""
    if window is None:
        ax.set_xlabel(
            "step (a unit is dead after `window` silent recorded steps; before that, only units silent since the "
            "first step count: the ratio can jump there)",
            fontsize=8,
        )
        return None
    if window >= len(steps):
        return None
    at = int(steps[window])
    return ax.axvline(
        at, color="0.35", linestyle=":", linewidth=1.0, zorder=1,
        label=f"step {at}: {window} steps in,\nunits that fired can\ncount as dead from here",
    )  # fmt: skip


def check_png_path(path: object, arg: str = "path") -> Path:
    """``path`` as a ``Path`` if it names a PNG file (a non-empty name ending in ``.png``, any case).

    Plots are written as PNG only, so that a file's name says what it holds.

    Raises:
        ConfigTypeError: Not a str or ``os.PathLike`` of str.
        ConfigError: Empty, or another suffix (``plot.pdf``, ``plot``).
    """
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(text, str):
        raise ConfigTypeError(f"`{arg}` must be a path (a str or os.PathLike) ending in .png, got {describe(path)}")
    if Path(text).suffix.lower() != ".png":
        raise ConfigError(f"`{arg}` must be a file name ending in .png (plots are written as PNG), got {text!r}")
    return Path(text)


def save_figure(fig: Figure, path: PathLike, dpi: int = 100) -> Path:
    """Save a figure as PNG atomically (temporary file, then ``os.replace``).

    Args:
        fig: A matplotlib ``Figure`` (from :func:`plot_heatmap` or :func:`plot_lines`).
        path: The PNG to write, ending in ``.png``; its directory must exist.
        dpi: Resolution, an int >= 1.

    Returns:
        The path written.

    Raises:
        ConfigTypeError: ``fig`` is not a Figure, ``path`` not a path, ``dpi`` not an int.
        ConfigError: ``path`` does not end in ``.png``, ``dpi`` < 1.
        OSError: The directory does not exist or is not writable, or ``path`` is a directory.
    """
    figure_cls = _matplotlib()
    if not isinstance(fig, figure_cls):
        raise ConfigTypeError(f"`fig` must be a matplotlib Figure, got {type(fig).__name__}")
    target = check_png_path(path)
    dpi = check_int("dpi", dpi, minimum=1)
    if target.is_dir():
        raise IsADirectoryError(f"cannot write {str(target)!r}: it is a directory")
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return target
