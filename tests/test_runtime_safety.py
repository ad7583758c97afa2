"""Conditions real training runs hit, which took a run down or showed a wrong number (issue 20): copies of an
attached model (EMA, SWA), sites that see no element in a step, users' hooks that replace outputs or call
activations, interrupts during discovery, compiled models, DDP's late reports, users' dispatch modes."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
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
    messages = [str(w.message) for w in caught if issubclass(w.category, HookscopeWarning)]
    return messages, hm.to_dataframe()["inactive_fraction"].tolist(), want


@pytest.mark.parametrize("warm_up", ["none", "no_grad"])
def test_attaching_to_a_compiled_model_that_records_says_nothing(warm_up: str) -> None:
    messages, got, want = _compiled_case(warm_up)
    assert got == want  # recorded exactly (no_grad: training compiled again, with the hooks)
    assert messages == []  # it warned that nothing would be recorded


def test_attaching_to_a_compiled_model_whose_code_ignores_the_hooks_says_so_once() -> None:
    messages, got, want = _compiled_case("same")
    assert got == [] and len(want) == 3
    assert len(messages) == 1 and "ran without running hookscope's hooks" in messages[0], messages
