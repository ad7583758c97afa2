"""The Hugging Face Trainer callback, offline: a 2-layer BERT built from a config, synthetic data, CPU."""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import torch.nn as nn
from conftest import ParamsManager, hook_count

from hookscope import HookManager
from hookscope.errors import ConfigError, ConfigTypeError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hookscope.integrations.transformers import HookscopeTrainerCallback  # noqa: E402

MICRO_BATCH = 2
ACCUMULATION = 2
MAX_STEPS = 4
EVAL_EXAMPLES = 4
INTERMEDIATE = "bert.encoder.layer.0.intermediate.intermediate_act_fn"  # HF's GELUActivation
POOLER = "bert.pooler.activation"  # nn.Tanh


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 32, (n, 8), generator=gen)
        self.labels = torch.randint(0, 2, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=2,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


class ForwardCounter:
    """Counts the model's forwards by hand, in training and in eval mode (a hook of the test's own)."""

    def __init__(self, model: nn.Module) -> None:
        self.train = 0
        self.eval = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module: nn.Module, args: Any) -> None:
        if module.training:
            self.train += 1
        else:
            self.eval += 1


class LogRecorder(transformers.TrainerCallback):  # type: ignore[misc]
    """Stands for a ``report_to`` integration: those are callbacks that receive every log in ``on_log``."""

    def __init__(self) -> None:
        self.logs: list[tuple[int, dict[str, float]]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        self.logs.append((state.global_step, dict(logs)))


class RaiseAt(transformers.TrainerCallback):  # type: ignore[misc]
    """Raises between the two micro-batches of the optimizer step that makes ``global_step`` ``step + 1``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            raise RuntimeError("boom")


def make_trainer(tmp_path: Path, model: nn.Module | None, callbacks: list[Any], **overrides: Any) -> Any:
    options: dict[str, Any] = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": MICRO_BATCH,
        "per_device_eval_batch_size": MICRO_BATCH,
        "gradient_accumulation_steps": ACCUMULATION,
        "max_steps": MAX_STEPS,
        "eval_strategy": "steps",
        "eval_steps": 2,
        "eval_on_start": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    model_init = overrides.pop("model_init", None)
    options.update(overrides)
    args = transformers.TrainingArguments(**options)
    return transformers.Trainer(
        model=model, model_init=model_init, args=args, train_dataset=Tokens(32),
        eval_dataset=Tokens(EVAL_EXAMPLES, seed=1), callbacks=callbacks,
    )  # fmt: skip


@pytest.fixture
def quiet_kernels() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*native kernels.*")
        warnings.filterwarnings("ignore", message=".*did not find the transformers Trainer.*")  # driven by hand
        yield


def hookscope_logs(log_history: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    return {e["step"]: e for e in log_history if any(k.startswith("hookscope/") for k in e)}


# ---------------------------------------------------------------------------------------------------------------
# one hookscope step per optimizer step; evaluation not recorded; logs in log_history and reporters


def _without(event: str) -> Any:
    """A CallbackHandler method that dispatches nothing: the event of an older transformers that lacks it."""

    def handler(self: Any, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        return control

    return handler


@pytest.mark.parametrize(
    "missing",
    [(), ("on_pre_optimizer_step",), ("on_pre_optimizer_step", "on_optimizer_step")],
    ids=["current", "4.42-4.44", "before-4.42"],
)
def test_trainer_callback_records_training_steps_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quiet_kernels: None, missing: tuple[str, ...]
) -> None:
    for event in missing:  # older transformers: the step is closed by the next event that exists
        monkeypatch.setattr(transformers.trainer_callback.CallbackHandler, event, _without(event))
    model = tiny_bert()
    hooks_before = hook_count(model)
    counter = ForwardCounter(model)
    reporter = LogRecorder()
    callback = HookscopeTrainerCallback(log_every_n_steps=2, alerts=False)
    trainer = make_trainer(tmp_path, model, [reporter, callback])
    trainer.train()

    hm = callback.manager
    assert hm is not None and hm.model is model and not hm.attached
    counter.handle.remove()
    assert hook_count(model) == hooks_before  # every hookscope hook is off after train()
    # the forwards, counted by hand: 4 optimizer steps x 2 micro-batches; evaluations at start and steps 2 and 4
    assert counter.train == MAX_STEPS * ACCUMULATION
    assert counter.eval == 3 * EVAL_EXAMPLES // MICRO_BATCH
    df = hm.to_dataframe()
    assert sorted(df["step"].unique()) == list(range(MAX_STEPS)) == list(range(trainer.state.global_step))
    for layer in (INTERMEDIATE, POOLER):
        rows = df[df["layer"] == layer]
        assert rows["calls"].tolist() == [ACCUMULATION] * MAX_STEPS  # no eval forward among them
        assert rows["grad_norm"].notna().all()
    assert df.groupby("layer")["calls"].sum().max() == counter.train

    # logged at global steps 2 and 4 with the values of hookscope steps 1 and 3, like the Trainer's grad_norm
    logged = hookscope_logs(trainer.state.log_history)
    assert sorted(logged) == [2, 4]
    for global_step, entry in logged.items():
        last = df[df["step"] == global_step - 1].set_index("layer")
        assert entry[f"hookscope/{POOLER}/grad_norm"] == pytest.approx(last.loc[POOLER, "grad_norm"])
        assert entry[f"hookscope/{INTERMEDIATE}/inactive_fraction"] == pytest.approx(
            last.loc[INTERMEDIATE, "inactive_fraction"]
        )
        assert f"hookscope/{POOLER}/dead_ratio" not in entry  # NaN for a tanh: not logged
    # the reporting callbacks received the same logs (they are on_log callbacks, listed before ours here)
    reported = {step: logs for step, logs in reporter.logs if any(k.startswith("hookscope/") for k in logs)}
    assert sorted(reported) == [2, 4]
    assert reported[4][f"hookscope/{POOLER}/grad_norm"] == logged[4][f"hookscope/{POOLER}/grad_norm"]
    # the Trainer's own logs still happen at those steps (Trainer.log clears control.should_log)
    losses = [e["step"] for e in trainer.state.log_history if "loss" in e]
    assert losses == [1, 2, 3, 4]


def test_a_new_model_gets_a_new_manager(tmp_path: Path, quiet_kernels: None) -> None:
    # with model_init, each train() trains a model of its own (hyperparameter search)
    callback = HookscopeTrainerCallback(alerts=False)
    trainer = make_trainer(tmp_path, None, [callback], eval_strategy="no", eval_on_start=False, model_init=tiny_bert)
    trainer.train()
    first, first_model = callback.manager, trainer.model
    trainer.train()
    hm = callback.manager
    assert first is not None and first.model is first_model and not first.attached
    assert hm is not None and hm is not first and hm.model is trainer.model is not first_model
    assert hook_count(first_model) == hook_count(trainer.model) == 0
    assert hm.to_dataframe()["step"].nunique() == first.to_dataframe()["step"].nunique() == MAX_STEPS


def test_logs_are_on_rank_zero_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quiet_kernels: None) -> None:
    monkeypatch.setattr(transformers.Trainer, "is_world_process_zero", lambda self: False)
    callback = HookscopeTrainerCallback(log_every_n_steps=1, alerts=False)
    trainer = make_trainer(tmp_path, tiny_bert(), [callback], eval_strategy="no", eval_on_start=False)
    trainer.train()
    assert not trainer.state.is_world_process_zero
    assert hookscope_logs(trainer.state.log_history) == {}
    assert callback.manager is not None and len(callback.manager.to_dataframe()) > 0  # recorded all the same


def test_start_step_follows_a_resumed_global_step(quiet_kernels: None) -> None:
    callback = HookscopeTrainerCallback(log_every_n_steps=1, alerts=False)
    model = tiny_bert()
    state = transformers.TrainerState()
    state.global_step = 7
    callback.on_train_begin(None, state, transformers.TrainerControl(), model=model)
    assert callback.manager is not None and callback.manager.current_step == 7
    callback.on_train_end(None, state, transformers.TrainerControl())
    explicit = HookscopeTrainerCallback(alerts=False, start_step=0)
    explicit.on_train_begin(None, state, transformers.TrainerControl(), model=model)
    assert explicit.manager is not None and explicit.manager.current_step == 0
    explicit.on_train_end(None, state, transformers.TrainerControl())


# ---------------------------------------------------------------------------------------------------------------
# training that raises


def test_training_that_raises_keeps_the_hooks_until_the_next_train_or_until_dropped(
    tmp_path: Path, quiet_kernels: None
) -> None:
    # The Trainer calls no callback event when training raises: the documented behaviour is that the hooks stay on
    # until callback.manager.detach(), the next train(), or the callback is garbage-collected.
    model = tiny_bert()
    hooks_before = hook_count(model)
    callback = HookscopeTrainerCallback(log_every_n_steps=1, alerts=False)
    raiser = RaiseAt(step=1)
    trainer = make_trainer(tmp_path, model, [callback, raiser], eval_strategy="no", eval_on_start=False)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    hm = callback.manager
    assert hm is not None and hm.attached and hook_count(model) > hooks_before
    assert hm.current_step == 1  # step 0 closed; step 1 was open (its first micro-batch ran) when it raised

    # the next train() closes the interrupted step as a step of its own, then records as usual
    trainer.remove_callback(raiser)
    trainer.train()
    assert callback.manager is hm and not hm.attached and hook_count(model) == hooks_before
    calls = hm.to_dataframe().groupby("step")["calls"].max()
    assert calls.loc[0] == ACCUMULATION and calls.loc[1] == 1  # the interrupted step: one micro-batch
    assert calls.loc[2:].tolist() == [ACCUMULATION] * MAX_STEPS


def test_a_dropped_callback_takes_its_hooks_off(tmp_path: Path, quiet_kernels: None) -> None:
    model = tiny_bert()
    hooks_before = hook_count(model)
    callback = HookscopeTrainerCallback(alerts=False)
    trainer = make_trainer(tmp_path, model, [callback, RaiseAt(step=1)], eval_strategy="no", eval_on_start=False)
    with contextlib.suppress(RuntimeError):
        trainer.train()
    assert hook_count(model) > hooks_before
    del trainer, callback
    gc.collect()
    assert hook_count(model) == hooks_before


# ---------------------------------------------------------------------------------------------------------------
# parameter statistics (HookManager(params=True), a contract: the manager's own test comes with it)


def test_parameter_statistics_are_logged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quiet_kernels: None) -> None:
    import hookscope.integrations.transformers as hf

    monkeypatch.setattr(hf, "HookManager", ParamsManager)
    callback = HookscopeTrainerCallback(log_every_n_steps=2, alerts=False)
    trainer = make_trainer(tmp_path, tiny_bert(), [callback], eval_strategy="no", eval_on_start=False)
    trainer.train()
    logged = hookscope_logs(trainer.state.log_history)
    assert sorted(logged) == [2, 4]
    for global_step, entry in logged.items():
        last = global_step - 1  # the last closed step
        assert entry["hookscope/params/head/weight_norm"] == last + 0.5
        assert entry["hookscope/params/head/grad_norm"] == 1.0
        assert entry["hookscope/params/head/update_ratio"] == last / 100.0
        assert "hookscope/params/body/grad_norm" not in entry  # NaN
        assert f"hookscope/{POOLER}/grad_norm" in entry  # with the activation statistics


def test_a_manager_without_params_is_never_asked_for_them() -> None:
    from hookscope.integrations._logging import last_step_scalars, records_params

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    hm = HookManager(model, alerts=False)
    assert not records_params(hm) and not records_params(types.SimpleNamespace(params="yes"))
    with hm:
        assert last_step_scalars(hm) == (None, {})
        model(torch.randn(3, 4)).sum().backward()
        hm.step()
        step, metrics = last_step_scalars(hm)
    assert step == 0 and set(metrics) == {
        "hookscope/1/dead_ratio",
        "hookscope/1/inactive_fraction",
        "hookscope/1/grad_norm",
    }


# ---------------------------------------------------------------------------------------------------------------
# arguments, callbacks driven by hand, the missing dependency


def test_arguments_are_checked_up_front(quiet_kernels: None) -> None:
    with pytest.raises(ConfigError, match=r"`log_every_n_steps` must be an int >= 1 \(steps between logs\), got 0"):
        HookscopeTrainerCallback(log_every_n_steps=0)
    with pytest.raises(ConfigTypeError, match="`log_every_n_steps`"):
        HookscopeTrainerCallback(log_every_n_steps=2.0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="`stats` must name statistic columns, got 'layer'"):
        HookscopeTrainerCallback(stats="layer")
    typo = HookscopeTrainerCallback(stats=("dead_ration",))  # perhaps a custom collector's column: known later
    with pytest.raises(ConfigError, match="this manager's statistic columns"):
        typo.on_train_begin(None, transformers.TrainerState(), transformers.TrainerControl(), model=nn.ReLU())


def test_without_a_trainer_on_the_stack_it_warns_and_logs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    import hookscope.warn

    monkeypatch.setattr(hookscope.warn, "_seen", set())  # an earlier test may have warned already
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    callback = HookscopeTrainerCallback(log_every_n_steps=1, alerts=False)
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback.on_train_begin(None, state, control, model=model)
        model(torch.randn(2, 4))  # paused until on_step_begin: not recorded
        callback.on_step_begin(None, state, control)
        model(torch.randn(2, 4)).sum().backward()
        callback.on_pre_optimizer_step(None, state, control)
        state.global_step = 1
        callback.on_optimizer_step(None, state, control)  # the step is closed once
        callback.on_step_end(None, state, control)
        callback.on_train_end(None, state, control)
    assert any("did not find the transformers Trainer" in str(w.message) for w in caught)
    assert callback.manager is not None and not callback.manager.attached
    assert callback.manager.to_dataframe()["calls"].tolist() == [1]
    assert callback.manager.current_step == 1


def test_without_transformers_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "hookscope.integrations.transformers")
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'hookscope\[transformers\]'"):
        importlib.import_module("hookscope.integrations.transformers")


def test_real_parameter_statistics_reach_the_log_history(tmp_path: Path, quiet_kernels: None) -> None:
    callback = HookscopeTrainerCallback(log_every_n_steps=2, alerts=False, params=True)
    trainer = make_trainer(tmp_path, tiny_bert(), [callback], eval_strategy="no", eval_on_start=False)
    trainer.train()
    params = callback.manager.param_frame()  # type: ignore[union-attr]
    logged = hookscope_logs(trainer.state.log_history)
    assert sorted(logged) == [2, 4]
    for global_step, entry in logged.items():
        rows = params[params["step"] == global_step - 1]
        assert len(rows) > 10
        for row in rows.itertuples():
            for stat in ("weight_norm", "grad_norm", "update_ratio"):
                value = getattr(row, stat)
                tag = f"hookscope/params/{row.module}/{stat}"
                assert (tag in entry) == (value == value), tag  # NaN is not logged
                if tag in entry:
                    assert entry[tag] == pytest.approx(value)
        # closed before the optimizer step: the gradients are there
        assert rows["grad_norm"].notna().sum() >= len(rows) - 1


def test_module_sites_and_their_magnitudes_are_logged(tmp_path: Path, quiet_kernels: None) -> None:
    callback = HookscopeTrainerCallback(log_every_n_steps=2, alerts=False, modules="bert.encoder.layer.?",
                                        stats=("rms", "kurtosis", "grad_norm"))  # fmt: skip
    trainer = make_trainer(tmp_path, tiny_bert(), [callback], eval_strategy="no", eval_on_start=False)
    trainer.train()
    logged = hookscope_logs(trainer.state.log_history)
    frame = callback.manager.to_dataframe()
    for global_step, entry in logged.items():
        row = frame[(frame["step"] == global_step - 1) & (frame["layer"] == "bert.encoder.layer.1")].iloc[0]
        assert entry["hookscope/bert.encoder.layer.1/rms"] == row["rms"] > 0
        assert entry["hookscope/bert.encoder.layer.1/kurtosis"] == row["kurtosis"]
        assert entry["hookscope/bert.encoder.layer.1/grad_norm"] == row["grad_norm"] > 0
    assert sorted(logged) == [2, 4]


def test_the_trainer_callback_with_torch_compile_records_what_the_eager_trainer_does(
    tmp_path: Path, quiet_kernels: None
) -> None:
    """``TrainingArguments(torch_compile=True)``: the Trainer compiles the model after the callback attached; the
    rows are those of the same training run without compilation (evaluation still left out)."""
    import torch._dynamo

    frames = []
    for compiled in (False, True):
        torch._dynamo.reset()
        callback = HookscopeTrainerCallback(alerts=False)
        options = {"torch_compile": True, "torch_compile_backend": "aot_eager"} if compiled else {}
        torch.manual_seed(0)
        model = tiny_bert()
        for m in model.modules():  # no dropout: a compiled graph draws its random numbers in another order
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        trainer = make_trainer(tmp_path / str(compiled), model, [callback], **options)
        trainer.train()
        assert callback.manager is not None and not callback.manager.attached
        frames.append(callback.manager.to_dataframe())
    eager, got = frames
    assert sorted(got["step"].unique()) == list(range(MAX_STEPS))
    assert got[got["layer"] == INTERMEDIATE]["calls"].tolist() == [ACCUMULATION] * MAX_STEPS
    pd.testing.assert_frame_equal(got, eager, check_exact=False, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("use_cache", [False, True], ids=["no cache", "DynamicCache"])
def test_a_compiled_gpt2_with_block_sites_records_what_the_eager_one_does(use_cache: bool, quiet_kernels: None) -> None:
    """GPT-2 from a config, decoder layers (tuples) as module sites, compiled with aot_eager: the frame of eager
    mode. Without a cache (training) it compiles to the graphs of the plain model. With the DynamicCache that
    GPT-2 makes by default, torch 2.14's dynamo falls back to eager for the model's top frame once hookscope's
    traced gradient hooks are in it (after an intermediate ``register_hook`` dynamo loses the ``device`` that the
    cache's lazy initialisation sets and reads: pytorch/pytorch#195954, see tests/test_compiled_graph.py): more
    graphs, the same numbers (README, Limitations)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, use_cache=use_cache,
    )  # fmt: skip
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    block = transformers.models.gpt2.modeling_gpt2.GPT2Block

    def train(model: nn.Module, run: Any, hm: HookManager | None) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(3):
            run(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            if hm is not None:
                hm.step()

    graphs = {}
    for label in ("plain", "hookscope"):
        torch._dynamo.reset()
        counters.clear()
        model = type(base)(config)
        model.load_state_dict(base.state_dict())
        if label == "plain":
            train(model, torch.compile(model, backend="aot_eager"), None)
        else:
            with HookManager(model, alerts=False, modules=block) as compiled:
                train(model, torch.compile(model, backend="aot_eager"), compiled)
        graphs[label] = counters["stats"]["unique_graphs"]
    eager_model = type(base)(config)
    eager_model.load_state_dict(base.state_dict())
    with HookManager(eager_model, alerts=False, modules=block) as eager:
        train(eager_model, eager_model, eager)
    got, want = compiled.to_dataframe(), eager.to_dataframe()
    assert {"transformer.h.0", "transformer.h.1", "transformer.h.0.mlp.act"} <= set(got["layer"])
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-4, atol=1e-6)
    if not use_cache:
        assert graphs["hookscope"] == graphs["plain"]
