"""All cross-rank reduction in one place.

Under ``torch.distributed`` every statistic is global: when a step closes, each rank's per-step collector state
(per-site counts, per-unit counts) and the host-side counts (calls, elements, backward passes) are combined with
one ``all_reduce`` per reduction kind, all sites flattened together, before any ratio is formed. So
``inactive_fraction`` is Σ inactive / Σ elements over ranks, a unit is dead only if it was inactive on every
rank, and ``grad_norm`` is sqrt(Σ over ranks of squared local norms). Persistent state (when each unit last
fired) is then updated from global values and is identical on every rank, so reports need no collective: any
rank may ask for one at any time. ``step()`` is the collective: every rank must call it, as with
``optimizer.step()`` under DDP. With NCCL the collectives are enqueued on the device without host
synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from hookscope.errors import ConfigError, ConfigTypeError, StateError

if TYPE_CHECKING:
    from hookscope.collectors.base import StateBank

__all__ = ["global_stats_of", "is_distributed", "rank", "reduce_step"]

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _check_layout(layout: list[int], device: torch.device) -> None:
    """Raise on every rank when the ranks' state layouts differ (instead of a collective on unequal sizes)."""
    local = torch.tensor(layout + [-v for v in layout], dtype=torch.float64, device=device)
    both = local.clone()
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    k = len(layout)
    # reading the result is a host sync, but only when the layout may have changed (new sites)
    if not torch.equal(both[:k], local[:k]) or not torch.equal(-both[k:], local[:k]):
        raise StateError(
            f"hookscope: ranks recorded different activation sites (rank {rank()}: {layout[0]} sites, "
            f"layout {layout}); every rank must run the same model so that statistics can be combined"
        )


def reduce_step(
    banks: Sequence[StateBank], counts: torch.Tensor, n_sites: int, device: torch.device, check_layout: bool
) -> torch.Tensor:
    """Combine one step's state across ranks in place; returns the global ``(n_sites, 3)`` host counts.

    Args:
        banks: Collector state banks; their per-step states are replaced by global values.
        counts: ``(n_sites, 3)`` float64 calls, elements and backward passes of this rank.
        n_sites: Number of sites (the same on every rank).
        device: Device of the state.
        check_layout: Verify first that every rank has the same layout (after new sites appeared).
    """
    if check_layout:
        _check_layout([n_sites, *(b.n_units for b in banks)], device)
    groups: dict[str, list[torch.Tensor]] = {"sum": [counts.reshape(-1)], "max": [], "min": []}
    for bank in banks:
        for name, spec in bank.specs.items():
            if spec.persistent:
                continue  # derived from reduced values, identical on every rank
            groups[spec.reduce].append(bank.unit(name) if spec.per_unit else bank.scalar(name))
    for kind, tensors in groups.items():
        if not tensors:
            continue
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        dist.all_reduce(flat, op=getattr(dist.ReduceOp, _OPS[kind]))
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n
    return counts


def global_stats_of(global_stats: object) -> bool:
    """Check ``HookManager(global_stats=...)``; ``None`` means: when a process group of several ranks exists."""
    if global_stats is not None and not isinstance(global_stats, bool):
        raise ConfigTypeError(f"`global_stats` must be None (automatic), True or False, got {global_stats!r}")
    if global_stats and not is_distributed():
        raise ConfigError(
            "`global_stats=True` needs torch.distributed initialised with more than one rank "
            "(call torch.distributed.init_process_group first, or leave global_stats=None)"
        )
    return is_distributed() if global_stats is None else global_stats
