"""Pause / resume, Lightning (automatic and manual optimisation), AMP loss scaling and torch.compile (the sinks
are in test_sinks.py)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import ActivationCalls, FunctionalReLU, ParamsManager, SharedReLU, definition_rows, hook_count
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


class GAN(nn.Module):
    """A generator and a discriminator with one activation each."""

    def __init__(self) -> None:
        super().__init__()
        self.G = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
        self.D = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))


def _gan_module(L, raise_at_batch: int | None = None):  # type: ignore[no-untyped-def]
    class GANModule(L.LightningModule):
        """Manual optimisation, two optimizers, two opt.step() per batch."""

        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.gan = GAN()
            self.batches = 0

        def training_step(self, batch, batch_idx):
            if batch_idx == raise_at_batch:
                raise RuntimeError("boom")
            self.batches += 1
            opt_g, opt_d = self.optimizers()
            (real,) = batch
            fake = self.gan.G(torch.randn(real.shape[0], 2))  # G: 1 forward per batch
            # D: 3 forwards per batch (real, detached fake, fake)
            d_loss = F.softplus(-self.gan.D(real)).mean() + F.softplus(self.gan.D(fake.detach())).mean()
            opt_d.zero_grad()
            self.manual_backward(d_loss)
            opt_d.step()
            g_loss = F.softplus(-self.gan.D(fake)).mean()  # reaches G's ReLU through D
            opt_g.zero_grad()
            self.manual_backward(g_loss)
            opt_g.step()

        def configure_optimizers(self):
            return [
                torch.optim.SGD(self.gan.G.parameters(), lr=0.05),
                torch.optim.SGD(self.gan.D.parameters(), lr=0.05),
            ]

    return GANModule()


def _lightning_trainer(L, tmp_path: Path, callback, **kwargs):  # type: ignore[no-untyped-def]
    from lightning.pytorch.loggers import CSVLogger

    return L.Trainer(
        logger=CSVLogger(tmp_path), callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", **kwargs,
    )  # fmt: skip


def test_lightning_manual_optimisation_is_one_step_per_batch(tmp_path: Path) -> None:
    L = pytest.importorskip("lightning.pytorch")
    from hookscope.integrations.lightning import HookscopeCallback

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(20, 2)), batch_size=4)
    callback = HookscopeCallback(log_every_n_steps=2, alerts=False)
    trainer = _lightning_trainer(L, tmp_path, callback, max_epochs=1)
    module = _gan_module(L)
    trainer.fit(module, loader)
    hm = callback.manager
    assert hm is not None and not hm.attached and module.batches == 5
    df = hm.to_dataframe()
    assert sorted(df["step"].unique()) == list(range(module.batches))  # not two steps per batch
    calls = df.pivot(index="step", columns="layer", values="calls")
    assert calls["gan.G.1"].tolist() == [1] * 5 and calls["gan.D.1"].tolist() == [3] * 5
    assert df["grad_norm"].notna().all()  # each site's forward and backward are in the same step
    metrics = pd.read_csv(Path(trainer.logger.log_dir) / "metrics.csv")
    logged = metrics.dropna(subset=["hookscope/gan.G.1/grad_norm"])
    assert len(logged) == 2  # after hookscope steps 1 and 3
    want = df[(df["layer"] == "gan.G.1") & (df["step"] == 3)]["grad_norm"].iloc[0]
    assert logged["hookscope/gan.G.1/grad_norm"].iloc[-1] == pytest.approx(want, rel=1e-6)


def test_lightning_detaches_when_fit_raises(tmp_path: Path) -> None:
    L = pytest.importorskip("lightning.pytorch")
    from hookscope.integrations.lightning import HookscopeCallback

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(20, 2)), batch_size=4)
    callback = HookscopeCallback(alerts=False)
    module = _gan_module(L, raise_at_batch=2)
    hooks_before = hook_count(module)
    with pytest.raises(RuntimeError, match="boom"):
        _lightning_trainer(L, tmp_path, callback, max_epochs=1).fit(module, loader)
    assert callback.manager is not None and not callback.manager.attached  # on_exception, not teardown
    assert hook_count(module) == hooks_before


def test_lightning_logs_parameter_statistics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    L = pytest.importorskip("lightning.pytorch")
    import hookscope.integrations.lightning as lightning_integration
    from hookscope.integrations.lightning import HookscopeCallback

    monkeypatch.setattr(lightning_integration, "HookManager", ParamsManager)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(20, 2)), batch_size=4)
    callback = HookscopeCallback(log_every_n_steps=2, alerts=False)
    trainer = _lightning_trainer(L, tmp_path, callback, max_epochs=1)
    trainer.fit(_gan_module(L), loader)
    metrics = pd.read_csv(Path(trainer.logger.log_dir) / "metrics.csv")
    logged = metrics.dropna(subset=["hookscope/params/head/weight_norm"])
    assert logged["hookscope/params/head/weight_norm"].tolist() == [1.5, 3.5]  # the last closed steps: 1 and 3
    assert "hookscope/params/body/grad_norm" not in metrics.columns  # NaN: never logged
    assert logged["hookscope/gan.G.1/grad_norm"].notna().all()


def test_lightning_checks_stats_against_the_manager_at_fit_start(tmp_path: Path) -> None:
    L = pytest.importorskip("lightning.pytorch")
    from hookscope.errors import ConfigError
    from hookscope.integrations.lightning import HookscopeCallback

    with pytest.raises(ConfigError, match="`log_every_n_steps`"):
        HookscopeCallback(log_every_n_steps=0)
    with pytest.raises(ConfigError, match="`stats` must name statistic columns, got 'layer'"):
        HookscopeCallback(stats=("layer",))
    callback = HookscopeCallback(stats=("dead_ration",), alerts=False)  # a custom collector's column, perhaps
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=4)
    module = _gan_module(L)
    with pytest.raises(ConfigError, match="this manager's statistic columns"):
        _lightning_trainer(L, tmp_path, callback, max_epochs=1).fit(module, loader)
    assert module.batches == 0 and hook_count(module) == 0


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


def test_lightning_with_a_compiled_module_records_what_the_eager_one_does() -> None:
    """``trainer.fit(torch.compile(module))``: the callback attaches at the start of training, before the first
    compiled call; one graph, and the rows of the same training without compilation."""
    L = pytest.importorskip("lightning.pytorch")
    from torch._dynamo.utils import counters

    from hookscope.integrations.lightning import HookscopeCallback

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = SharedReLU()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.net(x)[:, 0], y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    frames = []
    for compiled in (False, True):
        torch.manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32))
        callback = HookscopeCallback(alerts=False)
        trainer = L.Trainer(
            max_steps=4, callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu",
        )  # fmt: skip
        module: nn.Module = Module()
        if compiled:
            torch._dynamo.reset()
            counters.clear()
            module = torch.compile(module, backend="aot_eager")
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
        assert callback.manager is not None and not callback.manager.attached
        frames.append(callback.manager.to_dataframe())
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    eager, got = frames
    assert sorted(got["step"].unique()) == [0, 1, 2, 3] and set(got["layer"]) == {"net.act", "net.act#1"}
    pd.testing.assert_frame_equal(got, eager, check_exact=False, rtol=1e-5)


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
    torch._dynamo.reset()
    # a class of its own (dynamo shares compiled code between instances of a class); a Sequential, whose compiled
    # code ignores hooks added after its first call (a custom module's was compiled again, and recorded: torch 2.14)
    own = type("SequentialOfItsOwn", (nn.Sequential,), {})
    compiled = torch.compile(own(nn.Linear(4, 6), nn.ReLU()), backend="eager")
    x = torch.randn(2, 4)
    compiled(x)  # it ran before the hooks were added: its compiled code ignores them (pytorch/pytorch#117758)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hm = HookManager(compiled).attach()
        assert not caught  # attaching alone says nothing: a wrapper that has not run yet records (issue 20)
        compiled(x)
        hm.step()
        hm.detach()
    assert any("before calling torch.compile" in str(w.message) for w in caught)
    assert hm.to_dataframe().empty


def test_lightning_logs_module_sites_and_their_magnitudes(tmp_path: Path) -> None:
    L = pytest.importorskip("lightning.pytorch")
    from hookscope.integrations.lightning import HookscopeCallback

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 2)), batch_size=4)
    callback = HookscopeCallback(log_every_n_steps=2, alerts=False, modules="gan.G", stats=("rms", "abs_max"))
    trainer = _lightning_trainer(L, tmp_path, callback, max_epochs=1)
    trainer.fit(_gan_module(L), loader)
    metrics = pd.read_csv(Path(trainer.logger.log_dir) / "metrics.csv")
    logged = metrics.dropna(subset=["hookscope/gan.G/rms"])
    frame = callback.manager.to_dataframe()
    rows = frame[frame["layer"] == "gan.G"].set_index("step")
    assert logged["hookscope/gan.G/rms"].tolist() == pytest.approx(rows.loc[[1, 3], "rms"].tolist(), rel=1e-6)
    assert logged["hookscope/gan.G/abs_max"].tolist() == pytest.approx(rows.loc[[1, 3], "abs_max"].tolist(), rel=1e-6)
