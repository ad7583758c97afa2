"""hookscope never takes the training down and never mixes data: interrupts, errors in user code, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from hookscope import Alerts, HookManager

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
            model(torch.randn(128, 4))  # enough outputs per unit to confirm death in one step
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


# ---------------------------------------------------------------------------------------------------------------
# bad input raises up front, naming the argument


def _bad_inputs():  # type: ignore[no-untyped-def]
    import hookscope as hs
    from hookscope.alerts import DeadRatioRule, ExplodingGradientRule

    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    return [
        ("sinks=None", lambda: HookManager(m, sinks=None), TypeError, "`sinks`"),
        ("sinks='a.csv'", lambda: HookManager(m, sinks="a.csv"), TypeError, "`sinks`"),
        ("every=2.0", lambda: HookManager(m, every=2.0), TypeError, "`every`"),
        ("every=True", lambda: HookManager(m, every=True), TypeError, "`every`"),
        ("start_step=-1", lambda: HookManager(m, start_step=-1), ValueError, "`start_step`"),
        ("max_history=0", lambda: HookManager(m, max_history=0), ValueError, "`max_history`"),
        ("functional=1", lambda: HookManager(m, functional=1), TypeError, "`functional`"),
        ("Saturation(eps=nan)", lambda: hs.Saturation(eps=float("nan")), ValueError, "`eps`"),
        ("Saturation(eps='0.1')", lambda: hs.Saturation(eps="0.1"), TypeError, "`eps`"),
        ("GradientNorm(scaler=nan)", lambda: hs.GradientNorm(scaler=float("nan")), ValueError, "`scaler`"),
        ("Alerts(rules='x')", lambda: hs.Alerts(rules="x"), TypeError, "`rules`"),
        ("Alerts(rules=[DeadRatioRule])", lambda: hs.Alerts(rules=[DeadRatioRule]), TypeError, "`rules`"),
        ("Alerts(warn='no')", lambda: hs.Alerts(warn="no"), TypeError, "`warn`"),
        ("Alerts(log=None)", lambda: hs.Alerts(log=None), TypeError, "`log`"),
        ("Alerts(callback=5)", lambda: hs.Alerts(callback=5), TypeError, "`callback`"),
        ("DeadRatioRule(nan)", lambda: DeadRatioRule(float("nan")), ValueError, "`threshold`"),
        ("absolute=nan", lambda: ExplodingGradientRule(absolute=float("nan")), ValueError, "`absolute`"),
        ("audit(m, None)", lambda: hs.audit(m, None), TypeError, "`batches`"),
        ("audit(m, 'data')", lambda: hs.audit(m, "data"), TypeError, "`batches`"),
        ("rectifier='yes'", lambda: hs.register_activation("q1", rectifier="yes"), TypeError, "`rectifier`"),
        ("bounds=(0, nan)", lambda: hs.register_activation("q2", bounds=(0, float("nan"))), ValueError, "`bounds`"),
        ("steal torch.relu", lambda: hs.register_activation("q3", functions=[torch.relu]), ValueError, "torch.relu"),
        ("steal nn.Tanh", lambda: hs.register_activation("q4", modules=[nn.Tanh]), ValueError, "`modules`"),
        ("table(step='x')", lambda: HookManager(m).table(step="x"), TypeError, "`step`"),
        ("table(ascii=1)", lambda: HookManager(m).table(ascii=1), TypeError, "`ascii`"),
        ("to_csv(5)", lambda: HookManager(m).to_csv(5), TypeError, "`path`"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_input_raises_up_front_with_the_argument_named(case) -> None:  # type: ignore[no-untyped-def]
    _, call, kind, fragment = case
    with pytest.raises(kind, match=fragment) as e:
        call()
    from hookscope import HookscopeError

    assert isinstance(e.value, HookscopeError)


def test_integral_numpy_scalars_are_accepted() -> None:
    import numpy as np

    import hookscope as hs

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    hm = HookManager(model, every=np.int64(2), max_history=np.int32(5), alerts=hs.Alerts(every=np.int64(3)))
    assert (hm.every, hm.max_history, type(hm.every)) == (2, 5, int)
    assert hs.DeadReLU(window=np.int16(3)).window == 3


def test_a_tensor_given_to_audit_is_one_batch() -> None:
    import hookscope as hs

    lin = nn.Linear(2, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        lin.bias.zero_()
    x = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])  # unit 0 fires on the first sample, unit 1 on the second
    frame = hs.audit(nn.Sequential(lin, nn.ReLU()), x)
    assert frame["calls"].tolist() == [1]  # iterating the tensor would have made two batches of one sample
    assert frame.attrs["dead_units"] == {"1": [2]}  # unit 2 sums to 0: never positive


def test_a_collector_with_mistakes_is_refused_when_the_manager_is_built() -> None:
    from hookscope import Collector

    class NoSuper(Collector):
        columns = ("x",)

        def __init__(self) -> None:
            pass

        def compute(self, record):  # type: ignore[no-untyped-def]
            return {"x": record["calls"]}

    class MissingColumn(Collector):
        columns = ("a", "b")

        def __init__(self) -> None:
            super().__init__()
            self.add_state("total")

        def compute(self, record):  # type: ignore[no-untyped-def]
            return {"a": record["total"]}

    class NoCompute(Collector):
        columns = ("c",)

    class ForgotSuperButAddsState(Collector):
        def __init__(self) -> None:
            self.add_state("x")

    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(TypeError, match="super"):
        HookManager(m, [NoSuper()])
    with pytest.raises(ValueError, match="'b'"):
        HookManager(m, [MissingColumn()])
    with pytest.raises(TypeError, match="compute"):
        HookManager(m, [NoCompute()])
    with pytest.raises(TypeError, match="super"):
        ForgotSuperButAddsState()


def test_a_bounds_callable_that_returns_inverted_bounds_skips_saturation_with_a_warning() -> None:
    import warnings

    import hookscope as hs
    from hookscope.activations import unregister_activation

    class Squash(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x)

    hs.register_activation("squash_inverted", modules=[Squash], bounds=lambda module, args, kwargs: (1.0, -1.0))
    try:
        model = nn.Sequential(nn.Linear(4, 4), Squash())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with HookManager(model, alerts=False) as hm:
                model(torch.randn(8, 4))
                hm.step()
        assert any("output range" in str(w.message) and "'1'" in str(w.message) for w in caught)
        assert hm.to_dataframe()["saturation_rate"].isna().all()  # not 1.0 everywhere
    finally:
        unregister_activation("squash_inverted")
    assert hs.get_activation("tanh").modules == (nn.Tanh,)


# ---------------------------------------------------------------------------------------------------------------
# odd tensors, modules replaced while attached, models without sites


def test_outputs_on_the_meta_device_are_skipped_and_reports_work() -> None:
    import warnings

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).to("meta")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with HookManager(model, alerts=False) as hm:
            for _ in range(2):
                model(torch.randn(2, 4, device="meta"))
                hm.step()
    assert any("meta device" in str(w.message) and "'1'" in str(w.message) for w in caught)
    assert len(hm.to_dataframe()) == 0 and "no data" in str(hm.table(ascii=True))


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged], ids=["strided", "jagged"])
def test_nested_tensors_are_skipped_and_the_next_dense_output_is_recorded(layout: torch.layout) -> None:
    import warnings

    model = nn.Sequential(nn.ReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own prototype warning, and ours (once per process)
        with HookManager(model, alerts=False) as hm:
            out = model(torch.nested.nested_tensor([torch.randn(3, 4), -torch.ones(5, 4)], layout=layout))
            hm.step()
            model(torch.tensor([[1.0, -1.0, 2.0, -2.0]]))
            hm.step()
    assert out.is_nested  # the forward pass was not changed
    df = hm.to_dataframe()
    assert df[["step", "units", "inactive_fraction"]].values.tolist() == [[1, 4, 0.5]]


@pytest.mark.usefixtures("each_path")
@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_outputs_inside_torch_func_transforms_are_skipped_and_training_is_unchanged(
    transform: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # vmap's batched tensors and grad's tracked ones have no storage and no batching rules for out= operations:
    # both paths raised from inside the model's forward before. Now the call is skipped, with a warning.
    import warnings

    import hookscope.warn

    monkeypatch.setattr(hookscope.warn, "_seen", set())  # the warning is given once per process

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    reference = copy.deepcopy(model)
    xs = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0))
    params = dict(model.named_parameters())

    def loss(p: dict[str, torch.Tensor], m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(m, p, (x,)).pow(2).sum()

    def run(m: nn.Module) -> object:
        if transform == "vmap":
            return torch.func.vmap(m)(xs)
        return torch.func.grad(loss)({k: v.detach() for k, v in params.items()}, m, xs[0])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with HookManager(model, alerts=False) as hm:
            got = run(model)
            hm.step()
            model(torch.tensor([[1.0, -1.0, 2.0, -2.0]]))  # outside the transform: recorded
            hm.step()
    want = run(reference)
    if transform == "vmap":
        assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor) and torch.equal(got, want)
    else:
        assert isinstance(got, dict) and isinstance(want, dict)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert any("torch.func transform" in str(w.message) for w in caught)
    y = torch.relu(model[0](torch.tensor([[1.0, -1.0, 2.0, -2.0]])))
    df = hm.to_dataframe()
    assert df[["step", "units"]].values.tolist() == [[1, 6]]
    assert df["inactive_fraction"].iloc[0] == float((y <= 0).sum()) / 6


def test_a_module_put_in_place_of_another_is_hooked_as_what_it_is_whatever_its_id() -> None:
    """The tracer remembers torch's own layers (hooked after their forward only) by ``id()``, and CPython gives the
    id of a module dropped from the model to new objects: a ReLU put in place while attached, with such an id, still
    gets an activation's hooks and is recorded."""
    from hookscope.tracing import REHOOK_EVERY

    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.ReLU())
    replaced = nn.ReLU()
    with HookManager(model, alerts=False) as hm:
        hm.tracer._layers.add(id(replaced))  # the id() of a layer that is gone
        for s in range(REHOOK_EVERY + 5):
            if s == 2:
                model[3] = replaced
            model(torch.randn(2, 4))
            hm.step()
        assert (len(replaced._forward_pre_hooks), len(replaced._forward_hooks)) == (1, 1)
    last = hm.to_dataframe().query(f"step == {REHOOK_EVERY + 4}")
    assert last[["layer", "kind"]].values.tolist() == [["1", "tanh"], ["3", "relu"]]


def test_a_module_replaced_while_attached_is_recorded_under_its_name() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.ReLU())
    from hookscope.tracing import REHOOK_EVERY

    replaced = nn.ReLU()
    with HookManager(model, alerts=False) as hm:
        for s in range(REHOOK_EVERY + 5):
            if s == 2:
                model[3] = replaced  # a new module object (same kind)
            if s == 4:
                model[1] = nn.Sigmoid()  # another kind under the same name
            model(torch.randn(2, 4))
            hm.step()
        assert replaced._forward_hooks  # hooked within REHOOK_EVERY recorded steps
    df = hm.to_dataframe()
    last = df[df["step"] == REHOOK_EVERY + 4]
    assert last[["layer", "kind"]].values.tolist() == [["1", "sigmoid"], ["3", "relu"]]
    assert hm.site("1").kind == "sigmoid"
    one = df[df["layer"] == "1"]
    assert (one[one["kind"] == "tanh"]["step"] < 4).all()  # the tanh's numbers never go under the sigmoid's
    assert (one[one["kind"] == "sigmoid"]["step"] >= 4).all()


def test_a_model_without_activation_sites_says_why() -> None:
    import warnings

    model = nn.LSTM(4, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with HookManager(model, alerts=False) as hm:
            model(torch.randn(3, 2, 4))
            hm.step()
    assert any("no activation site found in LSTM" in str(w.message) for w in caught)
    assert hm.layers == []


class Recording(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.seen.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


class ManySites(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.ReLU()
        self.t = nn.ModuleList(nn.Tanh() for _ in range(17))  # past 16 sites: DeadReLU's state grows at step()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x).sum() + sum(t(x).sum() for t in self.t)


def test_a_users_torch_function_mode_around_step_sees_no_hookscope_operation() -> None:
    # 250 steps: state growth when steps close, ring flushes every 16 steps, history blocks, two alert checks
    model = ManySites()
    x = torch.randn(3, 4, requires_grad=True)
    mode = Recording()
    with HookManager(model, alerts=Alerts(every=100, warn=False)) as hm:
        for _ in range(250):
            model(x).backward()
            with mode:
                hm.step()
    assert len(hm.to_dataframe()) == 250 * 18
    assert mode.seen == []


class FunctionalToo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(F.relu(self.lin(x)))  # a functional site and a module site


@pytest.mark.usefixtures("each_path")
def test_a_users_torch_function_mode_sees_the_models_calls_only() -> None:
    # the mode is on for forward, backward and step(), discovery steps included: it sees what it sees on an
    # uninstrumented copy, call for call
    model = FunctionalToo()
    reference = copy.deepcopy(model)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))

    def steps(m: nn.Module, hm: HookManager | None) -> list[str]:
        mode = Recording()
        for _ in range(20):
            with mode:
                m(x).sum().backward()
                if hm is not None:
                    hm.step()
        return mode.seen

    with HookManager(model, alerts=False) as hm:
        seen = steps(model, hm)
    assert seen == steps(reference, None)
    assert len(hm.to_dataframe()) == 40
