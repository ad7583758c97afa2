"""Behaviours a mutation audit of the suite found untested (issue 11.8). Each test fails when its behaviour breaks;
expected values come from the construction of the inputs (planted dead units, outputs that fire on known samples,
hand-built frames) or from autograd on an uninstrumented copy, never from hookscope itself."""

from __future__ import annotations

import copy
import io
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from conftest import ActivationCalls, Extremes, definition_stats
from rich.console import Console

import hookscope as hs
import hookscope.distributed
import hookscope.warn
from hookscope import Alerts, DeadReLU, GradientNorm, HookManager, HookscopeWarning, Saturation, kernels
from hookscope.alerts import (
    ExplodingGradientRule,
    HookscopeAlert,
    VanishingGradientRule,
    gradient_median,
    gradient_outliers,
)


@pytest.fixture(params=["native", "aten"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The native kernels and the ATen formulation (managers built inside use it)."""
    if request.param == "native" and not kernels.available():
        pytest.skip(f"native kernels unavailable: {kernels.info()['reason']}")
    with kernels.forced(request.param):
        yield request.param


def fixed_linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    lin = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(weight))
        lin.bias.copy_(torch.tensor(bias))
    return lin


# ---------------------------------------------------------------------------------------------------------------
# 1. rectifier sites discovered after sites the dead-unit collector does not record


class TanhThenRelus(nn.Module):
    """tanh (2 units), relu ``a`` (3 units), sigmoid (2 units), relu ``b`` (5 units), in this order; ``stage`` 0
    runs the tanh only, 1 up to ``a``, 2 all. Weights are 0 and biases +1 or -100: ``a``'s unit 1 and ``b``'s units
    0 and 3 can never fire, every other unit always does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.t = nn.Linear(2, 2), nn.Tanh()
        self.fc1, self.a = fixed_linear([[0.0, 0.0]] * 3, [1.0, -100.0, 1.0]), nn.ReLU()
        self.fc2, self.s = nn.Linear(3, 2), nn.Sigmoid()
        self.fc3, self.b = fixed_linear([[0.0, 0.0]] * 5, [-100.0, 1.0, 1.0, -100.0, 1.0]), nn.ReLU()
        self.stage = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.t(self.fc0(x))
        if self.stage >= 1:
            h = self.a(self.fc1(h))
        if self.stage >= 2:
            h = self.b(self.fc3(self.s(self.fc2(h))))
        return h


@pytest.mark.parametrize("late", [False, True], ids=["same_step", "later_steps"])
def test_rectifier_sites_after_other_kinds_keep_their_own_units(backend: str, late: bool) -> None:
    # the dead-unit state holds the rectifiers only: a and b are sites 1 and 3, but its units 0-2 and 3-7
    model = TanhThenRelus()
    with HookManager(model, [Saturation(), DeadReLU(window=2), GradientNorm()], alerts=False) as hm:
        for step in range(4):
            model.stage = min(step, 2) if late else 2
            model(torch.randn(4, 2)).sum().backward()
            hm.step()
        assert hm.layers == ["t", "a", "s", "b"]
        assert hm.dead_units("a") == [1] and hm.dead_units("b") == [0, 3]
        df = hm.to_dataframe()
        tl = hm.unit_timeline()
    rows = df[df["step"] == 3].set_index("layer")
    assert rows["units"].to_dict() == {"t": 2, "a": 3, "s": 2, "b": 5}
    assert rows.loc["a", "dead_ratio"] == 1 / 3 and rows.loc["b", "dead_ratio"] == 2 / 5
    assert rows.loc["a", "inactive_fraction"] == 1 / 3 and rows.loc["b", "inactive_fraction"] == 2 / 5
    assert rows[["dead_ratio"]].loc[["t", "s"]].isna().all().all()
    assert list(zip(tl["layer"], tl["unit"], tl["dead"])) == [
        ("a", 0, False), ("a", 1, True), ("a", 2, False),
        ("b", 0, True), ("b", 1, False), ("b", 2, False), ("b", 3, True), ("b", 4, False),
    ]  # fmt: skip
    assert tl["last_fired"].tolist() == pytest.approx([3, math.nan, 3, math.nan, 3, 3, math.nan, 3], nan_ok=True)
    first_a, first_b = (1, 2) if late else (0, 0)  # a dead unit's spell began at its site's first step
    assert tl["dead_since"].tolist() == pytest.approx(
        [math.nan, first_a, math.nan, first_b, math.nan, math.nan, first_b, math.nan], nan_ok=True
    )
    audit = hs.audit(TanhThenRelus(), [torch.randn(4, 2) for _ in range(2)])
    assert audit.attrs["dead_units"] == {"a": [1], "b": [0, 3]}


# ---------------------------------------------------------------------------------------------------------------
# 2. loss-scaled gradients in fp16 or with strides: the unscaled autograd norm


class HalfOutput(nn.Module):
    """An fp16 tanh output read in float32: its gradient is an fp16 tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x).float()


class SummedOutput(nn.Module):
    """The output summed over the batch: its gradient is expanded (stride 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x).sum(dim=0)


@pytest.mark.parametrize("scaler_kind", ["grad_scaler", "constant"])
@pytest.mark.parametrize(("make", "dtype"), [(HalfOutput, torch.float16), (SummedOutput, torch.float32)])
def test_scaled_half_and_strided_gradients_give_the_unscaled_norm(
    backend: str, scaler_kind: str, make: type[nn.Module], dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(32, 16, generator=gen).to(dtype) for _ in range(2)]  # two micro-batches in one step
    weight = torch.randn(16, generator=gen)
    model = make()
    with ActivationCalls() as seen:  # the reference: autograd on an uninstrumented copy, unscaled loss
        for x in xs:
            (copy.deepcopy(model)(x.detach().requires_grad_()) * weight).sum().backward()
    want = definition_stats("tanh", [y for _, y in seen.calls])["grad_norm"]
    hooked: list[torch.Tensor] = []  # the gradients reaching the activation, to check which path they take

    def spy(module: nn.Module, args: object, out: torch.Tensor) -> None:
        out.register_hook(hooked.append)

    model.act.register_forward_hook(spy)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if scaler_kind == "grad_scaler" else 4096.0
    if scaler_kind == "grad_scaler":
        assert scaler.is_enabled()
    with HookManager(model, [GradientNorm(scaler=scaler)], alerts=False) as hm:
        for x in xs:
            loss = (model(x.detach().requires_grad_()) * weight).sum()
            (scaler.scale(loss) if scaler_kind == "grad_scaler" else loss * 4096.0).backward()
        hm.step()
    assert [g.dtype for g in hooked] == [dtype] * 2
    assert [g.is_contiguous() for g in hooked] == [make is HalfOutput] * 2  # which path the gradient takes
    assert hm.to_dataframe()["grad_norm"].iloc[0] == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# 3. rows of one step that runs some sites only, in another order than they were discovered


class Ordered(nn.Module):
    """Sites a (relu, 2 units), b (tanh, 3 units), c (relu, 4 units), run in the order given, each output
    weighted so that dL/dy is 1 for a, 2 for b and 3 for c."""

    WEIGHTS: ClassVar[dict[str, float]] = {"a": 1.0, "b": 2.0, "c": 3.0}

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.ReLU(), nn.Tanh(), nn.ReLU()

    def forward(self, xs: dict[str, torch.Tensor], order: str) -> torch.Tensor:
        return sum(getattr(self, n)(xs[n]).sum() * self.WEIGHTS[n] for n in order)  # type: ignore[return-value]


class RecordingWriter:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []
        self.flushes = 0

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self.scalars.append((tag, value, global_step))

    def flush(self) -> None:
        self.flushes += 1


def _input(rows: list[list[float]], n: int = 64) -> torch.Tensor:
    return torch.tensor(rows * n, requires_grad=True)


# step 1 runs c, then a (b not at all). c: every unit silent on 128 outputs (dead, confirmed); a: unit 1 fires on
# half of the samples, unit 0 on all: inactive 1/4, no dead unit.
STEP1 = {"c": (1.0, 1.0, 3.0 * math.sqrt(128 * 4)), "a": (0.0, 0.25, 1.0 * math.sqrt(128 * 2))}


def test_rows_of_a_step_are_each_sites_own_in_every_report(backend: str, tmp_path: Path) -> None:
    model = Ordered()
    frames: list[pd.DataFrame] = []
    alerts: list[hs.Alert] = []
    writer = RecordingWriter()
    sinks = [
        hs.CSVSink(tmp_path / "s.csv", every=1),
        hs.TensorBoardSink(writer, every=1),
        hs.CallbackSink(frames.append, every=1),
    ]
    with HookManager(model, alerts=Alerts(every=1, callback=alerts.append, warn=False, log=False), sinks=sinks) as hm:
        model({"a": _input([[1.0, 1.0]]), "b": _input([[0.0, 0.0, 0.0]]), "c": _input([[1.0] * 4])}, "abc").backward()
        hm.step()
        model({"a": _input([[1.0, 1.0], [1.0, -1.0]]), "c": _input([[-1.0] * 4], n=128)}, "ca").backward()
        hm.step()
        last = hm.last_step_frame()
        console = Console(file=io.StringIO(), width=120, color_system=None)
        console.print(hm.table(ascii=True))
    columns = ["dead_ratio", "inactive_fraction", "grad_norm"]

    def step1(frame: pd.DataFrame) -> dict[str, tuple[float, ...]]:
        rows = frame[frame["step"] == 1]
        return {r.layer: tuple(getattr(r, c) for c in columns) for r in rows.itertuples()}

    for name, frame in [
        ("last_step_frame", last),
        ("CallbackSink", frames[1]),
        ("CSVSink", pd.read_csv(tmp_path / "s.csv", dtype={"layer": str})),
        ("to_dataframe", hm.to_dataframe()),
    ]:
        assert list(frame[frame["step"] == 1]["layer"]) == ["c", "a"], name  # execution order, b did not run
        got = step1(frame)
        assert got == {k: pytest.approx(v, rel=1e-6) for k, v in STEP1.items()}, name
    scalars = {(tag, step): value for tag, value, step in writer.scalars}
    for layer, values in STEP1.items():
        for column, value in zip(columns, values):
            assert scalars[(f"hookscope/{layer}/{column}", 1)] == pytest.approx(value, rel=1e-6), (layer, column)
    assert not any(tag.startswith("hookscope/b/") and step == 1 for tag, step in scalars)
    assert scalars[("hookscope/b/grad_norm", 0)] == pytest.approx(2.0 * math.sqrt(64 * 3))
    assert writer.flushes == 3  # once per write, once more when the manager detaches
    # the only alert: c's dead units at step 1 (a has none, b did not run)
    assert [(x.rule, x.layer, x.step, x.value) for x in alerts] == [("dead_relu", "c", 1, 1.0)]
    table = console.file.getvalue()  # type: ignore[attr-defined]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]
    assert cells[1:] == [
        ["c", "relu", "128x4", "1", "100.0% !", "100.0%", "-", f"{3 * math.sqrt(512):.3g}"],
        ["a", "relu", "128x2", "1", "0.0%", "25.0%", "-", f"{math.sqrt(256):.3g}"],
    ]


# ---------------------------------------------------------------------------------------------------------------
# 4. dead-unit history across growth of the state banks (past 16 sites and 1,024 units)


UNITS = 70  # 15 sites hold 1,050 units


def depth(step: int) -> int:
    """Sites run at ``step``: the units pass 1,024 at step 12 (15 sites), the sites pass 16 at step 18."""
    return 2 if step < 3 else 9 if step < 6 else 14 if step < 12 else 15 if step < 18 else 17 if step < 21 else 20


class Bank(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.acts = nn.ModuleList(nn.ReLU() for _ in range(20))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, sites that run, units)
        return torch.stack([self.acts[i](x[:, i]) for i in range(x.shape[1])], dim=1)


def test_dead_unit_history_across_state_growth_matches_a_step_by_step_reference(backend: str) -> None:
    window, steps = 3, 40
    rng = np.random.default_rng(7)
    rates = np.array([0.5, 0.1, 0.03, 0.0, 0.9, 0.3, 0.05])[np.arange(UNITS) % 7]
    fires = rng.random((steps, 20, UNITS)) < rates  # whether each unit fires in each step (first sample)
    with HookManager(Bank(), [DeadReLU(window=window)], alerts=False) as hm:
        for s in range(steps):
            n = depth(s)
            x = -torch.ones(2, n, UNITS)  # the second sample never fires
            x[0] = torch.from_numpy(np.where(fires[s, :n], 1.0, -1.0))
            hm.model(x)
            if s in (4, 13, 19):
                hm.to_dataframe()  # a report inside a step (the ring flushed early)
            hm.step()
        assert len(hm.sites) == 20 and sum(site.units for site in hm.sites) == 1400
        df = hm.to_dataframe()
        timeline = hm.unit_timeline()
        dead_units = {f"acts.{i}": hm.dead_units(f"acts.{i}") for i in range(20)}
    first = [min(s for s in range(steps) if depth(s) > i) for i in range(20)]
    # the reference, step by step: a unit is dead at s when it did not fire in s - window + 1 ... s (steps before
    # its site first ran count as silent); a revival is a fire while dead at the step before, having fired before
    want: dict[tuple[int, str], tuple[float, float]] = {}
    last = np.full((20, UNITS), -1)
    revivals = np.zeros((20, UNITS), dtype=int)
    last_revival = np.full((20, UNITS), np.nan)
    for s in range(steps):
        for i in range(depth(s)):
            f = fires[s, i]
            was_dead = (last[i] >= 0) & (last[i] <= s - 1 - window)
            revivals[i] += was_dead & f
            last_revival[i] = np.where(was_dead & f, s, last_revival[i])
            last[i] = np.where(f, s, last[i])
            dead = (last[i] < 0) | (last[i] <= s - window)
            want[(s, f"acts.{i}")] = (dead.mean(), (2 * UNITS - f.sum()) / (2 * UNITS))
    got = {(int(r.step), r.layer): (r.dead_ratio, r.inactive_fraction) for r in df.itertuples()}
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    dead_now = (last < 0) | (last <= steps - 1 - window)
    since = np.where(last < 0, np.array(first)[:, None], last + window)
    assert timeline["layer"].tolist() == [f"acts.{i}" for i in range(20) for _ in range(UNITS)]
    assert timeline["last_fired"].tolist() == pytest.approx(np.where(last < 0, np.nan, last).ravel(), nan_ok=True)
    assert timeline["dead"].tolist() == dead_now.ravel().tolist()
    assert timeline["dead_since"].tolist() == pytest.approx(np.where(dead_now, since, np.nan).ravel(), nan_ok=True)
    assert timeline["revivals"].tolist() == revivals.ravel().tolist()
    assert timeline["last_revival"].tolist() == pytest.approx(last_revival.ravel(), nan_ok=True)
    assert dead_units == {f"acts.{i}": np.flatnonzero(dead_now[i]).tolist() for i in range(20)}
    assert revivals.sum() > 50 and dead_now.any() and not dead_now.all()  # the pattern exercises every case


# ---------------------------------------------------------------------------------------------------------------
# custom max / min states: each step starts from the declared default (also after the ring is recycled)


def test_max_and_min_states_restart_from_their_defaults_every_step() -> None:
    # outputs of tanh(x) for x in a step-dependent band that is all negative in even steps, all positive in odd
    model = nn.Sequential(nn.Tanh())
    steps = 2 * hs.collectors.base.RING_STEPS + 3
    xs = [torch.linspace(0.1, 0.5, 7) * (s + 1) * (1 if s % 2 else -1) for s in range(steps)]
    with HookManager(model, [Extremes()], alerts=False) as hm:
        for x in xs:
            model(x[None])
            model(x[None] / 2)  # a second call in the step: the extremes of both
            hm.step()
        model(xs[0][None])  # the open step
        df = hm.to_dataframe()
    want_hi = [float(torch.tanh(x if s % 2 else x / 2).max()) for s, x in enumerate(xs)]
    want_lo = [float(torch.tanh(x / 2 if s % 2 else x).min()) for s, x in enumerate(xs)]
    open_step = torch.tanh(xs[0])
    assert df["step"].tolist() == list(range(steps + 1))
    assert df["largest"].tolist() == pytest.approx([*want_hi, float(open_step.max())], rel=1e-6)
    assert df["smallest"].tolist() == pytest.approx([*want_lo, float(open_step.min())], rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# 6. the audit's pass: eval mode, no autograd, every module's mode restored


class Probe(nn.Module):
    """Records, at each forward, whether it runs in training mode and with autograd on."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.training, torch.is_grad_enabled()))
        return x


def test_audit_runs_in_eval_mode_without_autograd_and_restores_every_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), Probe(), nn.Dropout(0.5), nn.ReLU())
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.5, -0.5, 0.0, 3.0]))  # stats of the model, not of the batches
    model.train()
    model[0].eval()  # a mixed mode that must come back exactly
    modes = [m.training for m in model.modules()]
    buffers = {k: v.clone() for k, v in model[1].state_dict().items()}
    reference = copy.deepcopy(model).eval()
    batches = [torch.randn(16, 2) for _ in range(3)]
    frame = hs.audit(model, batches)
    assert model[2].seen == [(False, False)] * 3  # eval mode (Dropout off, BatchNorm's running stats) and no_grad
    assert [m.training for m in model.modules()] == modes
    for name, value in model[1].state_dict().items():
        assert torch.equal(value, buffers[name]), name  # running stats and num_batches_tracked untouched
    with torch.no_grad():
        ys = [reference(x) for x in batches]
    assert frame["inactive_fraction"].iloc[0] == pytest.approx(float((torch.cat(ys) <= 0).double().mean()), abs=0)
    never = (torch.cat(ys) > 0).sum(dim=0) == 0
    assert frame.attrs["dead_units"] == {"4": np.flatnonzero(never.numpy()).tolist()}
    assert math.isnan(frame["grad_norm"].iloc[0])


# ---------------------------------------------------------------------------------------------------------------
# 8. warnings (and alerts, and sinks) on rank zero only


@pytest.fixture
def fake_rank(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], None]]:
    """Make torch.distributed look initialised, with one rank, whose number the test chooses."""
    import torch.distributed as dist

    monkeypatch.setattr(hookscope.warn, "_seen", set())
    monkeypatch.setattr(hookscope.distributed, "_last_rank", None)  # rank() remembers the rank it saw
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)

    def set_rank(rank: int) -> None:
        monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)

    yield set_rank


def _hookscope_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, HookscopeWarning)]


def test_warn_once_warns_on_rank_zero_only(fake_rank) -> None:  # type: ignore[no-untyped-def]
    for rank, expected in ((1, []), (0, ["hookscope: a problem"])):
        fake_rank(rank)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hookscope.warn.warn_once("hookscope: a problem")
        assert _hookscope_warnings(caught) == expected, rank


@pytest.mark.parametrize("rank", [0, 1])
def test_alert_warnings_logs_and_sinks_on_rank_zero_only(fake_rank, rank: int, caplog) -> None:  # type: ignore[no-untyped-def]
    fake_rank(rank)
    model = nn.Sequential(fixed_linear([[0.0, 0.0]] * 2, [-1.0, 1.0]), nn.ReLU())  # unit 0 dead
    seen: list[hs.Alert] = []
    written: list[int] = []
    every_rank: list[int] = []

    class EveryRank(hs.CallbackSink):
        all_ranks = True

    sinks = [
        hs.CallbackSink(lambda f: written.append(len(f)), every=1),
        EveryRank(lambda f: every_rank.append(len(f)), every=1),
    ]
    with (
        warnings.catch_warnings(record=True) as caught,
        caplog.at_level(logging.WARNING, logger="hookscope"),
        HookManager(model, alerts=Alerts(every=1, callback=seen.append), sinks=sinks) as hm,
        HookManager(nn.Sequential(nn.ReLU()), include="nothing*", alerts=False) as unmatched,
    ):
        warnings.simplefilter("always")
        model(torch.randn(128, 2))
        hm.step()
        unmatched.model(torch.randn(2, 2))
        unmatched.step()  # its `include` matched no site: a warning
    assert [(a.rule, a.layer) for a in seen] == [("dead_relu", "1")]  # the callback runs on every rank
    alert_warnings = [w for w in caught if issubclass(w.category, HookscopeAlert)]
    assert len(alert_warnings) == (rank == 0)
    assert sum("matched none" in m for m in _hookscope_warnings(caught)) == (rank == 0)
    assert sum("dead_relu" in r.getMessage() for r in caplog.records) == (rank == 0)
    assert written == ([1] if rank == 0 else []) and every_rank == [1]


# ---------------------------------------------------------------------------------------------------------------
# 9. zero gradient norms are not part of the median of the gradient rules


def grad_rows(norms: list[float]) -> pd.DataFrame:
    n = len(norms)
    return pd.DataFrame({"layer": [f"l{i}" for i in range(n)], "kind": ["relu"] * n, "grad_norm": norms})


def test_zero_gradient_norms_are_left_out_of_the_median() -> None:
    nan = math.nan
    # four dead layers (norm 0), a layer without backward (NaN), and 1, 2, 3, 1000: the median is 2.5, not 0.5
    norms = [0.0, 0.0, 0.0, 0.0, nan, 1.0, 2.0, 3.0, 1000.0]
    assert gradient_median(np.array(norms)) == 2.5
    assert gradient_median(np.array([0.0, 0.0, 5.0])) != gradient_median(np.array([0.0, 0.0, 5.0]))  # NaN: one
    assert ExplodingGradientRule().check(grad_rows(norms)) == []  # 1000 < 2500 (zeros counted: 1000 > 500)
    vanishing = VanishingGradientRule().check(grad_rows(norms))
    assert [h[0] for h in vanishing] == ["l0", "l1", "l2", "l3"] and vanishing[0][2] == pytest.approx(2.5e-3)
    # 1e-3 is below 1e-3 x 2 (the median without the zeros); with them the median is 0 and nothing is below it
    hits = VanishingGradientRule().check(grad_rows([0.0, 0.0, 0.0, 0.0, 0.0, 1e-3, 2.0, 3.0]))
    assert [h[0] for h in hits] == ["l0", "l1", "l2", "l3", "l4", "l5"]
    # fewer than two non-zero norms: no median, so nothing is an outlier (with zeros, 5.0 > 0 would explode)
    assert ExplodingGradientRule().check(grad_rows([0.0, 0.0, 5.0])) == []
    assert VanishingGradientRule().check(grad_rows([0.0, 0.0, 5.0])) == []
    vanish, explode = gradient_outliers(np.array(norms))  # what the table marks
    assert vanish.tolist() == [True] * 4 + [False] * 5 and not explode.any()


# ---------------------------------------------------------------------------------------------------------------
# 10. wrapper components are not part of layer names


class Wrapped(nn.Module):
    """Holds its inner module under a wrapper's attribute name, as FSDP1 (``_fsdp_wrapped_module``) and the
    checkpoint wrappers (``_checkpoint_wrapped_module``) do."""

    def __init__(self, inner: nn.Module, attribute: str) -> None:
        super().__init__()
        self.add_module(attribute, inner)
        self.attribute = attribute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.attribute)(x)


def test_wrapper_components_are_dropped_from_names() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(2, 3),
        checkpoint_wrapper(nn.Sequential(nn.Linear(3, 4), nn.ReLU())),
        Wrapped(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), "_fsdp_wrapped_module"),
        Wrapped(nn.Sequential(nn.Sigmoid()), "_checkpoint_wrapped_module"),
    )
    assert "1._checkpoint_wrapped_module.1" in dict(model.named_modules())
    x = torch.randn(6, 2)
    with ActivationCalls() as seen:
        copy.deepcopy(model)(x).sum().backward()
    with HookManager(model, alerts=False) as hm:
        model(x).sum().backward()
        hm.step()
    df = hm.to_dataframe()
    assert list(df["layer"]) == ["1.1", "2.1", "3.0"]
    assert list(df["kind"]) == ["relu", "tanh", "sigmoid"]
    assert list(df["calls"]) == [1, 1, 1]  # the checkpointed forward, recomputed in backward, counts once
    for (kind, y), row in zip(seen.calls, df.itertuples()):
        want = definition_stats(kind, [y])
        assert (row.inactive_fraction, row.saturation_rate, row.grad_norm) == pytest.approx(
            (want["inactive_fraction"], want["saturation_rate"], want["grad_norm"]), rel=1e-6, nan_ok=True
        ), row.layer
    with HookManager(model, include="1.1", alerts=False) as only:
        model(x)
    assert list(only.to_dataframe()["layer"]) == ["1.1"]


# an activation module wrapped directly has the cleaned name of its wrapper: both must be hooked (the tracer
# keys hooks by raw names), or the site became the functional '1.relu()' (nothing at all with functional=False)
@pytest.mark.parametrize("functional", [True, False])
def test_a_wrapped_activation_module_is_a_module_site_named_after_its_wrapper(functional: bool) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = nn.Sequential(nn.Linear(2, 3), checkpoint_wrapper(nn.ReLU()), nn.Linear(3, 1))
    with HookManager(model, functional=functional, alerts=False) as hm:
        model(torch.randn(5, 2)).sum().backward()
        hm.step()
    df = hm.to_dataframe()
    assert list(zip(df["layer"], df["kind"], df["calls"])) == [("1", "relu", 1)]


# ---------------------------------------------------------------------------------------------------------------
# 11. a unit_dim pattern for a layer applies to its further calls


class Conv1dTwice(nn.Module):
    """One ReLU module called on (N, C, L) outputs of 3 channels, then of 5 channels (``act``, ``act#1``)."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.act(x).sum() + self.act(z).sum()


def test_unit_dim_pattern_of_a_layer_applies_to_its_further_calls() -> None:
    x, z = torch.ones(2, 3, 7), torch.ones(2, 5, 11)
    x[:, 1] = -1.0  # channel 1 of the first call and channel 4 of the second never fire
    z[:, 4] = -1.0
    model = Conv1dTwice()
    with HookManager(model, [DeadReLU()], unit_dim={"act": 1}, alerts=False) as hm:
        model(x, z)
        hm.step()
        assert hm.dead_units("act") == [1] and hm.dead_units("act#1") == [4]
    df = hm.to_dataframe()
    assert list(df["layer"]) == ["act", "act#1"] and list(df["units"]) == [3, 5]
    assert df["dead_ratio"].tolist() == [1 / 3, 1 / 5]
    with HookManager(model, [DeadReLU()], unit_dim={"act#1": 1}, alerts=False) as second_only:
        model(x, z)
    assert list(second_only.to_dataframe()["units"]) == [7, 5]  # the first call keeps the default (last dim)


# ---------------------------------------------------------------------------------------------------------------
# 13. dead_since of a site that first runs after step 0


class LateSite(nn.Module):
    """``a`` runs at every step; ``b`` (3 units) from step 5 on, where unit 1 fires at step 6 only."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        out = self.a(x).sum()
        if step >= 5:
            z = -torch.ones(2, 3)
            z[:, 1] = 1.0 if step == 6 else -1.0
            out = out + self.b(z).sum()
        return out


@pytest.mark.parametrize("window", [1, 3])
def test_dead_since_of_a_site_first_seen_after_step_zero(window: int) -> None:
    model = LateSite()
    with HookManager(model, [DeadReLU(window=window)], alerts=False) as hm:
        for s in range(10):
            model(torch.ones(2, 2), s)
            hm.step()
        tl = hm.unit_timeline("b")
        b = hm.to_dataframe().query("layer == 'b'")
    assert tl["dead"].tolist() == [True, True, True]
    assert tl["dead_since"].tolist() == [5.0, 6.0 + window, 5.0]  # never fired: the site's first step
    assert tl["last_fired"].tolist() == pytest.approx([math.nan, 6.0, math.nan], nan_ok=True)
    assert b["step"].tolist() == [5, 6, 7, 8, 9]
    # unit 1 alive at steps 6 ... 6 + window - 1
    assert b["dead_ratio"].tolist() == [1.0 if s < 6 or s >= 6 + window else 2 / 3 for s in range(5, 10)]
