"""Behaviours a mutation audit of the suite found unpinned (issue 23.6): each test fails when the single plausible
bug named in its docstring is planted. Expected values come from the construction of the inputs (planted dead
units, hand-built frames and weights) or from autograd on an uninstrumented copy, never from hookscope itself;
statistics are checked on both paths (native kernels and ATen) where both exist."""

from __future__ import annotations

import copy
import io
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from conftest import ActivationCalls, definition_stats
from rich.console import Console

import hookscope.warn
from hookscope import Alerts, DeadReLU, GradientNorm, HookManager, HookscopeWarning
from hookscope.alerts import AlertRule, DeadRatioRule
from hookscope.reporters.table import build_table
from hookscope.stats_file import read_stats


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hookscope.warn, "_seen", set())  # warnings of earlier tests are not "seen" here


def constant_linear(bias: list[float], in_features: int) -> nn.Linear:
    """A linear layer with zero weights: each output feature is its bias, whatever the input."""
    lin = nn.Linear(in_features, len(bias))
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.copy_(torch.tensor(bias))
    return lin


# ---------------------------------------------------------------------------------------------------------------
# gradient norms under AMP loss scaling, on a contiguous float32 gradient (the ATen path's dot product)


class PlainOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)


@pytest.mark.usefixtures("each_path")
@pytest.mark.parametrize("scaler_kind", ["grad_scaler", "constant"])
def test_a_scaled_contiguous_float32_gradient_gives_the_unscaled_norm(scaler_kind: str) -> None:
    """Planted: the squared norm divided by the scale, not its square (√65536 = 256 times too large)."""
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(8, 16, generator=gen) for _ in range(2)]  # two micro-batches in one step
    weight = torch.randn(16, generator=gen)
    model = PlainOutput()
    with ActivationCalls() as seen:  # autograd on an uninstrumented copy, loss not scaled
        for x in xs:
            (copy.deepcopy(model)(x.clone().requires_grad_()) * weight).sum().backward()
    want = definition_stats("tanh", [y for _, y in seen.calls])["grad_norm"]
    hooked: list[torch.Tensor] = []

    def spy(module: nn.Module, args: object, out: torch.Tensor) -> None:
        out.register_hook(hooked.append)

    model.act.register_forward_hook(spy)
    scaler: Any = torch.amp.GradScaler("cpu") if scaler_kind == "grad_scaler" else 65536.0
    with HookManager(model, [GradientNorm(scaler=scaler)], alerts=False) as hm:
        for x in xs:
            loss = (model(x.clone().requires_grad_()) * weight).sum()
            (scaler.scale(loss) if scaler_kind == "grad_scaler" else loss * 65536.0).backward()
        hm.step()
    assert [(g.dtype, g.is_contiguous()) for g in hooked] == [(torch.float32, True)] * 2
    if scaler_kind == "grad_scaler":
        assert scaler.get_scale() == 65536.0  # the default scale: the gradients reaching the hook are 65536x
    assert hm.to_dataframe()["grad_norm"].iloc[0] == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# parameter statistics after model.to(memory_format=torch.channels_last)


@pytest.mark.usefixtures("each_path")
def test_an_untouched_weight_has_update_ratio_zero_after_channels_last() -> None:
    """Planted: the native parameter pass accepting a previous copy with other strides (it compared memory, not
    elements: an update ratio of about 1.2 for a weight nothing changed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    x = torch.randn(2, 3, 6, 6)
    with HookManager(model, params=True, alerts=False) as hm:
        model(x).sum().backward()
        hm.step()  # step 0: the copies for update_ratio are taken, contiguous
        model.to(memory_format=torch.channels_last)  # the same parameters, other strides, same values
        assert not model[0].weight.is_contiguous()
        model(x).sum().backward()  # no optimizer step: nothing changes the weights
        hm.step()
    rows = hm.param_frame().set_index(["step", "module"])
    assert rows.loc[(1, "0"), "update_ratio"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# unit dimension: the batch dimension is never a candidate


class Transposed(nn.Module):
    """Linear(3 -> 4) on (N, T, 3), then its output transposed to (N, 4, T) before the ReLU: the layer's place
    (last dim) no longer holds its 4 features, only its size tells. Feature 0 is dead (bias -1), 1..3 fire."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = constant_linear([-1.0, 1.0, 1.0, 1.0], 3)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(x).transpose(1, 2))


@pytest.mark.usefixtures("each_path")
def test_the_batch_dim_is_never_a_unit_dim_candidate() -> None:
    """Planted: the batch dim counted as a candidate (batch 4 = 4 features: "ambiguous", the shape rule's last
    dim, 5 units and 0% dead)."""
    model = Transposed()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with HookManager(model, alerts=False) as hm:
            model(torch.randn(4, 5, 3))  # batch 4, T 5
            hm.step()
    row = hm.to_dataframe().iloc[0]
    assert (row["units"], row["dead_ratio"]) == (4, 0.25)
    assert not [w for w in caught if issubclass(w.category, HookscopeWarning)]


# ---------------------------------------------------------------------------------------------------------------
# the state bank growing while closed steps wait in its ring


class LateWide(nn.Module):
    """``a``: a ReLU on 8 units, units 0..2 dead (bias -1), the others firing; ``b``: a ReLU on 2048 units (wider
    than the bank's first allocation) whose first calls run inside ``torch.func.vmap`` (skipped: the site is
    entered but not bound until its first plain call)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_a = constant_linear([-1.0] * 3 + [1.0] * 5, 2)
        self.a = nn.ReLU()
        self.fc_b = constant_linear([1.0] * 2048, 2)
        self.b = nn.ReLU()

    def forward(self, x: torch.Tensor, plain_b: bool) -> torch.Tensor:
        out = self.a(self.fc_a(x)).sum()
        branch = nn.Sequential(self.fc_b, self.b)
        wide = branch(x) if plain_b else torch.func.vmap(branch)(x)
        return out + wide.sum()


@pytest.mark.usefixtures("each_path")
def test_closed_steps_keep_their_values_when_the_bank_grows() -> None:
    """Planted: growing the state copies only row 0 of the ring (the other closed steps and the open one then
    read 100% inactive for ``a``)."""
    model = LateWide()
    x = torch.randn(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HookscopeWarning)  # b's calls inside vmap are skipped, with a warning
        with HookManager(model, [DeadReLU()], alerts=False) as hm:
            for step in range(4):
                model(x, plain_b=step == 3)  # b is bound at step 3, while steps 0..2 wait in the ring
                hm.step()
    frame = hm.to_dataframe()
    a = frame[frame["layer"] == "a"]
    assert a["step"].tolist() == [0, 1, 2, 3]
    assert a["dead_ratio"].tolist() == [3 / 8] * 4
    assert a["inactive_fraction"].tolist() == [3 / 8] * 4
    b = frame[frame["layer"] == "b"]
    assert b["step"].tolist() == [3] and b["units"].tolist() == [2048] and b["dead_ratio"].tolist() == [0.0]


# ---------------------------------------------------------------------------------------------------------------
# alerts, the table, CSV files


class Failing(AlertRule):
    name = "failing"

    def check(self, rows: pd.DataFrame) -> list[tuple[str, float, float, str]]:
        raise RuntimeError("the custom rule failed")


def test_an_error_of_a_custom_rule_reaches_the_caller_after_the_other_rules() -> None:
    """Planted: the exception of a custom rule swallowed."""
    model = nn.Sequential(constant_linear([-1.0, -1.0], 2), nn.ReLU())  # every unit dead
    fired: list[Any] = []
    rules = [Failing(), DeadRatioRule(0.1, column="dead_ratio")]
    alerts = Alerts(rules=rules, every=1, callback=fired.append, warn=False, log=False)
    hm = HookManager(model, alerts=alerts).attach()
    try:
        model(torch.randn(2, 2))
        with pytest.raises(RuntimeError, match="the custom rule failed"):
            hm.step()
    finally:
        hm.detach()
    assert [a.rule for a in fired] == ["dead_relu"]  # the rule after it still ran and was delivered
    assert hm.current_step == 1  # the step was closed all the same


def test_the_table_marks_dead_layers_on_the_confirmed_ratio() -> None:
    """Planted: the table marking dead layers on the per-step ``dead_ratio``."""
    frame = pd.DataFrame(
        {
            "step": [0, 0], "layer": ["quiet", "dead"], "kind": ["relu", "relu"], "shape": ["2x4", "2x4"],
            "units": [4, 4], "calls": [1, 1], "dead_ratio": [0.5, 0.5], "inactive_fraction": [0.6, 0.6],
            "saturation_rate": [math.nan] * 2, "grad_norm": [1.0, 1.0], "confirmed_dead_ratio": [0.0, 0.25],
        }
    )  # fmt: skip
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(build_table(frame, ascii=True))
    lines = {line.split("|")[1].strip(): line for line in console.file.getvalue().splitlines() if "relu" in line}  # type: ignore[attr-defined]
    assert "50.0% !" not in lines["quiet"] and "50.0%" in lines["quiet"]
    assert "50.0% !" in lines["dead"]


@pytest.mark.parametrize("spelling", ["NaN", "NAN", "nan"])
def test_read_stats_takes_nan_in_any_case(tmp_path: Path, spelling: str) -> None:
    """Planted: only the lower-case spelling accepted."""
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh())  # a tanh has no dead ratio: NaN in the report
    with HookManager(model, alerts=False) as hm:
        model(torch.randn(2, 2)).sum().backward()
        hm.step()
    path = tmp_path / "stats.csv"
    hm.to_csv(path)
    frame = pd.read_csv(path, keep_default_na=False, dtype=str)
    assert (frame["dead_ratio"] == "").all()
    frame["dead_ratio"] = spelling
    frame.to_csv(path, index=False)
    assert spelling in path.read_text()
    back = read_stats(str(path))
    assert back["dead_ratio"].isna().all() and back["layer"].tolist() == ["1"]


# ---------------------------------------------------------------------------------------------------------------
# plots: which layers are named, where the first layer is


def test_lines_rank_gradient_norms_by_their_last_value() -> None:
    """Planted: layers ranked by their first value."""
    from hookscope.reporters.plots import plot_lines

    # eleven layers; l10's first value is extreme (1e6) but its last is the median's; l09's last is extreme
    rows = []
    for i in range(11):
        first, last = (1e6, 1.0) if i == 10 else (1.0, 1e-6 if i == 9 else 1.0)
        rows += [(0, f"l{i:02d}", "relu", first), (1, f"l{i:02d}", "relu", last)]
    frame = pd.DataFrame(rows, columns=["step", "layer", "kind", "grad_norm"])
    fig = plot_lines(frame, "grad_norm")
    named = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "l09" in named and "l10" not in named and len(named) == 10


def test_the_heat_map_draws_the_first_layer_at_the_top() -> None:
    """Planted: the first layer drawn at the bottom."""
    from hookscope.reporters.plots import plot_heatmap

    frame = pd.DataFrame(
        [(0, name, "relu", v) for name, v in (("first", 0.0), ("middle", 0.5), ("last", 1.0))],
        columns=["step", "layer", "kind", "dead_ratio"],
    )
    ax = plot_heatmap(frame, "dead_ratio").axes[0]
    heights = {t.get_text(): ax.transData.transform((0, y))[1] for t, y in zip(ax.get_yticklabels(), ax.get_yticks())}
    assert heights["first"] > heights["middle"] > heights["last"]  # display y grows upwards


# ---------------------------------------------------------------------------------------------------------------
# the logging callbacks under HookManager(every=K)


class FakeLogger:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((step, dict(metrics)))


def _relu_model() -> nn.Module:
    model = nn.Sequential(constant_linear([1.0, -1.0], 2), nn.ReLU())
    model.automatic_optimization = True  # type: ignore[assignment]  # read by the Lightning callback
    return model


def test_the_lightning_callback_logs_each_recorded_step_once_under_every() -> None:
    """Planted: the step already logged logged again at each optimizer step that ``every`` does not record."""
    pytest.importorskip("lightning.pytorch")
    from hookscope.integrations.lightning import HookscopeCallback

    callback = HookscopeCallback(log_every_n_steps=1, alerts=False, every=3)
    model = _relu_model()
    logger = FakeLogger()
    trainer = type("Trainer", (), {"loggers": [logger], "global_step": 0})()
    callback.on_fit_start(trainer, model)
    callback.on_train_start(trainer, model)  # the manager is built here (Lightning restores global_step before)
    try:
        for global_step in range(1, 8):
            model(torch.randn(2, 2)).sum().backward()
            callback.on_before_optimizer_step(trainer, model, None)  # closes hookscope step global_step - 1
            trainer.global_step = global_step
    finally:
        callback.teardown(trainer, model, "fit")
    # recorded: hookscope steps 0, 3, 6 (every=3); each logged once, when it closed (after optimizer steps 1, 4, 7)
    assert [step for step, _ in logger.logged] == [0, 3, 6]
    assert all(m["hookscope/1/dead_ratio"] == 0.5 for _, m in logger.logged)


def test_the_trainer_callback_logs_each_recorded_step_once_under_every() -> None:
    """Planted: the step already logged logged again at each optimizer step that ``every`` does not record."""
    transformers = pytest.importorskip("transformers")
    from hookscope.integrations.transformers import HookscopeTrainerCallback

    class FakeTrainer:
        def __init__(self) -> None:
            self.control = transformers.TrainerControl()
            self.logged: list[dict[str, float]] = []

        def log(self, logs: dict[str, float]) -> None:
            self.logged.append(dict(logs))

    callback = HookscopeTrainerCallback(log_every_n_steps=1, alerts=False, every=3)
    model = _relu_model()
    state, control, fake = transformers.TrainerState(), transformers.TrainerControl(), FakeTrainer()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*did not find the transformers Trainer.*")  # driven by hand
        callback.on_train_begin(None, state, control, model=model)
    callback._trainer = lambda: fake
    try:
        for global_step in range(1, 8):
            callback.on_step_begin(None, state, control)
            model(torch.randn(2, 2)).sum().backward()
            callback.on_pre_optimizer_step(None, state, control)
            state.global_step = global_step
            callback.on_step_end(None, state, control)
    finally:
        callback.on_train_end(None, state, control)
    assert len(fake.logged) == 3  # hookscope steps 0, 3 and 6: each once
    assert all(m["hookscope/1/dead_ratio"] == 0.5 for m in fake.logged)


# ---------------------------------------------------------------------------------------------------------------
# torch.distributed: a site that only backward passes reach in a step


def backward_only_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = nn.Sequential(constant_linear([1.0, -1.0], 1), nn.ReLU())
        with HookManager(model, alerts=False) as hm:
            # step 0: a forward only; step 1: its backward only (dL/dy = rank + 1 on every element)
            y = model(torch.ones(rank + 1, 1))
            hm.step()
            (y * (rank + 1.0)).sum().backward()
            hm.step()
        if rank == 0:
            hm.to_csv(Path(out_dir) / "combined.csv")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_site_reached_only_by_backward_passes_is_in_the_combined_record(tmp_path: Path) -> None:
    """Planted: the combined record keeping only the sites with forward calls in the step."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(backward_only_worker, args=(init_file, str(tmp_path)), nprocs=2, join=True)
    frame = pd.read_csv(tmp_path / "combined.csv", dtype={"layer": str})
    assert frame["step"].tolist() == [0, 1]
    assert frame["calls"].tolist() == [2, 0]  # one forward per rank in step 0, none in step 1
    # rank 0: 1 sample x 2 units of gradient 1; rank 1: 2 samples x 2 units of gradient 2 -> sqrt(2 + 16)
    assert math.isnan(frame["grad_norm"].iloc[0]) and frame["grad_norm"].iloc[1] == pytest.approx(math.sqrt(18))


# ---------------------------------------------------------------------------------------------------------------
# survivors of this issue's own audit (see the report of issue 23.6)


class Counting(AlertRule):
    """Records the steps at which the rules are checked (a rule sees only its step's rows)."""

    name = "counting"

    def __init__(self) -> None:
        self.steps: list[int] = []

    def check(self, rows: pd.DataFrame) -> list[tuple[str, float, float, str]]:
        self.steps.extend(sorted(set(rows["step"])))
        return []


@pytest.mark.parametrize(("every", "record_every", "want"), [(10, 1, [9, 19, 29]), (10, 4, [12, 20, 32])])
def test_alert_checks_fall_due_once_per_period(every: int, record_every: int, want: list[int]) -> None:
    """Planted: the next check computed from the step checked, not the step after it (a check at step every - 1
    made the next one due at once: checks at 9, 10, 19, 20...)."""
    rule = Counting()
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    alerts = Alerts(rules=[rule], every=every, warn=False, log=False)
    with HookManager(model, alerts=alerts, every=record_every) as hm:
        for _ in range(35):
            model(torch.randn(2, 2))
            hm.step()
    # due after steps 9, 19, 29; under every=4 only steps 0, 4, 8, ... are recorded: the next recorded one
    assert rule.steps == want


def _table_lines(table: Any) -> dict[str, str]:
    console = Console(file=io.StringIO(), width=160, color_system=None)
    console.print(table)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    rows = [line for line in text.splitlines() if line.startswith("|") and "---" not in line]
    return {line.split("|")[1].strip(): line for line in rows}


def test_the_table_marks_saturation_from_exactly_half() -> None:
    """Planted: saturation marked above 50% only (the alert rule fires at 50%: ``saturation_rate >= 0.5``)."""
    frame = pd.DataFrame(
        {
            "step": [0, 0], "layer": ["half", "under"], "kind": ["sigmoid"] * 2, "shape": ["2x4"] * 2,
            "units": [4, 4], "calls": [1, 1], "dead_ratio": [math.nan] * 2, "inactive_fraction": [math.nan] * 2,
            "saturation_rate": [0.5, 0.4999], "grad_norm": [1.0, 1.0], "confirmed_dead_ratio": [math.nan] * 2,
        }
    )  # fmt: skip
    lines = _table_lines(build_table(frame, ascii=True))
    assert "50.0% !" in lines["half"] and "!" not in lines["under"]


def test_the_parameter_table_marks_update_ratios_of_modules_with_a_gradient_only() -> None:
    """Planted: an update ratio outside 1e-6 .. 1e-1 marked for a module without a gradient (frozen: it does not
    move, its ratio 0 is no alarm; the alert rule skips it too)."""
    from hookscope.reporters.table import build_param_table

    frame = pd.DataFrame(
        {
            "step": [1, 1, 1], "module": ["frozen", "moving", "stuck"], "kind": ["Linear"] * 3, "params": [6] * 3,
            "weight_norm": [1.0] * 3, "grad_norm": [math.nan, 1.0, 1.0], "update_ratio": [0.0, 1e-3, 0.0],
        }
    )  # fmt: skip
    lines = _table_lines(build_param_table(frame, ascii=True))
    assert "!" not in lines["frozen"] and "!" not in lines["moving"] and lines["stuck"].rstrip(" |").endswith("!")
