"""Audit pass, dead units by index and over time, alerts, non-finite values."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import SharedReLU, hook_count
from test_statistics import col, three_unit_relu

import hookscope as hs
from hookscope import DeadReLU, GradientNorm, HookManager, NonFinite, Saturation
from hookscope.alerts import (
    Alerts,
    DeadRatioRule,
    ExplodingGradientRule,
    HookscopeAlert,
    NonFiniteRule,
    SaturationRule,
    VanishingGradientRule,
)
from hookscope.collectors.base import RING_STEPS

# ---------------------------------------------------------------------------------------------------------------
# audit


def test_audit_whole_pass_definition_and_model_left_as_found() -> None:
    model = nn.Sequential(three_unit_relu(), nn.BatchNorm1d(3), nn.Dropout(0.5))
    model.train()
    model[1].eval()  # a mixed mode that must come back exactly
    bn_before = model[1].running_mean.clone()
    # unit 0 fires only in the second batch, unit 1 only in the first: over the pass only unit 2 is dead
    frame = hs.audit(model, [col(-1.0, -2.0), (col(3.0), torch.zeros(1)), col(0.0)])
    assert list(frame["step"]) == [0] and frame["calls"].iloc[0] == 3
    assert frame.attrs["dead_units"] == {"0.1": [2]}
    assert frame["dead_ratio"].iloc[0] == 1 / 3
    # inactive: batch 1: 2 + 0 + 2, batch 2: 0 + 1 + 1, batch 3: 3 of 3 -> 9 of 12
    assert frame["inactive_fraction"].iloc[0] == 9 / 12
    assert math.isnan(frame["grad_norm"].iloc[0])
    assert [m.training for m in model.modules()] == [True, True, True, True, False, True]
    assert torch.equal(model[1].running_mean, bn_before)
    assert hook_count(model) == 0


def test_audit_restores_modes_when_a_batch_raises() -> None:
    model = SharedReLU().train()

    def batches():
        yield torch.randn(2, 4)
        yield torch.randn(2, 5)  # wrong width: the model raises

    with pytest.raises(RuntimeError):
        hs.audit(model, batches())
    assert model.training and hook_count(model) == 0


def test_audit_validates() -> None:
    with pytest.raises(TypeError, match="`model`"):
        hs.audit("model", [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no batch"):
        hs.audit(SharedReLU(), [])
    with pytest.raises(ValueError, match="`max_batches`"):
        hs.audit(SharedReLU(), [torch.randn(2, 4)], max_batches=0)
    assert hs.audit(SharedReLU(), [torch.randn(2, 4)] * 5, max_batches=2)["calls"].tolist() == [2, 2]


# ---------------------------------------------------------------------------------------------------------------
# dead units by index and over time


def test_dead_units_and_timeline() -> None:
    model = three_unit_relu()
    with HookManager(model, [DeadReLU(window=1)]) as hm:
        for xs in [(1.0,), (-1.0,), (1.0,), (1.0,)]:  # unit 0: fires, dies, revives; unit 1: fires at step 1 only
            model(col(*xs))
            hm.step()
    assert hm.dead_units("1") == [1, 2]
    tl = hm.unit_timeline()
    assert list(tl["unit"]) == [0, 1, 2]
    assert tl["last_fired"].tolist()[:2] == [3.0, 1.0] and math.isnan(tl["last_fired"][2])
    assert tl["dead"].tolist() == [False, True, True]
    assert math.isnan(tl["dead_since"][0]) and tl["dead_since"].tolist()[1:] == [2.0, 0.0]
    assert tl["revivals"].tolist() == [1, 0, 0]  # unit 1 first fired at step 1: waking up is not a revival
    assert tl["last_revival"][0] == 2.0


def test_dead_units_with_window_and_open_step() -> None:
    model = three_unit_relu()
    with HookManager(model, [DeadReLU(window=2)]) as hm:
        model(col(1.0))
        hm.step()
        model(col(-1.0))
        hm.step()
        model(col(-1.0))  # open step 2: unit 0 silent in steps 1 and 2 -> dead
        assert hm.dead_units("1") == [0, 2]
        hm.step()
    assert hm.dead_units("1") == [0, 2]
    assert hm.unit_timeline("1")["dead_since"].tolist()[0] == 2.0


def test_dead_units_errors() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Tanh())
    with HookManager(model) as hm:
        model(torch.randn(2, 2))
    with pytest.raises(KeyError, match="known layers: 1, 2"):
        hm.dead_units("nope")
    with pytest.raises(ValueError, match="not a rectifier"):
        hm.dead_units("2")
    hm2 = HookManager(model, [Saturation()])
    with hm2:
        model(torch.randn(2, 2))
    with pytest.raises(RuntimeError, match="DeadReLU"):
        hm2.dead_units("1")


# ---------------------------------------------------------------------------------------------------------------
# alerts


def dead_model() -> nn.Sequential:
    lin = nn.Linear(2, 4)
    with torch.no_grad():
        lin.bias.copy_(torch.tensor([5.0, 5.0, 5.0, -100.0]))  # one of four units (25%) can never fire
    return nn.Sequential(lin, nn.ReLU())


def test_alert_fires_once_per_cause_every_n_steps_with_warning_log_and_callback(caplog) -> None:
    seen: list[hs.Alert] = []
    model = dead_model()
    with (
        HookManager(model, alerts=Alerts(every=3, callback=seen.append)) as hm,
        caplog.at_level(logging.WARNING, logger="hookscope"),
    ):
        for step in range(9):
            model(torch.randn(64, 2))  # 64 outputs per unit per step: 128 silent outputs confirm death by step 1
            if step == 2:
                with pytest.warns(HookscopeAlert, match="25% of its 4 units are dead"):
                    hm.step()
            else:
                hm.step()
    assert [(a.rule, a.layer, a.step) for a in seen] == [("dead_relu", "1", 2)]  # checked at 2, 5, 8; once
    assert seen[0].value == 0.25 and seen[0].threshold == 0.10
    assert "learning rate" in seen[0].message and "LeakyReLU" in seen[0].message
    assert sum("dead_relu" in r.getMessage() for r in caplog.records) == 1


def test_alerts_are_not_checked_between_due_steps() -> None:
    seen: list[hs.Alert] = []
    model = dead_model()
    with HookManager(model, alerts=Alerts(every=5, callback=seen.append, warn=False)) as hm:
        for _ in range(4):
            model(torch.randn(8, 2))
            hm.step()
    assert seen == []


def rows(**cols) -> pd.DataFrame:  # noqa: F821
    import pandas as pd

    n = len(next(iter(cols.values())))
    base = {"layer": [f"l{i}" for i in range(n)], "kind": ["relu"] * n, "units": [10] * n,
            "dead_ratio": [0.0] * n, "inactive_fraction": [0.5] * n, "saturation_rate": [np.nan] * n,
            "grad_norm": [1.0] * n}  # fmt: skip
    base.update(cols)
    return pd.DataFrame(base)


def test_rules() -> None:
    assert [x[0] for x in DeadRatioRule().check(rows(dead_ratio=[0.09, 0.10, 0.5]))] == ["l1", "l2"]
    assert [x[0] for x in SaturationRule(0.3).check(rows(saturation_rate=[0.2, 0.3, np.nan]))] == ["l1"]
    g = [1.0, 2.0, 1.5, 1e-4, 5e3]
    assert [x[0] for x in VanishingGradientRule().check(rows(grad_norm=g))] == ["l3"]
    assert [x[0] for x in ExplodingGradientRule().check(rows(grad_norm=g))] == ["l4"]
    assert [x[0] for x in ExplodingGradientRule(absolute=1.8).check(rows(grad_norm=g))] == ["l1", "l4"]
    assert VanishingGradientRule().check(rows(grad_norm=[1e-9])) == []  # one layer has no median to compare
    nf = NonFiniteRule().check(rows(inactive_fraction=[0.5, np.nan], grad_norm=[1.0, np.inf]))
    assert [x[0] for x in nf] == ["l1"]
    # evidence is NonFinite's counts (summed) and an infinite grad_norm; a NaN statistic is a placeholder (the
    # collector is not attached, does not apply to the kind, or had nothing to judge), never evidence
    nf = NonFiniteRule().check(
        rows(
            kind=["relu", "softplus", "sigmoid", "sigmoid", "no-such-kind", "tanh", "relu", "relu6"],
            inactive_fraction=[np.nan, np.nan, np.nan, np.nan, np.nan, np.nan, 0.5, 0.5],
            saturation_rate=[np.nan, np.nan, np.nan, 0.1, np.nan, 0.2, np.nan, np.nan],
            grad_norm=[np.nan, 1.0, 1.0, 1.0, 1.0, -np.inf, 1.0, 1.0],
            nonfinite=[0.0, 0.0, 0.0, 3.0, 0.0, 0.0, np.nan, 1.0],
            grad_nonfinite=[np.nan, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0],
        )
    )
    assert [x[0] for x in nf] == ["l3", "l5", "l7"]
    assert [x[1] for x in nf] == [5.0, np.inf, 1.0]
    assert "5 non-finite values" in nf[0][3] and "gradient norm is infinite" in nf[1][3]
    with pytest.raises(ValueError, match="`threshold`"):
        DeadRatioRule(1.5)
    with pytest.raises(ValueError, match="`every`"):
        Alerts(every=0)
    with pytest.raises(TypeError, match="`rules`"):
        Alerts(rules=["dead"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="`alerts`"):
        HookManager(SharedReLU(), alerts="yes")  # type: ignore[arg-type]


def test_nan_outputs_alert_and_are_counted() -> None:
    class Poison(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(x * torch.tensor([1.0, float("nan"), float("inf"), 1.0]))

    seen: list[hs.Alert] = []
    model = Poison()
    x = torch.ones(3, 4, requires_grad=True)
    with HookManager(
        model, [DeadReLU(), GradientNorm(), NonFinite()], alerts=Alerts(every=1, callback=seen.append, warn=False)
    ) as hm:
        model(x).sum().backward()
        hm.step()
    df = hm.to_dataframe()
    assert df["nonfinite"].iloc[0] == 6  # a NaN and an Inf in each of 3 rows
    assert df["grad_nonfinite"].iloc[0] == 0  # d(sum)/dy is 1 everywhere
    assert "nonfinite" in [a.rule for a in seen]  # (the NaN unit never fires: it also counts as dead)


class _ReluSigmoid(nn.Module):
    """A healthy rectifier and a bounded layer; ``poison`` multiplies the pre-activations (NaN/Inf planted)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.sig = nn.Sigmoid()
        self.poison = torch.ones(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sig(self.act(self.lin(x) * self.poison))


@pytest.mark.parametrize(
    "collectors",
    [[NonFinite()], [GradientNorm()], [DeadReLU()], [Saturation()], [hs.Magnitude(activations=True)], None],
    ids=["nonfinite", "gradient_norm", "dead_relu", "saturation", "magnitude", "defaults"],
)
def test_nonfinite_alert_judges_only_its_own_evidence(collectors: list[hs.Collector] | None) -> None:
    # Regression: a collector set without DeadReLU (or Saturation) leaves inactive_fraction (saturation_rate) NaN on
    # every rectifier (bounded) row, which the non-finite rule read as NaN outputs of a healthy model.
    torch.manual_seed(0)
    model = _ReluSigmoid()
    seen: list[hs.Alert] = []
    with HookManager(model, collectors, alerts=Alerts(every=1, callback=seen.append, warn=False)) as hm:
        for _ in range(2):
            model(torch.randn(8, 4)).sum().backward()
            hm.step()
    assert not [a for a in seen if a.rule == "nonfinite"], seen


def test_nonfinite_alert_on_planted_values_from_counts_and_infinite_gradient_norms() -> None:
    torch.manual_seed(0)
    model = _ReluSigmoid()
    model.poison = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    seen: list[hs.Alert] = []
    with HookManager(model, [NonFinite()], alerts=Alerts(every=1, callback=seen.append, warn=False)) as hm:
        model(torch.randn(3, 4)).sum().backward()
        hm.step()
    # 3 NaN outputs per layer (one unit, 3 rows); the ReLU's gradient is NaN there too (sigmoid'(NaN))
    assert [(a.rule, a.layer, a.value) for a in seen] == [("nonfinite", "act", 6.0), ("nonfinite", "sig", 3.0)]
    model = _ReluSigmoid()
    seen.clear()
    with HookManager(model, [GradientNorm()], alerts=Alerts(every=1, callback=seen.append, warn=False)) as hm:
        (model(torch.randn(3, 4)) * torch.tensor([1.0, float("inf"), 1.0, 1.0])).sum().backward()
        hm.step()
    # an Inf in the sigmoid's output gradient, and in the ReLU's where sigmoid' > 0 carries it back
    assert [(a.rule, a.layer, a.value) for a in seen] == [("nonfinite", layer, math.inf) for layer in ("act", "sig")]


def test_nonfinite_counts_gradients() -> None:
    model = nn.Sequential(nn.Tanh())
    x = torch.zeros(2, 3, requires_grad=True)
    with HookManager(model, [NonFinite()], alerts=False) as hm:
        (model(x) * torch.tensor([1.0, float("inf"), 2.0])).sum().backward()
        hm.step()
        model(x)  # a training forward whose backward never runs (an evaluation would not be recorded)
        hm.step()
    df = hm.to_dataframe()
    assert df["grad_nonfinite"].tolist()[0] == 2 and math.isnan(df["grad_nonfinite"].tolist()[1])
    assert df["nonfinite"].tolist() == [0, 0]


@pytest.mark.parametrize(("window", "every"), [(1, 1), (3, 1), (4, 2), (2, 3)])
def test_dead_units_over_a_long_run_match_a_step_by_step_reference(window: int, every: int) -> None:
    # Steps are closed into a ring and processed many at a time; reports in the middle of a ring flush it early.
    # The reference below applies the definitions one step at a time.
    units, steps = 5, 140
    rng = np.random.default_rng(window * 10 + every)
    pattern = rng.random((steps, units)) < np.array([0.5, 0.1, 0.03, 0.0, 0.9])  # unit 3 never fires
    lin = nn.Linear(units, units)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(units))
        lin.bias.zero_()
    model = nn.Sequential(lin, nn.ReLU())
    with HookManager(model, [DeadReLU(window=window)], every=every) as hm:
        for s in range(steps):
            model(torch.from_numpy(np.where(pattern[s], 1.0, -1.0)).float()[None])
            hm.step()
            if s in (5, 16, 17, 40):
                hm.to_dataframe()  # a report mid-ring
    # windows count recorded steps: r is the ordinal of recorded step s
    last: list[float | None] = [None] * units  # step numbers
    last_r: list[int | None] = [None] * units  # ordinals
    revivals, last_revival = [0] * units, [math.nan] * units
    died: list[float] = [math.nan] * units
    expected = []
    for r, s in enumerate(range(0, steps, every)):
        for u in range(units):
            was_alive = last_r[u] is not None and last_r[u] > r - 1 - window
            if pattern[s, u]:
                if last_r[u] is not None and last_r[u] <= r - 1 - window:
                    revivals[u] += 1
                    last_revival[u] = s
                last[u], last_r[u] = s, r
            elif was_alive and last_r[u] <= r - window:  # type: ignore[operator]
                died[u] = s
        expected.append(sum(last_r[u] is None or last_r[u] <= r - window for u in range(units)) / units)
    df = hm.to_dataframe()
    assert list(df["step"]) == list(range(0, steps, every))
    assert df["dead_ratio"].tolist() == pytest.approx(expected, abs=0)
    assert df["inactive_fraction"].tolist() == pytest.approx(1 - pattern[::every].mean(axis=1), abs=1e-12)
    tl = hm.unit_timeline("1")
    assert tl["last_fired"].tolist() == pytest.approx([math.nan if v is None else v for v in last], nan_ok=True)
    assert tl["revivals"].tolist() == revivals
    assert tl["last_revival"].tolist() == pytest.approx(last_revival, nan_ok=True)
    dead_now = [last_r[u] is None or last_r[u] <= (steps - 1) // every - window for u in range(units)]
    want_since = [(0.0 if last[u] is None else died[u]) if dead_now[u] else math.nan for u in range(units)]
    assert tl["dead"].tolist() == dead_now
    assert tl["dead_since"].tolist() == pytest.approx(want_since, nan_ok=True)
    assert sum(revivals) > 3  # the pattern does exercise revivals


def test_unit_state_is_a_copy_that_training_does_not_change() -> None:
    model = nn.Sequential(nn.ReLU())
    dead = DeadReLU()
    with HookManager(model, [dead], alerts=False) as hm:
        model(torch.tensor([[1.0, -1.0]]))
        hm.step()
        hm.to_dataframe()  # brings the persistent state up to date
        state = dead.unit_state(hm.sites[0], 0, include_open=False)
        for _ in range(RING_STEPS + 1):  # the ring is processed: last_fired becomes RING_STEPS for both units
            model(torch.tensor([[1.0, 1.0]]))
            hm.step()
        hm.to_dataframe()
    assert state["last_fired"].tolist() == [0.0, -math.inf]
    assert state["revivals"].tolist() == [0, 0] and state["last_revival"].tolist() == [-math.inf, -math.inf]
