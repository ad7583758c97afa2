"""Time of the reports of a model with many activation sites (10,000 by default): the frame, the per-unit
timeline and the table, built and printed.

Method. A ``nn.Sequential`` of ``--sites`` ReLUs (4 units each) is recorded for three steps with the default
collectors; then each report is timed ``--repeats`` times (the median is printed). The table is printed into a
string at 140 columns, as outside a terminal. The package imported is this checkout's, unless ``--package-root``
names another checkout's root (to compare a version before a change on the same machine, in the same minutes).

    python benchmarks/report_scale.py                      # 10,000 sites
    python benchmarks/report_scale.py --sites 2500,5000,10000
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def timed(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(sites: int, repeats: int) -> dict[str, float]:
    import torch
    import torch.nn as nn
    from rich.console import Console

    import hookscope as hs

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.ReLU() for _ in range(sites)])
    x = torch.randn(8, 4, requires_grad=True)
    out: dict[str, float] = {}
    with hs.HookManager(model, alerts=False) as hm:
        start = time.perf_counter()
        for _ in range(3):
            model(x).sum().backward()
            hm.step()
        out["3 steps"] = time.perf_counter() - start

        def printed() -> None:
            Console(file=io.StringIO(), width=140).print(hm.table())

        out["to_dataframe()"] = timed(hm.to_dataframe, repeats)
        out["unit_timeline()"] = timed(hm.unit_timeline, repeats)
        out["table() built"] = timed(hm.table, repeats)
        out["table() printed"] = timed(printed, repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="10000", help="comma-separated numbers of sites (10000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--package-root", default=str(ROOT), help="the checkout whose hookscope is imported")
    args = parser.parse_args()
    sys.path.insert(0, args.package_root)
    import hookscope

    print(f"hookscope from {Path(hookscope.__file__).parent}")
    print(
        "| sites | " + " | ".join(["3 steps", "to_dataframe()", "unit_timeline()", "table() built", "table() printed"])
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for n in (int(s) for s in args.sites.split(",")):
        result = measure(n, args.repeats)
        print(f"| {n:,} | " + " | ".join(f"{v:.3f} s" for v in result.values()) + " |")


if __name__ == "__main__":
    main()
