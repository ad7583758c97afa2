"""The table's text, compared with a golden file (regenerate with HOOKSCOPE_REGEN_GOLDEN=1)."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import pandas as pd
from rich.console import Console

from hookscope.reporters.table import build_table

GOLDEN = Path(__file__).parent / "golden"
NAN = math.nan


def frame() -> pd.DataFrame:
    rows = [
        # step, layer, kind, shape, units, calls, dead, inactive, saturation, grad
        (0, "features.0", "relu", "16x64x32x32", 64, 1, 0.0, 0.5, NAN, 1.0),
        (1, "features.0", "relu", "16x64x32x32", 64, 1, 0.25, 0.8125, NAN, 2.5),
        (1, "features.0#1", "relu6", "16x64x16x16", 64, 2, 0.03125, 0.4, 0.625, 3e-7),
        (1, "head.tanh()", "tanh", "16x10", 10, 1, NAN, NAN, 0.1, 0.75),
    ]
    columns = ["step", "layer", "kind", "shape", "units", "calls", "dead_ratio", "inactive_fraction",
               "saturation_rate", "grad_norm"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def render(ascii: bool, step: int | None) -> str:
    console = Console(file=io.StringIO(), width=100, color_system=None, legacy_windows=False)
    console.print(build_table(frame(), step=step, ascii=ascii))
    return console.file.getvalue()  # type: ignore[attr-defined]


def check(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("HOOKSCOPE_REGEN_GOLDEN") == "1":
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"{name} differs; HOOKSCOPE_REGEN_GOLDEN=1 regenerates it"


def test_ascii_table_latest_step() -> None:
    # step 1 only; dead 25% and saturation 62.5% are marked, and the gradient norm 3e-7 is 6 orders of magnitude
    # below the median layer's
    check("table_ascii_step1.txt", render(ascii=True, step=None))


def test_rich_table_first_step() -> None:
    check("table_rich_step0.txt", render(ascii=False, step=0))
