"""The native statistics kernels: bit-exact counts against torch references for every dtype and layout, exact
band thresholds, sums of squares against float64, what they decline, the build, and how the backend is chosen.

Expected values come from torch reductions of boolean masks and float64 sums, never from the kernels. Tests that
need the library skip (saying why) when it is not built; the others run either way.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hookscope.warn
from hookscope import kernels
from hookscope.errors import ConfigError, StateError
from hookscope.kernels import _native, build

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
_BITS = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}

needs_native = pytest.mark.skipif(not kernels.available(), reason=str(kernels.info()["reason"]))


def _isas() -> list[str]:
    lib = kernels._library()
    if lib is None:
        return ["baseline"]
    found = ["baseline"]
    for name in ("avx2", "avx512"):
        if lib.select_isa(name) == name:
            found.append(name)
    lib.select_isa("best")
    return found


@pytest.fixture(params=_isas())
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each instruction set this CPU runs (the baseline code is tested on AVX2 machines too)."""
    lib = kernels._library()
    if lib is None:
        pytest.skip(str(kernels.info()["reason"]))
    assert lib.select_isa(request.param) == request.param
    try:
        yield request.param
    finally:
        lib.select_isa("best")


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget the warnings already given once in this process."""
    monkeypatch.setattr(hookscope.warn, "_seen", set())


# ----------------------------------------------------------------------------------------------------------------
# references


def special_values(dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0, -math.nan], dtype=torch.float32).to(dtype)


def planted(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random values around the thresholds (scale 1), with NaN, infinities and signed zeros planted."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 1.2).to(dtype)
    n = x.numel()
    if n:
        special = special_values(dtype)
        idx = torch.randint(0, n, (min(n, 3 * len(special)),), generator=gen)
        x.view(-1)[idx] = special.repeat(3)[: len(idx)]
    return x


def ref_positive(x: torch.Tensor, unit_dim: int | None) -> torch.Tensor:
    if unit_dim is None:
        return (x > 0).sum().to(torch.float64).reshape(1)
    dims = tuple(i for i in range(x.dim()) if i != unit_dim % x.dim())
    mask = x > 0
    return (mask.sum(dim=dims) if dims else mask).to(torch.float64)


def ref_saturated(x: torch.Tensor, lower: float | None, upper: float | None) -> float:
    if lower is not None and upper is not None and lower > upper:
        return float(x.numel())
    mask = torch.zeros(x.shape, dtype=torch.bool)
    wide = x.double()  # the exact comparison with the threshold as given
    if lower is not None:
        mask |= wide < lower
    if upper is not None:
        mask |= wide > upper
    return float(mask.sum())


def ref_nonfinite(x: torch.Tensor) -> float:
    return float((~torch.isfinite(x)).sum())


def zeros(n: int | tuple[()] = ()) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float64)


def run_output(
    x: torch.Tensor, unit_dim: int | None, lower: float | None, upper: float | None
) -> tuple[bool, torch.Tensor, float, float]:
    units = 1 if unit_dim is None else x.shape[unit_dim]
    # state views inside a larger tensor, as the collectors hold them
    bank = torch.full((units + 7,), 0.5, dtype=torch.float64)
    positive = bank[3 : 3 + units]
    scalars = torch.full((4,), 0.25, dtype=torch.float64)
    ok = kernels.output_stats(
        x,
        unit_dim=unit_dim,
        units=units,
        positive=positive,
        lower=lower,
        upper=upper,
        saturated=scalars[1],
        nonfinite=scalars[2],
    )
    assert bank[:3].eq(0.5).all() and bank[3 + units :].eq(0.5).all(), "wrote outside the view"
    assert scalars[0] == 0.25 and scalars[3] == 0.25, "wrote outside the view"
    return ok, positive - 0.5, float(scalars[1]) - 0.25, float(scalars[2]) - 0.25


# ----------------------------------------------------------------------------------------------------------------
# counts, every dtype and layout

# (name, shape, unit_dim, how the tensor is laid out)
LAYOUTS: list[tuple[str, tuple[int, ...], int | None, str]] = [
    ("nchw", (4, 6, 5, 5), 1, "contiguous"),
    ("nchw-odd", (3, 7, 9, 11), 1, "contiguous"),
    ("nchw-2x2", (16, 960, 2, 2), 1, "contiguous"),
    ("nchw-wide", (2, 70, 65), 1, "contiguous"),
    ("ncl", (7, 3, 5), 1, "contiguous"),
    ("linear", (128, 512), 1, "contiguous"),
    ("linear-narrow", (300, 2), 1, "contiguous"),
    ("linear-small", (5, 3), 1, "contiguous"),
    ("seq-last", (7, 3, 5), 2, "contiguous"),
    ("seq-last-neg", (4, 3, 9), -1, "contiguous"),
    ("unit-dim-0", (6, 4, 3), 0, "contiguous"),
    ("1d", (37,), 0, "contiguous"),
    ("1d-whole", (37,), None, "contiguous"),
    ("0d", (), None, "contiguous"),
    ("whole-4d", (3, 4, 5, 6), None, "contiguous"),
    ("se", (1, 10, 1, 1), 1, "contiguous"),
    ("empty-batch", (0, 5), 1, "contiguous"),
    ("no-units", (3, 0), 1, "contiguous"),
    ("empty-whole", (0, 4, 4), None, "contiguous"),
    ("channels-last", (4, 6, 3, 3), 1, "channels_last"),
    ("channels-last-big", (64, 3, 8, 8), 1, "channels_last"),
    ("channels-last-3d", (2, 5, 3, 4, 3), 1, "channels_last_3d"),
    ("channels-last-whole", (4, 6, 3, 3), None, "channels_last"),
    ("transposed", (9, 12), 1, "transposed"),
    ("sliced", (9, 12), 1, "sliced"),
    ("permuted-whole", (4, 5, 6), None, "permuted"),
]

# over the library's threading threshold (more than 32768 elements: two threads or more)
LARGE: list[tuple[str, tuple[int, ...], int | None, str]] = [
    ("large-nchw", (16, 96, 32, 32), 1, "contiguous"),
    ("large-rows", (4096, 160), 1, "contiguous"),
    ("large-grouped-rows", (70001, 3, 4), 1, "contiguous"),
    ("large-whole", ((1 << 20) + 5,), None, "contiguous"),
    ("large-channels-last", (16, 96, 24, 24), 1, "channels_last"),
]


def make(shape: tuple[int, ...], layout: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    if layout == "transposed":
        return planted(shape[::-1], dtype, seed).t()
    if layout == "sliced":
        return planted((shape[0], 2 * shape[1]), dtype, seed)[:, ::2]
    if layout == "permuted":
        return planted(shape[::-1], dtype, seed).permute(2, 0, 1)
    x = planted(shape, dtype, seed)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


BANDS = [(-0.9, 0.9), (None, 0.98), (0.05, None), (0.5, -0.5), (None, None)]


def in_dtype(t: float | None, dtype: torch.dtype) -> float | None:
    return None if t is None else float(torch.tensor(t, dtype=torch.float64).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("name", "shape", "unit_dim", "layout"), LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_counts_are_bit_exact(
    isa: str, dtype: torch.dtype, name: str, shape: tuple[int, ...], unit_dim: int | None, layout: str
) -> None:
    x = make(shape, layout, dtype)
    for lo, hi in BANDS:
        lower, upper = in_dtype(lo, dtype), in_dtype(hi, dtype)
        ok, positive, saturated, nonfinite = run_output(x, unit_dim, lower, upper)
        assert ok
        assert torch.equal(positive, ref_positive(x, unit_dim).reshape(positive.shape)), (name, lo, hi)
        assert saturated == ref_saturated(x, lower, upper), (name, lo, hi)
        assert nonfinite == ref_nonfinite(x), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("name", "shape", "unit_dim", "layout"), LARGE, ids=[c[0] for c in LARGE])
def test_counts_of_large_tensors_are_bit_exact(
    isa: str, dtype: torch.dtype, name: str, shape: tuple[int, ...], unit_dim: int | None, layout: str
) -> None:
    x = make(shape, layout, dtype, seed=1)
    lower, upper = in_dtype(-0.9, dtype), in_dtype(0.9, dtype)
    ok, positive, saturated, nonfinite = run_output(x, unit_dim, lower, upper)
    assert ok
    assert torch.equal(positive, ref_positive(x, unit_dim).reshape(positive.shape))
    assert saturated == ref_saturated(x, lower, upper)
    assert nonfinite == ref_nonfinite(x)


@needs_native
@pytest.mark.parametrize(("shape", "unit_dim"), [((16, 96, 32, 32), 1), ((70001, 3, 4), 1), ((1 << 20) + 5, None)])
def test_results_do_not_depend_on_the_number_of_threads(shape: Any, unit_dim: int | None) -> None:
    lib = kernels._library()
    assert lib is not None
    x = planted(shape if isinstance(shape, tuple) else (shape,), torch.float32)
    g = x.nan_to_num(0.0, 0.0, 0.0)
    units = 1 if unit_dim is None else x.shape[unit_dim]
    outer = 1 if unit_dim is None else x.shape[0]
    inner = x.numel() // (outer * units)
    results = []
    for threads in (1, 2, 3, 16):
        pos, scal = zeros(units), zeros(4)
        ptr = scal.data_ptr()
        rc = lib.output_stats(x.data_ptr(), 0, outer, units, inner, pos.data_ptr(), ptr, 3, -0.5, 0.5, ptr + 8, threads)
        rc |= lib.grad_stats(g.data_ptr(), 0, g.numel(), ptr + 16, 1.0, None, 0, ptr + 24, threads)
        assert rc == 0
        results.append((pos, scal))
    for pos, scal in results[1:]:
        assert torch.equal(pos, results[0][0]) and torch.equal(scal, results[0][1])  # bit for bit
    pos, scal = results[0]  # and right: against torch references
    assert torch.equal(pos, ref_positive(x, unit_dim).reshape(pos.shape))
    assert float(scal[0]) == ref_saturated(x, -0.5, 0.5) and float(scal[1]) == ref_nonfinite(x)
    assert float(scal[2]) == pytest.approx(float(g.double().pow(2).sum()), rel=1e-6) and float(scal[3]) == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_counts_accumulate_across_calls(isa: str, dtype: torch.dtype) -> None:
    x = planted((8, 5, 3), dtype)
    positive, scalars = zeros(5), zeros(2)
    for _ in range(3):
        assert kernels.output_stats(x, unit_dim=1, units=5, positive=positive, nonfinite=scalars[1])
    assert torch.equal(positive, 3 * ref_positive(x, 1))
    assert float(scalars[1]) == 3 * ref_nonfinite(x)


def test_only_the_requested_outputs_are_computed(isa: str) -> None:
    x = planted((6, 4, 7), torch.float32)
    scalars = zeros(2)
    assert kernels.output_stats(x, unit_dim=1, units=4, nonfinite=scalars[1])
    assert float(scalars[0]) == 0 and float(scalars[1]) == ref_nonfinite(x)
    sat = zeros()
    assert kernels.output_stats(x, unit_dim=1, units=4, saturated=sat)  # no bound: nothing is saturated
    assert float(sat) == 0


# ----------------------------------------------------------------------------------------------------------------
# thresholds: exact at the boundary


def all_values(dtype: torch.dtype) -> torch.Tensor:
    """Every bfloat16 / float16 value (all 65,536 bit patterns: NaN payloads, subnormals, signed zeros)."""
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def neighbours(t: float, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` and the values of the dtype just below and above it (two on each side)."""
    bits = torch.tensor([t], dtype=dtype).view(_BITS[dtype])
    around = bits + torch.tensor([-2, -1, 0, 1, 2], dtype=_BITS[dtype])
    return torch.cat([around.view(dtype), -around.view(dtype), special_values(dtype)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", [0.98, 0.01, 1.0, 6.0, 0.0, 1e-30, 65504.0, 3e38])
def test_band_thresholds_are_exact_at_the_boundary(isa: str, dtype: torch.dtype, t: float) -> None:
    x = neighbours(t, dtype)
    x = torch.cat([x, all_values(dtype)]) if dtype in (torch.bfloat16, torch.float16) else x
    exact = float(torch.tensor(t, dtype=torch.float64).to(dtype))  # a value of the dtype
    for lower, upper in [(None, exact), (exact, None), (-exact, exact), (None, t), (t, None), (-t, t)]:
        _, _, saturated, _ = run_output(x, None, lower, upper)
        assert saturated == ref_saturated(x, lower, upper), (lower, upper)


def test_strict_thresholds_from_numerics_give_the_band(isa: str) -> None:
    """With hookscope.numerics.strict_threshold (what Saturation passes), ``y >= 0.99`` is exact in every dtype."""
    from hookscope.numerics import strict_threshold

    for dtype in DTYPES:
        x = neighbours(0.99, dtype)
        upper = strict_threshold(0.99, dtype, above=True)
        lower = strict_threshold(0.01, dtype, above=False)
        _, _, saturated, _ = run_output(x, None, lower, upper)
        expected = ((x.double() >= 0.99) | (x.double() <= 0.01)).sum()
        assert saturated == float(expected), dtype


def test_relu6_upper_band_only(isa: str) -> None:
    x = torch.tensor([-1.0, 0.0, 5.9, 5.9375, 5.95, 6.0, math.nan, math.inf])
    _, _, saturated, nonfinite = run_output(x, None, None, 5.9375)
    assert saturated == 3.0  # 5.95, 6.0, inf
    assert nonfinite == 2.0


def test_inverted_band_counts_every_element(isa: str) -> None:
    x = torch.tensor([math.nan, 0.0, 1.0, -5.0])
    _, _, saturated, _ = run_output(x, None, 0.6, 0.4)
    assert saturated == 4.0  # like Saturation: the bands cover every value (NaN included)


# ----------------------------------------------------------------------------------------------------------------
# gradients


def ref_sumsq(g: torch.Tensor) -> float:
    return float(g.double().pow(2).sum())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 31, 4097, 100003, (1 << 20) + 7])
def test_sum_of_squares_matches_float64(isa: str, dtype: torch.dtype, n: int) -> None:
    g = torch.randn(n).to(dtype)
    sumsq, nonfinite = zeros(), zeros()
    assert kernels.grad_stats(g, sumsq=sumsq, nonfinite=nonfinite)
    expected = ref_sumsq(g)
    assert float(sumsq) == pytest.approx(expected, rel=1e-6, abs=1e-300)
    assert float(nonfinite) == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradient_nonfinite_counts(isa: str, dtype: torch.dtype) -> None:
    g = planted((3, 4097), dtype)
    sumsq, nonfinite = zeros(), zeros()
    assert kernels.grad_stats(g, sumsq=sumsq, nonfinite=nonfinite)
    assert float(nonfinite) == ref_nonfinite(g)
    assert math.isnan(float(sumsq))  # NaN planted
    finite = g.nan_to_num(0.0, 0.0, 0.0)
    sumsq.zero_()
    assert kernels.grad_stats(finite, sumsq=sumsq)
    assert float(sumsq) == pytest.approx(ref_sumsq(finite), rel=1e-6)


@pytest.mark.parametrize(
    "scale",
    [65536.0, 3.0, torch.tensor(65536.0), torch.tensor([1024.0], dtype=torch.float64), torch.tensor(0.5)],
    ids=["float-65536", "float-3", "tensor-f32", "tensor-f64", "tensor-half-scale"],
)
def test_scaled_sum_of_squares(isa: str, scale: Any) -> None:
    g = torch.randn(5000) * 100
    sumsq = zeros()
    assert kernels.grad_stats(g, sumsq=sumsq, scale=scale)
    s = float(scale)
    assert float(sumsq) == pytest.approx(ref_sumsq(g) / (s * s), rel=1e-6)


def test_gradients_in_other_layouts(isa: str) -> None:
    base = torch.randn(8, 6, 5, 5)
    for g in [base.transpose(0, 1), base.contiguous(memory_format=torch.channels_last), base[:, ::2], base[0, 0]]:
        sumsq = zeros()
        assert kernels.grad_stats(g, sumsq=sumsq)
        assert float(sumsq) == pytest.approx(ref_sumsq(g), rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# prepared calls: one argument record per state buffers and layout, run on new tensors of that layout


def run(call: kernels.Prepared, t: torch.Tensor) -> bool:
    """How the recorder runs a prepared call: after checking the tensor's key."""
    assert call.key == (t.dtype, t.shape, t.stride())
    return bool(call.fn(t.data_ptr(), call.address) == 0)


# layouts whose tensors the kernels read in place (the others are copied first: no prepared call for them)
IN_PLACE = {"transposed": False, "sliced": False}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("name", "shape", "unit_dim", "layout"), LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_a_prepared_output_call_counts_each_new_tensor(
    isa: str, dtype: torch.dtype, name: str, shape: tuple[int, ...], unit_dim: int | None, layout: str
) -> None:
    first, second = make(shape, layout, dtype, seed=0), make(shape, layout, dtype, seed=5)
    units = 1 if unit_dim is None else shape[unit_dim]
    lower, upper = in_dtype(-0.9, dtype), in_dtype(0.9, dtype)
    bank = torch.full((units + 7,), 0.5, dtype=torch.float64)
    scalars = torch.full((4,), 0.25, dtype=torch.float64)
    positive, saturated, nonfinite = bank[3 : 3 + units], scalars[1], scalars[2]
    call = kernels.prepare_output(
        first, unit_dim=unit_dim, units=units, positive=positive, lower=lower, upper=upper, saturated=saturated,
        nonfinite=nonfinite,
    )  # fmt: skip
    if not IN_PLACE.get(layout, True):
        assert call is None  # read through a copy: the plain call
        return
    assert call is not None
    assert run(call, first) and run(call, second)
    assert bank[:3].eq(0.5).all() and bank[3 + units :].eq(0.5).all(), "wrote outside the view"
    assert scalars[0] == 0.25 and scalars[3] == 0.25, "wrote outside the view"
    want = ref_positive(first, unit_dim) + ref_positive(second, unit_dim)
    assert torch.equal(positive - 0.5, want.reshape(positive.shape)), name
    assert float(saturated) - 0.25 == ref_saturated(first, lower, upper) + ref_saturated(second, lower, upper)
    assert float(nonfinite) - 0.25 == ref_nonfinite(first) + ref_nonfinite(second)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [None, 3.0], ids=["unscaled", "scaled"])
def test_a_prepared_gradient_call_sums_each_new_gradient(isa: str, dtype: torch.dtype, scale: float | None) -> None:
    base = [planted((8, 6, 5, 5), dtype, seed).nan_to_num(0.0, 0.0, 0.0) for seed in (1, 2)]
    layouts = {
        "contiguous": [b for b in base],
        "channels_last": [b.contiguous(memory_format=torch.channels_last) for b in base],
        "transposed": [b.transpose(0, 1) for b in base],  # dense: read in place
        "large": [planted(((1 << 17) + 3,), dtype, seed).nan_to_num(0.0, 0.0, 0.0) for seed in (3, 4)],
    }
    s = 1.0 if scale is None else scale
    for name, (g1, g2) in layouts.items():
        sumsq, nonfinite = zeros(), zeros()
        call = kernels.prepare_grad(g1, sumsq=sumsq, scale=scale, nonfinite=nonfinite)
        assert call is not None, name
        assert run(call, g1) and run(call, g2)
        want = (ref_sumsq(g1) + ref_sumsq(g2)) / (s * s)
        assert float(sumsq) == pytest.approx(want, rel=1e-6), name
        assert float(nonfinite) == 0.0
    g = torch.randn(8, 6)
    assert kernels.prepare_grad(g[:, ::2], sumsq=zeros()) is None  # a copy first: the plain call
    assert kernels.prepare_grad(g, sumsq=zeros(), scale=torch.tensor(2.0)) is None  # a scale tensor: read each call


@needs_native
def test_prepared_calls_decline_what_the_plain_ones_decline_and_check_the_same() -> None:
    positive, scalars = zeros(4), zeros(3)
    for x in [
        torch.ones(3, 4, dtype=torch.int32),
        torch.ones(3, 4, device="meta"),
        torch.ones(3, 4).to_sparse(),
        torch.nn.Parameter(torch.ones(3, 4)),
    ]:
        assert kernels.prepare_output(x, unit_dim=1, units=4, positive=positive) is None
        assert kernels.prepare_grad(x, sumsq=scalars[0]) is None
    x = torch.randn(3, 4)
    with pytest.raises(ConfigError, match=r"`positive`.*float64.*4 element"):
        kernels.prepare_output(x, unit_dim=1, units=4, positive=torch.zeros(4))
    with pytest.raises(ConfigError, match=r"`sumsq`"):
        kernels.prepare_grad(x, sumsq=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ConfigError, match=r"`unit_dim` 1 and `units` 5"):
        kernels.prepare_output(x, unit_dim=1, units=5, positive=zeros(5))


@needs_native
def test_sum_of_squares_is_more_accurate_than_torch_dot() -> None:
    """8M float32 values: blocked float lanes + float64 across blocks vs one BLAS dot in float32."""
    g = torch.randn(8 * 2**20, generator=torch.Generator().manual_seed(3))
    exact = ref_sumsq(g)
    sumsq = zeros()
    assert kernels.grad_stats(g, sumsq=sumsq)
    ours = abs(float(sumsq) - exact) / exact
    dot = abs(float(torch.dot(g, g)) - exact) / exact
    assert ours < 1e-6
    assert ours <= dot


# ----------------------------------------------------------------------------------------------------------------
# declining, and caller mistakes


class Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@needs_native
def test_a_call_dispatches_no_aten_operation() -> None:
    x = torch.randn(16, 8, 4, 4).relu()
    cl = x.contiguous(memory_format=torch.channels_last)
    bank, scalars = zeros(20), zeros(4)
    positive, sat, nf, sumsq = bank[4:12], scalars[0], scalars[1], scalars[2]
    scale = torch.tensor(65536.0)
    permuted, transposed = x.permute(3, 0, 2, 1), x.transpose(0, 1)
    with Counter() as counter:
        for t in (x, cl):
            assert kernels.output_stats(
                t, unit_dim=1, units=8, positive=positive, lower=0.1, upper=0.9, saturated=sat, nonfinite=nf
            )
            assert kernels.grad_stats(t, sumsq=sumsq, scale=scale, nonfinite=nf)
        assert kernels.output_stats(permuted, unit_dim=None, units=1, nonfinite=nf)  # dense: read in place
        assert kernels.grad_stats(transposed, sumsq=sumsq)
        out_call = kernels.prepare_output(x, unit_dim=1, units=8, positive=positive, saturated=sat, upper=0.9)
        grad_call = kernels.prepare_grad(cl, sumsq=sumsq, nonfinite=nf)
        assert out_call is not None and grad_call is not None
        assert run(out_call, x) and run(grad_call, cl)
    assert counter.ops == []


def test_declined_tensors_return_false_and_write_nothing() -> None:
    positive, scalars = zeros(4), zeros(3)
    cases = [
        torch.ones(3, 4, dtype=torch.int32),
        torch.ones(3, 4, dtype=torch.complex64),
        torch.ones(3, 4, dtype=torch.bool),
        torch.ones(3, 4, device="meta"),
        torch.ones(3, 4).to_sparse(),
        torch.nn.Parameter(torch.ones(3, 4)),  # a tensor subclass
    ]
    for x in cases:
        assert not kernels.output_stats(x, unit_dim=1, units=4, positive=positive, nonfinite=scalars[0]), x.dtype
        assert not kernels.grad_stats(x, sumsq=scalars[1], nonfinite=scalars[2])
    assert not kernels.grad_stats(torch.ones(4), sumsq=scalars[1], scale=torch.ones((), device="meta"))
    assert not kernels.grad_stats(torch.ones(4), sumsq=scalars[1], scale=torch.ones(2))
    assert positive.eq(0).all() and scalars.eq(0).all()


def test_without_the_library_every_call_declines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_loaded", True)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_reason", "not built (test)")
    monkeypatch.setattr(kernels, "_out_prepared", None)
    monkeypatch.setattr(kernels, "_grad_prepared", None)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    positive = zeros(4)
    assert not kernels.available()
    assert not kernels.output_stats(torch.ones(3, 4), unit_dim=1, units=4, positive=positive)
    assert not kernels.grad_stats(torch.ones(3, 4), sumsq=zeros())
    assert kernels.prepare_output(torch.ones(3, 4), unit_dim=1, units=4, positive=positive) is None
    assert kernels.prepare_grad(torch.ones(3, 4), sumsq=zeros()) is None
    assert positive.eq(0).all()
    assert kernels.backend() == "aten"
    info = kernels.info()
    assert info["library"] is None and info["isa"] is None and "not built (test)" in info["reason"]
    with pytest.raises(StateError, match="not built"), kernels.forced("native"):
        pass


@needs_native
def test_bad_state_tensors_raise_naming_the_argument() -> None:
    x = torch.randn(3, 4)
    with pytest.raises(ConfigError, match=r"`positive`.*float64.*4 element"):
        kernels.output_stats(x, unit_dim=1, units=4, positive=torch.zeros(4))
    with pytest.raises(ConfigError, match="`positive`"):
        kernels.output_stats(x, unit_dim=1, units=4, positive=zeros(5))
    with pytest.raises(ConfigError, match="`positive`"):
        kernels.output_stats(x, unit_dim=1, units=4, positive=zeros(8)[::2])
    with pytest.raises(ConfigError, match="`saturated`"):
        kernels.output_stats(x, unit_dim=1, units=4, saturated=zeros(2), upper=0.5)
    with pytest.raises(ConfigError, match="`nonfinite`"):
        kernels.grad_stats(x, nonfinite=torch.zeros(()))
    with pytest.raises(ConfigError, match="`sumsq`"):
        kernels.grad_stats(x, sumsq=zeros(3))
    with pytest.raises(ConfigError, match="`unit_dim` 2 and `units` 4"):
        kernels.output_stats(x, unit_dim=2, units=4, positive=zeros(4))
    with pytest.raises(ConfigError, match="`unit_dim` 1 and `units` 5"):
        kernels.output_stats(x, unit_dim=1, units=5, positive=zeros(5))
    with pytest.raises(ConfigError, match="`units` must be 1"):
        kernels.output_stats(x, unit_dim=None, units=4, positive=zeros(4))


# ----------------------------------------------------------------------------------------------------------------
# choosing the backend


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != kernels.ENV_VAR}
    environ.update(env)
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=environ)


CHOICE = """
import sys, torch
from hookscope import kernels
print("loaded at import:", kernels._loaded, file=sys.stderr, flush=True)  # nothing loaded or said at import
b = kernels.select()
print(kernels.backend(), b.name, kernels.info()["reason"])
x = torch.ones(2, 3)
for _ in range(3):
    b.output_stats(x, unit_dim=1, units=3)
    b.grad_stats(x)
"""


def test_env_aten_forces_aten_and_says_so_once() -> None:
    proc = run_python(CHOICE, HOOKSCOPE_KERNELS="aten")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:2] == ["aten", "aten"]
    assert "HOOKSCOPE_KERNELS=aten" in proc.stdout
    before, after = proc.stderr.split("loaded at import: False\n")
    assert "Warning" not in before  # nothing said at import
    assert after.count("HookscopeWarning") == 1  # said once, at the first CPU tensor
    assert "use ATen operations" in after and "HOOKSCOPE_KERNELS=aten" in after


def test_env_with_another_value_warns_and_uses_aten(monkeypatch: pytest.MonkeyPatch, fresh_warnings: None) -> None:
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    with pytest.warns(hookscope.warn.HookscopeWarning, match=r"HOOKSCOPE_KERNELS='fast'.*'native', 'aten'"):
        assert kernels.backend() == "aten"
    b = kernels.select()
    assert b.name == "aten" and b.reason is not None and "'fast'" in b.reason


def test_env_unset_or_native_uses_the_kernels_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in (None, "native", " Native "):
        if value is None:
            monkeypatch.delenv(kernels.ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(kernels.ENV_VAR, value)
        expected = "native" if kernels.available() else "aten"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert kernels.backend() == expected
            assert kernels.select().name == expected
    monkeypatch.setenv(kernels.ENV_VAR, "ATEN")
    assert kernels.backend() == "aten"


def test_aten_backend_says_why_once_and_only_for_cpu_tensors(fresh_warnings: None) -> None:
    b = kernels.Backend("aten", "no library (test)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not b.output_stats(torch.ones(2, device="meta"), unit_dim=0, units=2)
        assert not caught  # the kernels would not have handled it anyway
        assert not b.output_stats(torch.ones(2), unit_dim=0, units=2)
        assert not b.grad_stats(torch.ones(2))
    assert len(caught) == 1 and "no library (test)" in str(caught[0].message)
    forced = kernels.Backend("aten", None)  # chosen with forced("aten"): nothing to say
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not forced.output_stats(torch.ones(2), unit_dim=0, units=2)
    assert not caught


def test_forced_validates_its_name() -> None:
    with pytest.raises(ConfigError, match="`name` must be one of 'native', 'aten'; got 'ATen'"), kernels.forced("ATen"):
        pass
    with pytest.raises(TypeError, match="`name` must be a str"), kernels.forced(None):  # type: ignore[arg-type]
        pass


def test_forced_aten_nests_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    before = kernels.backend()
    with kernels.forced("aten"):
        assert kernels.backend() == "aten"
        assert kernels.select().name == "aten" and kernels.select().reason is None
        assert kernels.info()["reason"] == "forced('aten')"
        if kernels.available():
            with kernels.forced("native"):
                assert kernels.backend() == "native"
                assert kernels.select().output_stats is kernels.output_stats
            assert kernels.backend() == "aten"
    assert kernels.backend() == before


def test_info_describes_the_library() -> None:
    info = kernels.info()
    assert set(info) == {"backend", "library", "isa", "reason", "threads"}
    if kernels.available():
        assert info["isa"] in ("avx512", "avx2", "baseline") and Path(info["library"]).name == build.LIBRARY_NAME
        assert info["threads"] >= 1
    else:
        assert info["library"] is None and info["reason"]


# ----------------------------------------------------------------------------------------------------------------
# the build


def _have_compiler() -> bool:
    return any(shutil.which(c) for c in ("cc", "gcc", "clang"))


def test_the_library_builds_and_loads_or_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("HOOKSCOPE_NO_KERNELS", raising=False)
    if not _have_compiler() or sys.platform == "win32":
        with pytest.warns(build.BuildWarning):
            assert build.build(tmp_path) is None
        assert not kernels.available() or kernels.info()["library"]
        return
    path = build.build(tmp_path)
    assert path == tmp_path / build.LIBRARY_NAME and path.is_file()
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left
    native, reason = _native.load(path)
    assert native is not None, reason
    assert native.isa() in ("avx512", "avx2", "baseline")
    x = torch.tensor([[1.0, -1.0], [math.nan, 2.0]])
    positive = zeros(2)
    rc = native.output_stats(x.data_ptr(), 0, 2, 2, 1, positive.data_ptr(), None, 0, 0.0, 0.0, None, 1)
    assert rc == 0 and positive.tolist() == [1.0, 1.0]
    # a library in the package must be usable (not built from older sources); without one, hookscope uses ATen
    if _native.LIBRARY_PATH.exists():
        assert kernels.available(), kernels.info()["reason"]


def test_a_missing_compiler_is_a_warning_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.warns(build.BuildWarning, match="could not be compiled"):
        assert build.build(tmp_path) is None
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("HOOKSCOPE_NO_KERNELS", "1")
    with pytest.warns(build.BuildWarning, match="HOOKSCOPE_NO_KERNELS"):
        assert build.build(tmp_path) is None


def test_a_library_from_other_sources_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not kernels.available():
        pytest.skip(str(kernels.info()["reason"]))
    lib = tmp_path / build.LIBRARY_NAME
    shutil.copy(_native.LIBRARY_PATH, lib)
    sources = tmp_path / "src"
    sources.mkdir()
    for p in build.SOURCE_DIR.iterdir():
        shutil.copy(p, sources / p.name)
    (sources / "hookscope_kernels.c").write_text((sources / "hookscope_kernels.c").read_text() + "\n/* edited */\n")
    assert build.source_hash(sources) != build.source_hash()
    native, reason = _native.load(lib)
    assert native is not None  # same sources as the package's
    monkeypatch.setattr(_native, "SOURCE_DIR", sources)
    native, reason = _native.load(lib)
    assert native is None and reason is not None and "rebuild" in reason


def test_a_missing_library_says_how_to_build_it(tmp_path: Path) -> None:
    native, reason = _native.load(tmp_path / build.LIBRARY_NAME)
    assert native is None and reason is not None
    assert "was not built" in reason and "python -m hookscope.kernels" in reason


@pytest.mark.skipif(not _have_compiler(), reason="no C compiler")
def test_the_baseline_builds_without_the_x86_dispatch(tmp_path: Path) -> None:
    """What aarch64 (and any non-x86 machine) compiles: the baseline code only, warning-free."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    assert cc is not None
    out = tmp_path / build.LIBRARY_NAME
    source = build.SOURCE_DIR / "hookscope_kernels.c"
    flags = ["-O1", "-std=c11", "-fPIC", "-shared", "-DHS_NO_DISPATCH", "-Wall", "-Wextra", "-Werror"]
    digest = f'-DHS_SOURCE_HASH="{build.source_hash()}"'
    proc = subprocess.run([cc, *flags, digest, str(source), "-o", str(out), "-lm"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    native, reason = _native.load(out)
    assert native is not None, reason
    assert native.isa() == "baseline" and native.select_isa("avx2") == "baseline"
    x = torch.tensor([0.5, -1.0, math.inf, math.nan, 2.0], dtype=torch.bfloat16)
    scalars = zeros(2)
    ptr = scalars.data_ptr()
    assert native.output_stats(x.data_ptr(), 2, 1, 1, 5, None, ptr, 2, 0.0, 1.0, ptr + 8, 1) == 0
    assert scalars.tolist() == [2.0, 2.0]


def test_a_nan_bound_counts_nothing(isa: str) -> None:
    x = torch.tensor([-2.0, 0.0, 2.0, math.nan])
    _, _, saturated, _ = run_output(x, None, math.nan, 1.0)
    assert saturated == 1.0  # only x > 1
    _, _, saturated, _ = run_output(x, None, math.nan, math.nan)
    assert saturated == 0.0
