"""The table's text, compared with a golden file (regenerate with HOOKSCOPE_REGEN_GOLDEN=1), and its cells compared
with values worked out by hand from the frame, which no regeneration can change.

Regeneration never passes unseen: a run with HOOKSCOPE_REGEN_GOLDEN=1 rewrites each golden file whose text changed
and fails, naming the files; review the change (``git diff tests/golden``), then run the tests again without the
variable. A run in which nothing changed passes.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from hookscope.reporters.table import build_table

GOLDEN = Path(__file__).parent / "golden"
NAN = math.nan
REGEN_VAR = "HOOKSCOPE_REGEN_GOLDEN"


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
    """``text`` must equal the golden file ``name``. With HOOKSCOPE_REGEN_GOLDEN=1 a changed text is written to the
    file and the test fails, so that a regenerated file is always looked at before it is trusted."""
    path = GOLDEN / name
    old = path.read_text(encoding="utf-8") if path.exists() else None
    if os.environ.get(REGEN_VAR) == "1" and text != old:
        path.write_text(text, encoding="utf-8")
        pytest.fail(
            f"{name} was {'rewritten' if old is not None else 'created'} ({REGEN_VAR}=1): review the change "
            f"(git diff {path}), then run the tests again without {REGEN_VAR}",
            pytrace=False,
        )
    assert old is not None, f"{name} is missing; {REGEN_VAR}=1 creates it"
    assert text == old, f"{name} differs; {REGEN_VAR}=1 regenerates it"


def ascii_cells(text: str) -> list[list[str]]:
    """The body rows of an ASCII table, as stripped cell texts."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[1:]]  # not the header


def rich_cells(text: str) -> list[list[str]]:
    """The body rows of a SIMPLE_HEAVY table (cells are separated by three spaces or more)."""
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if "━" in line)
    return [line.strip().split("   ") for line in lines[rule + 1 :] if line.strip()]


def test_ascii_table_latest_step() -> None:
    # step 1 only; dead 25% and saturation 62.5% are marked, and the gradient norm 3e-7 is 6 orders of magnitude
    # below the median layer's
    text = render(ascii=True, step=None)
    # the cells, by hand: ratios as percentages with one decimal (81.25% rounds half to even), "-" where a
    # statistic does not apply, "!" on dead >= 10%, saturation >= 50%, and a norm 3 orders below the median (0.75)
    assert [[c for c in row if c] for row in ascii_cells(text)] == [
        ["features.0", "relu", "16x64x32x32", "1", "25.0% !", "81.2%", "-", "2.5"],
        ["features.0#1", "relu6", "16x64x16x16", "2", "3.1%", "40.0%", "62.5% !", "3e-07 !"],
        ["head.tanh()", "tanh", "16x10", "1", "-", "-", "10.0%", "0.75"],
    ]
    assert text.splitlines()[0].strip() == "hookscope - step 1"
    check("table_ascii_step1.txt", text)


def test_rich_table_first_step() -> None:
    text = render(ascii=False, step=0)
    assert [[c.strip() for c in row if c.strip()] for row in rich_cells(text)] == [
        ["features.0", "relu", "16x64x32x32", "1", "0.0%", "50.0%", "–", "1"]
    ]
    assert text.splitlines()[0].strip() == "hookscope · step 0"
    check("table_rich_step0.txt", text)


def test_regeneration_fails_when_the_text_changed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import test_table_golden

    monkeypatch.setattr(test_table_golden, "GOLDEN", tmp_path)
    (tmp_path / "t.txt").write_text("old\n", encoding="utf-8")
    monkeypatch.delenv(REGEN_VAR, raising=False)
    with pytest.raises(AssertionError, match=r"t\.txt differs"):
        check("t.txt", "new\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "old\n"  # a plain run never writes
    monkeypatch.setenv(REGEN_VAR, "1")
    with pytest.raises(pytest.fail.Exception, match=r"t\.txt was rewritten"):
        check("t.txt", "new\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "new\n"
    check("t.txt", "new\n")  # unchanged: regeneration passes
    with pytest.raises(pytest.fail.Exception, match=r"u\.txt was created"):
        check("u.txt", "first\n")
    monkeypatch.delenv(REGEN_VAR)
    check("t.txt", "new\n")
    with pytest.raises(AssertionError, match=r"v\.txt is missing"):
        check("v.txt", "x\n")
