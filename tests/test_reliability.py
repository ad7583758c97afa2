"""hookscope never takes the training down and never mixes data: interrupts, errors in user code, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import _get_current_function_mode_stack

from hookscope import HookManager

# ---------------------------------------------------------------------------------------------------------------
# interrupts inside a forward pass


class Bomb(nn.Module):
    """Raises ``KeyboardInterrupt`` (as Ctrl-C in Jupyter does) on the forward after it is armed."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt
        return x


class Interruptible(nn.Module):
    """fc → ReLU module → (bomb) → functional GELU in the root; the bomb sits in a nested block."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.block = nn.Sequential(nn.ReLU(), Bomb())
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.block(self.fc(x))))


@pytest.mark.parametrize("when", [0, 1, 5], ids=["discovery", "second step", "later"])
def test_a_keyboard_interrupt_inside_a_forward_is_recovered_at_the_next_one(when: int) -> None:
    torch.manual_seed(0)
    model = Interruptible()
    bomb = model.block[1]
    with HookManager(model, alerts=False) as hm:
        for step in range(300):
            bomb.armed = step == when
            try:
                model(torch.randn(3, 4)).sum().backward()
            except KeyboardInterrupt:
                assert step == when
            hm.step()
            assert _get_current_function_mode_stack() == [], step  # no mode left on outside forward passes
        assert hm.layers == ["block.0", "gelu()"]  # the same names and sites: 601 sites before the fix
        assert hm.tracer.stack == []
    df = hm.to_dataframe()
    # the interrupted step recorded what ran before the interrupt (the ReLU), every other step both sites
    per_step = df.groupby("step")["layer"].apply(list)
    assert per_step[when] == ["block.0"]
    assert all(per_step[s] == ["block.0", "gelu()"] for s in range(300) if s != when)
    assert (df["calls"] == 1).all()


def test_an_interrupt_before_the_next_forward_still_leaves_no_mode_at_step() -> None:
    model = Interruptible()
    with HookManager(model, alerts=False) as hm:
        model(torch.randn(3, 4))
        model.block[1].armed = True
        with pytest.raises(KeyboardInterrupt):
            model(torch.randn(3, 4))
        hm.step()  # the next thing after the interrupt is step(), not a forward
        assert _get_current_function_mode_stack() == [] and hm.tracer.stack == []
        torch.sigmoid(torch.randn(2))  # user code between steps is not recorded
        model(torch.randn(3, 4))
        hm.step()
    assert hm.layers == ["block.0", "gelu()"]


def test_an_interrupted_manager_detaches_cleanly() -> None:
    model = Interruptible()
    hm = HookManager(model, alerts=False).attach()
    model.block[1].armed = True
    with pytest.raises(KeyboardInterrupt):
        model(torch.randn(3, 4))
    hm.detach()
    assert _get_current_function_mode_stack() == []
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------------------------------
# step() when user code raises


def _dead_net() -> nn.Sequential:
    """Two ReLU layers whose units are all dead (bias -100), so both alert at the first check."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    with torch.no_grad():
        for i in (0, 2):
            model[i].weight.zero_()
            model[i].bias.fill_(-100.0)
    return model


def test_an_alert_callback_that_raises_does_not_lose_or_merge_steps() -> None:
    from hookscope import Alerts

    seen: list[str] = []

    def callback(alert) -> None:  # type: ignore[no-untyped-def]
        seen.append(alert.layer)
        if len(seen) == 1:
            raise RuntimeError("callback bug")

    model = _dead_net()
    with HookManager(model, alerts=Alerts(every=2, callback=callback, warn=False, log=False)) as hm:
        errors = 0
        for _ in range(6):
            model(torch.randn(2, 4))
            try:
                hm.step()
            except RuntimeError as e:
                assert "callback bug" in str(e)
                errors += 1
        assert hm.current_step == 6
    assert errors == 1
    assert seen == ["1", "3"]  # the second alert due at the same check was delivered too
    assert [a.layer for a in hm.alerts.fired] == ["1", "3"]  # type: ignore[union-attr]
    df = hm.to_dataframe()
    assert df["step"].tolist() == [s for s in range(6) for _ in range(2)]  # one number per training step
    assert (df["calls"] == 1).all()


def test_a_sink_that_raises_gets_its_rows_again_and_the_others_are_fed() -> None:
    from hookscope.sinks import Sink

    class Flaky(Sink):
        def __init__(self, fail: int) -> None:
            super().__init__(every=2)
            self.fail, self.calls, self.steps = fail, 0, []

        def write(self, frame) -> None:  # type: ignore[no-untyped-def]
            self.calls += 1
            if self.calls <= self.fail:
                raise OSError("disk on fire")
            self.steps.extend(sorted(set(frame["step"])))

    flaky, good = Flaky(fail=1), Flaky(fail=0)
    model = _dead_net()
    with HookManager(model, alerts=False, sinks=[flaky, good]) as hm:
        failures = 0
        for _ in range(6):
            model(torch.randn(2, 4))
            try:
                hm.step()
            except OSError:
                failures += 1
    assert failures == 1
    assert good.steps == [0, 1, 2, 3, 4, 5]
    assert flaky.steps == [0, 1, 2, 3, 4, 5]  # the rows of the failed write came again with the next one
    assert hm.current_step == 6


def test_a_collector_whose_close_steps_raises_once_loses_no_closed_step() -> None:
    from hookscope import Collector, DeadReLU
    from hookscope.reporters.csv import CSVSink

    class Flaky(Collector):
        columns = ("flaky_total",)

        def __init__(self) -> None:
            super().__init__()
            self.add_state("total")
            self.raised = False

        def update(self, state, output, site) -> None:  # type: ignore[no-untyped-def]
            state["total"].add_(output.sum(dtype=torch.float64))

        def close_steps(self, steps, block, commit):  # type: ignore[no-untyped-def]
            if commit and steps and not self.raised:
                self.raised = True
                raise ValueError("collector bug")
            return super().close_steps(steps, block, commit)

        def compute(self, record):  # type: ignore[no-untyped-def]
            return {"flaky_total": record["total"]}

    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "stats.csv"
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    xs = [torch.randn(3, 4) for _ in range(40)]
    errors = 0
    with HookManager(model, [DeadReLU(), Flaky()], alerts=False, sinks=[CSVSink(path, every=5)]) as hm:
        for x in xs:
            model(x)
            try:
                hm.step()
            except ValueError:
                errors += 1
    assert errors == 1  # raised once, at step 4: the sink's first write flushed the ring (steps 0-4)
    df = hm.to_dataframe()
    assert df["step"].tolist() == list(range(40))  # none of the 16 steps waiting in the ring is lost
    with torch.no_grad():
        want = [(model(x) <= 0).double().mean().item() for x in xs]
    assert df["inactive_fraction"].tolist() == pytest.approx(want)  # the other collector's values are intact
    assert df["flaky_total"].iloc[:5].isna().all() and df["flaky_total"].iloc[5:].notna().all()
    import pandas as pd

    assert pd.read_csv(path)["step"].tolist() == list(range(40))  # the sink received every step


def test_a_collector_error_inside_a_hook_waits_for_step() -> None:
    from hookscope import Collector

    class Raises(Collector):
        columns = ("raises",)

        def __init__(self) -> None:
            super().__init__()
            self.add_state("n")

        def close_steps(self, steps, block, commit):  # type: ignore[no-untyped-def]
            if commit and steps == [0]:
                raise ValueError("collector bug")
            return super().close_steps(steps, block, commit)

        def compute(self, record):  # type: ignore[no-untyped-def]
            return {"raises": record["n"]}

    class Late(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.ReLU(), nn.Tanh()

        def forward(self, x: torch.Tensor, late: bool) -> torch.Tensor:
            return self.b(self.a(x)) if late else self.a(x)

    model = Late()
    with HookManager(model, [Raises()], alerts=False) as hm:
        model(torch.randn(2, 3), late=False)
        hm.step()  # one closed step waits in the ring
        model(torch.randn(2, 3), late=True)  # a new site flushes the ring inside a hook: no error here
        with pytest.raises(ValueError, match="collector bug"):
            hm.step()
        assert hm.current_step == 2
    assert hm.to_dataframe()["step"].tolist() == [0, 1, 1]


def test_a_script_that_never_detaches_still_writes_its_last_steps(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    import pandas as pd

    path = tmp_path / "stats.csv"
    script = f"""
import torch, torch.nn as nn
import hookscope as hs
from hookscope.reporters.csv import CSVSink
model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
hm = hs.HookManager(model, alerts=False, sinks=[CSVSink({str(path)!r}, every=100)]).attach()
for _ in range(7):
    model(torch.randn(2, 4))
    hm.step()
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    assert pd.read_csv(path)["step"].tolist() == list(range(7))
