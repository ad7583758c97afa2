"""torch.compile: a model that compiles and trains without hookscope compiles and trains with it, with the
statistics of an independent reference, no recompilation storm, and bit-identical training."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hookscope import HookManager

STATS = ["dead_ratio", "inactive_fraction", "saturation_rate", "grad_norm"]


class Captured(nn.Module):
    """Base of the test models: ``self.cap(kind, y)`` hands activation outputs to a plain reference when
    ``self.capture`` is a list (only in the uninstrumented reference run)."""

    def __init__(self) -> None:
        super().__init__()
        self.capture: list[tuple[str, torch.Tensor]] | None = None

    def cap(self, kind: str, y: torch.Tensor) -> torch.Tensor:
        if self.capture is not None:
            y.retain_grad()
            self.capture.append((kind, y))
        return y


class ModuleSigmoidTanh(Captured):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.sig, self.fc2, self.tanh, self.fc3 = (
            nn.Linear(4, 8),
            nn.Sigmoid(),
            nn.Linear(8, 6),
            nn.Tanh(),
            nn.Linear(6, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.cap("sigmoid", self.sig(self.fc1(x)))
        return self.fc3(self.cap("tanh", self.tanh(self.fc2(h))))


class FunctionalSigmoidRelu6(Captured):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.cap("sigmoid", torch.sigmoid(self.fc1(x)))
        h = self.cap("relu6", F.relu6(self.fc2(h) * 8.0))
        return self.fc3(self.cap("relu", self.fc2(h).relu_()))


class MixedModulesAndFunctions(Captured):
    """A shared ReLU module called twice, GELU and SiLU modules, and functional tanh and leaky ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = (nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
        self.act, self.gelu, self.silu = nn.ReLU(), nn.GELU(), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.cap("relu", self.act(self.fc1(x)))
        h = self.cap("gelu", self.gelu(self.fc2(h)))
        h = self.cap("tanh", torch.tanh(h))
        h = self.cap("relu", self.act(self.fc3(h)))
        h = self.cap("leaky_relu", F.leaky_relu(h - 0.2, 0.1))
        return self.fc4(self.cap("silu", self.silu(h)))


MODELS = [ModuleSigmoidTanh, FunctionalSigmoidRelu6, MixedModulesAndFunctions]
BOUNDS = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0), "relu6": (0.0, 6.0)}
RECTIFIERS = {"relu", "relu6", "gelu", "silu", "leaky_relu"}


def _batches(steps: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(16, 4, generator=gen) * 3 for _ in range(steps)]


def reference(model: Captured, batches: list[torch.Tensor]) -> list[list[float]]:
    """The statistics by their definitions, from plain activation outputs and their autograd gradients, for each
    step and activation call in execution order (rows: dead_ratio, inactive_fraction, saturation_rate, grad_norm;
    NaN where a statistic does not apply)."""
    nan = float("nan")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rows = []
    for x in batches:
        model.capture = []
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for kind, y in model.capture:
            y, g = y.detach(), y.grad
            dead = inactive = sat = nan
            if kind in RECTIFIERS:
                inactive = (y <= 0).double().mean().item()
                dead = ((y > 0).sum(dim=0) == 0).double().mean().item()
            if kind in BOUNDS:
                lo, hi = BOUNDS[kind]
                band = 0.01 * (hi - lo)
                upper = y >= hi - band
                sat = (upper if kind == "relu6" else upper | (y <= lo + band)).double().mean().item()
            rows.append([dead, inactive, sat, g.double().norm().item()])
        model.capture = None
    return rows


def instrumented(model: nn.Module, batches: list[torch.Tensor], backend: str | None) -> list[list[float]]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with HookManager(model, alerts=False) as hm:
        run = torch.compile(model, backend=backend) if backend else model
        for x in batches:
            loss = run(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            hm.step()
    return hm.to_dataframe()[STATS].to_numpy().tolist()


def _close(got: list[list[float]], want: list[list[float]]) -> None:
    assert len(got) == len(want)
    for g_row, w_row in zip(got, want):
        assert g_row[:3] == pytest.approx(w_row[:3], abs=1e-12, nan_ok=True)
        assert g_row[3] == pytest.approx(w_row[3], rel=1e-5)


BACKENDS = ["eager", "aot_eager"]
if shutil.which("g++") or shutil.which("c++"):
    BACKENDS.append("inductor")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", MODELS, ids=lambda m: m.__name__)
def test_compiled_statistics_equal_a_plain_reference(make: type[Captured], backend: str) -> None:
    if backend == "inductor" and make is not MixedModulesAndFunctions:
        pytest.skip("inductor compiles slowly here: one model is enough")
    torch.manual_seed(0)
    model = make()
    ref_model, eager_model = copy.deepcopy(model), copy.deepcopy(model)
    batches = _batches(3)
    want = reference(ref_model, batches)
    got = instrumented(model, batches, backend)
    _close(got, want)
    _close(instrumented(eager_model, batches, None), want)  # the uncompiled manager agrees too


@pytest.mark.parametrize("make", MODELS, ids=lambda m: m.__name__)
def test_compiled_training_is_bit_identical_and_does_not_recompile(make: type[Captured]) -> None:
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(1)
    plain = make()
    model = copy.deepcopy(plain)
    batches = _batches(6)
    torch._dynamo.reset()
    compiled_plain = torch.compile(plain, backend="aot_eager")
    opt = torch.optim.SGD(plain.parameters(), lr=0.05)
    for x in batches:
        loss = compiled_plain(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    counter = CompileCounter()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    frames = []
    with HookManager(model, alerts=False) as hm:
        compiled = torch.compile(model, backend=counter)
        for x in batches:
            loss = compiled(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            hm.step()
            frames.append(counter.frame_count)
    assert frames[1:] == [frames[1]] * 5, frames  # compiled once; every later step reuses the frames
    for (name, a), (_, b) in zip(plain.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), name
    assert len(hm.to_dataframe()) == 6 * len(reference(copy.deepcopy(make()), batches[:1]))
