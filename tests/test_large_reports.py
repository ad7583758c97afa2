"""Reports of models with many sites: the table shows the worst layers first and says how many more there are;
the per-unit timeline is built for all sites at once. (Their speed is measured by benchmarks/report_scale.py,
not here: these tests pin the structure.)"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

import hookscope as hs
from hookscope.cli import main
from hookscope.reporters.table import MAX_ROWS, build_param_table, build_table


def many_layers(n: int = 60) -> pd.DataFrame:
    """One step of ``n`` relu layers, all quiet but five: l20 saturated-looking (a sigmoid at 90%), l10 and l40
    dead (50%, 20%), l30 with a vanishing gradient, l05 dead at 9% (below the 10% mark)."""
    frame = pd.DataFrame(
        {
            "step": 3,
            "layer": [f"l{i:02d}" for i in range(n)],
            "kind": "relu",
            "shape": "8x10",
            "units": 10,
            "calls": 1,
            "dead_ratio": 0.0,
            "inactive_fraction": 0.5,
            "saturation_rate": np.nan,
            "grad_norm": 1.0,
            "confirmed_dead_ratio": 0.0,
        }
    )
    frame.loc[20, ["kind", "dead_ratio", "confirmed_dead_ratio", "saturation_rate"]] = ["sigmoid", np.nan, np.nan, 0.9]
    frame.loc[10, ["dead_ratio", "confirmed_dead_ratio"]] = [0.5, 0.5]
    frame.loc[40, ["dead_ratio", "confirmed_dead_ratio"]] = [0.2, 0.2]
    frame.loc[30, "grad_norm"] = 1e-9
    frame.loc[5, ["dead_ratio", "confirmed_dead_ratio"]] = [0.09, 0.09]
    frame.loc[50, "grad_norm"] = 30.0  # 1.5 orders from the median: not marked, but the most unusual gradient
    return frame


def layers_of(text: str) -> list[str]:
    cells = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
    return [c for c in cells if c != "layer"]  # the header row


def test_a_table_with_more_layers_than_rows_shows_the_worst_first_and_counts_the_others() -> None:
    text = str(build_table(many_layers(), ascii=True, max_rows=6))
    # marked layers first, by the higher of dead ratio and saturation, then the vanishing gradient (score 0);
    # then the unmarked: l05 (9% dead), then l50 (its gradient 1.5 orders from the median's)
    assert layers_of(text) == ["l20", "l10", "l40", "l30", "l05", "l50"]
    assert "... 54 more layers (the 6 worst of 60 are shown, worst first)" in text
    assert text.index("l50") < text.index("54 more layers")  # the caption is under the table


def test_a_table_that_fits_keeps_the_forward_order_and_has_no_caption() -> None:
    frame = many_layers()
    for table in (build_table(frame, ascii=True, max_rows=None), build_table(frame, ascii=True, max_rows=60)):
        text = str(table)
        assert layers_of(text) == [f"l{i:02d}" for i in range(60)] and "more layer" not in text
    assert MAX_ROWS == 50 and "... 10 more layers (the 50 worst of 60 are shown" in str(build_table(frame, ascii=True))
    one_more = str(build_table(frame, ascii=True, max_rows=59))
    assert "... 1 more layer (the 59 worst" in one_more and len(layers_of(one_more)) == 59


def test_show_takes_max_rows(tmp_path: Path) -> None:
    path = tmp_path / "many.csv"
    many_layers().to_csv(path, index=False)
    for args, count in (([], 50), (["--max-rows", "3"], 3), (["--max-rows", "0"], 60)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["show", str(path), "--ascii", *args]) == 0
        assert len(layers_of(out.getvalue())) == count, args
        assert (f"{60 - count} more layers" in out.getvalue()) == (count < 60)


def test_the_manager_tables_take_max_rows() -> None:
    model = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(4, 4), nn.ReLU())])
    with hs.HookManager(model, alerts=False, params=True) as hm:
        model(torch.randn(4, 4)).sum().backward()
        hm.step()
    assert "... 5 more layers (the 3 worst of 8 are shown" in str(hm.table(ascii=True, max_rows=3))
    assert "more layer" not in str(hm.table(ascii=True))
    assert "... 5 more modules (the 3 worst of 8 are shown" in str(hm.param_table(ascii=True, max_rows=3))
    for bad in (0, -1, 2.5, True):
        with pytest.raises((ValueError, TypeError), match="`max_rows`"):
            hm.table(max_rows=bad)  # type: ignore[arg-type]


def test_the_parameter_table_shows_the_worst_modules_first() -> None:
    frame = pd.DataFrame(
        {
            "step": 0,
            "module": [f"m{i}" for i in range(6)],
            "kind": "Linear",
            "params": 20,
            "weight_norm": 1.0,
            "grad_norm": [1.0, 1.0, 1e-9, 1.0, 10.0, 1.0],
            "update_ratio": [1e-3, 1e-3, 1e-3, 0.5, 1e-3, 1e-3],
        }
    )
    text = str(build_param_table(frame, ascii=True, max_rows=3))
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| m")][1:]  # no header
    # the vanishing gradient (9 orders) and the update ratio above 0.1 are marked; then m4 (1 order from median)
    assert rows == ["m2", "m3", "m4"] and "... 3 more modules (the 3 worst of 6" in text


def test_the_timeline_of_all_sites_is_each_sites_timeline_back_to_back() -> None:
    torch.manual_seed(0)
    relu = nn.ReLU()  # called twice: sites "1" and "1#1"; the sigmoid between them has no units in the timeline
    model = nn.Sequential(nn.Linear(4, 6), relu, nn.Linear(6, 3), nn.Sigmoid(), nn.Linear(3, 5), relu)
    with hs.HookManager(model, alerts=False) as hm:
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()
            hm.step()
        model(torch.randn(2, 4))  # an open step
        whole = hm.unit_timeline()
        parts = pd.concat([hm.unit_timeline(layer) for layer in ("1", "1#1")], ignore_index=True)
        dead = {layer: hm.dead_units(layer) for layer in ("1", "1#1")}
    pd.testing.assert_frame_equal(whole, parts)
    assert whole["layer"].tolist() == ["1"] * 6 + ["1#1"] * 5 and whole["unit"].tolist() == [*range(6), *range(5)]
    for layer, units in dead.items():
        assert whole[(whole["layer"] == layer) & whole["dead"]]["unit"].tolist() == units


def deep() -> nn.Module:  # a factory for `hookscope scan test_large_reports:deep`
    return nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(4, 4), nn.ReLU())])


def test_scan_takes_max_rows() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        argv = ["scan", "test_large_reports:deep", "--input-shape", "4,4", "--steps", "1", "--ascii", "--params"]
        assert main([*argv, "--max-rows", "2"]) == 0
    assert "... 4 more layers (the 2 worst of 6" in out.getvalue()
    assert "... 4 more modules (the 2 worst of 6" in out.getvalue()
