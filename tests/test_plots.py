"""Plots: what is drawn (cells and their colours, hatched n/a rows, tick values, which lines are named), checked on
frames built by hand, and the argument checks."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb, to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from hookscope.errors import ConfigError, ConfigTypeError
from hookscope.reporters.plots import (
    MAX_LABELLED,
    MISSING_COLOUR,
    NA_COLOUR,
    NA_HATCH,
    ZERO_COLOUR,
    check_png_path,
    plot_heatmap,
    plot_lines,
    save_figure,
)

PNG = b"\x89PNG\r\n\x1a\n"


def frame_of(rows: list[tuple[int, str, str, float, float]]) -> pd.DataFrame:
    """A report frame from ``(step, layer, kind, dead_ratio, grad_norm)`` rows."""
    return pd.DataFrame(rows, columns=["step", "layer", "kind", "dead_ratio", "grad_norm"]).assign(
        inactive_fraction=np.nan, saturation_rate=np.nan
    )


# steps 0, 4, 8 (HookManager(every=4)); `gate` is a sigmoid: no dead ratio at any step; fc2.relu has no row at step 4
NAN = float("nan")
SPARSE = frame_of([
    (0, "fc1.relu", "relu", 0.0, 0.0), (0, "gate", "sigmoid", NAN, 0.5), (0, "fc2.relu", "relu", 0.75, 2.0),
    (4, "fc1.relu", "relu", 0.25, 0.1), (4, "gate", "sigmoid", NAN, 0.5),
    (8, "fc1.relu", "relu", 0.5, 1.0), (8, "gate", "sigmoid", NAN, 0.5), (8, "fc2.relu", "relu", 1.0, 4.0),
])  # fmt: skip


def render(fig: Figure) -> np.ndarray:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].astype(float) / 255


def pixels(fig: Figure, image: np.ndarray, x: float, y: float, half: int = 0) -> np.ndarray:
    """The drawn RGB colours around data point (x, y) of the figure's first axes (a square of side 2·half+1)."""
    px, py = fig.axes[0].transData.transform((x, y))
    row, col = round(float(image.shape[0] - py)), round(float(px))
    return image[row - half : row + half + 1, col - half : col + half + 1].reshape(-1, 3)


def visible_ticks(fig: Figure) -> list[float]:
    ax = fig.axes[0]
    lo, hi = sorted(ax.get_xlim())
    return [float(t) for t in ax.get_xticks() if lo <= t <= hi]


def test_heatmap_cells_na_rows_and_missing_steps() -> None:
    fig = plot_heatmap(SPARSE, "dead_ratio")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["fc1.relu", "gate (n/a)", "fc2.relu"]
    mesh = ax.collections[0]
    # one column per recorded step, each as wide as the spacing of the steps
    assert mesh.get_coordinates()[0, :, 0].tolist() == [-2.0, 2.0, 6.0, 10.0]
    values = mesh.get_array()
    assert values.mask.tolist() == [[False, False, False], [True, True, True], [False, True, False]]
    assert values.compressed().tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    # the n/a row: one grey hatched rectangle over the whole row, and a text saying so
    hatched = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_hatch()]
    assert len(hatched) == 1 and hatched[0].get_hatch() == NA_HATCH
    assert hatched[0].get_facecolor() == to_rgba(NA_COLOUR)
    assert (hatched[0].get_x(), hatched[0].get_y(), hatched[0].get_width(), hatched[0].get_height()) == (
        -2.0, 0.5, 12.0, 1.0
    )  # fmt: skip
    assert [t.get_text() for t in ax.texts] == ["n/a: no dead ratio at any step"]

    image = render(fig)
    viridis = matplotlib.colormaps["viridis"]
    for (step, row), value in {(0, 0): 0.0, (4, 0): 0.25, (8, 0): 0.5, (0, 2): 0.75, (8, 2): 1.0}.items():
        assert np.allclose(pixels(fig, image, step, row), viridis(value)[:3], atol=2 / 255), (step, row)
    # the step at which fc2.relu has no row is white; the n/a row is grey (with darker hatch lines), not white
    assert np.allclose(pixels(fig, image, 4, 2, half=3), to_rgb(MISSING_COLOUR), atol=2 / 255)
    na = pixels(fig, image, -1, 1, half=4)
    grey = np.all(np.abs(na - to_rgb(NA_COLOUR)) < 3 / 255, axis=1)
    assert grey.mean() > 0.5 and not np.all(na > 0.99, axis=1).any()
    assert visible_ticks(fig) and all(t == int(t) for t in visible_ticks(fig))


def test_heatmap_grad_norm_log_scale_and_zero() -> None:
    fig = plot_heatmap(SPARSE, "grad_norm")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["fc1.relu", "gate", "fc2.relu"]  # it has values here
    norm = ax.collections[0].norm
    assert (norm.vmin, norm.vmax) == (0.1, 4.0)  # the smallest and largest positive norms
    image = render(fig)
    magma = matplotlib.colormaps["magma"]
    assert np.allclose(pixels(fig, image, 4, 0), magma(0.0)[:3], atol=2 / 255)  # 0.1, the bottom of the scale
    assert np.allclose(pixels(fig, image, 8, 2), magma(1.0)[:3], atol=2 / 255)  # 4.0, the top
    assert np.allclose(pixels(fig, image, 0, 0), to_rgb(ZERO_COLOUR), atol=2 / 255)  # a zero norm: below the scale
    assert np.allclose(pixels(fig, image, 4, 2, half=3), to_rgb(MISSING_COLOUR), atol=2 / 255)
    assert "cyan: 0" in fig.axes[1].get_ylabel()


@pytest.mark.parametrize("plot", [plot_heatmap, plot_lines])
def test_a_short_run_has_integer_step_ticks(plot) -> None:
    frame = frame_of([(s, "act", "relu", s / 4, 1.0) for s in range(3)])
    assert visible_ticks(plot(frame, "dead_ratio")) == [0.0, 1.0, 2.0]


def many_layers(maxima: list[float]) -> pd.DataFrame:
    rows = []
    for step in range(4):
        for i, peak in enumerate(maxima):
            value = [0.0, peak, peak / 2, peak / 2][step]  # each layer's maximum is at step 1
            rows.append((step, f"l{i:02d}", "relu", value, 1.0))
        rows.append((step, "gate", "sigmoid", NAN, 1.0))
    return frame_of(rows)


def test_lines_name_the_most_extreme_layers_and_grey_the_others() -> None:
    fig = plot_lines(many_layers([i / 24 for i in range(25)]), "dead_ratio")
    ax = fig.axes[0]
    legend = ax.get_legend()
    named = [f"l{i:02d}" for i in range(15, 25)]  # the ten highest maxima, in forward order
    assert [t.get_text() for t in legend.get_texts()] == named
    assert legend.get_title().get_text() == (
        "10 of 25 layers named\n(highest maximum);\n15 others in grey\n1 layer without values not drawn"
    )
    lines = ax.get_lines()
    assert len(lines) == 25  # the sigmoid has no dead ratio: not drawn
    coloured = {line.get_label(): line.get_color() for line in lines if line.get_label() in named}
    greys = [line for line in lines if line.get_label() not in named]
    assert len(greys) == 15 and all(to_rgba(line.get_color()) == to_rgba("0.72") for line in greys)
    assert len({to_rgba(c) for c in coloured.values()}) == MAX_LABELLED  # ten distinct colours
    assert all(line.get_zorder() > grey.get_zorder() for line in lines if line in coloured for grey in greys)
    assert visible_ticks(fig) == [0.0, 1.0, 2.0, 3.0]


def test_lines_rank_gradient_norms_by_distance_from_the_median_on_the_log_scale() -> None:
    # last values 10**k; the median of k is 0; |k| ranks the layers (ties: forward order)
    exponents = [0, 0, 0, 0, 0, 0, 0, 0.1, 0.2, -4, 5, -0.3]
    rows = [(s, f"l{i:02d}", "relu", 0.5, 10.0**k) for s in range(2) for i, k in enumerate(exponents)]
    fig = plot_lines(frame_of(rows), "grad_norm")
    names = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert names == [f"l{i:02d}" for i in range(12) if i not in (5, 6)]
    assert fig.axes[0].get_yscale() == "log"
    assert "last value farthest\nfrom the median's" in fig.axes[0].get_legend().get_title().get_text()


def test_each_line_draws_its_own_layers_values_over_the_steps() -> None:
    # the data of every line, not only its label: fc2.relu has no row at step 4, so its line has a gap there
    for metric, want in {
        "dead_ratio": {"fc1.relu": [0.0, 0.25, 0.5], "fc2.relu": [0.75, NAN, 1.0]},
        "grad_norm": {"fc1.relu": [0.0, 0.1, 1.0], "gate": [0.5, 0.5, 0.5], "fc2.relu": [2.0, NAN, 4.0]},
    }.items():
        lines = plot_lines(SPARSE, metric).axes[0].get_lines()
        assert [line.get_label() for line in lines] == list(want), metric  # the sigmoid has no dead ratio
        for line, values in zip(lines, want.values()):
            assert np.asarray(line.get_xdata(), dtype=float).tolist() == [0.0, 4.0, 8.0]
            np.testing.assert_array_equal(np.asarray(line.get_ydata(), dtype=float), values)


def test_few_layers_are_all_named_without_a_legend_title() -> None:
    fig = plot_lines(many_layers([0.1, 0.2, 0.3]).query("kind == 'relu'"), "dead_ratio")
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["l00", "l01", "l02"]
    assert legend.get_title().get_text() == ""


@pytest.mark.parametrize(
    ("call", "error", "fragment"),
    [
        (lambda: plot_heatmap([1, 2]), ConfigTypeError, "`frame` must be a pandas DataFrame"),  # type: ignore[arg-type]
        (lambda: plot_lines(SPARSE, 3), ConfigTypeError, "`metric` must be a column name (a str), got 3"),  # type: ignore[arg-type]
        (lambda: plot_heatmap(SPARSE, title=5), ConfigTypeError, "`title` must be None or a str, got 5"),  # type: ignore[arg-type]
        (lambda: plot_lines(SPARSE.drop(columns="layer")), ConfigError, "`frame` lacks the columns layer"),
        (lambda: plot_heatmap(SPARSE, "nope"), ConfigError, "`metric` 'nope' is not a column of the report"),
        (lambda: plot_heatmap(SPARSE, "kind"), ConfigError, "`metric` 'kind' is not a numeric column"),
        (lambda: plot_lines(SPARSE.iloc[:0]), ConfigError, "the report is empty"),
        (lambda: plot_lines(SPARSE, "saturation_rate"), ConfigError, "has no values in this report"),
        (lambda: plot_lines(SPARSE.assign(step=SPARSE["step"] + 0.5)), ConfigError, "must hold whole step numbers"),
        (lambda: check_png_path("plot.pdf"), ConfigError, "`path` must be a file name ending in .png"),
        (lambda: check_png_path(""), ConfigError, "`path` must be a file name ending in .png"),
        (lambda: check_png_path(7), ConfigTypeError, "`path` must be a path (a str or os.PathLike) ending in .png"),
    ],
)  # fmt: skip
def test_plot_arguments_are_checked_up_front(call, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value)


def test_save_figure(tmp_path: Path) -> None:
    fig = plot_lines(SPARSE)
    assert save_figure(fig, tmp_path / "a.png") == tmp_path / "a.png"
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG
    with pytest.raises(ConfigError, match=r"`path` must be a file name ending in \.png"):
        save_figure(fig, tmp_path / "a.svg")
    with pytest.raises(ConfigTypeError, match="`fig` must be a matplotlib Figure, got str"):
        save_figure("figure", tmp_path / "b.png")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="`dpi` must be an int >= 1"):
        save_figure(fig, tmp_path / "b.png", dpi=0)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(IsADirectoryError, match="it is a directory"):
        save_figure(fig, tmp_path / "dir.png")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_figure(fig, tmp_path / "missing" / "c.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "dir.png"]  # nothing else left behind
