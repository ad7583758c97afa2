"""Conditions real training runs hit, which took a run down or showed a wrong number (issue 20): copies of an
attached model (EMA, SWA), sites that see no element in a step, users' hooks that replace outputs or call
activations, interrupts during discovery, compiled models, DDP's late reports, users' dispatch modes."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from conftest import ActivationCalls, hook_count
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import hookscope.warn
from hookscope import HookManager
from hookscope.warn import HookscopeWarning


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hookscope.warn, "_seen", set())  # warned once per process: maybe by an earlier test


def _relu_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


# ---------------------------------------------------------------------------------------------------------------
# copies of an attached model (issue 20, item 2)


@pytest.mark.parametrize("make_copy", ["deepcopy", "ema"])
def test_a_copy_made_while_attached_runs_unrecorded_with_one_warning(make_copy: str) -> None:
    model, plain = _relu_net(), _relu_net()
    xs = [torch.randn(5, 4) for _ in range(3)]
    opt, plain_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, plain))
    with warnings.catch_warnings(record=True) as caught, HookManager(model, alerts=False) as hm:
        warnings.simplefilter("always")
        model(xs[0]).sum().backward()  # discovery ran: every module has its hooks, and the copy gets them all
        hm.step()
        if make_copy == "ema":  # an EMA model as torch's SWA utilities build it: a deepcopy of the model
            shadow: nn.Module = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        else:
            shadow = copy.deepcopy(model)
        plain_shadow = copy.deepcopy(plain)
        for x in xs:
            for m, o in ((model, opt), (plain, plain_opt)):
                o.zero_grad()
                m(x).pow(2).sum().backward()
                o.step()
            if isinstance(shadow, AveragedModel):
                shadow.update_parameters(model)
            # evaluating the copy crashed with KeyError in the tracer's pre-hook
            with torch.no_grad():
                got = shadow(x)
            if not isinstance(shadow, AveragedModel):
                assert torch.equal(got, plain_shadow(x))  # the copy computes what an uninstrumented copy does
            hm.step()
        frame = hm.to_dataframe()
    messages = [str(w.message) for w in caught if issubclass(w.category, HookscopeWarning)]
    assert len([m for m in messages if "copy of an instrumented model" in m]) == 1, messages
    # the model's own statistics are untouched by the copy's forwards: one call per step, as a plain hook counts
    assert frame["calls"].tolist() == [1, 1, 1, 1]
    assert frame["layer"].unique().tolist() == ["1"]
    for p, q in zip(model.parameters(), plain.parameters()):  # training unchanged
        assert torch.equal(p, q)


# ---------------------------------------------------------------------------------------------------------------
# attaching to a compiled model (issue 20, item 10)


def _compiled_case(warm_up: str) -> tuple[list[str], list[float], list[float]]:
    """Attach to a ``torch.compile`` wrapper after ``warm_up`` ("none": before its first call; "same": a first call
    as the training calls it; "no_grad": a first call under ``torch.no_grad``, so training compiles again).
    Returns hookscope's warnings, its inactive fractions, and those of a plain ReLU on an uninstrumented copy."""
    torch._dynamo.reset()
    net = type(f"Net_{warm_up}", (nn.Sequential,), {})  # a class of its own: dynamo shares code between instances
    torch.manual_seed(0)
    model = net(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    plain = copy.deepcopy(model)
    compiled = torch.compile(model, backend="eager")
    xs = [torch.randn(16, 4) for _ in range(3)]
    if warm_up == "same":
        compiled(xs[0]).sum().backward()
    elif warm_up == "no_grad":
        with torch.no_grad():
            compiled(xs[0])
    want = [float((torch.relu(plain[0](x)) <= 0).double().mean()) for x in xs]
    with warnings.catch_warnings(record=True) as caught, HookManager(compiled, alerts=False) as hm:
        warnings.simplefilter("always")
        for x in xs:
            compiled(x).sum().backward()
            hm.step()
        if warm_up != "same":
            with torch.no_grad():  # a step of evaluation only, once the model trains: not recorded, no warning
                compiled(xs[0])
            hm.step()
    assert hook_count(compiled) == 0  # every hook removed, the wrapper's too
    messages = [str(w.message) for w in caught if issubclass(w.category, HookscopeWarning)]
    return messages, hm.to_dataframe()["inactive_fraction"].tolist(), want


@pytest.mark.parametrize("warm_up", ["none", "no_grad"])
def test_attaching_to_a_compiled_model_that_records_says_nothing(warm_up: str) -> None:
    messages, got, want = _compiled_case(warm_up)
    assert got == want  # recorded exactly (no_grad: training compiled again, with the hooks)
    # it warned that nothing would be recorded; the one warning allowed says what a compiled region that begins at
    # the root (a Sequential) cannot see: functional activations (the compiled path, README)
    assert not [m for m in messages if "torch.compile" in m and "function mode" not in m], messages


def test_attaching_to_a_compiled_model_whose_code_ignores_the_hooks_says_so_once() -> None:
    messages, got, want = _compiled_case("same")
    assert got == [] and len(want) == 3
    assert len(messages) == 1 and "ran without running hookscope's hooks" in messages[0], messages


# ---------------------------------------------------------------------------------------------------------------
# a user's forward hook that replaces an activation's output (issue 20, item 4)

MASK = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0])  # units 0, 2, 4, 6 silenced


def _mask(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
    return out * MASK


def _firing_net() -> nn.Sequential:
    model = _relu_net()
    with torch.no_grad():
        model[0].bias.fill_(10.0)  # every unit fires on these inputs (|w·x| < 10)
        model[0].weight.clamp_(-1.0, 1.0)
    return model


@pytest.mark.parametrize("when", ["before attaching", "after attaching", "after discovery"])
def test_the_output_a_users_hook_puts_in_place_is_what_is_measured(when: str) -> None:
    model = _firing_net()
    reference = copy.deepcopy(model)
    # the reference: what the next layer receives, and its gradient, on an uninstrumented copy
    received: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        args[0].retain_grad()
        received.append(args[0])

    reference[1].register_forward_hook(_mask)
    reference[2].register_forward_pre_hook(keep)
    xs = [torch.rand(6, 4) - 0.5 for _ in range(2)]
    for x in xs:
        reference(x).pow(2).sum().backward()
    want_inactive = [float((r <= 0).double().mean()) for r in received]
    want_grad = [float(r.grad.double().norm()) for r in received]  # type: ignore[union-attr]
    want_dead = [u for u in range(8) if all((r[:, u] <= 0).all() for r in received)]
    assert want_dead == [0, 2, 4, 6]

    if when == "before attaching":
        model[1].register_forward_hook(_mask)
    with HookManager(model, alerts=False) as hm:
        if when == "after attaching":
            model[1].register_forward_hook(_mask)
        for i, x in enumerate(xs):
            if when == "after discovery" and i == 1:
                model[1].register_forward_hook(_mask)
            model(x).pow(2).sum().backward()
            hm.step()
        frame = hm.to_dataframe()
        dead = hm.dead_units("1")
    first = 1 if when == "after discovery" else 0  # its first step had no mask
    assert frame["inactive_fraction"].tolist()[first:] == want_inactive[first:]
    assert frame["grad_norm"].tolist()[first:] == pytest.approx(want_grad[first:], rel=1e-6)
    assert dead == want_dead  # [2] with the hook registered after attaching: the mask was not seen


# ---------------------------------------------------------------------------------------------------------------
# activation calls made by users' hooks, or after an interrupted forward pass, are not sites (issue 20, items 5, 11)


class Gated(nn.Module):
    """fc → functional ReLU in the block → tanh module; the root calls F.gelu."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.block = Block()
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(torch.nn.functional.gelu(self.block(self.fc(x))))


class Block(nn.Module):
    """Calls F.relu, then raises ``KeyboardInterrupt`` (as Ctrl-C in Jupyter does) when armed."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.relu(x)
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt
        return y


def _activation_calls_of(model: nn.Module, x: torch.Tensor) -> int:
    """Activation calls of one forward pass of a model without hooks (conftest's mode, no hookscope code)."""
    mode = ActivationCalls()
    with mode:
        model(x)
    return len(mode.calls)


@pytest.mark.parametrize("when", ["before attaching", "after attaching"])
def test_activations_called_by_a_users_hooks_are_not_sites(when: str) -> None:
    model = Gated()
    logged: list[float] = []

    def log(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        logged.append(float(torch.relu(out).mean().detach()) + float(torch.sigmoid(out).sum().detach()))

    def log_input(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        logged.append(float(torch.tanh(args[0]).sum().detach()))

    targets = (model.fc, model, model.block, model.act)
    if when == "before attaching":
        for m in targets:
            m.register_forward_hook(log)
            m.register_forward_pre_hook(log_input)
    x = torch.randn(3, 4)
    with HookManager(model, alerts=False) as hm:
        if when == "after attaching":
            for m in targets:
                m.register_forward_hook(log)
                m.register_forward_pre_hook(log_input)
        for _ in range(3):
            model(x).sum().backward()
            hm.step()
        frame = hm.to_dataframe()
    assert len(logged) == 3 * 2 * len(targets)  # the hooks ran
    # the model's three sites (F.relu in block, F.gelu in the root, the Tanh module), once per forward
    assert _activation_calls_of(Gated(), x) == 3
    assert hm.layers == ["block.relu()", "gelu()", "act"]  # fc.relu(), relu(), fc.sigmoid()... before the fix
    assert (frame["calls"] == 1).all() and len(frame) == 9


@pytest.mark.parametrize("when", ["before attaching", "after attaching"])
def test_activation_modules_called_by_a_users_hooks_are_not_sites(when: str) -> None:
    """A user's hook that runs one of the model's own activation modules, or one of its own, on what it sees (to
    log a squashed value) makes no site and no extra call: the model's rows are those of the model's forward."""
    torch.manual_seed(0)
    model, squash = Gated(), nn.Sigmoid()
    logged: list[float] = []

    def log(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        logged.append(float(model.act(out).mean().detach()) + float(squash(out).sum().detach()))

    def attach_logging() -> None:
        for m in (model.fc, model.block, model):
            m.register_forward_hook(log)

    if when == "before attaching":
        attach_logging()
    x = torch.randn(3, 4)
    with HookManager(model, alerts=False) as hm:
        if when == "after attaching":
            attach_logging()
        for _ in range(3):
            model(x).sum().backward()
            hm.step()
        frame = hm.to_dataframe()
    assert len(logged) == 3 * 3
    assert hm.layers == ["block.relu()", "gelu()", "act"]  # act#1..act#3 (the hooks' calls) before the fix
    assert (frame["calls"] == 1).all() and len(frame) == 9
    # the model's own call of `act` is measured: its tanh units, with the gradient of an uninstrumented copy
    reference = copy.deepcopy(model)
    for h in (reference.fc, reference.block, reference):
        h._forward_hooks.clear()
    acts: list[torch.Tensor] = []
    reference.act.register_forward_hook(lambda m, a, out: acts.append(out.detach()))
    reference(x)
    assert frame[frame["layer"] == "act"]["calls"].tolist() == [1, 1, 1] and len(acts) == 1


class Composite(nn.Module):
    """A part of the model with an activation module and a functional one inside."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(8, 8), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x)) + torch.nn.functional.relu(x)


class WithComposite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.block, self.out = nn.Linear(4, 8), Composite(), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(self.inp(x)))


@pytest.mark.parametrize("on", ["inp", "root"])
def test_nothing_inside_a_part_of_the_model_that_a_hook_runs_is_a_site(on: str) -> None:
    """A user's hook, registered after attaching, runs a part of the model that has activations inside (on a
    module mid-forward, or on the root after the forward): the model's own call is the only one recorded, at every
    step (discovery, when every module has hooks, included), and the hook's call begins no forward pass."""
    torch.manual_seed(0)
    model, x = WithComposite(), torch.randn(16, 4)
    logged: list[float] = []
    with HookManager(model, alerts=False, modules="block") as hm:
        model.get_submodule("" if on == "root" else on).register_forward_hook(
            lambda m, a, out: logged.append(float(model.block(model.inp(x) if on == "root" else out).mean()))
        )
        for _ in range(3):
            model(x).sum().backward()
            hm.step()
        frame = hm.to_dataframe()
    assert len(logged) == 3
    assert sorted(set(frame["layer"])) == ["block", "block.act", "block.relu()"]
    assert (frame["calls"] == 1).all() and len(frame) == 9
    # the model's call itself: the block's output, as an uninstrumented copy computes it
    blocks: list[torch.Tensor] = []
    reference = WithComposite()
    reference.load_state_dict(model.state_dict())
    reference.block.register_forward_hook(lambda m, a, out: blocks.append(out.detach()))
    reference(x)
    rms = frame.query("layer == 'block' and step == 0")["rms"].item()
    assert rms == pytest.approx(blocks[0].double().pow(2).mean().sqrt().item(), rel=1e-6)


@pytest.mark.parametrize("when", [0, 3], ids=["discovery", "later"])
def test_activations_called_after_an_interrupted_forward_are_not_sites(when: str) -> None:
    model = Gated()
    with HookManager(model, alerts=False) as hm:
        for step in range(5):
            model.block.armed = step == when
            try:
                model(torch.randn(3, 4)).sum().backward()
            except KeyboardInterrupt:
                # a notebook cell run after Ctrl-C, before the next forward: not part of any forward pass
                torch.relu(torch.randn(5))
                torch.nn.functional.gelu(torch.randn(5))
                torch.nn.functional.relu(torch.randn(5))
            hm.step()
        frame = hm.to_dataframe()
    assert hm.layers == ["block.relu()", "gelu()", "act"]  # block.relu()#1, block.gelu() appeared before the fix
    rows = frame.groupby("step")["layer"].apply(list).to_dict()
    assert rows[when] == ["block.relu()"]  # what ran before the interrupt
    assert all(rows[s] == ["block.relu()", "gelu()", "act"] for s in range(5) if s != when)
    assert (frame["calls"] == 1).all()


# ---------------------------------------------------------------------------------------------------------------
# a step in which a site sees no element (a mixture-of-experts expert that gets no token) (issue 20, item 3)


class Expert(nn.Module):
    """An expert that gets the rows routed to it (maybe none). Units: relu(x), relu(-x), relu(x - 10), relu(-1)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(1, 4)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0], [-1.0], [1.0], [0.0]]))
            self.fc.bias.copy_(torch.tensor([0.0, 0.0, -10.0, -1.0]))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


#: Rows routed to the expert at each step ([] : no token).
ROUTED = [[1.0], [], [-1.0], [], [], [20.0], [-2.0], [], [3.0, -3.0]]


def _by_definition(window: int) -> tuple[list[float], list[int], list[bool]]:
    """dead_ratio per step (NaN where the expert saw nothing), revivals and dead flags at the end, from the
    definition with steps that saw no element left out, computed from the inputs alone."""
    fired_by_step = [[any(f(v) > 0 for v in xs) for f in UNITS] if xs else None for xs in ROUTED]
    counted: list[list[bool]] = []  # the steps that count, in order
    ratios, revivals, dead_before = [], [0] * 4, [False] * 4
    ever = [False] * 4
    for fired in fired_by_step:
        if fired is None:
            ratios.append(float("nan"))
            continue
        counted.append(fired)
        dead = [not any(step[u] for step in counted[-window:]) for u in range(4)]
        for u in range(4):
            if fired[u] and ever[u] and dead_before[u]:
                revivals[u] += 1
            ever[u] = ever[u] or fired[u]
        dead_before = dead
        ratios.append(sum(dead) / 4)
    return ratios, revivals, dead_before


UNITS = [lambda v: v, lambda v: -v, lambda v: v - 10.0, lambda v: -1.0]


@pytest.mark.usefixtures("each_path")
@pytest.mark.parametrize("window", [1, 2])
def test_a_step_in_which_a_site_saw_nothing_does_not_count(window: int) -> None:
    from hookscope import DeadReLU

    model = Expert()
    with HookManager(model, [DeadReLU(window=window, evidence=3)], alerts=False) as hm:
        for xs in ROUTED:
            model(torch.tensor(xs).reshape(-1, 1))  # a (0, 1) batch when no token is routed
            hm.step()
        model(torch.zeros(0, 1))  # the open step: nothing either
        frame = hm.to_dataframe()
        timeline = hm.unit_timeline("act")
        dead_now = hm.dead_units("act")
    ratios, revivals, dead = _by_definition(window)
    closed = frame[frame["step"] < len(ROUTED)]
    assert closed["dead_ratio"].tolist() == pytest.approx(ratios, nan_ok=True)  # 1.0 where nothing came before
    empty = [i for i, xs in enumerate(ROUTED) if not xs]
    assert closed["inactive_fraction"].iloc[empty].isna().all() and (closed["calls"] == 1).all()
    assert timeline["revivals"].tolist() == revivals  # fake revivals after each empty step before the fix
    assert timeline["dead"].tolist() == dead
    assert dead_now == [u for u in range(4) if dead[u]]  # the open step saw nothing: as at the last closed one
    # evidence counts elements: the never-firing unit 3 saw 6 elements, 3 is enough; unit 2 fired at step 5 and
    # has been silent on 3 elements since
    assert frame["confirmed_dead_ratio"].iloc[-1] == 0.5


def test_the_hook_on_a_compiled_wrapper_is_removed_when_it_ran_eagerly() -> None:
    # a compiled model that runs eagerly (set_stance, a fallback): discovery ends and module hooks are slimmed
    compiled = torch.compile(_relu_net(), backend="eager")
    with torch.compiler.set_stance("force_eager"), HookManager(compiled, alerts=False) as hm:
        for _ in range(3):
            compiled(torch.randn(2, 4))
            hm.step()
        assert not hm.tracer.discovering
    assert hook_count(compiled) == 0  # the wrapper's hook stayed on before the fix
    assert hm.to_dataframe()["calls"].tolist() == [1, 1, 1]


def test_an_activation_module_applied_by_a_hook_by_design_is_not_a_site_as_documented() -> None:
    """A forward pre-hook that transforms its module's input with an activation module (part of the graph: its
    output requires grad) adds no site, like a logging hook: the README's rule, made once for all hooks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    model.add_module("squash", nn.Tanh())  # a module of the model that only the hook runs
    model.forward = lambda x: model[2](model[1](model[0](x)))  # type: ignore[method-assign]
    model[2].register_forward_pre_hook(lambda m, args: (model.squash(args[0]),))
    with HookManager(model, alerts=False) as hm:
        for _ in range(2):
            model(torch.randn(5, 4)).sum().backward()
            hm.step()
    assert hm.layers == ["1"] and (hm.to_dataframe()["calls"] == 1).all()
