"""A training run that tests/test_resume.py runs in separate processes: uninterrupted, interrupted after saving
hookscope's state at step SAVE_AT (it goes on a few steps, writing rows, and dies without detaching), and resumed
from that state. The first layer is a frozen identity, so which ReLU unit fires at which step is planted by the
inputs (PLAN)."""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch
import torch.nn as nn

import hookscope as hs
from hookscope import Alerts, DeadReLU, GradientNorm, HookManager, Saturation, SpikeRule
from hookscope.alerts import DeadRatioRule

STEPS = 10
SAVE_AT = 6
#: steps at which each of the 4 units fires: 0 always, 1 until step 2, 2 at step 1 and again at 7, 3 never
PLAN = {0: set(range(STEPS)), 1: {0, 1, 2}, 2: {1, 7}, 3: set()}
SPIKE_AT = 8
LOSSES = [1.0 + 0.01 * (t % 2) for t in range(STEPS)]
LOSSES[SPIKE_AT] = 3.0


def model() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2), nn.Tanh())
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(4))
        net[0].bias.zero_()
    net[0].requires_grad_(False)
    return net


def inputs(t: int) -> torch.Tensor:
    """The planted inputs, requiring grad: the ReLU after the frozen layer is then part of the network being
    trained (an activation output that does not require grad while the model trains is not a site)."""
    return torch.tensor([[1.0 if t in PLAN[u] else -1.0 for u in range(4)]], requires_grad=True)


def manager(net: nn.Module, out: str, fired: list[object], start_step: int = 0) -> HookManager:
    rules = [DeadRatioRule(), SpikeRule("loss", sigma=6.0, window=4)]
    alerts = Alerts(rules, every=3, callback=fired.append, warn=False, log=False)
    return HookManager(
        net, [DeadReLU(window=3, evidence=2), Saturation(), GradientNorm()], params=True, alerts=alerts,
        sinks=[hs.CSVSink(os.path.join(out, "stats.csv"), every=2)], start_step=start_step,
    )  # fmt: skip


def train(net: nn.Module, hm: HookManager, opt: torch.optim.Optimizer, start: int, stop: int) -> None:
    for t in range(start, stop):
        out = net(inputs(t))
        out.sum().backward()
        hm.step(loss=torch.tensor(LOSSES[t]))
        opt.step()
        opt.zero_grad()


def report(hm: HookManager, fired: list[object], out: str) -> None:
    hm.to_dataframe().to_csv(os.path.join(out, "frame.csv"), index=False)
    hm.unit_timeline().to_csv(os.path.join(out, "timeline.csv"), index=False)
    hm.param_frame().to_csv(os.path.join(out, "params.csv"), index=False)
    assert hm.alerts is not None
    alerts = [[a.rule, a.layer, a.step] for a in hm.alerts.fired]
    delivered = [[a.rule, a.layer, a.step] for a in fired]  # type: ignore[attr-defined]
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({"alerts": alerts, "delivered": delivered, "dead": hm.dead_units("1"), "step": hm.current_step}, f)


def main(mode: str, out: str, state: str) -> None:
    warnings.simplefilter("ignore")
    net = model()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    fired: list[object] = []
    if mode == "full":
        hm = manager(net, out, fired).attach()
        train(net, hm, opt, 0, STEPS)
        hm.detach()
        report(hm, fired, out)
    elif mode == "interrupted":
        hm = manager(net, out, fired).attach()
        train(net, hm, opt, 0, SAVE_AT)
        checkpoint = {"model": net.state_dict(), "opt": opt.state_dict(), "hookscope": hm.state_dict()}
        torch.save(checkpoint, state)
        light = {**checkpoint, "hookscope": hm.state_dict(history=False, param_copies=False)}
        torch.save(light, state + ".light")
        train(net, hm, opt, SAVE_AT, SAVE_AT + 3)  # rows written after the checkpoint, then preempted
        hm._feed.write(0, [])
        os._exit(0)
    else:
        checkpoint = torch.load(state if mode == "resumed" else state + ".light", weights_only=True)
        net.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["opt"])
        hm = manager(net, out, fired)
        hm.load_state_dict(checkpoint["hookscope"])
        hm.attach()
        train(net, hm, opt, SAVE_AT, STEPS)
        hm.detach()
        report(hm, fired, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
