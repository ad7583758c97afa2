"""Quickstart: instrument a torchvision model, train a few steps on random data, look at the statistics.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

import hookscope as hs


def main(steps: int = 5) -> hs.HookManager:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)  # weights=None: nothing is downloaded
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = [(torch.randn(16, 3, 64, 64), torch.randint(0, 10, (16,))) for _ in range(steps)]

    with hs.HookManager(model, params=True) as hm:  # default collectors: DeadReLU, Saturation, GradientNorm
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            hm.step()  # closes one training step (before the optimizer's step: it sees the gradients it uses)
            opt.step()

    print(hm.table())  # one row per layer, latest step (the terminal's width, or 140 columns in a pipe)
    df = hm.to_dataframe()  # one row per (step, layer)
    print(df.groupby("step")[["dead_ratio", "inactive_fraction", "grad_norm"]].mean().round(4))
    out = Path(tempfile.gettempdir()) / "hookscope-quickstart.csv"
    hm.to_csv(out)
    print(f"wrote {len(df)} rows to {out}")
    print(hm.param_table())  # weight and weight-gradient norms, update ratios, per module
    return hm


if __name__ == "__main__":
    main()
