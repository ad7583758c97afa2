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
