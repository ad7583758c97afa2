"""Layer, module and kind names are data, never markup: rich tables, the command line and plots show them exactly
as they are (rich markup such as ``[bold]x`` or ``[/]``, matplotlib mathtext between ``$`` signs, a legend label
starting with ``_``), and nothing raises on them."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
import torch
import torch.nn as nn
from matplotlib.cbook import is_math_text

import hookscope as hs
from hookscope.activations import register_activation, unregister_activation
from hookscope.cli import main
from hookscope.reporters.plots import plot_heatmap, plot_lines, save_figure

matplotlib.use("Agg")

#: Module names that rich reads as markup, matplotlib as mathtext, or a legend as "leave me out".
NAMES = ["[bold]x", "[/]", "[red]a[/red]", "a$b$c", "$x^2$", "_private", "back\\slash[", "plain"]


class Gate(nn.Module):  # a kind registered under a name that is rich markup
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)


@pytest.fixture
def markup_kind() -> object:
    register_activation("[i]gate", modules=[Gate], bounds=(0.0, 1.0))
    yield
    unregister_activation("[i]gate")


def hostile_run(params: bool = False) -> hs.HookManager:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("[b]linear", nn.Linear(4, 4))  # a module with parameters (the parameter table)
    for name in NAMES:
        model.add_module(name, nn.ReLU())
    model.add_module("[/]gate", Gate())
    hm = hs.HookManager(model, alerts=False, params=params)
    with hm:
        for _ in range(2):
            model(torch.randn(8, 4)).sum().backward()
            hm.step()
    return hm


@pytest.mark.usefixtures("markup_kind")
@pytest.mark.parametrize("ascii", [True, False])
def test_the_tables_show_names_verbatim(ascii: bool) -> None:
    hm = hostile_run(params=True)
    text = str(hm.table(ascii=ascii))  # "[/]" raised rich's MarkupError; "[bold]x" showed as "x"
    for name in [*NAMES, "[/]gate", "[i]gate"]:
        assert name in text, (name, text)
    params = str(hm.param_table(ascii=ascii))
    assert "[b]linear" in params


@pytest.mark.usefixtures("markup_kind")
def test_show_renders_a_csv_with_such_names_and_activations_lists_such_kinds(tmp_path: Path) -> None:
    path = tmp_path / "stats.csv"
    hostile_run().to_csv(path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["show", str(path), "--ascii"]) == 0  # was a MarkupError traceback
        assert main(["activations", "--ascii"]) == 0
    for name in [*NAMES, "[/]gate", "[i]gate"]:
        assert name in out.getvalue(), name


def shown(text: matplotlib.text.Text) -> str:
    """What matplotlib draws for a text object: plain text with escaped dollars, never mathtext."""
    raw = text.get_text()
    assert not is_math_text(raw), raw
    return raw.replace("\\$", "$")


@pytest.mark.usefixtures("markup_kind")
def test_plots_show_names_verbatim_and_draw(tmp_path: Path) -> None:
    frame = hostile_run().to_dataframe()
    heat = plot_heatmap(frame, "dead_ratio")
    labels = [shown(t) for t in heat.axes[0].get_yticklabels()]
    assert labels[: len(NAMES)] == NAMES and labels[-1] == "[/]gate (n/a)"
    save_figure(heat, tmp_path / "heat.png")  # drawing "a$b$c" raised matplotlib's mathtext ValueError
    lines = plot_lines(frame, "dead_ratio")
    legend = [shown(t) for t in lines.axes[0].get_legend().get_texts()]
    assert legend == NAMES  # "_private" too: a label starting with "_" is otherwise left out of a legend
    save_figure(lines, tmp_path / "lines.png")
    custom = frame.assign(**{"$cost$": frame["dead_ratio"]})  # a custom column's name is data too
    assert shown(plot_lines(custom, "$cost$").axes[0].title) == "$cost$"
    save_figure(plot_heatmap(custom, "$cost$"), tmp_path / "custom.png")
    caller = plot_lines(frame, "dead_ratio", title=r"dead, $\alpha$").axes[0].title.get_text()
    assert caller == r"dead, $\alpha$" and is_math_text(caller)  # the caller's own title is matplotlib text


def test_alert_messages_carry_names_as_plain_text() -> None:
    frame = pd.DataFrame(
        {"step": [0], "layer": ["[/]"], "kind": ["relu"], "shape": ["8x4"], "units": [4], "calls": [1],
         "dead_ratio": [1.0], "inactive_fraction": [1.0], "saturation_rate": [float("nan")],
         "grad_norm": [0.1], "confirmed_dead_ratio": [1.0]}
    )  # fmt: skip
    seen: list[hs.Alert] = []
    hs.Alerts(callback=seen.append, warn=False, log=False).check(frame, 0)
    assert seen and "layer '[/]'" in seen[0].message  # warnings and logging get the name as it is


def test_the_demo_prints_alerted_layer_names_verbatim() -> None:
    from rich.console import Console

    from hookscope.demo import DemoRun, _alert_line

    alerts = [hs.Alert("dead_relu", name, 3, 0.5, 0.1, "message") for name in ("[/]", "[bold]x")]
    run = DemoRun("dying", 0.05, "Adam", pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), 0.5, alerts)
    out = io.StringIO()
    Console(file=out, width=200).print(_alert_line(run))  # "[/]" raised MarkupError, "[bold]x" lost its tag
    assert "dead_relu on [/], [bold]x (first at step 3)" in out.getvalue()
