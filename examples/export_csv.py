"""Export per-layer statistics to CSV, then read them back with pandas.

Run: python examples/export_csv.py [OUT.csv]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

import hookscope as hs


def main(path: str | Path | None = None) -> pd.DataFrame:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with hs.HookManager(model) as hm:
        for _ in range(10):
            x, y = torch.randn(32, 20), torch.randint(0, 4, (32,))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            hm.step()  # closes the step, before the optimizer's step (as in the Quickstart)
            opt.step()

    path = Path(path) if path is not None else Path(tempfile.gettempdir()) / "hookscope-stats.csv"
    hm.to_csv(path)  # atomic: a reader never sees half a file

    # layer names such as "1" would be read as numbers without dtype=str
    back = pd.read_csv(path, dtype={"layer": str, "kind": str, "shape": str})
    print(f"read {len(back)} rows from {path}; columns: {', '.join(back.columns)}")
    print(back.pivot_table(index="step", columns="layer", values=["inactive_fraction", "saturation_rate"]).round(3))
    return back


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
