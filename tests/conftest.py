"""Shared fixtures and a small model zoo for the hookscope tests."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hookscope import Collector, HookManager


@pytest.fixture(autouse=True)
def _seed_and_threads() -> Iterator[None]:
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=".*torch.utils.checkpoint.*")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # a test (the benchmark) that changes it does not change the others


@pytest.fixture(params=["native", "aten"])
def each_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test on both statistics paths, the native kernels and the ATen formulation (test files opt in with
    ``pytestmark = pytest.mark.usefixtures("each_path")``); native is skipped where the library is not built."""
    from hookscope import kernels

    if request.param == "native" and not kernels.available():
        pytest.skip(f"native kernels unavailable: {kernels.info()['reason']}")
    with kernels.forced(request.param):
        yield request.param


class Extremes(Collector):
    """A custom collector with max and min states: the largest and smallest output of each site and step."""

    columns = ("largest", "smallest")

    def __init__(self) -> None:
        super().__init__()
        self.add_state("hi", -math.inf, reduce="max")
        self.add_state("lo", math.inf, reduce="min")

    def update(self, state, output, site) -> None:  # type: ignore[no-untyped-def]
        state["hi"].clamp_(min=output.max().double())
        state["lo"].clamp_(max=output.min().double())

    def compute(self, record):  # type: ignore[no-untyped-def]
        return {"largest": record["hi"], "smallest": record["lo"]}


def hook_count(model: nn.Module) -> int:
    """Forward hooks and pre-hooks on all modules of a model."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class SharedReLU(nn.Module):
    """One ReLU module called twice per forward (like torchvision's BasicBlock)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc2(self.act(self.fc1(x))))


class InplaceReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


class FunctionalReLU(nn.Module):
    """Only functional activations, in several spellings."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 6)
        self.fc3 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        h = torch.relu(self.fc2(h))
        h = self.fc2(h).relu_()
        return torch.sigmoid(self.fc3(h))


class SaturatingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.tanh = nn.Tanh()
        self.out = nn.Linear(8, 1)
        self.sig = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sig(self.out(self.tanh(self.fc(x))))


def mlp(widths: tuple[int, ...] = (4, 8, 8, 2), act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1])


def train_steps(model: nn.Module, steps: int, manager=None, batch: int = 8, in_features: int = 4, lr: float = 0.1):
    """A few SGD steps on fixed random data; calls ``manager.step()`` after each when given."""
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        x = torch.randn(batch, in_features, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if manager is not None:
            manager.step()


class ParamsManager(HookManager):
    """A stand-in for ``HookManager(params=True)`` (the contract the integrations are written against): ``params``
    is true and ``param_frame()`` has one row per (step, module), the open step included as reports do, with
    ``weight_norm = step + 0.5``, ``grad_norm`` 1 for ``head`` and NaN for ``body``, ``update_ratio = step / 100``.
    """

    params = property(lambda self: True, lambda self, value: None)  # whether the real one sets it or not

    def param_frame(self) -> pd.DataFrame:
        steps = np.arange(self.current_step + 1)  # the open step too: it must never be logged
        n = len(steps)
        return pd.DataFrame(
            {
                "step": np.repeat(steps, 2),
                "module": ["head", "body"] * n,
                "kind": ["Linear"] * 2 * n,
                "params": [2, 2] * n,
                "weight_norm": np.repeat(steps + 0.5, 2),
                "grad_norm": np.tile([1.0, np.nan], n),
                "update_ratio": np.repeat(steps / 100.0, 2),
            }
        )


# --------------------------------------------------------------------------------------------------------------
# An independent reference for the statistics: what every activation call produced, by the definitions


#: Activation functions as the functional API and the activation modules call them, with their kinds.
_ACTIVATION_KINDS = {
    F.relu: "relu",
    F.relu_: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    torch.Tensor.relu: "relu",
    torch.Tensor.relu_: "relu",
    F.relu6: "relu6",
    F.gelu: "gelu",
    F.silu: "silu",
    F.leaky_relu: "leaky_relu",
    torch.sigmoid: "sigmoid",
    torch.Tensor.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    torch.Tensor.tanh: "tanh",
    F.hardtanh: "hardtanh",  # nn.ReLU6 calls F.hardtanh(x, 0, 6)
}
REFERENCE_RECTIFIERS = frozenset({"relu", "relu6", "gelu", "silu", "leaky_relu"})
REFERENCE_BOUNDS = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0), "relu6": (0.0, 6.0)}


class ActivationCalls(TorchFunctionMode):
    """Records the output of every activation function called while active (``nn.ReLU`` and the other activation
    modules call these functions too), in execution order, keeping its gradient (``retain_grad``). Use it on an
    uninstrumented copy of a model: it shares no code with hookscope.

    Attributes:
        calls: ``(kind, output)`` pairs in execution order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        kind = _ACTIVATION_KINDS.get(func)
        if kind is not None and isinstance(out, torch.Tensor):
            if kind == "hardtanh":
                bounds = {"min_val": -1.0, "max_val": 1.0, **dict(zip(("min_val", "max_val"), args[1:3])), **kwargs}
                kind = "relu6" if (float(bounds["min_val"]), float(bounds["max_val"])) == (0.0, 6.0) else kind
            if out.requires_grad:
                out.retain_grad()
            self.calls.append((kind, out))
        return out


def _unit_dim(ndim: int) -> int | None:
    return None if ndim == 0 else 0 if ndim == 1 else ndim - 1 if ndim == 3 else 1


def definition_stats(kind: str, outputs: list[torch.Tensor], eps: float = 0.01) -> dict[str, float]:
    """``dead_ratio``, ``inactive_fraction``, ``saturation_rate``, ``grad_norm``, ``nonfinite`` and
    ``grad_nonfinite`` of one site in one step, from the outputs of its calls in the step (their ``.grad`` kept)
    by the README's definitions, in float64. NaN where a statistic does not apply."""
    nan = math.nan
    ys = [y.detach().double() for y in outputs]
    row = dict.fromkeys(("dead_ratio", "inactive_fraction", "saturation_rate", "grad_norm"), nan)
    elements = sum(y.numel() for y in ys)
    row["nonfinite"] = float(sum(int((~torch.isfinite(y)).sum()) for y in ys))
    if kind in REFERENCE_RECTIFIERS:
        row["inactive_fraction"] = sum(int((~(y > 0)).sum()) for y in ys) / elements
        d = _unit_dim(ys[0].dim())
        fired = [(y > 0).reshape(1, -1) if d is None else (y > 0).movedim(d, -1).reshape(-1, y.shape[d]) for y in ys]
        row["dead_ratio"] = float((~torch.cat(fired).any(dim=0)).double().mean())
    if kind in REFERENCE_BOUNDS:
        lo, hi = REFERENCE_BOUNDS[kind]
        band = eps * (hi - lo)
        saturated = [y >= hi - band if kind == "relu6" else (y >= hi - band) | (y <= lo + band) for y in ys]
        row["saturation_rate"] = sum(int(s.sum()) for s in saturated) / elements
    grads = [y.grad.double() for y in outputs if y.grad is not None]
    row["grad_norm"] = math.sqrt(sum(float(g.pow(2).sum()) for g in grads)) if grads else nan
    row["grad_nonfinite"] = float(sum(int((~torch.isfinite(g)).sum()) for g in grads)) if grads else nan
    return row


def definition_rows(calls: list[tuple[str, torch.Tensor]], per_forward: int, forwards: int = 1) -> list[dict]:
    """One row per site per step (in execution order) from :attr:`ActivationCalls.calls` of a run in which each
    step ran ``forwards`` forward passes of ``per_forward`` activation calls each, every pass calling the same
    sites in the same order. Each row holds ``kind``, ``calls`` and :func:`definition_stats`."""
    per_step = per_forward * forwards
    assert len(calls) % per_step == 0, (len(calls), per_step)
    rows = []
    for start in range(0, len(calls), per_step):
        step = calls[start : start + per_step]
        for j in range(per_forward):
            site = [step[f * per_forward + j] for f in range(forwards)]
            kind = site[0][0]
            assert all(k == kind for k, _ in site)
            rows.append({"kind": kind, "calls": forwards, **definition_stats(kind, [y for _, y in site])})
    return rows
