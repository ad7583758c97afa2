"""Entropy of softmax outputs (attention distributions), per site and per unit (head)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import torch

from hookscope.activations import DISTRIBUTION_KINDS
from hookscope.collectors.base import Collector, SiteState
from hookscope.collectors.units import keep_latest, latest_host, per_unit
from hookscope.sites import Site

__all__ = ["ENTROPY_KINDS", "Entropy", "softmax_dim"]

_F64 = torch.float64
#: The kinds the collector records.
ENTROPY_KINDS = DISTRIBUTION_KINDS
_UNIT_STATES = (("unit_entropy", "last_unit_entropy"), ("unit_rows", "last_unit_rows"))


def softmax_dim(site: Site, ndim: int) -> int:
    """The dimension a softmax-like site normalises: its ``dim`` argument, else torch's legacy rule for
    ``dim=None`` (``F._get_softmax_dim``: 0 for 0-, 1- and 3-D inputs, else 1)."""
    dim = site.dim if site.dim is not None else (0 if ndim in (0, 1, 3) else 1)
    return dim % max(ndim, 1)


class Entropy(Collector):
    """Entropy of the distributions a softmax, softmin or log_softmax site outputs.

    ``entropy`` = mean over the rows of −Σ_j p_j ln p_j, the sum along the softmax ``dim`` (in nats; log_softmax
    outputs are exponentiated first; 0 · ln 0 = 0), over all calls of the site in the step; rows whose entropy is
    not finite (NaN outputs) are left out. Per unit, the rows of unit u are those whose index along the site's
    unit dimension is u (the heads of a ``(B, H, T, T)`` attention: dim 1), and ``entropy_min`` is the lowest
    unit's mean entropy (the most peaked head); ``HookManager.unit_frame(layer, "entropy")`` lists every unit's.
    When the units lie along the softmax dim itself (``(B, T, V)`` logits), no row belongs to one unit and the
    per-unit values are NaN. Sums are float64, each row's entropy is computed in float32 (float64 outputs: in
    float64).

    The default collectors do not include it (it costs two elementwise passes per output on every path). Fused
    kernels (``F.scaled_dot_product_attention``) compute their softmax where no hook sees it: the attention
    must call ``softmax`` itself (Hugging Face: ``attn_implementation="eager"``).

    Example:
        >>> Entropy().columns
        ('entropy', 'entropy_min')
    """

    columns = ("entropy", "entropy_min")
    unit_columns: ClassVar[tuple[str, ...]] = ("entropy",)

    def __init__(self) -> None:
        super().__init__()
        self.add_state("entropy_sum")
        self.add_state("rows")
        self.add_state("unit_entropy", per_unit=True)
        self.add_state("unit_rows", per_unit=True)
        for _, kept in _UNIT_STATES:
            self.add_state(kept, per_unit=True, persistent=True)
        self.add_state("last_step", -math.inf, reduce="max", per_unit=True, persistent=True)

    def applies_to(self, site: Site) -> bool:
        return site.kind in ENTROPY_KINDS

    def update(self, state: SiteState, output: torch.Tensor, site: Site) -> None:
        x = output
        if x.numel() == 0:
            return
        if x.dtype not in (torch.float32, _F64):
            x = x.float()
        dim = softmax_dim(site, x.dim())
        if x.dim() == 0:
            x = x.reshape(1)
        p = x.exp() if site.kind == "log_softmax" else x
        h = torch.special.entr(p).sum(dim=dim)  # one entropy per row
        finite = torch.isfinite(h)
        h = torch.where(finite, h, 0.0)
        state["entropy_sum"].add_(h.sum(dtype=_F64))
        state["rows"].add_(finite.sum(dtype=_F64))
        u = site.unit_dim
        if u is None or u == dim or output.dim() == 0:
            return
        ud = u - 1 if u > dim else u  # the unit dim among the rows' dims
        dims = tuple(d for d in range(h.dim()) if d != ud)
        state["unit_entropy"].add_(per_unit(h, ud, site.units, dims, "sum"))
        state["unit_rows"].add_(per_unit(finite, ud, site.units, dims, "sum"))

    def close_steps(self, steps: list[int], block: Mapping[str, torch.Tensor], commit: bool) -> dict[str, torch.Tensor]:
        bank = self.bank
        entropy, rows = block["unit_entropy"], block["unit_rows"]  # (T, U)
        t = rows.shape[0]
        has = rows > 0
        mean = torch.where(has, entropy / rows, math.inf)
        lowest = torch.full((bank.n_sites, t), math.inf, dtype=_F64, device=rows.device)
        lowest.scatter_reduce_(0, bank.owners()[:, None].expand(-1, t), mean.T, reduce="amin", include_self=True)
        lowest = lowest.T
        if commit:
            keep_latest(bank, block, _UNIT_STATES, has, steps, "last_step")
        return {
            "entropy_sum": block["entropy_sum"],
            "rows": block["rows"],
            "entropy_min": torch.where(torch.isinf(lowest), math.nan, lowest),
        }

    def compute(self, record: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with np.errstate(divide="ignore", invalid="ignore"):
            return {
                "entropy": record["entropy_sum"] / record["rows"],
                "entropy_min": np.asarray(record["entropy_min"], dtype=np.float64),
            }

    def unit_values(self, site: Site, step: int, include_open: bool) -> tuple[int | None, dict[str, np.ndarray]]:
        """Per unit (head): ``entropy``, the mean entropy of its rows at the latest step the site ran in."""
        found, raw = latest_host(
            self.bank, site, include_open, "unit_rows", [name for name, _ in _UNIT_STATES],
            [kept for _, kept in _UNIT_STATES], "last_step", step,
        )  # fmt: skip
        with np.errstate(divide="ignore", invalid="ignore"):
            return found, {"entropy": raw["unit_entropy"] / raw["unit_rows"]}

    def __repr__(self) -> str:
        return "Entropy()"
