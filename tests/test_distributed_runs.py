"""Distributed runs as users meet them (issue 20): reports read right after ``step()`` under DDP, FSDP2 with
``params=True``. 2 CPU processes over gloo, as in ``test_distributed.py``."""

from __future__ import annotations

import functools
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


# ---------------------------------------------------------------------------------------------------------------
# FSDP2 with params=True: no crash, whole-parameter norms, the gradient FSDP2's hooks see (issue 20, item 1)


def _fsdp_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))


def _fsdp_batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(4, 3, generator=torch.Generator().manual_seed(10 * step + rank)) + rank


def _keep_square(seen: dict[str, float], name: str, param: torch.Tensor) -> None:
    seen[name] = float(param.grad.to_local().double().pow(2).sum())  # type: ignore[union-attr]


def scenario_fsdp2(rank: int, out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hookscope import HookManager

    result: dict[str, object] = {}
    for case in ("sharded", "local", "replicated"):
        model = _fsdp_model()
        if case == "replicated":  # HSDP: (Replicate, Shard) over a (2, 1) mesh, every rank holds every element
            mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))
            fully_shard(model[0], mesh=mesh)
            fully_shard(model, mesh=mesh)
        else:
            fully_shard(model[0])
            fully_shard(model)
        # what FSDP2's post-accumulate-grad hooks see of each parameter's gradient: its local shard
        seen: dict[str, float] = {}
        for name, p in model.named_parameters():
            p.register_post_accumulate_grad_hook(functools.partial(_keep_square, seen, name))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        hooked = []
        with HookManager(model, params=True, alerts=False, global_stats=case != "local") as hm:
            for step in range(3):
                model(_fsdp_batch(rank, step)).pow(2).sum().backward()
                hooked.append(dict(seen))
                hm.step()  # before the optimizer's step, as the integrations do (crashed here before the fix)
                opt.step()
                opt.zero_grad()
            frame = hm.param_frame()
        result[case] = {"frame": frame.to_dict(orient="list"), "hooked": hooked, "layers": hm.layers}
    (out / f"fsdp{rank}.json").write_text(json.dumps(result))


SCENARIOS: dict[str, Callable[[int, Path], None]] = {"early_reports": scenario_early_reports, "fsdp2": scenario_fsdp2}


def _reference_param_rows() -> list[tuple[int, str, float, float, float]]:
    """(step, module, weight_norm, grad_norm, update_ratio) of an uninstrumented, unsharded copy trained on both
    ranks' batches, with the gradient FSDP2 reduces (the mean over ranks)."""
    import math

    model = _fsdp_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rows, previous = [], None
    for step in range(3):
        loss = sum(model(_fsdp_batch(r, step)).pow(2).sum() for r in (0, 1)) / 2
        loss.backward()  # type: ignore[union-attr]
        now = {n: [p.detach().clone() for p in m.parameters()] for n, m in (("0", model[0]), ("2", model[2]))}
        for name, module in (("0", model[0]), ("2", model[2])):
            weight = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in module.parameters()))
            grad = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in module.parameters()))  # type: ignore[union-attr]
            ratio = math.nan
            if previous is not None:
                change = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(now[name], previous[name]))
                before = sum(float(b.double().pow(2).sum()) for b in previous[name])
                ratio = math.sqrt(change) / math.sqrt(before)
            rows.append((step, name, weight, grad, ratio))
        previous = now
        opt.step()
        opt.zero_grad()
    return rows


def test_fsdp2_parameter_statistics_are_those_of_the_whole_parameters(tmp_path: Path) -> None:
    import math

    _run(tmp_path, "fsdp2")
    got = [json.loads((tmp_path / f"fsdp{r}.json").read_text()) for r in (0, 1)]
    want = _reference_param_rows()
    for case in ("sharded", "replicated"):
        for rank in (0, 1):
            frame = got[rank][case]["frame"]
            rows = list(zip(frame["step"], frame["module"], frame["weight_norm"], frame["grad_norm"],
                            frame["update_ratio"]))  # fmt: skip
            assert [r[:2] for r in rows] == [r[:2] for r in want]
            for (_, _, *values), (_, _, *expected) in zip(rows, want):
                assert values == pytest.approx(expected, rel=1e-5, nan_ok=True), (case, rank)
            assert frame["kind"][:2] == ["linear", "linear"] and frame["params"][:2] == [20, 12]  # whole params
            assert got[rank][case]["layers"] == ["1"]
    # the gradient read at step() is the one FSDP2's post-accumulate-grad hooks saw, summed over the shards
    for step in range(3):
        for row, name in enumerate(("0", "2")):
            hooked = [got[r]["sharded"]["hooked"][step] for r in (0, 1)]
            squares = sum(h[f"{name}.{p}"] for h in hooked for p in ("weight", "bias"))
            reported = got[0]["sharded"]["frame"]["grad_norm"][2 * step + row]
            assert reported == pytest.approx(math.sqrt(squares), rel=1e-6)
    # global_stats=False: each rank's own shards, as its hooks saw them (sqrt(2) smaller or so: not the whole)
    for rank in (0, 1):
        frame = got[rank]["local"]["frame"]
        local = got[rank]["local"]["hooked"][0]
        assert frame["grad_norm"][0] == pytest.approx(math.sqrt(local["0.weight"] + local["0.bias"]), rel=1e-6)
        assert frame["grad_norm"][0] < want[0][3] * 0.99
