"""The overhead benchmark runs end to end (a smoke test: speed itself is measured by running it, not here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_overhead_benchmark_writes_a_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import overhead
    finally:
        sys.path.remove(str(BENCHMARKS))
    out = tmp_path / "results.json"
    args = ["--models", "mlp", "--rounds", "3", "--no-malloc-env", "--threads", "1", "--json", str(out)]
    assert overhead.main(args) == 0
    table = capsys.readouterr().out
    # the columns the issue pins, in its order, then the noise and the op counts
    assert "| model | plain ms | hookscope ms | ratio | every=4 ratio | naive ratio | A/A ratio |" in table
    result = json.loads(out.read_text())["results"][0]
    assert result["model"] == "mlp" and result["rounds"] == 3
    configs = result["configs"]
    assert set(configs) == {"plain", "plain (A/A)", "hookscope", "every=4", "naive"}
    assert all(len(c["ratios"]) == 3 and c["ms"] > 0 for c in configs.values())
    assert configs["plain"]["ratio"] == configs["plain"]["median_ratio"] == 1.0
    assert configs["plain"]["aten_ops_per_step"] == configs["plain (A/A)"]["aten_ops_per_step"]
    # 3 ReLU sites: 6 ops each in the forward and backward hooks, plus one processing of the ring every 16 steps
    # (closing a step dispatches no op)
    extra = configs["hookscope"]["aten_ops_per_step"] - configs["plain"]["aten_ops_per_step"]
    assert 3 * 6 < extra <= 3 * 6 + 64 / 16
    assert configs["hookscope"]["state_bytes"] > 0
