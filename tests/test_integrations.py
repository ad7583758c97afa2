"""Pause / resume, Lightning, AMP loss scaling and torch.compile (the sinks are in test_sinks.py)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import ActivationCalls, FunctionalReLU, SharedReLU, definition_rows, hook_count
from test_real_conditions import CountSyncs

from hookscope import GradientNorm, HookManager

# ---------------------------------------------------------------------------------------------------------------
# pause / resume


def test_pause_and_resume() -> None:
    model = SharedReLU()
    with HookManager(model) as hm:
        model(torch.randn(2, 4))
        hm.pause()
        model(torch.randn(2, 4))  # e.g. a validation pass
        hm.resume()
        hm.step()
    assert hm.to_dataframe()["calls"].tolist() == [1, 1]


# ---------------------------------------------------------------------------------------------------------------
# Lightning


def test_lightning_callback(tmp_path: Path) -> None:
    L = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger

    from hookscope.integrations.lightning import HookscopeCallback

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = SharedReLU()
            self.val_calls = 0

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.net(x)[:, 0], y)

        def validation_step(self, batch, batch_idx):
            self.val_calls += 1
            x, y = batch
            return F.mse_loss(self.net(x)[:, 0], y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    callback = HookscopeCallback(log_every_n_steps=2, alerts=False)
    trainer = L.Trainer(
        max_steps=3, accumulate_grad_batches=2, logger=CSVLogger(tmp_path), callbacks=[callback],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=2, val_check_interval=4, num_sanity_val_steps=1, accelerator="cpu",
    )  # fmt: skip
    module = Module()
    trainer.fit(module, loader, loader)
    hm = callback.manager
    assert hm is not None and not hm.attached
    df = hm.to_dataframe()
    # 3 optimizer steps of 2 micro-batches each; validation and the sanity check are not recorded
    assert sorted(df["step"].unique()) == [0, 1, 2]
    assert set(df["layer"]) == {"net.act", "net.act#1"}
    assert df["calls"].tolist() == [2] * 6
    assert module.val_calls > 0
    metrics = pd.read_csv(Path(trainer.logger.log_dir) / "metrics.csv")
    assert "hookscope/net.act/inactive_fraction" in metrics.columns
    assert metrics["hookscope/net.act/inactive_fraction"].notna().any()


# ---------------------------------------------------------------------------------------------------------------
# AMP loss scaling


def test_grad_scaler_gives_unscaled_norms_without_sync() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1))
    reference = copy.deepcopy(model)
    plain = copy.deepcopy(model)  # uninstrumented: autograd's gradients of its ReLU output are the reference
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)  # the scale doubles every step
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.01)
    x = torch.randn(4, 3)
    scaled_hm = HookManager(model, [GradientNorm(scaler=scaler)], alerts=False).attach()
    ref_hm = HookManager(reference, [GradientNorm()], alerts=False).attach()
    with CountSyncs() as counter:
        for _ in range(3):
            scaler.scale(model(x).pow(2).sum()).backward()
            scaler.step(opt)
            scaler.update()
            scaled_hm.step()
            reference(x).pow(2).sum().backward()
            ref_opt.step()
            ref_opt.zero_grad()
            opt.zero_grad()
            ref_hm.step()
    syncs_in_hooks = counter.count
    assert scaler.get_scale() == 8192.0
    got = scaled_hm.to_dataframe()["grad_norm"].tolist()
    assert got == pytest.approx(ref_hm.to_dataframe()["grad_norm"].tolist(), rel=1e-5)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01)
    with ActivationCalls() as seen:
        for _ in range(3):
            plain(x).pow(2).sum().backward()
            plain_opt.step()
            plain_opt.zero_grad()
    assert got == pytest.approx([float(y.grad.double().norm()) for _, y in seen.calls], rel=1e-5)
    # the scaler itself syncs in step()/update() (it checks for inf); hookscope adds none
    plain_counter = CountSyncs()
    with plain_counter:
        scaler.scale(model(x).pow(2).sum()).backward()
        scaler.step(opt)
        scaler.update()
    assert syncs_in_hooks == 3 * plain_counter.count


def test_constant_scale_and_validation() -> None:
    model = nn.Sequential(nn.ReLU())
    x = torch.ones(1, 4, requires_grad=True)
    with HookManager(model, [GradientNorm(scaler=8.0)], alerts=False) as hm:
        (model(x) * 8.0).sum().backward()  # gradients of 8 = 8 x the unscaled 1
        hm.step()
    assert hm.to_dataframe()["grad_norm"].iloc[0] == pytest.approx(2.0)  # sqrt(4 * 1)
    with pytest.raises(ValueError, match="`scaler`"):
        GradientNorm(scaler=0.0)
    with pytest.raises(TypeError, match="`scaler`"):
        GradientNorm(scaler="1024")


# ---------------------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_attach_before_compile(backend: str) -> None:
    model = FunctionalReLU() if backend == "inductor" else SharedReLU()
    plain, reference = copy.deepcopy(model), copy.deepcopy(model)
    with HookManager(model, alerts=False) as hm, HookManager(plain, alerts=False) as ref:
        compiled = torch.compile(model, backend=backend)
        x = torch.randn(3, 4)
        for _ in range(2):
            compiled(x).sum().backward()
            hm.step()
            plain(x).sum().backward()
            ref.step()
    got, want = hm.to_dataframe(), ref.to_dataframe()
    assert list(got["layer"]) == list(want["layer"]) and len(got) > 0
    pd.testing.assert_frame_equal(got.drop(columns="grad_norm"), want.drop(columns="grad_norm"))
    assert got["grad_norm"].tolist() == pytest.approx(want["grad_norm"].tolist(), rel=1e-5)
    # both hold the definitions' values, from the activations of an uninstrumented copy (no weight changes: the
    # two steps are alike)
    with ActivationCalls() as seen:
        reference(x).sum().backward()
    rows = definition_rows(seen.calls, per_forward=len(seen.calls)) * 2
    assert list(got["kind"]) == [r["kind"] for r in rows]
    for stat in ("dead_ratio", "inactive_fraction", "saturation_rate", "grad_norm"):
        assert got[stat].tolist() == pytest.approx([r[stat] for r in rows], rel=1e-5, abs=1e-12, nan_ok=True), stat


def test_hooks_of_a_compiled_model_never_change_so_it_does_not_recompile(monkeypatch: pytest.MonkeyPatch) -> None:
    # after discovery hooks are slimmed, and one step in REDISCOVER_EVERY hooks every module again: under
    # torch.compile each change would recompile (and dynamo gives up after its recompile limit)
    from torch._dynamo.testing import CompileCounter

    import hookscope.tracing

    monkeypatch.setattr(hookscope.tracing, "REDISCOVER_EVERY", 2)
    torch._dynamo.reset()
    model = SharedReLU()
    counter = CompileCounter()
    with HookManager(model, alerts=False) as hm:
        compiled = torch.compile(model, backend=counter)
        hooks = hook_count(model)
        frames = []
        for _ in range(6):
            compiled(torch.randn(3, 4)).sum().backward()
            hm.step()
            frames.append(counter.frame_count)
        assert hook_count(model) == hooks
    assert frames[1:] == [frames[1]] * 5
    assert len(hm.to_dataframe()) == 2 * 6


def test_attaching_to_a_compiled_model_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    import hookscope.warn

    monkeypatch.setattr(hookscope.warn, "_seen", set())  # warned once per process: maybe by an earlier test
    compiled = torch.compile(SharedReLU(), backend="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        HookManager(compiled).attach().detach()
    assert any("before calling torch.compile" in str(w.message) for w in caught)
