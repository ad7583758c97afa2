"""The native kernels and the ATen formulation give the same statistics: counts exactly, norms within float
tolerance, and both follow the definitions (checked against hand-computed values where the data is planted)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import ActivationCalls, definition_rows

from hookscope import HookManager, NonFinite, kernels
from hookscope.collectors import DeadReLU, GradientNorm, Saturation

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable")

STATS = ["dead_ratio", "inactive_fraction", "saturation_rate", "grad_norm", "nonfinite", "grad_nonfinite"]


class Block(nn.Module):
    """Conv → BN → ReLU6 (channels_last capable), a sigmoid head and a functional tanh and GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(8, 6)
        self.sig = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.conv(x)) * 4)
        h = F.gelu(h).mean(dim=(2, 3))
        return self.sig(torch.tanh(self.fc(h) * 3))


def _run(model: nn.Module, xs: list[torch.Tensor], backend: str) -> list[list[float]]:
    collectors = [DeadReLU(), Saturation(), GradientNorm(), NonFinite()]
    with kernels.forced(backend), HookManager(model, collectors, alerts=False) as hm:
        for x in xs:
            model(x).float().pow(2).mean().backward()
            hm.step()
    return hm.to_dataframe()[STATS].to_numpy().tolist()


def _agree(native: list[list[float]], aten: list[list[float]]) -> None:
    assert len(native) == len(aten) > 0
    for n, a in zip(native, aten):
        assert n[:3] + n[4:] == pytest.approx(a[:3] + a[4:], abs=0, nan_ok=True)  # counts: exactly
        assert n[3] == pytest.approx(a[3], rel=1e-5, nan_ok=True)


def _reference(model: nn.Module, xs: list[torch.Tensor]) -> list[list[float]]:
    """The statistics by their definitions, from the activations of an uninstrumented run of ``_run``'s loop."""
    with ActivationCalls() as seen:
        for x in xs:
            model(x).float().pow(2).mean().backward()
    return [[row[k] for k in STATS] for row in definition_rows(seen.calls, per_forward=4)]


def _follow_definitions(got: list[list[float]], want: list[list[float]]) -> None:
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert g[:3] + g[4:] == pytest.approx(w[:3] + w[4:], abs=1e-12, nan_ok=True)
        assert g[3] == pytest.approx(w[3], rel=1e-5, nan_ok=True)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_both_paths_agree(layout: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = Block().to(dtype)
    xs = [torch.randn(4, 3, 6, 6, dtype=dtype) for _ in range(3)]
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        xs = [x.to(memory_format=torch.channels_last) for x in xs]
    native, aten = _run(copy.deepcopy(model), xs, "native"), _run(copy.deepcopy(model), xs, "aten")
    _agree(native, aten)
    _follow_definitions(native, _reference(copy.deepcopy(model), xs))


def test_both_paths_agree_under_bfloat16_autocast() -> None:
    torch.manual_seed(1)
    model = Block()
    xs = [torch.randn(4, 3, 6, 6) for _ in range(2)]

    def run(backend: str) -> list[list[float]]:
        m = copy.deepcopy(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _run(m, xs, backend)

    native = run("native")
    _agree(native, run("aten"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _reference(copy.deepcopy(model), xs)
    _follow_definitions(native, want)


@pytest.mark.parametrize("backend", ["native", "aten"])
def test_nan_outputs_are_inactive_not_saturated_and_counted_as_nonfinite(backend: str) -> None:
    # hand-planted outputs: 8 elements per site, 2 of them NaN, 1 +inf
    y = torch.tensor([[float("nan"), 1.0, -1.0, 0.5], [float("nan"), float("inf"), 0.0, 2.0]])

    class Plant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.relu, self.sig = nn.ReLU(), nn.Sigmoid()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.sig(self.relu(x) + x * 0)  # relu sees y; the sigmoid sees relu(y) + y * 0

    with kernels.forced(backend), HookManager(Plant(), [DeadReLU(), Saturation(), NonFinite()], alerts=False) as hm:
        hm.model(y)
        hm.step()
    relu, sig = hm.to_dataframe().to_dict("records")
    # relu(y) = [nan, 1, 0, .5 | nan, inf, 0, 2]: positive 1, .5, inf, 2 -> 4 of 8; NaN is not positive
    assert relu["inactive_fraction"] == 4 / 8 and relu["nonfinite"] == 3
    # units are columns: column 0 (NaN, NaN) and column 2 (0, 0) never fire; columns 1 (1, inf) and 3 do
    assert relu["dead_ratio"] == 2 / 4
    # relu(y) + y*0 = [nan, 1, 0, .5 | nan, nan (inf*0), 0, 2]: sigmoid of 1, 0, .5, 2 is .73, .5, .62, .88, none
    # in a band (<= .01 or >= .99), and NaN is never saturated
    assert sig["saturation_rate"] == 0.0
    assert sig["nonfinite"] == 3
    assert not math.isnan(relu["inactive_fraction"])


class TwoPlantedSites(nn.Module):
    """Two ReLU sites whose inputs are the data itself: unit u of a step fires exactly when some x[:, u] > 0."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.ReLU()
        self.b = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x[:, :5]), self.b(x[:, 5:])], dim=1)


def _planted_steps(steps: int) -> list[torch.Tensor]:
    """Inputs (batch 1 to 4) in which 12 units fire with probabilities from never to always, and some stop and
    start again (dead spells and revivals of several lengths)."""
    g = torch.Generator().manual_seed(7)
    p = torch.tensor([0.0, 0.05, 0.2, 0.5, 1.0, 0.1, 0.3, 0.0, 0.7, 0.02, 0.4, 0.9])
    xs = []
    for k in range(steps):
        n = int(torch.randint(1, 5, (1,), generator=g))
        q = p.clone()
        q[3] = 0.0 if 6 <= k < 14 or 20 <= k < 22 else 1.0  # two spells of silence, then it fires again
        fire = torch.rand(n, 12, generator=g) < q
        xs.append(torch.where(fire, 1.0, -1.0))
    return xs


def _dead_unit_reference(xs: list[torch.Tensor], window: int, evidence: int) -> tuple[list[list[float]], dict]:
    """dead_ratio and confirmed_dead_ratio per step and site, and each unit's timeline, by their definitions."""
    sites = [range(0, 5), range(5, 12)]
    last: list[int | None] = [None] * 12  # last step a unit fired
    silent = [0] * 12  # elements since it last fired
    dead_prev = [True] * 12
    revivals, last_revival, dead_since = [0] * 12, [math.nan] * 12, [0.0] * 12
    rows = []
    for k, x in enumerate(xs):
        fired = (x > 0).any(dim=0).tolist()
        dead = []
        for u in range(12):
            before = last[u]
            if fired[u]:
                last[u], silent[u] = k, 0
            else:
                silent[u] += x.shape[0]
            now_dead = last[u] is None or last[u] <= k - window
            if fired[u] and before is not None and before <= k - 1 - window:
                revivals[u] += 1
                last_revival[u] = k
            if now_dead and not dead_prev[u] and last[u] is not None:
                dead_since[u] = k
            dead.append(now_dead)
            dead_prev[u] = now_dead
        for units in sites:
            n = len(units)
            rows.append([sum(dead[u] for u in units) / n, sum(silent[u] >= evidence for u in units) / n])
    timeline = {
        "last_fired": [math.nan if t is None else float(t) for t in last],
        "dead": dead_prev,
        "dead_since": [s if d else math.nan for s, d in zip(dead_since, dead_prev)],
        "revivals": revivals,
        "last_revival": last_revival,
    }
    return rows, timeline


@pytest.mark.parametrize(("window", "evidence"), [(1, 128), (1, 3), (3, 5)])
def test_dead_unit_bookkeeping_is_the_same_on_both_paths_and_follows_the_definitions(
    window: int, evidence: int
) -> None:
    # the per-unit windows, evidence, deaths and revivals, processed a ring at a time (native: one kernel call),
    # across full rings, a ring flushed early by a report, and the open step seen by the timeline
    xs = _planted_steps(37)
    got = {}
    for backend in ("native", "aten"):
        model = TwoPlantedSites()
        with kernels.forced(backend), HookManager(model, [DeadReLU(window=window, evidence=evidence)]) as hm:
            frames = []
            for k, x in enumerate(xs):
                model(x)
                if k == len(xs) - 1:
                    frames.append(hm.unit_timeline())  # the open step counts
                hm.step()
                if k == 20:
                    frames.append(hm.to_dataframe())  # flushes a ring of 5 steps
            frame = hm.to_dataframe()
        got[backend] = (frame, frames)
    native, aten = got["native"], got["aten"]
    assert native[0].equals(aten[0]) and native[1][0].equals(aten[1][0]) and native[1][1].equals(aten[1][1])
    rows, timeline = _dead_unit_reference(xs, window, evidence)
    frame = native[0]
    assert frame[["dead_ratio", "confirmed_dead_ratio"]].to_numpy().ravel().tolist() == pytest.approx(
        [v for row in rows for v in row]
    )
    units = native[1][1]
    for column, want in timeline.items():
        assert units[column].tolist() == pytest.approx(want, nan_ok=True), column


def test_parameter_statistics_read_each_cpu_parameter_once_and_follow_the_definitions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # float32 and float64 modules, a channels_last convolution (dense, not contiguous), a frozen parameter and a
    # bfloat16 one (declined by the kernel: its group falls back to torch._foreach_*)
    calls = []
    real = kernels.param_stats

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(kernels, "param_stats", spy)

    def model(dtype: torch.dtype) -> nn.Sequential:
        torch.manual_seed(3)
        m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5), nn.Linear(5, 2))
        m[0].to(memory_format=torch.channels_last)
        m[:4].to(dtype)
        m[4].double()
        m[3].bias.requires_grad_(False)
        return m

    for dtype in (torch.float32, torch.bfloat16):
        m = model(dtype)
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05)
        want, previous = [], {}
        with kernels.forced("native"), HookManager(m, params=True, alerts=False) as hm:
            for s in range(3):
                x = torch.randn(4, 3, 6, 6, dtype=dtype).to(memory_format=torch.channels_last)
                h = m[:4](x)
                m[4](h.double()).pow(2).mean().backward()
                hm.step()
                for name in ("0", "3", "4"):
                    own = list(m[int(name)].parameters())
                    theta = [p.detach().double().clone() for p in own]
                    grads = [p.grad.double() for p in own if p.grad is not None]
                    ratio = math.nan
                    if s:
                        diff = sum(float((a - b).pow(2).sum()) for a, b in zip(theta, previous[name]))
                        ratio = math.sqrt(diff) / math.sqrt(sum(float(b.pow(2).sum()) for b in previous[name]))
                    norms = [math.sqrt(sum(float(t.pow(2).sum()) for t in ts)) for ts in (theta, grads)]
                    want.append([*norms, ratio])
                    previous[name] = theta
                opt.step()
                opt.zero_grad()
        got = hm.param_frame()[["weight_norm", "grad_norm", "update_ratio"]].to_numpy().ravel().tolist()
        rel = 1e-6 if dtype == torch.float32 else 1e-2
        assert got == pytest.approx([v for row in want for v in row], rel=rel, nan_ok=True)
        if dtype == torch.float32:
            assert calls and all(calls)  # every step in one kernel call per device group
        else:
            assert calls and not any(calls)
        calls.clear()
