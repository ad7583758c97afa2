"""Per-unit helpers shared by the collectors that report per-unit values (``Magnitude``, ``Entropy``): sums within
each unit of a site, and the per-unit values of the latest step in which each site ran, kept on the device."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from hookscope.collectors.base import StateBank, host_to_device
from hookscope.sites import Site

__all__ = ["keep_latest", "latest_host", "per_unit"]

_F64 = torch.float64


def per_unit(x: torch.Tensor, unit_dim: int | None, units: int, reduce_dims: tuple[int, ...], op: str) -> torch.Tensor:
    """``op`` (``"sum"`` in float64, or ``"amax"``) of ``x`` within each unit: ``units`` values.

    ``unit_dim`` and ``reduce_dims`` are those of the site (``x`` has its output's shape, or the output's shape
    without one dimension, with the site's dims renumbered by the caller)."""
    if not reduce_dims:  # one element per unit (a 1-D output), or a 0-D output (one unit)
        flat = x.reshape(units)
        return flat.to(_F64) if op == "sum" else flat
    if op == "sum":
        return x.sum(dim=reduce_dims, dtype=_F64).reshape(units)
    return x.amax(dim=reduce_dims).reshape(units)


def keep_latest(
    bank: StateBank, block: Mapping[str, torch.Tensor], pairs: Sequence[tuple[str, str]], present: torch.Tensor,
    steps: Sequence[int], step_state: str,
) -> None:  # fmt: skip
    """Copy, for each unit, its values of the latest step of the block in which it had data (``present``, ``(T,
    U)`` bool) from the per-step states into persistent ones (``pairs``: (per-step, persistent) names), and that
    step's number into ``step_state``; units without data in the block keep what they had."""
    t = present.shape[0]
    if t == 0 or present.shape[1] == 0:
        return
    order = torch.arange(1, t + 1, dtype=_F64, device=present.device)[:, None]
    latest = torch.where(present, order, 0.0).amax(dim=0)  # (U,): 1 + row of the latest step with data, 0: none
    seen = latest > 0
    row = (latest - 1).clamp_min_(0).long()[None]
    for step_name, kept in pairs:
        target = bank.unit(kept)
        target.copy_(torch.where(seen, block[step_name].gather(0, row)[0].to(target.dtype), target))
    numbers = host_to_device(torch.tensor(list(steps), dtype=_F64), present.device)  # no wait for the device
    target = bank.unit(step_state)
    target.copy_(torch.where(seen, numbers[row[0]], target))


def latest_host(
    bank: StateBank, site: Site, include_open: bool, present: str, open_names: Sequence[str],
    kept_names: Sequence[str], step_state: str, open_step: int,
) -> tuple[int | None, dict[str, np.ndarray]]:  # fmt: skip
    """Host copies of a site's per-unit values at the latest step in which it ran: the open step's (per-step states
    ``open_names``) when ``include_open`` and the site has data there (``present`` > 0 for some unit), else the kept
    ones (``kept_names``; ``step_state`` says which step). Returns ``(step or None, values by open name)``."""
    views = bank.site_state(site.index)

    def host(name: str) -> np.ndarray:
        return views[name].cpu().numpy().copy()  # on CPU, .cpu().numpy() shares the live state's memory

    if include_open and bool((host(present) > 0).any()):
        return open_step, {name: host(name) for name in open_names}
    steps = host(step_state)
    if not np.isfinite(steps).any():
        return None, {name: np.full(site.units, np.nan) for name in open_names}
    return int(np.nanmax(np.where(np.isfinite(steps), steps, np.nan))), {
        name: host(kept) for name, kept in zip(open_names, kept_names)
    }
