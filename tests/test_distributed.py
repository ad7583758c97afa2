"""Global statistics under torch.distributed: 2 CPU processes over gloo, data chosen so that the global answer
differs from each rank's local one."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

# unit 0 = relu(x), unit 1 = relu(-x). Rank 0 sees x = [1, 2, 0]: unit 1 never fires there; rank 1 sees x = [-1]:
# unit 0 never fires there. Locally each rank has one dead unit; globally none is dead.
INPUTS = {0: [1.0, 2.0, 0.0], 1: [-1.0]}


def make_model() -> nn.Sequential:
    lin = nn.Linear(1, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        lin.bias.zero_()
    return nn.Sequential(lin, nn.ReLU())


def worker(rank: int, init_file: str, out_dir: str, use_ddp: bool) -> None:
    from hookscope import HookManager

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = make_model()
        wrapped = nn.parallel.DistributedDataParallel(model) if use_ddp else model
        x = torch.tensor(INPUTS[rank]).reshape(-1, 1)
        with (
            HookManager(wrapped, alerts=False) as hm,
            HookManager(make_model(), global_stats=False, alerts=False) as local,
        ):
            for _ in range(2):
                wrapped(x).sum().backward()  # dL/dy = 1 for every element
                local.model(x).sum().backward()
                hm.step()
                local.step()
        hm.to_csv(Path(out_dir) / f"global{rank}.csv")
        local.to_csv(Path(out_dir) / f"local{rank}.csv")
        pd.DataFrame({"dead": [repr(hm.dead_units("1"))]}).to_csv(Path(out_dir) / f"dead{rank}.csv", index=False)
        if rank == 0:  # a report on one rank only is no collective: it must not hang
            hm.to_dataframe()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(tmp_path: Path, use_ddp: bool) -> dict[str, pd.DataFrame]:
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(worker, args=(init_file, str(tmp_path), use_ddp), nprocs=2, join=True)
    read = {}
    for name in ("global0", "global1", "local0", "local1", "dead0", "dead1"):
        read[name] = pd.read_csv(tmp_path / f"{name}.csv", dtype={"layer": str})
    return read


@pytest.mark.parametrize("use_ddp", [False, True], ids=["process_group", "ddp"])
def test_reports_are_global_across_ranks(tmp_path: Path, use_ddp: bool) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    got = run(tmp_path, use_ddp)
    g0, g1 = got["global0"], got["global1"]
    # every rank reports the same global numbers (the shape is each rank's own latest output shape)
    pd.testing.assert_frame_equal(g0.drop(columns="shape"), g1.drop(columns="shape"))
    assert list(g0["layer"]) == ["1", "1"]  # DDP's "module." prefix is not in the name
    # global: no unit is dead; inactive 4 of 6 on rank 0 and 1 of 2 on rank 1 -> 5 / 8 (not the mean 0.583)
    assert g0["dead_ratio"].tolist() == [0.0, 0.0]
    assert g0["inactive_fraction"].tolist() == [5 / 8, 5 / 8]
    assert g0["calls"].tolist() == [2, 2]  # one forward per rank per step
    assert g0["grad_norm"].tolist() == pytest.approx([math.sqrt(8)] * 2)  # sqrt(6 + 2)
    assert got["dead0"]["dead"][0] == "[]" and got["dead1"]["dead"][0] == "[]"
    # rank-local reports, for comparison
    l0, l1 = got["local0"], got["local1"]
    assert l0["dead_ratio"].tolist() == [0.5, 0.5] and l1["dead_ratio"].tolist() == [0.5, 0.5]
    assert l0["inactive_fraction"].iloc[0] == 4 / 6 and l1["inactive_fraction"].iloc[0] == 1 / 2
    assert l0["grad_norm"].iloc[0] == pytest.approx(math.sqrt(6))


def test_global_stats_true_needs_a_process_group() -> None:
    from hookscope import HookManager

    with pytest.raises(ValueError, match="init_process_group"):
        HookManager(make_model(), global_stats=True)
