"""Correctness under real training conditions: identical training, checkpointing, no_grad, memory, no syncs."""

from __future__ import annotations

import copy
import gc
import warnings
import weakref

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from conftest import (
    ActivationCalls,
    FunctionalReLU,
    InplaceReLU,
    SaturatingNet,
    SharedReLU,
    definition_rows,
    mlp,
    train_steps,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import hookscope.warn
from hookscope import HookManager
from hookscope.collectors.base import RING_STEPS
from hookscope.warn import HookscopeWarning

STATS = ["dead_ratio", "inactive_fraction", "saturation_rate", "grad_norm"]


@pytest.mark.parametrize("make", [SharedReLU, InplaceReLU, FunctionalReLU, SaturatingNet])
def test_training_is_bit_for_bit_identical(make) -> None:
    torch.manual_seed(3)
    plain = make()
    instrumented = copy.deepcopy(plain)
    train_steps(plain, 5)
    with HookManager(instrumented) as hm:
        train_steps(instrumented, 5, hm)
    for (name, a), (_, b) in zip(plain.named_parameters(), instrumented.named_parameters()):
        assert torch.equal(a, b), name
    assert len(hm.to_dataframe()) > 0


def test_resnet18_training_is_bit_for_bit_identical() -> None:
    plain = torchvision.models.resnet18(num_classes=4)
    instrumented = copy.deepcopy(plain)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for model, manager in ((plain, None), (instrumented, HookManager(instrumented))):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if manager is not None:
            manager.attach()
        for _ in range(2):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if manager is not None:
                manager.step()
        if manager is not None:
            manager.detach()
    for a, b in zip(plain.state_dict().values(), instrumented.state_dict().values()):
        assert torch.equal(a, b)


class CheckpointedNet(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.stem = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh()) for _ in range(2)
        )
        self.act = nn.ReLU()  # called after each block: act, act#1
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h) if self.mode == "none" else checkpoint(block, h, use_reentrant=self.mode == "reentrant")
            h = self.act(h)
        return self.head(F.gelu(h))


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_checkpointing_gives_the_statistics_of_the_plain_model(mode: str) -> None:
    torch.manual_seed(5)
    plain = CheckpointedNet("none")
    ckpt, reference = copy.deepcopy(plain), copy.deepcopy(plain)
    ckpt.mode = mode
    frames = []
    for model in (plain, ckpt):
        with HookManager(model) as hm:
            train_steps(model, 3, hm)
        frames.append(hm.to_dataframe())
    a, b = frames
    assert list(a["layer"]) == list(b["layer"])
    assert list(a["calls"]) == list(b["calls"])  # the recomputed forward is not counted again
    assert b["grad_norm"].notna().all()
    pd.testing.assert_frame_equal(a[STATS], b[STATS], rtol=1e-6)
    # both equal the definitions, applied to the activations of an uninstrumented copy trained the same way
    with ActivationCalls() as seen:
        train_steps(reference, 3)
    want = definition_rows(seen.calls, per_forward=7)
    assert list(b["layer"]) == ["blocks.0.1", "blocks.0.3", "act", "blocks.1.1", "blocks.1.3", "act#1", "gelu()"] * 3
    assert list(b["kind"]) == [r["kind"] for r in want] and list(b["calls"]) == [r["calls"] for r in want]
    for stat in STATS:
        assert b[stat].tolist() == pytest.approx([r[stat] for r in want], rel=1e-6, abs=1e-12, nan_ok=True), stat


def test_no_grad_and_inference_mode_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hookscope.warn, "_seen", set())  # said once per process: maybe by an earlier test
    model = SharedReLU()
    with HookManager(model) as hm:
        with torch.inference_mode():  # the first call creates state: it must stay usable outside
            model(torch.randn(2, 4))
        hm.step()
        with torch.no_grad():
            model(torch.randn(2, 4))
        hm.step()
        model(torch.randn(2, 4)).sum().backward()
        hm.step()
        with pytest.warns(HookscopeWarning, match="evaluation passes are not recorded"), torch.inference_mode():
            model(torch.randn(2, 4))  # once the model trained: evaluation, not recorded (test_evaluation.py)
            hm.step()
    df = hm.to_dataframe()
    assert list(df["step"]) == [0, 0, 1, 1, 2, 2]
    assert df["grad_norm"].notna().tolist() == [False] * 4 + [True] * 2
    assert df["inactive_fraction"].notna().all()


def test_hooks_do_not_keep_outputs_alive() -> None:
    model = SharedReLU()
    refs: list[weakref.ref] = []
    model.act.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
    with HookManager(model) as hm:
        model(torch.randn(3, 4)).sum().backward()  # with backward
        model(torch.randn(3, 4))  # forward only: a tensor hook is registered on outputs that are dropped
        hm.step()
        gc.collect()
        assert len(refs) == 4 and all(r() is None for r in refs)


def _live_tensor_bytes() -> int:
    gc.collect()
    seen: set[int] = set()
    total = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on some torch objects warns about deprecations
        tensors = [
            obj
            for obj in gc.get_objects()
            if isinstance(obj, torch.Tensor) and type(obj).__name__ not in ("FakeTensor", "FunctionalTensor")
        ]
    for obj in tensors:
        try:  # fake tensors left by torch.compile have no data
            storage = obj.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):
            continue
        if ptr not in seen:
            seen.add(ptr)
            total += nbytes
    return total


def test_a_long_loop_does_not_grow_memory() -> None:
    model = mlp((32, 256, 256, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(64, 32)

    def run(steps: int) -> None:
        for _ in range(steps):
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            hm.step()

    with HookManager(model) as hm:
        run(20)
        before = _live_tensor_bytes()
        run(200)
        after = _live_tensor_bytes()
    # one activation is 64 KiB; the history kept per step is a few dozen numbers per site
    assert after - before < 200 * 512, (before, after)


class CountSyncs(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_sync_counter_sees_item() -> None:
    with CountSyncs() as counter:
        torch.ones(2).sum().item()
    assert counter.count == 1


@pytest.mark.parametrize("make", [SharedReLU, InplaceReLU, FunctionalReLU, SaturatingNet, CheckpointedNet])
def test_no_host_synchronisation_while_training(make) -> None:
    model = make("reentrant") if make is CheckpointedNet else make()
    with HookManager(model) as hm:
        train_steps(model, 1, hm)  # first step creates sites and state
        with CountSyncs() as counter:
            train_steps(model, 3, hm)
    assert counter.count == 0
    assert len(hm.to_dataframe()) > 0


def test_no_host_synchronisation_resnet18() -> None:
    model = torchvision.models.resnet18(num_classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    with HookManager(model) as hm, CountSyncs() as counter:
        for _ in range(2):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            hm.step()
    assert counter.count == 0


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _step_ops(model: nn.Module, x: torch.Tensor) -> tuple[int, int, list[int]]:
    """ATen ops of one plain training step, of one instrumented step, and of each step() over three rings."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    plain, instrumented = CountOps(), CountOps()
    with plain:
        model(x).sum().backward()
    closing = []
    with HookManager(model, alerts=False) as hm:
        for i in range(3 * RING_STEPS):
            if i == RING_STEPS:
                with instrumented:
                    model(x).sum().backward()
            else:
                model(x).sum().backward()
            with CountOps() as ops:
                hm.step()
            closing.append(ops.count)
    opt.zero_grad()
    return plain.count, instrumented.count, closing


@pytest.mark.parametrize("backend", ["aten", "native"])
def test_cost_is_a_few_ops_per_site_and_a_fixed_number_per_step(backend: str) -> None:
    # On small models the fixed cost of each ATen op dominates (benchmarks/overhead.py): pin the op counts.
    from hookscope import kernels

    if backend == "native" and not kernels.available():
        pytest.skip(f"native kernels unavailable: {kernels.info()['reason']}")
    small = mlp((32, 64, 64, 4))  # 2 ReLU sites
    resnet = torchvision.models.resnet18(num_classes=4)  # 17 sites
    with kernels.forced(backend):
        p_small, i_small, step_small = _step_ops(small, torch.randn(8, 32))
        p_res, i_res, step_res = _step_ops(resnet, torch.randn(2, 3, 32, 32))
    # closing a step dispatches no op (the sites' views move to the next row of the ring); once per ring the
    # collectors process all of its steps at once, whatever the number of sites
    assert step_small[RING_STEPS:] == step_res[RING_STEPS:]
    steady = [n for i, n in enumerate(step_small) if i >= RING_STEPS and (i + 1) % RING_STEPS]
    assert set(steady) == {0}
    if backend == "native":
        # processing a ring: DeadReLU's per-unit bookkeeping is one kernel call; the rest is the other
        # collectors' sums and the stacking of the block's values
        assert step_small[2 * RING_STEPS - 1] <= 24
    else:
        # ~90 ops (DeadReLU's windows, revivals, deaths and evidence, the other collectors' sums), plus one
        # elementwise maximum per step of the ring for the units' running maximum of the step they last fired
        # (on CPU 16 of them cost a tenth of one cummax)
        assert step_small[2 * RING_STEPS - 1] <= 92 + RING_STEPS
    if backend == "native":  # one kernel call per output and per gradient, straight into the state
        assert i_small == p_small and i_res == p_res
        return
    # forward (empty, gt, per-unit sum, add) and gradient (flat view, dot, accumulate)
    assert i_small - p_small == 7 * 2
    assert i_res - p_res <= 7 * 17


def test_host_values_reach_a_cuda_device_through_pinned_memory() -> None:
    # a copy from pageable memory may synchronise with the CUDA stream; pinned memory + non_blocking does not
    from hookscope.collectors.base import host_to_device

    calls = []

    class Host:
        def pin_memory(self):  # type: ignore[no-untyped-def]
            calls.append("pin_memory")
            return self

        def to(self, device, non_blocking=False):  # type: ignore[no-untyped-def]
            calls.append(("to", str(device), non_blocking))
            return self

    host_to_device(Host(), torch.device("cuda", 0))  # type: ignore[arg-type]
    assert calls == ["pin_memory", ("to", "cuda:0", True)]
    t = torch.arange(3.0)
    assert torch.equal(host_to_device(t, torch.device("cpu")), t)
