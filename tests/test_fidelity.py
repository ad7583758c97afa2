"""Statistics that mean what they say: every=K keeps the cadences and windows, alerts need enough evidence, hints
fit the layer. Expected values come from the construction of the inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

import hookscope as hs
from hookscope import Alerts, HookManager


def identity_relu(units: int, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """y = act(x): unit u fires exactly when x[:, u] > 0."""
    lin = nn.Linear(units, units)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(units))
        lin.bias.zero_()
    return nn.Sequential(lin, act())


def half_firing(steps: int, batch: int, units: int, never: tuple[int, ...] = (), seed: int = 0) -> list[torch.Tensor]:
    """Inputs where every unit fires on half of all samples (each sample decided by a fair coin), except the units
    in ``never``, which never fire."""
    rng = np.random.default_rng(seed)
    signs = np.where(rng.random((steps, batch, units)) < 0.5, 1.0, -1.0)
    signs[..., list(never)] = -1.0
    return [torch.from_numpy(s).float() for s in signs]


def test_the_dead_unit_alert_stays_silent_for_healthy_units_at_batch_two() -> None:
    units, steps = 8, 300
    model = identity_relu(units)
    seen: list[hs.Alert] = []
    with HookManager(model, alerts=Alerts(callback=seen.append, warn=False, log=False)) as hm:
        for x in half_firing(steps, 2, units):
            model(x)
            hm.step()
    df = hm.to_dataframe()
    # the per-step dead ratio is what it is: a unit is silent in a step of 2 samples a quarter of the time
    assert df["dead_ratio"].mean() == pytest.approx(0.25, abs=0.05)
    assert (df.loc[df["step"] % 100 == 99, "dead_ratio"] >= 0.10).any()  # the old rule would have alerted
    assert df["confirmed_dead_ratio"].max() == 0.0
    assert [a for a in seen if a.rule == "dead_relu"] == []


def test_a_unit_that_never_fires_alerts_at_the_first_check_even_at_batch_two() -> None:
    units = 8
    model = identity_relu(units)
    seen: list[hs.Alert] = []
    with HookManager(model, alerts=Alerts(callback=seen.append, warn=False, log=False)) as hm:
        for x in half_firing(120, 2, units, never=(3,)):
            model(x)
            hm.step()
    dead = [a for a in seen if a.rule == "dead_relu"]
    assert [(a.layer, a.step, a.value) for a in dead] == [("1", 99, 1 / 8)]
    df = hm.to_dataframe()
    # 2 outputs per unit per step: the never-firing unit reaches 128 silent outputs after 64 steps (step 63)
    confirmed = df.set_index("step")["confirmed_dead_ratio"]
    assert confirmed[62] == 0.0 and confirmed[63] == 1 / 8


def test_alerts_are_checked_at_the_next_recorded_step_under_every() -> None:
    model = identity_relu(4)
    for every, first in ((4, 100), (7, 105), (2, 100), (1, 99)):
        seen: list[hs.Alert] = []
        with HookManager(model, every=every, alerts=Alerts(callback=seen.append, warn=False, log=False)) as hm:
            for _ in range(210):
                model(-torch.ones(64, 4))  # every unit dead, confirmed at once (64 outputs per unit and step)
                hm.step()
        assert [(a.step, a.rule) for a in seen] == [(first, "dead_relu")], every


def test_sinks_count_training_steps_under_every(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = identity_relu(4)
    written: list[list[int]] = []
    sink = hs.CallbackSink(lambda frame: written.append(sorted(set(frame["step"]))), every=4)
    with HookManager(model, every=4, alerts=False, sinks=[sink]) as hm:
        for _ in range(17):
            model(torch.randn(2, 4))
            hm.step()
    # recorded steps 0, 4, 8, 12, 16; a write whenever 4 training steps have passed (a crash loses < 4 + 4)
    assert written == [[0, 4], [8], [12], [16]]


def test_the_timeline_under_every_counts_no_revival_for_a_unit_that_always_fires() -> None:
    model = identity_relu(2)
    with HookManager(model, every=3, alerts=False) as hm:
        for s in range(30):
            x = torch.tensor([[1.0, 1.0 if s % 12 < 6 else -1.0]])  # unit 1: fires in steps 0-5, 12-17, 24-29
            model(x)
            hm.step()
    tl = hm.unit_timeline("1").set_index("unit")
    # recorded steps 0, 3, ..., 27: unit 0 fires at each; unit 1 at 0, 3 | 12, 15 | 24, 27 (dead at 6, 9, 18, 21)
    assert tl.loc[0, "revivals"] == 0 and tl.loc[0, "last_fired"] == 27
    assert tl.loc[1, "revivals"] == 2 and tl.loc[1, "last_revival"] == 24
    assert not tl.loc[1, "dead"]


def test_the_window_counts_recorded_steps() -> None:
    model = identity_relu(1)
    with HookManager(model, [hs.DeadReLU(window=2)], every=5, alerts=False) as hm:
        for s in range(20):
            model(torch.tensor([[1.0 if s == 0 else -1.0]]))  # fires at step 0 only
            hm.step()
    df = hm.to_dataframe()
    assert df["step"].tolist() == [0, 5, 10, 15]
    # alive within 2 recorded steps of the last fire (steps 0 and 5), dead from recorded step 10 on
    assert df["dead_ratio"].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert hm.unit_timeline("1")["dead_since"].tolist() == [10.0]


@pytest.mark.parametrize(
    ("act", "says", "never"),
    [
        (nn.ReLU, "are dead", None),
        (nn.LeakyReLU, "negative side", "LeakyReLU"),
        (nn.ELU, "negative side", "ELU"),
        (nn.GELU, "negative side", None),
    ],
)
def test_dead_unit_hints_fit_the_layer(act: type[nn.Module], says: str, never: str | None) -> None:
    model = identity_relu(4, act)
    seen: list[hs.Alert] = []
    with HookManager(model, alerts=Alerts(every=1, callback=seen.append, warn=False, log=False)) as hm:
        model(-torch.ones(128, 4))
        hm.step()
    (alert,) = [a for a in seen if a.rule == "dead_relu"]
    assert says in alert.message
    if never is not None:
        assert never not in alert.message  # never prescribe the family the layer already uses
    if act is nn.ReLU:
        assert "LeakyReLU" in alert.message


def test_the_alert_column_can_be_the_per_step_ratio() -> None:
    rule = hs.alerts.DeadRatioRule(column="dead_ratio")
    rows = pd.DataFrame({"layer": ["a"], "kind": ["relu"], "units": [4], "dead_ratio": [0.5],
                         "confirmed_dead_ratio": [0.0]})  # fmt: skip
    assert [h[0] for h in rule.check(rows)] == ["a"]
    assert hs.alerts.DeadRatioRule().check(rows) == []
    with pytest.raises(ValueError, match="`column`"):
        hs.alerts.DeadRatioRule(column="grad_norm")
