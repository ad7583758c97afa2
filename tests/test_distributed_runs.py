"""Distributed runs as users meet them (issue 20): reports read right after ``step()`` under DDP, FSDP2 with
``params=True``. 2 CPU processes over gloo, as in ``test_distributed.py``."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _worker(rank: int, init_file: str, out_dir: str, name: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        SCENARIOS[name](rank, Path(out_dir))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(tmp_path: Path, name: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_worker, args=(init_file, str(tmp_path), name), nprocs=2, join=True)


# ---------------------------------------------------------------------------------------------------------------
# an empty report right after step() says why (issue 20, item 13)


def scenario_early_reports(rank: int, out: Path) -> None:
    from hookscope import HookManager
    from hookscope.warn import HookscopeWarning

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    ddp = nn.parallel.DistributedDataParallel(model)
    sizes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with HookManager(ddp, alerts=False) as hm:
            for _ in range(4):
                ddp(torch.randn(4, 2)).sum().backward()
                hm.step()
                sizes.append(len(hm.to_dataframe()))
                sizes.append(len(hm.last_step_frame()))
        sizes.append(len(hm.to_dataframe()))  # detach() combined the last steps
    said = [str(w.message) for w in caught if issubclass(w.category, HookscopeWarning)]
    (out / f"early{rank}.json").write_text(json.dumps({"sizes": sizes, "said": said}))


def test_an_early_report_under_ddp_says_once_why_it_is_short(tmp_path: Path) -> None:
    _run(tmp_path, "early_reports")
    for rank in (0, 1):
        got = json.loads((tmp_path / f"early{rank}.json").read_text())
        assert got["sizes"][0] == 0 and got["sizes"][-1] == 4  # empty after the first step(); all at the end
        assert got["sizes"][:-1:2] == [0, 1, 2, 3]  # each report lacks the latest closed step
        why = [m for m in got["said"] if "reaches the reports one or two step() calls later" in m]
        assert len(why) == (1 if rank == 0 else 0), got["said"]  # once, on rank zero (which prints)


SCENARIOS: dict[str, Callable[[int, Path], None]] = {"early_reports": scenario_early_reports}
