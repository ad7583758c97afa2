"""Diagnose dying ReLU while training on real data (scikit-learn's digits), then apply the remedy.

Run: python examples/dying_relu.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import hookscope as hs
from hookscope.demo import load_digits_data, make_mlp


def train(lr: float, steps: int = 300) -> tuple[hs.HookManager, list[hs.Alert]]:
    x_train, y_train, _, _ = load_digits_data()
    model = make_mlp(seed=0)  # 64-128-128-128-10, ReLU layers act1..act3
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
            opt.step()
            hm.step()
    return hm, alerts


def main(steps: int = 300) -> dict[float, hs.HookManager]:
    managers = {}
    for lr in (0.05, 0.001):  # far too high for Adam, then the remedy
        hm, alerts = train(lr, steps)
        managers[lr] = hm
        last = hm.to_dataframe().groupby("layer", sort=False).last()
        print(f"\nAdam lr={lr:g}: dead ratio at the last step")
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
    return managers


if __name__ == "__main__":
    main()
