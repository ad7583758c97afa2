"""Every example runs and produces what it claims."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pandas as pd

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> dict:
    return runpy.run_path(str(EXAMPLES / f"{name}.py"))


def test_quickstart_runs_as_a_script() -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "layer1.0.relu#1" in proc.stdout
    assert "wrote 85 rows" in proc.stdout  # 5 steps x 17 call sites
    assert "<rich.table.Table object" not in proc.stdout  # print(hm.table()) shows the table, as the README says
    assert "hookscope parameters" in proc.stdout and "layer4.1.conv2" in proc.stdout


def test_quickstart_main_returns_the_manager() -> None:
    hm = load("quickstart")["main"](steps=2)
    df = hm.to_dataframe()
    assert isinstance(df, pd.DataFrame) and sorted(df["step"].unique()) == [0, 1]
    assert not hm.attached


def test_dying_relu_example_shows_the_remedy(capsys) -> None:
    managers = load("dying_relu")["main"](steps=120)
    high, low = managers[0.05], managers[0.001]
    out = capsys.readouterr().out
    dying, remedy = out.split("Adam lr=0.001, biases initialised to 0.1:")
    # the remedy is a remedy: the dying run alerts on act1, the remedy on no layer
    assert "layer 'act1'" in dying and "(dead_r" in dying
    assert "alert:" not in remedy and "no alert" in remedy
    # when units stopped firing (the step after they last fired) and when the window rule (20) confirmed it
    dead = high.unit_timeline("act1").query("dead")
    stopped, confirmed = (dead["last_fired"] + 1).fillna(0), dead["dead_since"]
    assert ((confirmed - stopped)[dead["last_fired"].notna()] == 19).all()
    assert (
        f"half of them had stopped firing by step {stopped.median():.0f} (dead by the window rule by step "
        f"{confirmed.median():.0f})" in dying
    )

    def last_dead(hm) -> float:
        df = hm.to_dataframe()
        return float(df[(df["step"] == df["step"].max()) & (df["layer"] == "act1")]["dead_ratio"].iloc[0])

    assert last_dead(high) > 0.5 > 0.1 > last_dead(low)
    assert len(high.dead_units("act1")) > 64


def test_export_csv_round_trip(tmp_path: Path) -> None:
    back = load("export_csv")["main"](tmp_path / "stats.csv")
    assert len(back) == 20 and list(back["layer"].unique()) == ["1", "3"]
    assert back["saturation_rate"].notna().sum() == 10  # the tanh layer only


def test_custom_activation_example() -> None:
    ns = load("custom_activation")
    try:
        hm = ns["main"]()
        df = hm.to_dataframe()
        assert list(df["kind"].unique()) == ["smu", "relu"]
        assert df["mean_activation"].notna().all() and df["dead_ratio"].notna().all()
    finally:
        from hookscope.activations import unregister_activation

        unregister_activation("smu")
