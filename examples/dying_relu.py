"""Diagnose dying ReLU while training on real data (scikit-learn's digits), then apply the remedy.

Run: python examples/dying_relu.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import hookscope as hs
from hookscope.demo import load_digits_data, make_mlp

#: (learning rate, initial bias): far too high for Adam, then the remedy (a lower rate, biases started slightly
#: positive so that units begin in the active region of the ReLU)
RECIPES = ((0.05, None), (0.001, 0.1))


def train(lr: float, steps: int = 300, bias: float | None = None) -> tuple[hs.HookManager, list[hs.Alert]]:
    x_train, y_train, _, _ = load_digits_data()
    model = make_mlp(seed=0, bias=bias)  # 64-128-128-128-10, ReLU layers act1..act3
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    alerts: list[hs.Alert] = []
    collectors = [hs.DeadReLU(window=20), hs.Saturation(), hs.GradientNorm()]
    # alerts are checked every 25 steps (one host read each time), and reported once per layer and rule
    with hs.HookManager(
        model, collectors, alerts=hs.Alerts(every=25, callback=alerts.append, warn=False, log=False)
    ) as hm:
        for _ in range(steps):
            idx = torch.randint(0, len(x_train), (64,), generator=gen)
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            hm.step()  # closes the step, before the optimizer's step
            opt.step()
    return hm, alerts


def main(steps: int = 300) -> dict[float, hs.HookManager]:
    managers = {}
    for lr, bias in RECIPES:
        hm, alerts = train(lr, steps, bias)
        managers[lr] = hm
        last = hm.to_dataframe().groupby("layer", sort=False).last()
        start = f", biases initialised to {bias:g}" if bias is not None else ""
        print(f"\nAdam lr={lr:g}{start}: dead ratio at the last step")
        for layer, row in last.iterrows():
            dead = hm.unit_timeline(layer).query("dead")
            # a unit stops firing the step after it last fired (step 0 if it never did); its death is confirmed
            # `window` silent steps later, at `dead_since`
            stopped = (dead["last_fired"] + 1).fillna(0)
            since = (
                f", half of them had stopped firing by step {stopped.median():.0f} (dead by the window rule by step "
                f"{dead['dead_since'].median():.0f})"
                if len(dead)
                else ""
            )
            print(f"  {layer}: {row['dead_ratio']:.0%} of {row['units']} units dead{since}")
        for alert in alerts:
            print(f"  alert: {alert.message[:110]}...")
        if not alerts:
            print("  no alert")
    return managers


if __name__ == "__main__":
    main()
