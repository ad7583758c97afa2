"""The magnitude pass of the native kernels against the ATen formulation (``Magnitude.update``, the counts of
``DeadReLU`` / ``Saturation`` / ``NonFinite``) and against float64 first principles: dtypes, layouts, NaN/inf,
bands, threads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_kernels import isa  # noqa: F401  (the fixture)

from hookscope import kernels
from hookscope.activations import MODULE_OUTPUT
from hookscope.collectors.magnitude import Magnitude
from hookscope.sites import Site

# every test under each instruction set this CPU runs (the magnitude pass has its own AVX2 code)
pytestmark = [pytest.mark.skipif(not kernels.available(), reason="native kernels not built"),
              pytest.mark.usefixtures("isa")]  # fmt: skip

PER_UNIT = ("count", "abs_sum", "sq_sum", "abs_max")
PER_SITE = ("sum", "quad_sum", "zeros")


def site_for(shape: tuple[int, ...], unit_dim: int | None) -> Site:
    site = Site(0, "x", "x", 0, MODULE_OUTPUT)
    site.bind_shape(shape, unit_dim)
    return site


def states(units: int) -> dict[str, torch.Tensor]:
    out = {name: torch.zeros(units, dtype=torch.float64) for name in PER_UNIT}
    out.update({name: torch.zeros((), dtype=torch.float64) for name in PER_SITE})
    return out


def aten(x: torch.Tensor, site: Site) -> dict[str, torch.Tensor]:
    state = states(site.units)
    Magnitude().update(state, x, site)  # type: ignore[arg-type]
    return state


def native(x: torch.Tensor, site: Site, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    state = states(site.units)
    assert kernels.output_stats(x, unit_dim=site.unit_dim, units=site.units, **state, **extra)
    return state


def sample(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    flat = x.view(-1)
    flat[::7] = 0.0
    flat[5] = math.nan
    flat[11] = math.inf
    flat[13] = -math.inf
    flat[17] = 250.0
    return x.to(dtype)


LAYOUTS = [
    ((4, 6, 16), -1, "contiguous"),  # unit-last rows
    ((4, 16, 5, 5), 1, "contiguous"),  # runs of 25 per unit
    ((4, 16, 5, 5), 1, "channels_last"),
    ((3, 7, 16), None, "contiguous"),  # one unit
    ((6, 16), 1, "transposed"),  # non-contiguous: copied first
    ((40000, 8), -1, "contiguous"),  # large: several threads
    ((70, 3, 300), -1, "contiguous"),  # units in tiles of 8 (the last one partial), rows in blocks
    ((3, 13, 41), 1, "contiguous"),  # runs of 41: full vectors and a partial one
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("shape", "unit_dim", "layout"), LAYOUTS, ids=[f"{s}-{lay}" for s, _, lay in LAYOUTS])
def test_magnitude_pass_equals_the_aten_formulation(
    dtype: torch.dtype, shape: tuple[int, ...], unit_dim: int | None, layout: str
) -> None:
    x = sample(shape, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = sample(shape[::-1], dtype).T
    site = site_for(tuple(x.shape), unit_dim)
    want, got = aten(x, site), native(x, site)
    for name in PER_UNIT + PER_SITE:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=0, msg=name)
    # and first principles, in float64, on the values the compute type sees (finite elements only)
    v = x.float().double() if dtype != torch.float64 else x.clone()
    finite = torch.isfinite(v)
    v = torch.where(finite, v, 0.0)
    assert float(got["count"].sum()) == float(finite.sum()) == x.numel() - 3
    assert float(got["zeros"]) == float(((v == 0) & finite).sum())
    assert float(got["abs_max"].max()) == 250.0


@pytest.mark.parametrize("shape", [(8, 16), (9, 13), (3, 13, 17)])
def test_positive_saturated_and_nonfinite_come_from_the_same_pass(shape: tuple[int, ...]) -> None:
    x = sample(shape, torch.float32)
    site = site_for(tuple(x.shape), 1)
    units = shape[1]
    extra = {"positive": torch.zeros(units, dtype=torch.float64), "saturated": torch.zeros((), dtype=torch.float64),
             "nonfinite": torch.zeros((), dtype=torch.float64)}  # fmt: skip
    native(x, site, lower=-1.0, upper=2.0, **extra)
    assert extra["positive"].tolist() == (x > 0).sum(dim=[d for d in range(x.dim()) if d != 1]).double().tolist()
    assert float(extra["saturated"]) == float(((x < -1.0) | (x > 2.0)).sum())
    assert float(extra["nonfinite"]) == 3.0
    every = torch.zeros((), dtype=torch.float64)
    native(x, site, lower=1.0, upper=-1.0, saturated=every)  # bands that cover every value
    assert float(every) == x.numel()


def test_results_do_not_depend_on_the_number_of_threads() -> None:
    x = sample((30000, 64), torch.float32, seed=3)
    site = site_for(tuple(x.shape), -1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        kernels._load()
        one = native(x, site)
        torch.set_num_threads(2)
        two = native(x, site)
    finally:
        torch.set_num_threads(threads)
    for name in PER_UNIT + PER_SITE:
        assert torch.equal(one[name], two[name]), name


def test_a_prepared_magnitude_call_adds_like_a_plain_one() -> None:
    x = sample((5, 16), torch.float64)
    site = site_for(tuple(x.shape), 1)
    state = states(16)
    call = kernels.prepare_output(x, unit_dim=1, units=16, **state)
    assert call is not None
    for _ in range(2):
        assert call.fn(x.data_ptr(), call.address) == 0
    plain = native(x, site)
    for name in PER_UNIT + PER_SITE:
        expected = plain[name] if name == "abs_max" else 2 * plain[name]
        torch.testing.assert_close(state[name], expected, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="`count` must be a contiguous float64 CPU tensor of 16"):
        kernels.output_stats(x, unit_dim=1, units=16, count=torch.zeros(3, dtype=torch.float64))


def test_the_reference_in_numpy_agrees_for_float64() -> None:
    x = sample((6, 16), torch.float64, seed=5)
    got = native(x, site_for(tuple(x.shape), 1))
    v = x.numpy()
    v = np.where(np.isfinite(v), v, 0.0)
    np.testing.assert_allclose(got["sq_sum"].numpy(), (v * v).sum(axis=0), rtol=1e-14)
    assert float(got["quad_sum"]) == pytest.approx(float((v**4).sum()), rel=1e-14)


def test_module_sites_take_the_magnitude_pass_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.nn as nn

    import hookscope as hs

    def refuse(*args: object) -> None:
        raise AssertionError("the ATen update ran: the magnitude pass was not taken")

    monkeypatch.setattr(Magnitude, "update", refuse)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU())
    collectors = [hs.Magnitude(activations=True), hs.DeadReLU(), hs.NonFinite()]
    with kernels.forced("native"), hs.HookManager(model, collectors, modules="0", alerts=False) as hm:
        for _ in range(3):  # the first call prepares the pass, the next ones reuse it
            with torch.no_grad():
                model(torch.randn(8, 4))
            hm.step()
    frame = hm.to_dataframe()
    assert frame["rms"].notna().all() and (frame["nonfinite"] == 0).all()
    assert frame[frame["layer"] == "1"]["inactive_fraction"].notna().all()
