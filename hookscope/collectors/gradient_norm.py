"""Norm of the gradient that reaches each activation's output."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from hookscope.collectors.base import Collector, SiteState
from hookscope.sites import Site

__all__ = ["GradientNorm"]


class GradientNorm(Collector):
    """L2 norm of the loss gradient with respect to each site's output.

    ``grad_norm`` at step ``s`` = sqrt(Σ over the backward passes in step ``s`` of ‖∂L/∂y‖²), ``y`` the site's
    output (so k micro-batches of gradient accumulation combine as one step). NaN for steps without a backward
    pass through the site (evaluation, ``torch.no_grad``). Gradients are captured with a tensor hook on the
    output, which also works for in-place activations, and reduced in float32 or wider.

    Example:
        >>> GradientNorm().columns
        ('grad_norm',)
    """

    columns = ("grad_norm",)
    wants_grad = True

    def __init__(self) -> None:
        super().__init__()
        self.add_state("sumsq")

    def update_grad(self, state: SiteState, grad: torch.Tensor, site: Site) -> None:
        norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
        state["sumsq"].addcmul_(norm, norm)  # squared in the state's float64

    def compute(self, record: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        norm = np.sqrt(record["sumsq"])
        return {"grad_norm": np.where(record["backward"] > 0, norm, np.nan)}
