"""Global statistics under torch.distributed: 2 CPU processes over gloo, data chosen so that the global answer
differs from each rank's local one."""

from __future__ import annotations

import gc
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


def worker(rank: int, init_file: str, out_dir: str, use_ddp: bool, compiled: bool = False) -> None:
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
            forward = torch.compile(wrapped, backend="aot_eager") if compiled else wrapped
            for _ in range(2):
                forward(x).sum().backward()  # dL/dy = 1 for every element
                local.model(x).sum().backward()
                hm.step()
                local.step()
        assert hm._tracer._compiled.replayed == compiled  # recorded by the compiled graph's operations
        hm.to_csv(Path(out_dir) / f"global{rank}.csv")
        local.to_csv(Path(out_dir) / f"local{rank}.csv")
        pd.DataFrame({"dead": [repr(hm.dead_units("1"))]}).to_csv(Path(out_dir) / f"dead{rank}.csv", index=False)
        if rank == 0:  # a report on one rank only is no collective: it must not hang
            hm.to_dataframe()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(tmp_path: Path, use_ddp: bool, compiled: bool = False) -> dict[str, pd.DataFrame]:
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(worker, args=(init_file, str(tmp_path), use_ddp, compiled), nprocs=2, join=True)
    read = {}
    for name in ("global0", "global1", "local0", "local1", "dead0", "dead1"):
        read[name] = pd.read_csv(tmp_path / f"{name}.csv", dtype={"layer": str})
    return read


@pytest.mark.parametrize(
    ("use_ddp", "compiled"), [(False, False), (True, False), (True, True)], ids=["process_group", "ddp", "ddp_compiled"]
)
def test_reports_are_global_across_ranks(tmp_path: Path, use_ddp: bool, compiled: bool) -> None:
    """Planted units, exact global values; the same when the DDP model is torch.compile'd after attaching (the
    statistics come from the compiled graph's operations, combined across ranks as in eager mode)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    got = run(tmp_path, use_ddp, compiled)
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


# ---------------------------------------------------------------------------------------------------------------
# sites by name, sites on some ranks only, layouts that differ, skipped steps, a destroyed process group


class Experts(nn.Module):
    """A router that sends every sample to the experts named in ``route`` (in that order), then sums them."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.experts = nn.ModuleDict({n: nn.Sequential(nn.Linear(2, width), nn.ReLU()) for n in "abc"})
        with torch.no_grad():
            for n in "abc":
                lin = self.experts[n][0]
                lin.weight.fill_(1.0)
                lin.bias.fill_(-100.0 if n == "a" else 0.0)  # expert a: every unit dead on every rank

    def forward(self, x: torch.Tensor, route: str) -> torch.Tensor:
        return sum(self.experts[n](x).sum() for n in route)  # type: ignore[return-value]


def _frame_rows(frame: pd.DataFrame) -> list[tuple]:  # type: ignore[type-arg]
    return [tuple(r) for r in frame[["step", "layer", "calls", "dead_ratio", "inactive_fraction"]].to_numpy()]


def scenario_routing(rank: int, out: Path) -> None:
    """MoE routing: rank 0 meets a then b, rank 1 b then a; expert c runs on rank 1 only, at step 1."""
    from conftest import Extremes  # max and min states combine with max and min across ranks

    from hookscope import DeadReLU, HookManager

    model = Experts()
    x = torch.full((2, 2), float(rank + 1))  # rank 0: outputs 2.0, rank 1: 4.0 (experts b, c)
    routes = {0: ["ab", "ab"], 1: ["ba", "bac"]}[rank]
    with HookManager(model, [DeadReLU(), Extremes()], alerts=False) as hm:
        for route in routes:
            model(x, route)
            hm.step()
    frame = hm.to_dataframe()
    frame.to_csv(out / f"routing{rank}.csv", index=False)


def scenario_layouts_differ(rank: int, out: Path) -> None:
    from hookscope import HookManager

    model = Experts(width=3 if rank == 0 else 5)  # expert b has 3 units on rank 0 and 5 on rank 1
    with HookManager(model, alerts=False) as hm:
        try:
            for _ in range(3):
                model(torch.ones(2, 2), "b")
                hm.step()
            message = "no error"
        except RuntimeError as e:
            message = str(e)
    (out / f"layouts{rank}.txt").write_text(message)


def scenario_skipped_step(rank: int, out: Path) -> None:
    from hookscope import HookManager

    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    hm = HookManager(ddp, alerts=False).attach()
    messages = []
    gc.disable()  # what holds the process groups must be freed by reference counting, not by a later collection
    try:
        for i in range(6):  # a loop that catches errors and goes on: training must go on too
            ddp(torch.tensor(INPUTS[rank]).reshape(-1, 1)).sum().backward()
            opt.step()
            opt.zero_grad()
            if not (rank == 1 and i == 2):  # rank 1 forgets step() once
                try:
                    hm.step()
                except RuntimeError as e:
                    messages.append(f"{i}: {e}")
        # a gloo group or work that lives until interpreter shutdown can abort the process there
        live = sum(type(o).__name__ in ("CrossRank", "PendingReduction") for o in gc.get_objects())
        messages.append(f"live cross-rank objects: {live}")
    finally:
        gc.enable()
    hm.detach()
    (out / f"skipped{rank}.txt").write_text("\n".join(messages) or "no error")


def scenario_destroyed_group(rank: int, out: Path) -> None:
    import warnings

    from hookscope import CSVSink, HookManager

    model = make_model()
    hm = HookManager(model, alerts=False, sinks=[CSVSink(out / f"sink{rank}.csv", every=100)]).attach()
    for _ in range(2):
        model(torch.tensor(INPUTS[rank]).reshape(-1, 1))
        hm.step()
    dist.barrier()
    dist.destroy_process_group()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            hm.detach()  # hookscope's own groups still combine the last step; only rank 0 writes
        except RuntimeError as e:
            (out / f"destroyed{rank}.txt").write_text(str(e))


SCENARIOS = {
    "routing": scenario_routing,
    "layouts": scenario_layouts_differ,
    "skipped": scenario_skipped_step,
    "destroyed": scenario_destroyed_group,
}


def scenario_worker(rank: int, init_file: str, out_dir: str, names: list[str]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        for name in names:
            SCENARIOS[name](rank, Path(out_dir))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_scenarios(tmp_path: Path, *names: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(scenario_worker, args=(init_file, str(tmp_path), list(names)), nprocs=2, join=True)


def test_sites_are_matched_by_name_across_ranks_and_a_site_on_one_rank_is_reported(tmp_path: Path) -> None:
    run_scenarios(tmp_path, "routing", "layouts")
    f0 = pd.read_csv(tmp_path / "routing0.csv", dtype={"layer": str})
    f1 = pd.read_csv(tmp_path / "routing1.csv", dtype={"layer": str})
    assert _frame_rows(f0) == _frame_rows(f1)  # every rank reports the same global numbers
    by = {(r.step, r.layer): r for r in f0.itertuples()}
    # expert a is dead on every rank, whatever order the ranks met it in (index pairing reported 0%)
    assert by[(0, "experts.a.1")].dead_ratio == 1.0 and by[(1, "experts.a.1")].dead_ratio == 1.0
    assert by[(0, "experts.b.1")].dead_ratio == 0.0
    assert by[(0, "experts.a.1")].calls == 2 and by[(0, "experts.b.1")].calls == 2  # one call per rank
    # expert c ran on rank 1 only, in step 1: reported on both ranks, from rank 1
    assert (0, "experts.c.1") not in by
    assert by[(1, "experts.c.1")].calls == 1 and by[(1, "experts.c.1")].inactive_fraction == 0.0
    # max and min states: b's outputs are 2.0 on rank 0 and 4.0 on rank 1 (weights 1, bias 0, inputs 1 or 2)
    assert by[(0, "experts.b.1")].largest == 4.0 and by[(0, "experts.b.1")].smallest == 2.0
    # a name that stands for other sites on the other rank: a clear error on every rank
    for r in (0, 1):
        text = (tmp_path / f"layouts{r}.txt").read_text()
        assert "different activation sites" in text and "'experts.b.1'" in text and "3 units" in text


def test_a_rank_that_skips_step_raises_an_error_naming_it_instead_of_aborting(tmp_path: Path) -> None:
    run_scenarios(tmp_path, "skipped")  # gloo aborted both processes (exit -6) before
    for r, when in ((0, 3), (1, 4)):  # each rank notices at its next step() after the skip
        *lines, live = (tmp_path / f"skipped{r}.txt").read_text().splitlines()
        assert live == "live cross-rank objects: 0"  # released when the ranks disagreed, not at shutdown
        assert len(lines) == 1 and lines[0].startswith(f"{when}: "), lines  # once; rank-local afterwards
        assert "skipped step() or called it once too often" in lines[0]
        assert "rank 0: step 2, 1 forward passes" in lines[0] and "rank 1: step 2, 2 forward passes" in lines[0]


def test_after_the_process_group_is_destroyed_only_rank_zero_writes(tmp_path: Path) -> None:
    run_scenarios(tmp_path, "destroyed")
    sink = pd.read_csv(tmp_path / "sink0.csv")
    # step 1 is combined at detach through hookscope's own groups, which may or may not outlive the destroyed
    # default group (timing); if it could not be, detach says so. Either way only rank 0 writes, global values.
    steps = sink["step"].tolist()
    assert steps in ([0], [0, 1]) and (sink["inactive_fraction"] == 5 / 8).all()
    if steps == [0]:
        assert "step 1" in (tmp_path / "destroyed0.txt").read_text()
    assert not (tmp_path / "sink1.csv").exists() or (tmp_path / "sink1.csv").stat().st_size == 0
