"""Shared fixtures and a small model zoo for the hookscope tests."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hookscope import HookManager


@pytest.fixture(autouse=True)
def _seed_and_threads() -> Iterator[None]:
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=".*torch.utils.checkpoint.*")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # a test (the benchmark) that changes it does not change the others


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
