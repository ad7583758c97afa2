"""Non-finite values (NaN, +Inf, -Inf) in activations and their gradients."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from hookscope.collectors.base import Collector, SiteState
from hookscope.numerics import count_dtype
from hookscope.sites import Site

__all__ = ["NonFinite", "count_nonfinite"]


def count_nonfinite(x: torch.Tensor) -> torch.Tensor:
    """Number of NaN/Inf elements, as an exact float reduction: ``x - x`` is 0 for finite values, NaN otherwise."""
    dtype = count_dtype(x.numel())
    return x.sub(x).nan_to_num_(nan=1.0, posinf=1.0, neginf=1.0).sum(dtype=dtype)


class NonFinite(Collector):
    """Counts of non-finite elements (NaN, +Inf, -Inf) per step.

    ``nonfinite`` = non-finite output elements in the step (all calls); ``grad_nonfinite`` = non-finite elements
    of the gradients w.r.t. the output (all backward passes; NaN for steps without backward). Costs about two
    elementwise passes per output and per gradient.

    Example:
        >>> NonFinite().columns
        ('nonfinite', 'grad_nonfinite')
    """

    columns = ("nonfinite", "grad_nonfinite")
    wants_grad = True

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nonfinite_out")
        self.add_state("nonfinite_grad")

    def update(self, state: SiteState, output: torch.Tensor, site: Site) -> None:
        state["nonfinite_out"].add_(count_nonfinite(output))

    def update_grad(self, state: SiteState, grad: torch.Tensor, site: Site) -> None:
        state["nonfinite_grad"].add_(count_nonfinite(grad))

    def fused_output(self, site: Site) -> Mapping[str, str] | None:
        return {"nonfinite": "nonfinite_out"}

    def fused_gradient(self, site: Site) -> Mapping[str, str] | None:
        return {"nonfinite": "nonfinite_grad"}

    def compute(self, record: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            "nonfinite": np.asarray(record["nonfinite_out"], dtype=np.float64),
            "grad_nonfinite": np.where(record["backward"] > 0, record["nonfinite_grad"], np.nan),
        }
