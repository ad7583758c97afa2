"""Register a custom activation (a Smooth Maximum Unit) and write a custom collector.

Run: python examples/custom_activation.py
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn

import hookscope as hs
from hookscope.reporters import make_console


class SMU(nn.Module):
    """Smooth Maximum Unit (Biswas et al., 2022): a smooth approximation of max(x, alpha * x)."""

    def __init__(self, alpha: float = 0.25, mu: float = 1.0) -> None:
        super().__init__()
        self.alpha = alpha
        self.mu = nn.Parameter(torch.tensor(mu))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha
        return ((1 + a) * x + (1 - a) * x * torch.erf(self.mu * (1 - a) * x)) / 2


class MeanActivation(hs.Collector):
    """Mean output per layer and step: state declared with its reduction, ratio formed at report time."""

    columns = ("mean_activation",)

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", reduce="sum")

    def update(self, state, output: torch.Tensor, site) -> None:  # hot path: tensor operations only
        state["total"].add_(output.sum(dtype=torch.float64))

    def compute(self, record: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"mean_activation": record["total"] / record["elements"]}


def main() -> hs.HookManager:
    # SMU is a rectifier: dead-unit statistics apply. Its torch.erf call is not a separate site.
    hs.register_activation("smu", modules=[SMU], rectifier=True, replace=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), SMU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    collectors = [hs.DeadReLU(), hs.GradientNorm(), MeanActivation()]
    with hs.HookManager(model, collectors) as hm:
        for _ in range(20):
            x = torch.randn(64, 8)
            loss = (model(x).squeeze(1) - x.sum(1)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            hm.step()  # closes the step, before the optimizer's step
            opt.step()
    make_console().print(hm.table())  # the terminal's width, or 140 columns in a pipe
    print(hm.to_dataframe()[["step", "layer", "kind", "dead_ratio", "mean_activation"]].tail(4).to_string(index=False))
    return hm


if __name__ == "__main__":
    main()
