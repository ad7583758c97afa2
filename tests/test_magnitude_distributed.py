"""Magnitude and Entropy across 2 CPU processes over gloo: the global values equal those of one process that sees
the whole batch (the per-unit rules are applied to the merged sums), and differ from each rank's own."""

from __future__ import annotations

import ast
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_magnitude import COLUMNS, DORMANT, MASSIVE, Attention, Net, entropy_rows, planted, reference, scores

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def inputs(rank: int, step: int) -> torch.Tensor:
    x = planted(100 * rank + step)
    if rank == 0:
        x[1, 2, MASSIVE] = 1.0  # the massive element lives on rank 1 only
        x[..., DORMANT[0]] *= 1e4  # unit 5 is dormant on rank 1 only: globally its mean is not small
    return x


def attention_scores(rank: int) -> torch.Tensor:
    s = scores()
    if rank == 1:
        s[:, 1] = 0.0  # head 1 is one-hot on rank 0 only
    return s


def worker(rank: int, init_file: str, out_dir: str) -> None:
    import hookscope as hs

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model, attention = Net(), Attention()
        with (
            hs.HookManager(model, modules="emit", alerts=False) as hm,
            hs.HookManager(attention, [hs.Entropy()], alerts=False) as he,
        ):
            for step in range(2):
                model(inputs(rank, step)).sum().backward()
                attention(attention_scores(rank))
                hm.step()
                he.step()
        hm.to_csv(Path(out_dir) / f"magnitude{rank}.csv")
        he.to_csv(Path(out_dir) / f"entropy{rank}.csv")
        extra = {
            "massive": repr(hm.massive_units("emit")),
            "rms": repr(hm.unit_frame("emit", "rms")["rms"].tolist()),
            "heads": repr(he.unit_frame(he.layers[0], "entropy")["entropy"].tolist()),
        }
        pd.DataFrame([extra]).to_csv(Path(out_dir) / f"extra{rank}.csv", index=False)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_magnitude_and_entropy_are_exact_across_ranks(tmp_path: Path) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(worker, args=(init_file, str(tmp_path)), nprocs=2, join=True)
    read = {n: pd.read_csv(tmp_path / f"{n}.csv", dtype={"layer": str}) for n in
            ("magnitude0", "magnitude1", "entropy0", "entropy1", "extra0", "extra1")}  # fmt: skip
    pd.testing.assert_frame_equal(read["magnitude0"], read["magnitude1"])
    pd.testing.assert_frame_equal(read["entropy0"], read["entropy1"])
    pd.testing.assert_frame_equal(read["extra0"], read["extra1"])
    frame = read["magnitude0"]
    rows = frame[frame["layer"] == "emit"]
    for step in range(2):
        both = reference([inputs(r, step).numpy() for r in (0, 1)])  # one process seeing the whole batch
        local = reference([inputs(0, step).numpy()])
        other = reference([inputs(1, step).numpy()])
        row = rows[rows["step"] == step].iloc[0]
        for col in COLUMNS:
            assert row[col] == pytest.approx(both[col], rel=1e-12), col
        assert row["massive_units"] == 1.0 and local["massive_units"] == 0.0  # global differs from rank 0's
        assert row["dormant_ratio"] == 1 / 16 and other["dormant_ratio"] == 2 / 16  # unit 5: dormant on rank 1
    last = reference([inputs(r, 1).numpy() for r in (0, 1)])
    assert read["extra0"]["massive"][0] == "[3]"
    np.testing.assert_allclose(ast.literal_eval(read["extra0"]["rms"][0]), last["unit_rms"], rtol=1e-12)
    # entropy: rows of both ranks; head 1 collapsed on rank 0, uniform on rank 1
    per_row = [entropy_rows(torch.softmax(attention_scores(r), -1).numpy(), -1) for r in (0, 1)]
    heads = np.concatenate(per_row, axis=0).mean(axis=(0, 2))
    entropy = read["entropy0"]
    assert entropy["entropy"].tolist() == pytest.approx([np.concatenate(per_row).mean()] * 2, rel=1e-12)
    assert entropy["entropy_min"].tolist() == pytest.approx([heads.min()] * 2, rel=1e-12)
    np.testing.assert_allclose(ast.literal_eval(read["extra0"]["heads"][0]), heads, rtol=1e-12)
