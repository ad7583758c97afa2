"""HookManager's contract: arguments, attach/detach, steps, reports, CSV, table."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn as nn
from conftest import SaturatingNet, SharedReLU, hook_count, mlp, train_steps
from rich.console import Console

import hookscope as hs
from hookscope import DeadReLU, GradientNorm, HookManager, Saturation

CONTRACT_COLUMNS = ["step", "layer", "kind", "dead_ratio", "inactive_fraction", "saturation_rate", "grad_norm"]


def test_public_names() -> None:
    for name in ("HookManager", "DeadReLU", "Saturation", "GradientNorm", "Collector", "register_activation"):
        assert hasattr(hs, name)
    assert hs.__all__ == sorted(hs.__all__)


@pytest.mark.parametrize("bad", [None, 3, "resnet18", torch.zeros(2), [nn.ReLU()]])
def test_model_must_be_a_module(bad: object) -> None:
    with pytest.raises(TypeError, match=r"nn\.Module") as e:
        HookManager(bad)  # type: ignore[arg-type]
    assert type(bad).__name__ in str(e.value)


def test_collector_validation() -> None:
    model = SharedReLU()
    with pytest.raises(TypeError, match=r"DeadReLU\(\)"):
        HookManager(model, [DeadReLU])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="Collector"):
        HookManager(model, ["dead"])  # type: ignore[list-item]
    d = DeadReLU()
    with pytest.raises(ValueError, match="twice"):
        HookManager(model, [d, d])
    with pytest.raises(ValueError, match="dead_ratio"):
        HookManager(model, [DeadReLU(), DeadReLU(window=3)])
    HookManager(model, [d])
    with pytest.raises(RuntimeError, match="another HookManager"):
        HookManager(model, [d])
    with pytest.raises(TypeError, match="`include`"):
        HookManager(model, include=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`functional`"):
        HookManager(model, functional="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`unit_dim`"):
        HookManager(model, unit_dim=1.5)  # type: ignore[arg-type]


def test_default_collectors() -> None:
    hm = HookManager(SharedReLU())
    assert [type(c) for c in hm.collectors] == [DeadReLU, Saturation, GradientNorm]


def test_context_manager_removes_hooks_also_when_the_block_raises() -> None:
    model = SharedReLU()
    with HookManager(model) as hm:
        assert hm.attached and hook_count(model) > 0
    assert hook_count(model) == 0
    with pytest.raises(ZeroDivisionError), HookManager(model) as hm:
        model(torch.randn(2, 4))
        1 / 0  # noqa: B018
    assert hook_count(model) == 0 and not hm.attached
    assert len(hm.to_dataframe()) == 2  # results stay readable


def test_hooks_removed_when_the_forward_raises() -> None:
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.act(x)
            raise RuntimeError("boom")

    model = Boom()
    hm = HookManager(model)
    with pytest.raises(RuntimeError, match="boom"), hm:
        model(torch.randn(2, 2))
    assert hook_count(model) == 0
    # a manager whose forward raised is balanced: the next forward starts a new pass
    with hm:
        with pytest.raises(RuntimeError):
            model(torch.randn(2, 2))
        with pytest.raises(RuntimeError):
            model(torch.randn(2, 2))
    assert list(hm.to_dataframe()["layer"]) == ["act"]  # never "act#1": each raise ended its pass


def test_explicit_attach_detach_and_nothing_recorded_after_detach() -> None:
    model = SharedReLU()
    hm = HookManager(model).attach()
    with pytest.raises(RuntimeError, match="already attached"):
        hm.attach()
    model(torch.randn(2, 4)).sum().backward()
    hm.step()
    hm.detach()
    hm.detach()  # idempotent
    out = model(torch.randn(2, 4))
    out.sum().backward()
    hm.step()
    df = hm.to_dataframe()
    assert list(df["step"]) == [0, 0]
    # detaching between forward and backward: the pending gradient is not recorded either
    hm.attach()
    y = model(torch.randn(2, 4))
    hm.detach()
    y.sum().backward()
    df = hm.to_dataframe()
    assert df[df["step"] == 2]["grad_norm"].isna().all()


def test_steps_start_at_zero_and_rows_follow_execution_order() -> None:
    model = SaturatingNet()
    with HookManager(model) as hm:
        train_steps(model, 3, hm)
    df = hm.to_dataframe()
    assert list(df["step"]) == [0, 0, 1, 1, 2, 2]
    assert list(df["layer"]) == ["tanh", "sig"] * 3
    assert list(df.columns[: len(CONTRACT_COLUMNS) + 3]) == [
        "step", "layer", "kind", "shape", "units", "calls",
        "dead_ratio", "inactive_fraction", "saturation_rate", "grad_norm",
    ]  # fmt: skip


def test_open_step_is_reported_without_step() -> None:
    model = SharedReLU()
    with HookManager(model) as hm:
        model(torch.randn(2, 4)).sum().backward()
    df = hm.to_dataframe()
    assert list(df["step"]) == [0, 0] and df["grad_norm"].notna().all()
    # asking for a report does not close the step
    assert hm.current_step == 0
    with hm:
        model(torch.randn(2, 4))
        hm.step()
    df = hm.to_dataframe()
    assert list(df["calls"]) == [2, 2]
    assert {df[c].dtype.name for c in ("step", "units", "calls")} == {"int64"}


def test_empty_report_has_the_columns() -> None:
    df = HookManager(SharedReLU()).to_dataframe()
    assert len(df) == 0
    assert set(CONTRACT_COLUMNS) <= set(df.columns)
    assert {df[c].dtype.name for c in ("step", "units", "calls")} == {"int64"}


def test_to_csv_writes_exactly_the_frame(tmp_path: Path) -> None:
    model = mlp()
    with HookManager(model) as hm:
        train_steps(model, 2, hm)
    path = tmp_path / "stats.csv"
    hm.to_csv(path)
    back = pd.read_csv(path, dtype={"layer": str, "kind": str, "shape": str})
    df = hm.to_dataframe()
    assert list(back.columns) == list(df.columns)
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    assert [p.name for p in tmp_path.iterdir()] == ["stats.csv"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600


def test_to_csv_missing_directory_raises_oserror_and_leaves_nothing(tmp_path: Path) -> None:
    hm = HookManager(SharedReLU())
    with pytest.raises(OSError):
        hm.to_csv(tmp_path / "missing" / "stats.csv")
    assert list(tmp_path.iterdir()) == []


def test_to_csv_is_atomic_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = SharedReLU()
    with HookManager(model) as hm:
        model(torch.randn(2, 4))
    path = tmp_path / "stats.csv"
    path.write_text("old contents\n")

    def failing_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        hm.to_csv(path)
    assert path.read_text() == "old contents\n"
    assert [p.name for p in tmp_path.iterdir()] == ["stats.csv"]


def render(table: object) -> str:
    console = Console(file=io.StringIO(), width=140, color_system=None)
    console.print(table)
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_table_shows_one_row_per_layer_for_the_latest_step() -> None:
    model = SaturatingNet()
    with HookManager(model) as hm:
        train_steps(model, 2, hm)
    text = render(hm.table())
    assert "step 1" in text
    assert text.count("tanh") == 2  # the layer "tanh" of kind "tanh": one row
    assert "sig" in text and "sigmoid" in text
    ascii_text = render(hm.table(ascii=True))
    assert all(ord(c) < 128 for c in ascii_text)


def test_table_marks_dead_layers() -> None:
    lin = nn.Linear(2, 4)
    with torch.no_grad():
        lin.bias.fill_(-100.0)
    model = nn.Sequential(lin, nn.ReLU())
    with HookManager(model) as hm:
        model(torch.randn(3, 2))  # 3 outputs per unit: not enough evidence yet
        hm.step()
        assert "100.0% |" in render(hm.table(ascii=True))
        model(torch.randn(128, 2))  # 131 silent outputs per unit: confirmed
        hm.step()
    text = render(hm.table(ascii=True))
    assert "100.0% !" in text


def test_every_row_of_a_layer_that_ran() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.ReLU()
            self.b = nn.Tanh()

        def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
            return self.b(x) if use_b else self.a(x)

    model = Branchy()
    with HookManager(model) as hm:
        model(torch.randn(2, 2), use_b=False)
        hm.step()
        model(torch.randn(2, 2), use_b=True)
        hm.step()
        hm.step()  # a step in which nothing ran has no rows
    df = hm.to_dataframe()
    assert list(zip(df["step"], df["layer"])) == [(0, "a"), (1, "b")]
    assert math.isnan(df["saturation_rate"].iloc[0]) and not math.isnan(df["saturation_rate"].iloc[1])


def test_repr_mentions_state() -> None:
    hm = HookManager(SharedReLU())
    assert "detached" in repr(hm) and "DeadReLU(window=1)" in repr(hm)


def test_every_k_records_one_step_in_k() -> None:
    model = SharedReLU()
    with HookManager(model, every=3) as hm:
        train_steps(model, 7, hm, in_features=4)
    df = hm.to_dataframe()
    assert sorted(df["step"].unique()) == [0, 3, 6]
    assert df["grad_norm"].notna().all()
    with pytest.raises(ValueError, match="`every`"):
        HookManager(model, every=0)


def test_long_history_is_consolidated_and_exact() -> None:
    # 150 steps cross two consolidation blocks; a site that appears late changes the number of sites
    class Late(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.ReLU()
            self.b = nn.Tanh()

        def forward(self, x: torch.Tensor, late: bool) -> torch.Tensor:
            return self.b(self.a(x)) if late else self.a(x)

    model = Late()
    with HookManager(model, alerts=False) as hm:
        for s in range(150):
            x = torch.full((1, 4), float(s % 3) - 1.0)  # -1, 0, 1: inactive fraction 1, 1, 0
            model(x, late=s >= 100)
            hm.step()
    df = hm.to_dataframe()
    a = df[df["layer"] == "a"]
    assert list(a["step"]) == list(range(150))
    assert list(a["inactive_fraction"]) == [1.0 if s % 3 < 2 else 0.0 for s in range(150)]
    b = df[df["layer"] == "b"]
    assert list(b["step"]) == list(range(100, 150))
    assert hm.history_bytes() < 150 * 400


def test_max_history_keeps_the_last_steps_and_bounds_memory() -> None:
    model = SharedReLU()
    with HookManager(model, max_history=10, alerts=False) as hm:
        sizes = []
        for _ in range(600):
            model(torch.randn(2, 4))
            hm.step()
            sizes.append(hm.history_bytes())
    assert max(sizes[300:]) <= max(sizes[130:300])  # a saw tooth (blocks of 64 steps) that stops growing
    assert sorted(hm.to_dataframe()["step"].unique()) == list(range(590, 600))
    with pytest.raises(ValueError, match="`max_history`"):
        HookManager(model, max_history=0)
    # fewer steps than max_history: all of them
    with HookManager(model, max_history=10, alerts=False) as short:
        for _ in range(3):
            model(torch.randn(2, 4))
            short.step()
    assert sorted(short.to_dataframe()["step"].unique()) == [0, 1, 2]


def test_state_does_not_grow_with_steps() -> None:
    model = mlp()
    with HookManager(model) as hm:
        train_steps(model, 2, hm)
        state = hm.state_bytes()
        train_steps(model, 50, hm)
    assert hm.state_bytes() == state > 0


def test_recording_switched_off_inside_a_forward_keeps_hooks_balanced() -> None:
    from torch.overrides import _get_current_function_mode_stack

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.ReLU()
            self.b = nn.ReLU()
            self.hm: HookManager | None = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            if self.hm is not None:
                self.hm.pause()  # recording stops in the middle of this forward
            return self.b(torch.relu(h))

    model = Odd()
    with HookManager(model, alerts=False) as hm:
        model.hm = hm
        model(torch.randn(2, 3))
        assert _get_current_function_mode_stack() == []  # the function capture ended with the forward
        assert hm.tracer.stack == []
        model.hm = None
        hm.resume()
        model(torch.randn(2, 3))
        hm.step()
    df = hm.to_dataframe()
    assert df["layer"].tolist() == ["a", "relu()", "b"]  # the first forward was followed to its end
    assert df["calls"].tolist() == [2, 2, 2]


def test_a_dropped_manager_takes_its_hooks_off_the_model() -> None:
    import gc

    model = SharedReLU()
    HookManager(model).attach()  # never detached, no reference kept
    gc.collect()
    assert hook_count(model) == 0


class Growing(nn.Module):
    """20 ReLU layers of 100 units; step s runs the first 2 + 3 * s of them, so sites (and units) appear in the
    middle of forward passes, after earlier layers already updated the open step's state: the state grows past
    its initial 16 sites and 1024 units while steps wait in the ring."""

    def __init__(self) -> None:
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(100, 100) for _ in range(20))
        self.acts = nn.ModuleList(nn.ReLU() for _ in range(20))
        self.depth = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin, act in list(zip(self.lins, self.acts))[: self.depth]:
            x = act(lin(x))
        return x


def test_state_keeps_the_open_step_across_reports_and_growth() -> None:
    torch.manual_seed(0)
    model = Growing()
    expected: dict[tuple[int, str], tuple[float, float]] = {}  # (step, layer) -> (inactive, dead ratio)
    outputs: dict[str, list[torch.Tensor]] = {}

    def spy(name: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(module: nn.Module, args: object, out: torch.Tensor) -> None:
            outputs.setdefault(name, []).append(out.detach().clone())

        return hook

    for i, act in enumerate(model.acts):
        act.register_forward_hook(spy(f"acts.{i}"))
    with HookManager(model, [DeadReLU()], alerts=False) as hm:
        for step in range(8):
            model.depth = min(20, 2 + 3 * step)
            outputs.clear()
            x = torch.randn(4, 100) * 0.3
            model(x)
            if step % 3 == 1:
                hm.to_dataframe()  # a report inside the step: the ring is emptied, the open step kept
            model(x + 0.1)  # a second call of every site in the same step
            for name, outs in outputs.items():
                both = torch.cat(outs)
                expected[(step, name)] = (float((both <= 0).double().mean()), float((both <= 0).all(0).double().mean()))
            hm.step()
        df = hm.to_dataframe()
    got = {(int(r.step), r.layer): (r.inactive_fraction, r.dead_ratio) for r in df.itertuples()}
    assert len(hm.sites) == 20 and sum(s.units for s in hm.sites) == 2000
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_reports_before_any_step_closed() -> None:
    model = SharedReLU()
    hm = HookManager(model, alerts=False)
    frame = hm.last_step_frame()
    assert len(frame) == 0 and list(frame.columns) == list(hm.columns)
