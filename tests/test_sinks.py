"""Sinks under the reliability policy: configuration mistakes raise when the manager is built, failures of the
environment (full disk, vanished directory, lost permission) warn once and never stop training, and a reader
never sees a torn line. CSV, TensorBoard, CallbackSink and the top-level exports."""

from __future__ import annotations

import contextlib
import gc
import subprocess
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn as nn
from conftest import SharedReLU, train_steps

import hookscope as hs
from hookscope import HookManager
from hookscope.errors import ConfigError, ConfigTypeError, StateError
from hookscope.report import scalars
from hookscope.sinks import Sink


def steps(model: nn.Module, n: int, hm: HookManager) -> None:
    for _ in range(n):
        model(torch.randn(2, 4))
        hm.step()


def test_a_sink_belongs_to_one_manager(tmp_path: Path) -> None:
    model = SharedReLU()
    sink = hs.CallbackSink(lambda frame: None)
    with pytest.raises(ConfigError, match=r"`sinks` must hold each sink once, .* at positions 0 and 1"):
        HookManager(model, sinks=[sink, sink])
    owner = HookManager(model, sinks=[sink])
    with pytest.raises(StateError, match="already feeds another HookManager"):
        HookManager(model, sinks=[sink])
    assert sink.source is owner
    del owner
    gc.collect()
    assert sink.source is None  # a sink does not keep its manager alive
    HookManager(model, sinks=[sink])


# ---------------------------------------------------------------------------------------------------------------
# CallbackSink


def test_callback_sink_hands_each_closed_step_once() -> None:
    model = SharedReLU()
    frames: list[pd.DataFrame] = []
    calls_after_each_step = []
    with HookManager(model, sinks=[hs.CallbackSink(frames.append, every=3)], alerts=False) as hm:
        for _ in range(10):
            model(torch.randn(2, 4))
            hm.step()
            calls_after_each_step.append(len(frames))
    assert calls_after_each_step == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3]
    assert len(frames) == 4  # and one at detach, with the last step
    assert [sorted(f["step"].unique()) for f in frames] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert [len(f) for f in frames] == [2 * 3, 2 * 3, 2 * 3, 2 * 1]  # layers x steps
    assert all(tuple(f.columns) == hm.columns for f in frames)
    pd.testing.assert_frame_equal(pd.concat(frames, ignore_index=True), hm.to_dataframe())


def test_callback_sink_checks_fn_and_lets_its_errors_through() -> None:
    with pytest.raises(ConfigTypeError, match=r"`fn` must be a callable taking one DataFrame .*got 'log'"):
        hs.CallbackSink("log")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`every`"):
        hs.CallbackSink(print, every=0)
    seen: list[list[int]] = []

    def flaky(frame: pd.DataFrame) -> None:
        seen.append(sorted(frame["step"].unique()))
        if len(seen) == 1:
            raise ConnectionError("logger unreachable")

    model = SharedReLU()
    with HookManager(model, sinks=[hs.CallbackSink(flaky, every=2)], alerts=False) as hm:
        steps(model, 1, hm)
        with pytest.raises(ConnectionError):
            steps(model, 1, hm)
        steps(model, 2, hm)  # the sink holds nothing from the failed call: the next one works
    assert seen[0] == [0, 1] and seen[-1][-1] == 3
    assert repr(hs.CallbackSink(flaky)).endswith("<locals>.flaky, every=100)")


@pytest.mark.xfail(
    strict=True, reason="pending manager change: HookManager._write_sink drops the rows of a write that raised"
)
def test_rows_handed_to_a_callback_that_raised_come_again() -> None:
    seen: list[list[int]] = []

    def flaky(frame: pd.DataFrame) -> None:
        seen.append(sorted(frame["step"].unique()))
        if len(seen) == 1:
            raise ConnectionError("logger unreachable")

    model = SharedReLU()
    with HookManager(model, sinks=[hs.CallbackSink(flaky, every=2)], alerts=False) as hm:
        with contextlib.suppress(ConnectionError):
            steps(model, 2, hm)
        steps(model, 2, hm)
    assert seen == [[0, 1], [0, 1, 2, 3]]


def _by_step(frame: pd.DataFrame) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for tag, step, value in scalars(frame):
        out.setdefault(step, {})[tag] = value
    return out


def test_logger_recipes_of_the_readme() -> None:
    # the README's Weights & Biases and MLflow recipes, against stand-ins with the same calls
    logged: list[tuple[str, dict[str, float], int | None]] = []
    wandb = types.SimpleNamespace(log=lambda metrics: logged.append(("wandb", metrics, None)))
    mlflow = types.SimpleNamespace(log_metrics=lambda metrics, step: logged.append(("mlflow", metrics, step)))
    import re

    def to_wandb(frame: pd.DataFrame) -> None:
        for step, metrics in _by_step(frame).items():
            wandb.log({"hookscope/step": step, **metrics})

    def to_mlflow(frame: pd.DataFrame) -> None:
        for step, metrics in _by_step(frame).items():
            mlflow.log_metrics({re.sub(r"[^\w./ -]", "_", k): v for k, v in metrics.items()}, step=step)

    model = SharedReLU()
    sinks = [hs.CallbackSink(to_wandb, every=2), hs.CallbackSink(to_mlflow, every=2)]
    with HookManager(model, sinks=sinks, alerts=False) as hm:
        train_steps(model, 3, hm)
    wandb_rows = [m for who, m, _ in logged if who == "wandb"]
    mlflow_rows = [(m, s) for who, m, s in logged if who == "mlflow"]
    assert [m["hookscope/step"] for m in wandb_rows] == [0, 1, 2]
    assert [s for _, s in mlflow_rows] == [0, 1, 2]
    df = hm.to_dataframe()
    second_call = df[(df["step"] == 1) & (df["layer"] == "act#1")]["grad_norm"].item()
    assert wandb_rows[1]["hookscope/act#1/grad_norm"] == second_call
    assert mlflow_rows[1][0]["hookscope/act_1/grad_norm"] == second_call


# ---------------------------------------------------------------------------------------------------------------
# exports


def test_sinks_are_exported_and_tensorboard_loads_lazily() -> None:
    from hookscope.integrations.tensorboard import TensorBoardSink
    from hookscope.reporters.callback import CallbackSink
    from hookscope.reporters.csv import CSVSink

    assert (hs.CSVSink, hs.CallbackSink, hs.TensorBoardSink) == (CSVSink, CallbackSink, TensorBoardSink)
    assert {"CSVSink", "CallbackSink", "TensorBoardSink"} <= set(hs.__all__) and "TensorBoardSink" in dir(hs)
    assert all(issubclass(s, Sink) for s in (CSVSink, CallbackSink, TensorBoardSink))
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        hs.Nothing  # type: ignore[attr-defined]  # noqa: B018
    code = (
        "import sys, hookscope; loaded = [m for m in ('tensorboard', 'torch.utils.tensorboard') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
