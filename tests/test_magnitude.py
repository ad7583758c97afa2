"""Module sites (``HookManager(modules=...)``), the ``Magnitude`` and ``Entropy`` collectors, ``massive_units`` and
``unit_frame``: expected values from first principles, in float64, from this file's own plain hooks and numpy."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hookscope as hs
from hookscope import HookManager
from hookscope.errors import ConfigError, ConfigTypeError, StateError

pytestmark = pytest.mark.usefixtures("each_path")

D = 16
MASSIVE = 3  # the planted massive unit
DORMANT = (5, 6)  # the planted dormant units


# ---------------------------------------------------------------------------------------------------------------
# the reference: numpy over the outputs a plain forward hook saw


def reference(outputs: list[np.ndarray], unit_axis: int = -1, abs_=100.0, ratio=1000.0, tau=0.025) -> dict[str, Any]:
    """Every Magnitude column, by its definition, over all elements of ``outputs`` (one step's calls)."""
    x = np.concatenate([o.reshape(-1) for o in outputs]).astype(np.float64)
    x = x[np.isfinite(x)]
    n = len(x)
    mean = x.sum() / n
    m2 = (x * x).sum() / n
    units = [np.moveaxis(o, unit_axis, -1).reshape(-1, o.shape[unit_axis]) for o in outputs]
    per_unit = np.concatenate(units, axis=0).astype(np.float64)  # (elements per unit, units)
    m, a, r = [], [], []
    for u in range(per_unit.shape[1]):
        v = per_unit[:, u]
        v = v[np.isfinite(v)]
        if len(v) == 0:
            continue
        m.append(np.abs(v).mean())
        a.append(np.abs(v).max())
        r.append(np.sqrt((v * v).mean()))
    m_, a_, r_ = np.array(m), np.array(a), np.array(r)
    median = np.median(m_)
    massive = [u for u in range(len(a_)) if a_[u] >= abs_ and a_[u] >= ratio * median]
    return {
        "rms": math.sqrt(m2),
        "mean": mean,
        "std": math.sqrt(max(m2 - mean * mean, 0.0)),
        "abs_max": np.abs(x).max(),
        "kurtosis": ((x**4).sum() / n) / m2**2,
        "zero_fraction": (x == 0).sum() / n,
        "massive_units": float(len(massive)),
        "dormant_ratio": float((m_ <= tau * m_.mean()).sum()) / len(m_),
        "neuron_kurtosis": (r_**4).mean() / (r_**2).mean() ** 2,
        "massive": massive,
        "unit_rms": r_,
        "unit_mean_abs": m_,
        "unit_abs_max": a_,
    }


COLUMNS = hs.Magnitude.columns


class Emit(nn.Module):
    """Returns its input times a weight of ones: the output is exactly what the test builds, and has a gradient."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(D, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


class Net(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.emit = Emit(dtype)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.emit(x))


def planted(seed: int, dtype: torch.dtype = torch.float64, batch: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 5, D, generator=gen, dtype=torch.float64)
    x[1, 2, MASSIVE] = 5000.0  # one huge element in one unit: a_u >= 100 and >= 1000 x the median m_u
    for u in DORMANT:
        x[..., u] *= 1e-3  # m_u / mean(m) ~ 1e-3 <= 0.025
    x[0, 0, 0] = 0.0
    x[2, 1, 1] = 0.0
    return x.to(dtype)


class Capture:
    """A plain forward hook that keeps a float64 copy of every output of a module."""

    def __init__(self, module: nn.Module) -> None:
        self.outputs: list[np.ndarray] = []
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, out: Any) -> None:
        t = out[0] if isinstance(out, (tuple, list)) else out
        self.outputs.append(t.detach().double().numpy().copy())

    def take(self) -> list[np.ndarray]:
        out, self.outputs = self.outputs, []
        return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_magnitude_columns_match_their_definitions_over_micro_batches(dtype: torch.dtype) -> None:
    model = Net(dtype)
    capture = Capture(model.emit)
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    expected = []
    with HookManager(model, modules="emit", alerts=False) as hm:
        for step in range(2):
            for micro in range(2):  # gradient accumulation: two forwards, one step
                model(planted(10 * step + micro, dtype)).sum().backward()
            expected.append(reference(capture.take()))
            hm.step()
    frame = hm.to_dataframe()
    rows = frame[frame["layer"] == "emit"]
    assert list(rows["kind"]) == ["output", "output"]
    assert list(rows["calls"]) == [2, 2] and list(rows["units"]) == [D, D]
    for col in COLUMNS:
        got = rows[col].to_numpy()
        want = np.array([e[col] for e in expected])
        np.testing.assert_allclose(got, want, rtol=rtol, atol=0, err_msg=col)
    assert list(rows["massive_units"]) == [1.0, 1.0]
    assert list(rows["dormant_ratio"]) == [2 / D, 2 / D]
    # the activation site beside it is not a Magnitude site (activations=False) and keeps its own statistics
    relu = frame[frame["layer"] == "act"]
    assert relu[list(COLUMNS)].isna().all().all() and relu["dead_ratio"].notna().all()
    assert hm.massive_units("emit") == [MASSIVE] == expected[-1]["massive"]
    assert hm.massive_units("emit", step=0) == [MASSIVE]
    units = hm.unit_frame("emit", "rms")
    assert list(units.columns) == ["layer", "unit", "step", "rms"] and list(units["step"]) == [1.0] * D
    np.testing.assert_allclose(units["rms"], expected[-1]["unit_rms"], rtol=rtol)
    np.testing.assert_allclose(hm.unit_frame("emit", "mean_abs")["mean_abs"], expected[-1]["unit_mean_abs"], rtol=rtol)
    np.testing.assert_allclose(hm.unit_frame("emit", "abs_max")["abs_max"], expected[-1]["unit_abs_max"], rtol=rtol)


def test_nonfinite_elements_are_left_out_and_counted_by_nonfinite() -> None:
    model = Net()
    capture = Capture(model.emit)
    x = planted(0)
    x[0, 1, 2] = math.nan
    x[3, 4, 7] = math.inf
    x[:, :, 9] = math.nan  # a unit without one finite element is left out of the per-unit statistics
    with HookManager(model, [hs.Magnitude(), hs.NonFinite()], modules="emit", alerts=False) as hm:
        with torch.no_grad():
            model(x)
        want = reference(capture.take())
        hm.step()
    row = hm.to_dataframe().set_index("layer").loc["emit"]
    for col in COLUMNS:
        assert row[col] == pytest.approx(want[col], rel=1e-12), col
    assert row["nonfinite"] == 4 * 5 + 2  # unit 9's 20 NaN, one more NaN, one inf
    assert math.isnan(hm.unit_frame("emit", "rms")["rms"][9])


def test_dormant_and_massive_thresholds_are_the_arguments() -> None:
    model = Net()
    capture = Capture(model.emit)
    collector = hs.Magnitude(massive_abs=6000.0, massive_ratio=10.0, dormant_tau=0.5)
    with HookManager(model, [collector], modules="emit", alerts=False) as hm:
        with torch.no_grad():
            model(planted(1))
        want = reference(capture.take(), abs_=6000.0, ratio=10.0, tau=0.5)
    row = hm.to_dataframe().set_index("layer").loc["emit"]
    assert row["massive_units"] == want["massive_units"] == 0.0  # 5000 < 6000
    assert row["dormant_ratio"] == want["dormant_ratio"]
    assert hm.massive_units("emit") == []


def test_all_zero_outputs_have_every_unit_dormant_and_nan_moments() -> None:
    model = Net()
    with HookManager(model, modules="emit", alerts=False) as hm, torch.no_grad():
        model(torch.zeros(2, 3, D, dtype=torch.float64))
    row = hm.to_dataframe().set_index("layer").loc["emit"]
    assert row["dormant_ratio"] == 1.0 and row["zero_fraction"] == 1.0 and row["rms"] == 0.0
    assert math.isnan(row["kurtosis"]) and math.isnan(row["neuron_kurtosis"])  # 0 / 0
    assert row["massive_units"] == 0.0


def test_magnitude_on_activation_sites_with_activations_true() -> None:
    model = Net()
    capture = Capture(model.act)
    with HookManager(model, [hs.Magnitude(activations=True)], alerts=False) as hm:
        with torch.no_grad():
            model(planted(2))
        want = reference(capture.take())
    row = hm.to_dataframe().set_index("layer").loc["act"]
    for col in COLUMNS:
        assert row[col] == pytest.approx(want[col], rel=1e-12, abs=0), col


# ---------------------------------------------------------------------------------------------------------------
# module sites: names, outputs, errors, gradients


class TupleBlock(nn.Module):
    """Returns ``(ints, None, hidden)``: the first floating-point tensor is ``hidden``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> tuple[Any, ...]:
        return (torch.arange(3), None, x + self.fc(x))


class DictBlock(TupleBlock):
    def forward(self, x: torch.Tensor) -> dict[str, Any]:  # type: ignore[override]
        return {"ids": torch.arange(3), "hidden": x + self.fc(x), "other": x}


class Stack(nn.Module):
    def __init__(self, kind: type[nn.Module] = TupleBlock, n: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([kind() for _ in range(n)])
        self.head = nn.Linear(D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = hidden(block(x))
        x = hidden(self.blocks[0](x))  # block 0 again: its second call in the pass, blocks.0#1
        return self.head(x)


def hidden(out: Any) -> torch.Tensor:
    return out["hidden"] if isinstance(out, dict) else out[2]


@pytest.mark.parametrize("kind", [TupleBlock, DictBlock], ids=["tuple", "mapping"])
def test_module_sites_record_the_first_floating_tensor_and_name_further_calls(kind: type[nn.Module]) -> None:
    model = Stack(kind)
    captured: dict[str, list[np.ndarray]] = {}

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            captured.setdefault(name, []).append(hidden(out).detach().double().numpy())

        return hook

    for i, block in enumerate(model.blocks):
        block.register_forward_hook(keep(f"blocks.{i}"))
    with HookManager(model, modules=[kind], alerts=False) as hm:
        model(torch.randn(3, 4, D)).sum().backward()
        hm.step()
    frame = hm.to_dataframe()
    assert list(frame["layer"]) == ["blocks.0", "blocks.1", "blocks.0#1"]
    rows = frame.set_index("layer")
    for layer, out in [("blocks.0", captured["blocks.0"][0]), ("blocks.1", captured["blocks.1"][0]),
                       ("blocks.0#1", captured["blocks.0"][1])]:  # fmt: skip
        want = reference([out])
        assert rows.loc[layer, "rms"] == pytest.approx(want["rms"], rel=1e-6)
        assert rows.loc[layer, "kurtosis"] == pytest.approx(want["kurtosis"], rel=1e-5)
        assert rows.loc[layer, "kind"] == "output" and rows.loc[layer, "units"] == D


def test_patterns_and_classes_select_modules_and_bad_ones_raise_at_construction() -> None:
    model = Stack()
    with HookManager(model, modules="blocks.?", alerts=False) as hm:
        model(torch.randn(2, D))
    assert {"blocks.0", "blocks.1"} <= set(hm.layers) and "head" not in hm.layers
    with HookManager(model, modules=["head", nn.ModuleList], alerts=False) as hm:
        model(torch.randn(2, D))
    assert "head" in hm.layers  # ModuleList never runs forward: no site, no error (it matched a module)
    with pytest.raises(ConfigError, match=r"`modules` pattern 'block\.\*' matches no module of Stack"):
        HookManager(model, modules="block.*")
    with pytest.raises(ConfigError, match="`modules` class Conv2d matches no module"):
        HookManager(model, modules=["head", nn.Conv2d])
    relu_model = Net()
    with pytest.raises(ConfigError, match=r"matches only activation modules \(act\).*activations=True"):
        HookManager(relu_model, modules="act")
    with pytest.raises(ConfigTypeError, match="`modules` must hold module-name patterns"):
        HookManager(model, modules=["head", 3])
    with pytest.raises(ConfigTypeError, match="`modules` must be None"):
        HookManager(model, modules=3)
    with pytest.raises(ConfigError, match="`modules` must name at least one module"):
        HookManager(model, modules=[])


def test_default_collectors_add_magnitude_with_modules_only() -> None:
    assert not any(isinstance(c, hs.Magnitude) for c in HookManager(Net()).collectors)
    assert any(isinstance(c, hs.Magnitude) for c in HookManager(Net(), modules="emit").collectors)
    assert "rms" not in HookManager(Net()).columns


def test_gradient_norm_of_a_module_site_is_that_of_autograd() -> None:
    model = Stack()
    x = torch.randn(3, 4, D)
    with HookManager(model, modules=TupleBlock, alerts=False) as hm:
        outputs: list[torch.Tensor] = []
        handle = model.blocks[1].register_forward_hook(lambda m, a, out: outputs.append(out[2]) or out[2].retain_grad())
        model(x).pow(2).sum().backward()
        handle.remove()
        hm.step()
    want = float(outputs[0].grad.double().norm())
    got = hm.to_dataframe().set_index("layer").loc["blocks.1", "grad_norm"]
    assert got == pytest.approx(want, rel=1e-6)


def test_unit_dim_overrides_module_sites_and_the_producer_tells_conv_channels() -> None:
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    with HookManager(conv, modules=["0", "1"], alerts=False) as hm:
        conv(torch.randn(2, 3, 8, 8))
    assert [s.units for s in hm.sites] == [8, 8]
    with HookManager(conv, modules=["0"], unit_dim={"0": -1}, alerts=False) as hm:
        conv(torch.randn(2, 3, 8, 8))
    assert hm.sites[0].units == 6


def test_activation_module_selected_by_a_pattern_stays_one_activation_site() -> None:
    model = Net()
    with HookManager(model, modules="*", alerts=False) as hm, torch.no_grad():
        model(planted(0))
    kinds = dict(zip(hm.layers, [s.kind for s in hm.sites]))
    assert kinds == {"emit": "output", "act": "relu", "(root)": "output"}


# ---------------------------------------------------------------------------------------------------------------
# entropy


def entropy_rows(p: np.ndarray, axis: int) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(axis=axis)


class Attention(nn.Module):
    """Softmax over hand-built scores ``(B, H, T, T)``: head 0 uniform, head 1 one-hot, head 2 in between."""

    def __init__(self, how: str = "softmax") -> None:
        super().__init__()
        self.how = how
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        if self.how == "module":
            return self.softmax(scores)
        if self.how == "log_softmax":
            return F.log_softmax(scores, dim=-1)
        if self.how == "softmin":
            return F.softmin(-scores, dim=3)
        return F.softmax(scores, -1)


def scores(batch: int = 2, heads: int = 3, t: int = 5) -> torch.Tensor:
    s = torch.zeros(batch, heads, t, t, dtype=torch.float64)
    s[:, 1] = -1e4  # head 1: all the mass on key 0 (exp(-1e4) underflows to 0: entropy exactly 0)
    s[:, 1, :, 0] = 0.0
    s[:, 2] = torch.arange(t, dtype=torch.float64)  # head 2: a geometric distribution
    return s


@pytest.mark.parametrize("how", ["softmax", "module", "log_softmax", "softmin"])
def test_entropy_per_site_and_per_head_from_hand_built_distributions(how: str) -> None:
    model = Attention(how)
    s = scores()
    p = torch.softmax(s, dim=-1).numpy()
    per_row = entropy_rows(p, axis=-1)  # (B, H, T)
    with HookManager(model, [hs.Entropy()], alerts=False) as hm:
        model(s)
        model(s[:1])  # a second call in the step (a micro-batch): rows add up
        hm.step()
    all_rows = np.concatenate([per_row.reshape(-1), per_row[:1].reshape(-1)])
    heads = np.concatenate([per_row, per_row[:1]], axis=0).mean(axis=(0, 2))
    assert heads[0] == pytest.approx(math.log(5)) and heads[1] == 0.0
    row = hm.to_dataframe().iloc[0]
    assert row["entropy"] == pytest.approx(all_rows.mean(), rel=1e-12)
    assert row["entropy_min"] == pytest.approx(heads.min(), abs=1e-12)
    units = hm.unit_frame(row["layer"], "entropy")
    np.testing.assert_allclose(units["entropy"], heads, rtol=1e-12, atol=1e-12)
    assert int(units.nsmallest(1, "entropy")["unit"].iloc[0]) == 1  # the lowest-entropy head, by name


def test_entropy_of_logits_over_the_unit_dim_has_no_per_unit_values() -> None:
    logits = torch.randn(4, 6, 10, dtype=torch.float64)
    model = Attention("softmax")
    with HookManager(model, [hs.Entropy()], alerts=False) as hm:
        model(logits)
    row = hm.to_dataframe().iloc[0]
    want = entropy_rows(torch.softmax(logits, -1).numpy(), -1).mean()
    assert row["entropy"] == pytest.approx(want, rel=1e-12)
    assert math.isnan(row["entropy_min"])  # units (dim -1, 10 of them) lie along the softmax dim


def test_entropy_with_legacy_dim_none() -> None:
    x = torch.randn(3, 4, dtype=torch.float64)

    class Legacy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.softmax(x, dim=None)

    model = Legacy()
    with pytest.warns(UserWarning, match="Implicit dimension"), HookManager(model, [hs.Entropy()], alerts=False) as hm:
        model(x)
    want = entropy_rows(torch.softmax(x, 1).numpy(), 1).mean()  # torch's rule for 2-D: dim 1
    assert hm.to_dataframe()["entropy"].iloc[0] == pytest.approx(want, rel=1e-12)


def test_unit_frame_errors() -> None:
    model = Net()
    with HookManager(model, modules="emit", alerts=False) as hm, torch.no_grad():
        model(planted(0))
    with pytest.raises(ConfigError, match="`stat` 'entropy' is not a per-unit statistic"):
        hm.unit_frame("emit", "entropy")
    with pytest.raises(ConfigError, match="`layer` 'act' \\(relu\\) has no per-unit 'rms'"):
        hm.unit_frame("act", "rms")
    with pytest.raises(ConfigError, match="`layer` 'act' is a relu site"):
        hm.massive_units("act")
    with pytest.raises(ConfigError, match="`step` 7 is not a recorded step"):
        hm.massive_units("emit", step=7)


# ---------------------------------------------------------------------------------------------------------------
# alerts: each rule on a planted case and on a healthy one


def healthy(seed: int, batch: int = 16) -> torch.Tensor:
    return torch.randn(batch, 5, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


MINE = {"massive_units", "massive_units_moved", "kurtosis_rise", "dormant", "entropy_collapse"}


def alerts_of_run(model: nn.Module, inputs: list[torch.Tensor], collectors: list[hs.Collector], **kw: Any) -> list:
    """The alerts of this issue's rules (among the default rules) in a run without gradients."""
    seen: list[hs.Alert] = []
    alerts = hs.Alerts(every=1, callback=seen.append, warn=False, log=False)
    with HookManager(model, collectors, alerts=alerts, **kw) as hm:
        for x in inputs:
            with torch.no_grad():
                model(x)
            hm.step()
    return [a for a in seen if a.rule in MINE]


def rules(seen: list) -> set[tuple[str, str, int]]:
    return {(a.rule, a.layer, a.step) for a in seen}


def test_massive_units_appearing_mid_training_alert() -> None:
    late = healthy(2)
    late[0, 0, MASSIVE] = 5000.0
    seen = alerts_of_run(Net(), [healthy(0), healthy(1), late], [hs.Magnitude()], modules="emit")
    assert ("massive_units", "emit", 2) in rules(seen)
    assert "hm.massive_units(layer)" in next(a.message for a in seen if a.rule == "massive_units")
    # healthy: none; and massive units present from the first check on are not "appearing"
    assert not alerts_of_run(Net(), [healthy(0), healthy(1), healthy(2)], [hs.Magnitude()], modules="emit")
    always = [healthy(i) for i in range(3)]
    for x in always:
        x[0, 0, MASSIVE] = 5000.0
    assert "massive_units" not in {a.rule for a in alerts_of_run(Net(), always, [hs.Magnitude()], modules="emit")}


def massive_in(seed: int, units: tuple[int, ...]) -> torch.Tensor:
    """A healthy output with one huge element in each of ``units`` (a_u = 5000 >= 100 and >= 1000 x the median)."""
    x = healthy(seed)
    for k, u in enumerate(units):
        x[k % x.shape[0], 1, u] = 5000.0
    return x


def test_massive_units_moving_mid_training_alert() -> None:
    # dims 3 and 9 for four steps, then dims 5 and 9: the count stays 2, so only the set tells the move
    inputs = [massive_in(i, (MASSIVE, 9)) for i in range(4)] + [massive_in(i, (5, 9)) for i in range(4, 8)]
    seen = alerts_of_run(Net(), inputs, [hs.Magnitude()], modules="emit")
    assert [(a.rule, a.layer, a.step) for a in seen] == [("massive_units_moved", "emit", 4)]  # once, at the move
    assert "moved from [3, 9] to [5, 9] (units [3] are no longer massive, units [5] are new" in seen[0].message
    assert "sink token" in seen[0].message  # the remedy
    assert seen[0].value == 2.0
    # healthy: the same dims in every step, whatever the rest of the output does; units only added are "appearing"
    # (massive_units), and all of them vanishing for a while is not a move
    stable = [massive_in(i, (MASSIVE, 9)) for i in range(12)]
    assert not alerts_of_run(Net(), stable, [hs.Magnitude()], modules="emit")
    added = [massive_in(0, (MASSIVE,)), massive_in(1, (MASSIVE,)), massive_in(2, (MASSIVE, 9))]
    assert [a.rule for a in alerts_of_run(Net(), added, [hs.Magnitude()], modules="emit")] == ["massive_units"]
    gap = [massive_in(0, (MASSIVE,)), healthy(1), healthy(2), massive_in(3, (MASSIVE,))]
    assert not alerts_of_run(Net(), gap, [hs.Magnitude()], modules="emit")
    # the move is judged against the last set seen, across a gap without massive units too
    gap_moved = [massive_in(0, (MASSIVE,)), healthy(1), massive_in(2, (5,))]
    assert rules(alerts_of_run(Net(), gap_moved, [hs.Magnitude()], modules="emit")) == {
        ("massive_units_moved", "emit", 2)
    }


def test_massive_units_moved_is_judged_at_the_checks_and_on_whole_sets_only() -> None:
    from hookscope.alerts import MassiveUnitsMovedRule
    from hookscope.collectors.magnitude import MASSIVE_SLOTS

    # more units than are recorded: only the largest 8 are known, whose ranking may change: not judged
    many = tuple(range(MASSIVE_SLOTS + 1))
    crowd = [massive_in(i, many) for i in range(2)]
    crowd[1][0, 1, 0] = 9000.0  # unit 0 is now the largest: another top 8, the same 9 units
    seen: list[hs.Alert] = []
    alerts = hs.Alerts([MassiveUnitsMovedRule()], every=1, callback=seen.append, warn=False, log=False)
    # (9 of 16 units massive: the median unit is one of them, so the relative part must be small)
    with HookManager(Net(), [hs.Magnitude(massive_ratio=10.0)], modules="emit", alerts=alerts) as hm:
        for x in crowd:
            with torch.no_grad():
                hm.model(x)
            hm.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (once per process: 9 massive units, the 8 largest recorded)
            assert hm.massive_units("emit", step=0) != hm.massive_units("emit", step=1)
    assert not seen
    # checked every 3 steps: steps 2 and 5 are compared (a move and back between checks is not seen)
    inputs = [massive_in(0, (3,)), massive_in(1, (5,)), massive_in(2, (3,)), massive_in(3, (3,)), massive_in(4, (3,)),
              massive_in(5, (7,))]  # fmt: skip
    seen.clear()
    alerts = hs.Alerts([MassiveUnitsMovedRule()], every=3, callback=seen.append, warn=False, log=False)
    with HookManager(Net(), [hs.Magnitude()], modules="emit", alerts=alerts) as hm:
        for x in inputs:
            with torch.no_grad():
                hm.model(x)
            hm.step()
    assert [(a.layer, a.step) for a in seen] == [("emit", 5)] and "from [3] to [7]" in seen[0].message


def test_massive_units_rules_keep_their_reference_across_a_resume() -> None:
    def run(inputs: list[torch.Tensor], state: dict[str, Any] | None) -> tuple[list[hs.Alert], dict[str, Any]]:
        seen: list[hs.Alert] = []
        model = Net()
        alerts = hs.Alerts(every=1, callback=seen.append, warn=False, log=False)
        hm = HookManager(model, [hs.Magnitude()], modules="emit", alerts=alerts, start_step=0 if state is None else 2)
        if state is not None:
            hm.load_state_dict(state)
        with hm:
            for x in inputs:
                with torch.no_grad():
                    model(x)
                hm.step()
            return [a for a in seen if a.rule in MINE], hm.state_dict()

    first, state = run([massive_in(0, (MASSIVE,)), massive_in(1, (MASSIVE,))], None)
    assert not first
    saved = state["alerts"]["rule_states"]
    assert {"reference": {"emit": [MASSIVE]}} in saved  # plain values, which torch.load(weights_only=True) reads
    assert {"baselines": [["emit", "massive_units", 1.0]]} in saved
    later = [massive_in(2, (5, 9)), massive_in(3, (5, 9))]
    resumed, _ = run(later, state)
    # a move from the saved reference [3], and 2 massive units against the saved baseline of 1
    assert rules(resumed) == {("massive_units_moved", "emit", 2), ("massive_units", "emit", 2)}
    fresh, _ = run(later, None)  # without the state, [5, 9] is where the layer starts: nothing to report
    assert not fresh
    bad = {**state, "alerts": {**state["alerts"], "rule_states": [
        {"reference": {"emit": ["3"]}} if r == {"reference": {"emit": [MASSIVE]}} else r
        for r in state["alerts"]["rule_states"]]}}  # fmt: skip
    target = HookManager(Net(), [hs.Magnitude()], modules="emit")
    with pytest.raises(StateError, match="MassiveUnitsMovedRule state `reference`"):
        target.load_state_dict(bad)
    assert not target.recorder.sites  # checked before anything is loaded


def test_kurtosis_rising_by_two_orders_of_magnitude_alerts() -> None:
    spike = healthy(2)
    spike[3, 2, 4] = 1e4  # one outlier among 1280 elements: the kurtosis goes from ~3 to ~1280
    seen = alerts_of_run(Net(), [healthy(0), healthy(1), spike], [hs.Magnitude()], modules="emit")
    hits = [a for a in seen if a.rule == "kurtosis_rise"]
    assert [(a.layer, a.step) for a in hits] == [("emit", 2)]
    mild = healthy(2)
    mild[3, 2, 4] = 30.0  # a rise by a factor < 100: no alarm
    assert not alerts_of_run(Net(), [healthy(0), healthy(1), mild], [hs.Magnitude()], modules="emit")


def test_dormant_ratio_above_ten_percent_alerts() -> None:
    dormant = healthy(0)
    dormant[..., list(DORMANT)] *= 1e-3  # 2 of 16 units: 12.5%
    seen = alerts_of_run(Net(), [dormant], [hs.Magnitude()], modules="emit")
    assert rules(seen) == {("dormant", "emit", 0)}
    one = healthy(0)
    one[..., 5] *= 1e-3  # 1 of 16: 6.25% < 10%
    assert not alerts_of_run(Net(), [one], [hs.Magnitude()], modules="emit")


def test_attention_head_entropy_collapse_alerts() -> None:
    seen = alerts_of_run(Attention(), [scores()], [hs.Entropy()])
    assert [a.rule for a in seen] == ["entropy_collapse"]
    assert "hm.unit_frame(layer, 'entropy')" in seen[0].message
    uniform = torch.zeros(2, 3, 5, 5, dtype=torch.float64)
    uniform[:, 2] = torch.arange(5, dtype=torch.float64)  # peaked but not collapsed: entropy ~0.45 nats
    assert not alerts_of_run(Attention(), [uniform], [hs.Entropy()])


# ---------------------------------------------------------------------------------------------------------------
# reports: table, CSV, sinks, the command line


def test_table_shows_module_sites_with_their_magnitudes() -> None:
    model = Net()
    x = planted(0)
    x[..., 8:] *= 1e-3  # 8 + 2 of 16 units dormant: highlighted
    with HookManager(model, modules="emit", alerts=False) as hm, torch.no_grad():
        model(x)
    want = reference([x.numpy()])
    text = str(hm.table(ascii=True))
    header = next(line for line in text.splitlines() if "layer" in line)
    assert header.split("|")[-5:-1] == [" rms ", " abs max ", " kurt ", " massive/dormant "]
    emit = next(line for line in text.splitlines() if line.startswith("| emit"))
    cells = [c.strip() for c in emit.split("|")[1:-1]]
    assert cells[1] == "output" and cells[4:7] == ["-", "-", "-"]
    assert cells[8:11] == [f"{want['rms']:.3g}", f"{want['abs_max']:.3g}", f"{want['kurtosis']:.3g}"]
    assert cells[11] == "1/62.5% !"
    relu = next(line for line in text.splitlines() if line.startswith("| act"))
    assert [c.strip() for c in relu.split("|")[1:-1]][8:] == ["-", "-", "-", "-"]
    # without Magnitude values the table keeps its usual columns
    with HookManager(model, alerts=False) as plain, torch.no_grad():
        model(x)
    assert "rms" not in str(plain.table(ascii=True))


def test_table_shows_the_entropy_and_the_lowest_head() -> None:
    model = Attention()
    with HookManager(model, [hs.Entropy()], alerts=False) as hm:
        model(scores())
    line = next(line for line in str(hm.table(ascii=True)).splitlines() if line.startswith("| softmax()"))
    per_row = entropy_rows(torch.softmax(scores(), -1).numpy(), -1)
    assert line.split("|")[-2].strip() == f"{per_row.mean():.3g}/0 !"


def test_csv_sink_callback_sink_and_tensorboard_carry_the_columns(tmp_path: Any) -> None:
    model = Net()
    frames: list[Any] = []
    written: list[tuple[str, float, int]] = []

    class Writer:
        def add_scalar(self, tag: str, value: float, global_step: int) -> None:
            written.append((tag, value, global_step))

        def flush(self) -> None:
            pass

    sinks = [hs.CSVSink(tmp_path / "s.csv", every=1), hs.CallbackSink(frames.append, every=1),
             hs.TensorBoardSink(Writer(), every=1, stats=("rms", "massive_units", "grad_norm"))]  # fmt: skip
    with HookManager(model, modules="emit", alerts=False, sinks=sinks) as hm:
        model(planted(0)).sum().backward()
        hm.step()
        hm.to_csv(tmp_path / "all.csv")
    want = reference([planted(0).numpy()])
    import pandas as pd

    for frame in (pd.read_csv(tmp_path / "s.csv"), pd.read_csv(tmp_path / "all.csv"), frames[0]):
        row = frame[frame["layer"] == "emit"].iloc[0]
        for col in COLUMNS:
            assert row[col] == pytest.approx(want[col], rel=1e-12), col
    tags = {tag: value for tag, value, _ in written}
    assert tags["hookscope/emit/rms"] == pytest.approx(want["rms"], rel=1e-12)
    assert tags["hookscope/emit/massive_units"] == 1.0
    assert "hookscope/act/rms" not in tags  # NaN (not recorded there) is never written


def test_scan_with_modules(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    from hookscope.cli import main

    csv = tmp_path / "scan.csv"
    assert main(["scan", "resnet18", "--input-shape", "2,3,32,32", "--steps", "1", "--modules", "layer[1-4]",
                 "--modules", "fc", "--ascii", "--csv", str(csv)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "massive/dormant" in out
    import pandas as pd

    frame = pd.read_csv(csv)
    outputs = frame[frame["kind"] == "output"]
    assert list(outputs["layer"]) == ["layer1", "layer2", "layer3", "layer4", "fc"]
    assert outputs["rms"].notna().all() and outputs["grad_norm"].notna().all()
    assert main(["show", str(csv), "--ascii"]) == 0  # a CSV with the new columns renders too
    assert "massive/dormant" in capsys.readouterr().out
    assert main(["scan", "resnet18", "--input-shape", "2,3,32,32", "--modules", "blocks.*"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hookscope scan: error: `modules` pattern 'blocks.*' matches no module of ResNet")


def test_a_collector_error_elsewhere_leaves_magnitude_fields_in_place() -> None:
    """A block of no step (what the recorder asks when another collector's close_steps raised) works too."""
    model = Net()
    with HookManager(model, modules="emit", alerts=False) as hm, torch.no_grad():
        model(planted(0))
    collector = next(c for c in hm.collectors if isinstance(c, hs.Magnitude))
    empty = {name: rows[:0] for name, rows in collector.bank.current().items()}
    empty["elements"] = torch.zeros(0, collector.bank.n_sites, dtype=torch.float64)
    fields = collector.close_steps([], empty, commit=False)
    assert "massive_units" in fields and fields["massive_units"].shape == (0, collector.bank.n_sites)


def test_checkpointed_blocks_are_counted_once_and_get_their_gradient() -> None:
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = TupleBlock()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return checkpoint(lambda y: hidden(self.block(y)), x, use_reentrant=False)  # type: ignore[no-any-return]

    model = Checkpointed()
    x = torch.randn(3, D, requires_grad=True)
    outputs: list[torch.Tensor] = []
    plain = copy_of(model)
    plain.block.register_forward_hook(lambda m, a, out: outputs.append(out[2]) or out[2].retain_grad())
    plain.block(x)[2].pow(2).sum().backward()
    with HookManager(model, modules="block", alerts=False) as hm:
        model(x).pow(2).sum().backward()
        hm.step()
    row = hm.to_dataframe().set_index("layer").loc["block"]
    assert row["calls"] == 1
    assert row["grad_norm"] == pytest.approx(float(outputs[0].grad.norm()), rel=1e-6)
    assert row["rms"] == pytest.approx(reference([outputs[0].detach().double().numpy()])["rms"], rel=1e-6)


def copy_of(model: nn.Module) -> Any:
    import copy

    return copy.deepcopy(model)


def test_output_is_a_reserved_kind() -> None:
    from hookscope.activations import MODULE_OUTPUT, get_activation

    assert get_activation("output") is MODULE_OUTPUT  # sites of other ranks are entered by their kind's name
    assert "output" not in [spec.name for spec in hs.list_activations()]
    with pytest.raises(ConfigError, match="'output' is reserved for module sites"):
        hs.register_activation("output", modules=[nn.Identity])
