"""The main job: diagnose dying ReLU on real data (scikit-learn's bundled digits), then show the remedy.

A ReLU MLP (64-128-128-128-10) is trained twice with hookscope attached: with Adam at a learning rate that is far
too high (0.05), which kills most units of the first hidden layers within a few dozen steps, and with the same
network at lr=0.001 with biases initialised to 0.1. A live view shows a progress bar and the per-layer table
while training; at the end a diagnosis says which layers lost how many units, when they stopped firing and when
their death was confirmed, whether any revived, and which remedies fit the evidence. CSVs and PNG plots are
written to the output directory.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from hookscope.alerts import DEAD_RATIO_ALERT, HINTS, Alert, Alerts
from hookscope.audit import audit
from hookscope.collectors import DeadReLU, GradientNorm, NonFinite, Saturation
from hookscope.manager import HookManager
from hookscope.reporters.table import make_console

__all__ = ["DemoRun", "death_steps", "load_digits_data", "make_mlp", "run_demo", "train_run"]

DYING_LR = 0.05
REMEDY_LR = 0.001
REMEDY_BIAS = 0.1  # small positive biases: units start in the active region of the ReLU
WINDOW = 20  # a unit is dead after 20 silent steps of 64 samples: 1280 samples, most of the training set
#: Intra-op threads while training: float sums split across threads round differently, so the numbers the demo
#: prints (and the README shows) are the same on every run only with a fixed thread count, whatever the caller set.
THREADS = 2


def load_digits_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits (1797 images, no download): train (1400) and test (397) splits."""
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("the demo needs scikit-learn: pip install 'hookscope[demo]'") from e
    x, y = load_digits(return_X_y=True)
    xs = torch.tensor(x / 16.0, dtype=torch.float32)
    ys = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(xs), generator=torch.Generator().manual_seed(seed))
    train, test = perm[:1400], perm[1400:]
    return xs[train], ys[train], xs[test], ys[test]


def make_mlp(
    seed: int = 0, width: int = 128, act: type[nn.Module] = nn.ReLU, bias: float | None = None
) -> nn.Sequential:
    """64 → width → width → width → 10, with named layers fc1/act1 ... out; ``bias`` sets every bias."""
    torch.manual_seed(seed)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    sizes = [64, width, width, width]
    for i in range(3):
        layers[f"fc{i + 1}"] = nn.Linear(sizes[i], sizes[i + 1])
        layers[f"act{i + 1}"] = act()
    layers["out"] = nn.Linear(width, 10)
    model = nn.Sequential(layers)
    if bias is not None:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    module.bias.fill_(bias)
    return model


@dataclasses.dataclass
class DemoRun:
    """One instrumented training run of the demo."""

    name: str
    lr: float
    recipe: str
    frame: pd.DataFrame
    timeline: pd.DataFrame
    audit: pd.DataFrame
    accuracy: float
    alerts: list[Alert]


def train_run(
    name: str,
    lr: float,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    steps: int = 400,
    batch: int = 64,
    seed: int = 0,
    bias: float | None = None,
    console: Console | None = None,
    live: bool = True,
) -> DemoRun:
    """Train the demo MLP with Adam at ``lr`` for ``steps`` steps, instrumented, with a live view."""
    x_train, y_train, x_test, y_test = data
    model = make_mlp(seed, bias=bias)
    recipe = f"Adam, lr={lr:g}" + (f", biases initialised to {bias:g}" if bias is not None else "")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    fired: list[Alert] = []
    alerts = Alerts(every=10, callback=fired.append, warn=False, log=False)
    console = console or make_console()
    progress = Progress(
        TextColumn(f"[bold]{name}[/] ({recipe})"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
        TimeElapsedColumn(), console=console,
    )  # fmt: skip
    task = progress.add_task(name, total=steps)
    hm = HookManager(model, [DeadReLU(window=WINDOW), Saturation(), GradientNorm(), NonFinite()], alerts=alerts)

    def view() -> Group:
        return Group(progress, hm.table())

    last_refresh = 0.0
    with hm, Live(view(), console=console, refresh_per_second=4, transient=False, auto_refresh=False) as screen:
        for _ in range(steps):
            idx = torch.randint(0, len(x_train), (batch,), generator=gen)
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            hm.step()  # closes the step (before the optimizer's step, as in the Quickstart)
            opt.step()
            progress.advance(task)
            now = time.monotonic()
            if live and now - last_refresh >= 0.25:  # 4 times a second: values reach the host then, not per step
                screen.update(view(), refresh=True)
                last_refresh = now
        screen.update(view(), refresh=True)
    console.print()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(dim=1) == y_test).float().mean())
    whole_set = audit(model, [x_train])
    return DemoRun(name, lr, recipe, hm.to_dataframe(), hm.unit_timeline(), whole_set, accuracy, fired)


def death_steps(timeline: pd.DataFrame, first_step: int = 0) -> tuple[pd.Series, pd.Series]:
    """For the units dead at the latest step of a ``unit_timeline()`` frame: the step at which each stopped firing
    (the step after it last fired, or ``first_step`` if it never fired) and the step at which its death was
    confirmed (``dead_since``: ``window`` silent steps later, when the window rule first counted it as dead)."""
    dead = timeline[timeline["dead"]]
    stopped = (dead["last_fired"] + 1).fillna(first_step)
    return stopped, dead["dead_since"]


def _span(steps: pd.Series) -> str:
    return f"between steps {int(steps.min())} and {int(steps.max())} (median {statistics.median(steps):.0f})"


def _layer_lines(run: DemoRun) -> list[str]:
    lines = []
    last = run.frame[run.frame["step"] == run.frame["step"].max()].set_index("layer")
    first_step = int(run.frame["step"].min())
    for layer, dead_units in run.audit.attrs["dead_units"].items():
        units = int(last.loc[layer, "units"])
        tl = run.timeline[run.timeline["layer"] == layer]
        stopped, confirmed = death_steps(tl, first_step)
        never = int(tl[tl["dead"]]["last_fired"].isna().sum())
        revived = int((tl["revivals"] > 0).sum())
        when = (
            f"they stopped firing {_span(stopped)}"
            + (f", {never} of them never fired" if never else "")
            + f"; death confirmed (dead by the window rule) {_span(confirmed)}"
            if len(stopped)
            else "none died during training"
        )
        lines.append(
            f"  {escape(layer)}: {len(dead_units)} of {units} units never fire on the training set "
            f"({len(dead_units) / units:.0%}); {len(stopped)} dead at the last step (silent {WINDOW} steps): "
            f"{when}; {revived} unit{'s' if revived != 1 else ''} revived after dying"
        )
    return lines


def _alert_line(run: DemoRun) -> str:
    """The alerts a run raised: each rule with its layers and the step of its first alert."""
    by_rule: dict[str, list[Alert]] = {}
    for alert in run.alerts:
        by_rule.setdefault(alert.rule, []).append(alert)
    if not by_rule:
        return "  alerts: none"
    parts = [
        f"{rule} on {escape(', '.join(dict.fromkeys(a.layer for a in alerts)))}"  # names: never markup
        f" (first at step {min(a.step for a in alerts)})"
        for rule, alerts in by_rule.items()
    ]
    return f"  alerts: {'; '.join(parts)}"


def diagnose(dying: DemoRun, remedy: DemoRun) -> str:
    """The text diagnosis comparing the two runs."""
    out = ["", "[bold]Diagnosis[/]"]
    for run in (dying, remedy):
        out.append(f"[bold]{run.name}[/] ({run.recipe}): test accuracy {run.accuracy:.1%}")
        out.extend(_layer_lines(run))
        out.append(_alert_line(run))
    bad = {layer: len(v) for layer, v in dying.audit.attrs["dead_units"].items()}
    good = {layer: len(v) for layer, v in remedy.audit.attrs["dead_units"].items()}
    units = int(dying.frame["units"].iloc[0])
    worst = max(bad, key=lambda k: bad[k])
    first_alert = min((a.step for a in dying.alerts if a.rule == "dead_relu"), default=None)
    out.append("")
    out.append("[bold]What the evidence says[/]")
    if bad[worst] / units >= DEAD_RATIO_ALERT:
        tl = dying.timeline[dying.timeline["layer"] == worst]
        stopped, confirmed = death_steps(tl, int(dying.frame["step"].min()))
        revived = int((tl[tl["dead"]]["revivals"] > 0).sum())
        alert = f" (first alert at step {first_alert})" if first_alert is not None else ""
        timing = (
            f" Half of the dead units of {escape(worst)} had stopped firing by step"
            f" {statistics.median(stopped):.0f} (their death confirmed by step {statistics.median(confirmed):.0f}),"
            f" and {revived} of those dead now had come back before dying again:"
            if len(stopped)
            else " The likely cause:"
        )
        out.append(
            f"- With {dying.recipe}, {escape(worst)} lost {bad[worst]} of {units} units{alert}; with {remedy.recipe} it"
            f" loses {good[worst]}, and no layer loses more than {max(good.values())}.{timing} large Adam updates"
            " pushed biases and weights to where the pre-activation is negative for every input, where a ReLU gets"
            " no gradient to recover."
        )
        out.append(
            "- Remedies that fit: lower the learning rate (or warm it up), and start biases slightly positive."
            f" Also: {HINTS['dead_relu']}."
        )
    return "\n".join(out)


def run_demo(
    out_dir: str | Path = "hookscope-demo", *, steps: int = 400, live: bool = True, console: Console | None = None
) -> dict[str, Any]:
    """Run the whole demo and write CSVs and plots into ``out_dir``; returns the runs and the files written.

    Training runs on :data:`THREADS` intra-op threads (the caller's setting is restored afterwards), so that the
    printed numbers do not depend on it.
    """
    from hookscope.reporters.csv import write_csv
    from hookscope.reporters.plots import plot_heatmap, plot_lines, save_figure

    console = console or make_console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_digits_data()
    console.print(
        f"[bold]hookscope demo[/]: a ReLU MLP on scikit-learn's digits ({len(data[0])} training images), trained"
        f" with a too-high learning rate, then with the remedy"
    )
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        dying = train_run("dying", DYING_LR, data, steps=steps, console=console, live=live)
        remedy = train_run("remedy", REMEDY_LR, data, steps=steps, bias=REMEDY_BIAS, console=console, live=live)
    finally:
        torch.set_num_threads(caller_threads)
    console.print(diagnose(dying, remedy))

    files = []
    for run in (dying, remedy):
        files.append(out / f"stats_{run.name}.csv")
        write_csv(run.frame, files[-1])
        files.append(out / f"units_{run.name}.csv")
        write_csv(run.timeline, files[-1])
    both = pd.concat(
        [run.frame.assign(layer=f"{run.name} (lr={run.lr:g}) " + run.frame["layer"]) for run in (dying, remedy)]
    )
    plots = {
        f"{metric}_heatmap_{run.name}.png": plot_heatmap(run.frame, metric, f"{title}, {run.name} run, lr={run.lr:g}")
        for run in (dying, remedy)
        for metric, title in (("dead_ratio", "dead ratio"), ("grad_norm", "gradient norm"))
    }
    plots["dead_ratio_lines.png"] = plot_lines(
        both, "dead_ratio", "dead ratio per layer: too-high lr vs remedy", window=WINDOW
    )
    for name, fig in plots.items():
        files.append(save_figure(fig, out / name))
    console.print(f"\nwrote {escape(', '.join(str(f) for f in files))}")  # a directory may be named "[x]"
    return {"dying": dying, "remedy": remedy, "files": files, "accuracy": np.array([dying.accuracy, remedy.accuracy])}
