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
