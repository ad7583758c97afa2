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

    def band(self, site: Site, dtype: torch.dtype) -> tuple[float | None, float | None]:
        """``(lower, upper)`` of ``dtype``: ``y <= lo + eps*(hi-lo)`` exactly when ``y < lower``, ``y >= hi -
        eps*(hi-lo)`` exactly when ``y > upper`` (``None`` for a bound that does not count, and both for a dtype
        without exact thresholds, compared in float64)."""
        assert site.bounds is not None
        lo, hi = site.bounds
        width = self.eps * (hi - lo)
        side = site.spec.saturate
        upper = site.threshold(hi - width, dtype, above=True) if side != "lower" else None
        lower = site.threshold(lo + width, dtype, above=False) if side != "upper" else None
        return lower, upper

    def update(self, state: SiteState, output: torch.Tensor, site: Site) -> None:
        lower, upper = self.band(site, output.dtype)
        if lower is None and upper is None:  # a dtype without exact thresholds: compare in float64
            output = output.double()
            lower, upper = self.band(site, output.dtype)
        if lower is not None and upper is not None and lower > upper:  # the bands cover every value
            state["saturated"].add_(output.numel())
            return
        # 1 where the output lies in a band, else 0 (NaN too), written as floats by the comparisons themselves:
        # exact counts, several times faster to sum than a boolean mask
        dtype = count_dtype(output.numel())
        inside = torch.empty(output.shape, dtype=dtype, device=output.device)
        if upper is not None:
            torch.gt(output, upper, out=inside)
            if lower is not None:
                inside.add_(torch.lt(output, lower))
        else:
            assert lower is not None
            torch.lt(output, lower, out=inside)
        state["saturated"].add_(inside.sum(dtype=dtype))

    def fused_output(self, site: Site) -> Mapping[str, str] | None:
        return {"saturated": "saturated"}

    def compute(self, record: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with np.errstate(divide="ignore", invalid="ignore"):
            return {"saturation_rate": record["saturated"] / record["elements"]}

    def __repr__(self) -> str:
        return f"Saturation(eps={self.eps})"
