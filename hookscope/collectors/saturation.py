"""Saturation of bounded activations."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from hookscope.checks import check_number
from hookscope.collectors.base import Collector, SiteState
from hookscope.numerics import count_dtype
from hookscope.sites import Site

__all__ = ["Saturation"]


class Saturation(Collector):
    """Share of outputs of bounded activations that sit near a bound of their range.

    For an activation with range ``[lo, hi]`` an element is *saturated* when its output is within
    ``eps * (hi - lo)`` of a bound: ``y <= lo + eps * (hi - lo)`` or ``y >= hi - eps * (hi - lo)`` (relu6: the
    upper bound only, its lower bound being the inactive region). ``saturation_rate`` = saturated elements /
    elements over every call of the site in the step. With the default ``eps=0.01``: sigmoid ``y <= 0.01`` or
    ``y >= 0.99``; tanh ``|y| >= 0.98``. The comparison is exact in the output's own dtype (no rounding of the
    threshold). NaN for unbounded activations.

    Args:
        eps: Width of the band at each bound, as a fraction of the range, in (0, 0.5).

    Raises:
        ValueError: ``eps`` outside (0, 0.5).
        TypeError: ``eps`` is not a number.

    Example:
        >>> Saturation(eps=0.05).eps
        0.05
    """

    columns = ("saturation_rate",)

    def __init__(self, eps: float = 0.01) -> None:
        super().__init__()
        self.eps = check_number("eps", eps, low=0.0, high=0.5, high_open=True, meaning="a fraction of the range")
        self.add_state("saturated")

    def applies_to(self, site: Site) -> bool:
        return site.bounds is not None

    def update(self, state: SiteState, output: torch.Tensor, site: Site) -> None:
        assert site.bounds is not None
        lo, hi = site.bounds
        band = self.eps * (hi - lo)
        side = site.spec.saturate
        # y >= hi - band  <=>  y > upper;  y <= lo + band  <=>  y < lower  (exact in the output's dtype)
        upper = site.threshold(hi - band, output.dtype, above=True)
        lower = site.threshold(lo + band, output.dtype, above=False)
        if upper is None or lower is None:  # a dtype without exact thresholds: compare in float64
            output = output.double()
            upper = site.threshold(hi - band, output.dtype, above=True)
            lower = site.threshold(lo + band, output.dtype, above=False)
        assert upper is not None and lower is not None
        dtype = count_dtype(output.numel())
        if side == "both":  # y differs from its clamp to [lower, upper] exactly when it lies outside (lower, upper)
            if lower > upper:  # the bands cover every value
                state["saturated"].add_(output.numel())
                return
            outside = output.clamp(lower, upper)
            torch.sub(output, outside, out=outside)
            state["saturated"].add_(outside.abs_().sign_().sum(dtype=dtype))
            return
        # One band: clamp to [a, b], two adjacent values of the dtype on either side of the threshold. Every
        # element becomes a or b; (clamped - a) is 0 or b - a (a power of two), so the sum is an exact count.
        a: float | None
        b: float | None
        if side == "upper":
            a, b = upper, site.threshold(hi - band, output.dtype, above=False, adjacent=True)
        else:
            a, b = site.threshold(lo + band, output.dtype, above=True, adjacent=True), lower
        assert a is not None and b is not None
        clamped = output.clamp(a, b).sub_(a)  # 0 below the band, b - a inside it (upper band)
        total = clamped.sum(dtype=dtype)
        if side == "upper":
            state["saturated"].add_(total, alpha=1.0 / (b - a))
        else:  # lower band: elements at a are the saturated ones
            state["saturated"].add_(total, alpha=-1.0 / (b - a)).add_(output.numel())

    def compute(self, record: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with np.errstate(divide="ignore", invalid="ignore"):
            return {"saturation_rate": record["saturated"] / record["elements"]}

    def __repr__(self) -> str:
        return f"Saturation(eps={self.eps})"
