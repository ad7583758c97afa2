"""What a new user meets first (issue 23.3 and 23.4): warnings that point at their own line, false warnings, sites
that are not layers of the network being trained, plots and the command line."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

import hookscope.warn
from hookscope import Alerts, HookManager, HookscopeWarning
from hookscope.alerts import DeadRatioRule, HookscopeAlert


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hookscope.warn, "_seen", set())  # warnings of earlier tests are not "seen" here


# ---------------------------------------------------------------------------------------------------------------
# warnings point at the user's line


class Deep(nn.Module):
    """An activation three modules deep (hooks run under several torch frames), after a transposed Linear: its
    unit dimension is ambiguous (batch 4 x 4 x 4), which hookscope warns about from inside the hook."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.inner = nn.Sequential(nn.Sequential(nn.ReLU()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.lin(x).transpose(1, 2))


def _user_line(action: Callable[[], object], category: type[Warning]) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [w for w in caught if issubclass(w.category, category)]


def test_warnings_point_at_the_users_line() -> None:
    here = __file__
    # from a hook, inside nested modules: at model(x)
    model = Deep()
    hm = HookManager(model, alerts=False).attach()
    try:
        got = _user_line(lambda: model(torch.randn(4, 4, 4)), HookscopeWarning)
        assert got and "ambiguous" in str(got[0].message)
        assert [w.filename for w in got] == [here]
    finally:
        hm.detach()
    # from step(): `include` matched nothing; a model without activation sites
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    hm = HookManager(model, include="nothing*", alerts=False).attach()
    try:
        model(torch.randn(2, 2))
        got = _user_line(hm.step, HookscopeWarning)
        assert got and "matched none" in str(got[0].message) and [w.filename for w in got] == [here]
    finally:
        hm.detach()
    bare = nn.Linear(2, 2)
    with HookManager(bare, alerts=False) as hm:
        bare(torch.randn(2, 2))
        got = _user_line(hm.step, HookscopeWarning)
    assert got and "no activation site" in str(got[0].message) and [w.filename for w in got] == [here]
    # alerts, raised while step() checks them
    dead = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with torch.no_grad():
        dead[0].weight.zero_()
        dead[0].bias.fill_(-1.0)
    alerts = Alerts(rules=[DeadRatioRule(0.1, column="dead_ratio")], every=1, log=False)
    with HookManager(dead, alerts=alerts) as hm:
        dead(torch.randn(2, 2))
        got = _user_line(hm.step, HookscopeAlert)
    assert len(got) == 1 and [w.filename for w in got] == [here]
    # attaching to a compiled model
    compiled = torch.compile(nn.Sequential(nn.ReLU()))
    got = _user_line(lambda: HookManager(compiled, alerts=False).attach().detach(), HookscopeWarning)
    assert got and [w.filename for w in got] == [here]
