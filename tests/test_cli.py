"""The command line: scan, show, plot, activations, demo; errors to stderr with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch.nn as nn

from hookscope.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def tiny_model() -> nn.Module:  # a factory for `scan pkg.module:factory`
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.Sigmoid())


@pytest.fixture()
def stats_csv(tmp_path: Path) -> Path:
    path = tmp_path / "stats.csv"
    assert main(["scan", "resnet18", "--input-shape", "2,3,32,32", "--steps", "2", "--csv", str(path), "--ascii"]) == 0
    return path


def test_scan_torchvision_model_prints_table_and_writes_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "stats.csv"
    assert main(["scan", "resnet18", "--input-shape", "2,3,32,32", "--steps", "2", "--csv", str(path)]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.relu#1" in out and "step 1" in out and "wrote 34 rows" in out
    frame = pd.read_csv(path)
    assert len(frame) == 34 and set(frame["step"]) == {0, 1}


def test_scan_factory(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scan", "test_cli:tiny_model", "--input-shape", "2,3,8,8", "--ascii"]) == 0
    out = capsys.readouterr().out
    assert "sigmoid" in out and "relu" in out


def test_show_renders_a_csv(stats_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["show", str(stats_csv), "--step", "0", "--ascii"]) == 0
    out = capsys.readouterr().out
    assert "step 0" in out and "layer4.1.relu#1" in out


def test_plot_writes_png(stats_csv: Path, tmp_path: Path) -> None:
    for metric, kind in [("dead_ratio", "heatmap"), ("grad_norm", "heatmap"), ("inactive_fraction", "lines")]:
        out = tmp_path / f"{metric}.png"
        assert main(["plot", str(stats_csv), "-o", str(out), "--metric", metric, "--kind", kind]) == 0
        assert out.read_bytes()[:8] == PNG


def test_plot_a_metric_without_values_is_a_user_error(stats_csv: Path, tmp_path: Path, capsys) -> None:
    assert main(["plot", str(stats_csv), "-o", str(tmp_path / "s.png"), "--metric", "saturation_rate"]) == 2
    assert "has no values in this report" in capsys.readouterr().err
    assert not (tmp_path / "s.png").exists()


def test_activations_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["activations", "--ascii"]) == 0
    out = capsys.readouterr().out
    for kind in ("relu", "relu6", "gelu", "sigmoid", "hardtanh", "softmax"):
        assert kind in out
    assert "from the layer" in out  # hardtanh's range


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", "missing.csv"], "no such file: missing.csv"),
        (["scan", "no_such_net", "--input-shape", "1,3,8,8"], "unknown MODEL 'no_such_net'"),
        (["scan", "nomodule_xyz:f", "--input-shape", "1,3,8,8"], "cannot import module"),
        (["plot", "missing.csv", "-o", "x.png"], "no such file"),
        (["scan", "resnet18", "--input-shape", "2,3,32"], "fails on an input of shape [2, 3, 32]"),
    ],
)
def test_user_errors_go_to_stderr_without_traceback(argv, message, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_not_a_hookscope_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert main(["show", str(bad)]) == 2
    assert "not a hookscope CSV: missing columns step, layer" in capsys.readouterr().err


def test_show_unknown_step(stats_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", str(stats_csv), "--step", "7"]) == 2
    assert "--step 7 is not in" in capsys.readouterr().err


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scan", "resnet18", "--input-shape", "a,b"]) == 2
    assert "expected comma-separated positive ints" in capsys.readouterr().err
    assert main([]) == 2


def test_python_dash_m_and_entry_point(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "hookscope", "activations", "--ascii"], capture_output=True, text=True)
    assert proc.returncode == 0 and "leaky_relu" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "hookscope", "show", str(tmp_path / "nope.csv")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_runs_and_writes_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "80", "--no-live"]) == 0
    text = capsys.readouterr().out
    assert "Diagnosis" in text and "lower the learning rate" in text
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([
        "stats_dying.csv", "stats_remedy.csv", "units_dying.csv", "units_remedy.csv",
        "dead_ratio_heatmap.png", "grad_norm_heatmap.png", "dead_ratio_lines.png",
    ])  # fmt: skip
    dying = pd.read_csv(out / "stats_dying.csv")
    remedy = pd.read_csv(out / "stats_remedy.csv")
    last = dying["step"].max()
    # the recipe kills well over 10% of a layer; the remedy keeps the first layer nearly intact
    assert dying[dying["step"] == last]["dead_ratio"].max() > 0.3
    assert remedy[remedy["step"] == last]["dead_ratio"].iloc[0] < 0.1
    assert (out / "dead_ratio_heatmap.png").read_bytes()[:8] == PNG
