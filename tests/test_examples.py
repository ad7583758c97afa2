"""Every example runs and produces what it claims."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pandas as pd

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_runs_as_a_script() -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "layer1.0.relu#1" in proc.stdout
    assert "wrote 85 rows" in proc.stdout  # 5 steps x 17 call sites


def test_quickstart_main_returns_the_manager() -> None:
    hm = runpy.run_path(str(EXAMPLES / "quickstart.py"))["main"](steps=2)
    df = hm.to_dataframe()
    assert isinstance(df, pd.DataFrame) and sorted(df["step"].unique()) == [0, 1]
    assert not hm.attached
