"""Dead and inactive units of rectifiers."""

from __future__ import annotations

import math
from collections.abc import Container, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from hookscope.checks import check_int
from hookscope.collectors.base import Collector, SiteState, StateBank, host_to_device
from hookscope.kernels import DEAD_UNIT_STATES
from hookscope.numerics import count_dtype
from hookscope.sites import Site

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["TIMELINE_COLUMNS", "DeadReLU", "per_unit_sum"]

_is_compiling = torch.compiler.is_compiling

#: Columns of :meth:`DeadReLU.timeline` (``HookManager.unit_timeline``), in order.
TIMELINE_COLUMNS = ("layer", "unit", "last_fired", "dead", "dead_since", "revivals", "last_revival")


#: Below this many elements per (sample, unit), summing the batch dimension first is faster (see per_unit_sum).
_SMALL_INNER = 64
_SPLIT_MIN = 2**15


def per_unit_sum(x: torch.Tensor, site: Site) -> torch.Tensor:
    """Sum of ``x`` within each unit of a site (one value per unit), exact for 0/1 values."""
    if x.dim() == 1 and site.unit_dim == 0:
        return x
    dtype = count_dtype(x.numel() // max(site.units, 1))
    if not site.reduce_dims:
        return x.sum(dtype=dtype).reshape(1)
    n = x.numel()
    if x.dim() >= 3 and site.unit_dim == 1 and _SPLIT_MIN <= n < _SMALL_INNER * x.shape[0] * x.shape[1]:
        # (N, C, 2, 2): one strided pass over (0, 2, 3) runs 2-4x slower than summing the batch dimension
        # (contiguous rows) and then the few remaining elements per unit; on small tensors the second
        # operation costs more than it saves
        return x.sum(dim=0, dtype=dtype).sum(dim=tuple(range(1, x.dim() - 1)))
    return x.sum(dim=site.reduce_dims, dtype=dtype)


class DeadReLU(Collector):
    """Inactive elements and dead units of rectifiers.

    An element is *inactive* when the activation's output is <= 0 (NaN included). ``inactive_fraction`` =
    inactive elements / elements, over every call of the site in the step. A unit (channel) is *dead* at a
    recorded step when it was inactive on every element of every call of the site in that step and the
    ``window - 1`` recorded steps before it (steps before the first count as inactive); ``dead_ratio`` = dead
    units / units. Windows count recorded steps (with ``HookManager(every=K)``, ``window=3`` spans 3 recorded
    steps, i.e. ``3 * K`` training steps).

    ``confirmed_dead_ratio`` = units inactive on each of their last ``evidence`` output elements, however many
    steps that took / units: a unit with few elements per step (a head ``(N, C)`` or a squeeze-excite
    ``(N, C, 1, 1)`` at batch 2) needs several steps of silence before it counts, so that a unit that fires on a
    fair share of inputs is not called dead after one unlucky small batch. The default dead-unit alert uses it.
    NaN for activations that are not rectifiers.

    Args:
        window: Number of consecutive recorded steps a unit must stay inactive to count as dead (>= 1).
        evidence: Consecutive inactive output elements per unit for ``confirmed_dead_ratio`` (>= 1). With 128, a
            unit that fires on 10% of inputs looks dead with probability 0.9**128 = 1.4e-6 at any moment.

    Raises:
        ValueError: ``window`` or ``evidence`` < 1.
        TypeError: ``window`` or ``evidence`` is not an int.

    Example:
        >>> DeadReLU(window=5).window
        5
    """

    columns = ("dead_ratio", "inactive_fraction", "confirmed_dead_ratio")

    def __init__(self, window: int = 1, evidence: int = 128) -> None:
        super().__init__()
        self.window = check_int(
            "window", window, minimum=1, meaning="consecutive silent recorded steps; 1 judges each step alone"
        )
        self.evidence = check_int("evidence", evidence, minimum=1, meaning="consecutive silent output elements")
        self._closed = 0  # recorded steps closed so far: the ordinal of the next one
        self._inverse: tuple[tuple[int, int], torch.Tensor] | None = None
        # Positive elements of each unit in the open step.
        self.add_state("positive", per_unit=True)
        # The last step in which each unit fired (> 0), as a step number (reports) and as the ordinal of the
        # recorded step (windows count recorded steps), moved one step later for each recorded step since in which
        # the unit's site saw no element (those do not count); -inf for never.
        self.add_state("last_fired", -math.inf, reduce="max", per_unit=True, persistent=True)
        self.add_state("fired_at", -math.inf, reduce="max", per_unit=True, persistent=True)
        # The step at which the current (or last) dead spell began: the first step at which the unit counted dead.
        self.add_state("died_at", -math.inf, reduce="max", per_unit=True, persistent=True)
        # Output elements since the unit last fired.
        self.add_state("silent", per_unit=True, persistent=True)
        # Revivals: a unit that had fired, stayed dead (window rule), then fired again.
        self.add_state("revivals", per_unit=True, persistent=True)
        self.add_state("last_revival", -math.inf, reduce="max", per_unit=True, persistent=True)

    def applies_to(self, site: Site) -> bool:
        return site.spec.rectifier

    def update(self, state: SiteState, output: torch.Tensor, site: Site) -> None:
        if _is_compiling():
            # traced into a compiled graph: the count in float64, which the compiler fuses into the kernel that makes
            # the output (the float32 indicator below is for eager kernels; there it costs a pass of its own)
            positive = output > 0
            if site.reduce_dims:
                state["positive"].add_(positive.sum(dim=site.reduce_dims, dtype=torch.float64))
            else:
                state["positive"].add_(positive.to(torch.float64).reshape(state["positive"].shape))
            return
        # 1 where the output is > 0, else 0 (NaN too), as floats written by the comparison itself: a float
        # reduction is several times faster than reducing a boolean mask, and exact for counts (see per_unit_sum)
        indicator = torch.empty(output.shape, dtype=count_dtype(output.numel()), device=output.device)
        torch.gt(output, 0, out=indicator)
        state["positive"].add_(per_unit_sum(indicator, site))

    def fused_output(self, site: Site) -> Mapping[str, str] | None:
        return {"positive": "positive"}

    def close_steps(self, steps: list[int], block: Mapping[str, torch.Tensor], commit: bool) -> dict[str, torch.Tensor]:
        bank = self.bank
        positive = block["positive"]  # (T, units): positive elements of each unit in each step of the block
        if bank.kernels is not None:  # the native kernels: the same arithmetic in one pass over the block
            state = {name: bank.unit(name) for name in DEAD_UNIT_STATES}
            args = (positive, block["elements"], bank.owners(), self._inverse_units(bank), steps, self._closed)
            out = bank.kernels.dead_units(*args, self.window, self.evidence, state, commit)
            if out is not None:
                if commit:
                    self._closed += len(steps)
                return {"positive": out[0], "alive_units": out[1], "confirmed_units": out[2]}
        device = positive.device
        t = host_to_device(torch.tensor(steps, dtype=torch.float64), device)[:, None]
        o = torch.arange(self._closed, self._closed + len(steps), dtype=torch.float64, device=device)[:, None]
        fired = positive > 0  # NaN outputs never fire
        owners = bank.owners()
        per_unit = (block["elements"] * self._inverse_units(bank))[:, owners]  # (T, units): elements per unit
        total = per_unit.cumsum(dim=0)  # elements up to each step
        # A step in which a unit's site saw no element does not count for it: the unit's clock stands still there.
        # skipped[k]: such steps up to step k of the block; o - skipped is the ordinal of each step on the unit's
        # clock, and the persistent fired_at is on that clock already (see __init__).
        skipped = torch.cumsum(per_unit == 0, dim=0, dtype=torch.float64)
        # Running maxima over the block's steps, in one loop: the step each unit last fired in, on its clock
        # (starting from the persistent value), and the elements up to the step it last fired in within the block
        # (-inf: none)
        marks = torch.stack([torch.where(fired, o - skipped, -math.inf), torch.where(fired, total, -math.inf)], 1)
        rows = marks.unbind(0)
        fired_at = bank.unit("fired_at")
        head = rows[0][0]
        torch.maximum(head, fired_at, out=head)
        for previous, row in zip(rows, rows[1:]):  # cummax(dim=0) runs ~10x slower on CPU (2.9 ms at 17k units)
            torch.maximum(previous, row, out=row)
        last, at_fire = marks.unbind(1)
        # when each unit last fired (as an ordinal, moved later by the steps since that did not count), as of step
        # k (after[k]) and as of the previous step (before[k])
        after = last + skipped
        before = torch.cat([fired_at[None], after[:-1]])
        # alive: fired within the window (the recorded steps o - window + 1 ... o); every other unit is dead
        alive = after > o - self.window
        # silent: output elements since each unit last fired, as of each step (elements up to each step, minus
        # those up to the step it last fired in within the block, or plus the persistent count when it did not
        # fire in the block); confirmed dead past `evidence`
        silent = torch.where(at_fire > -math.inf, total - at_fire, total + bank.unit("silent"))
        confirmed = silent >= self.evidence
        # units first: index_add_ along the leading dimension runs 5-7x faster than along dim 1 here
        stacked = torch.stack([positive.T, alive.T.to(positive.dtype), confirmed.T.to(positive.dtype)], dim=-1)
        sums = bank.per_site_sum(stacked).transpose(0, 1)  # (T, sites, 3)
        if commit:
            # revived: fires now, was dead at the previous recorded step having fired before
            revived = (before <= o - 1 - self.window).logical_and_(before > -math.inf).logical_and_(fired)
            bank.unit("revivals").add_(revived.sum(dim=0))
            _raise_to(bank.unit("last_revival"), torch.where(revived, t, -math.inf).amax(dim=0))
            # died: alive at the previous recorded step, dead now
            died = (before > o - 1 - self.window).logical_and_(alive.logical_not())
            _raise_to(bank.unit("died_at"), torch.where(died, t, -math.inf).amax(dim=0))
            _raise_to(bank.unit("last_fired"), torch.where(fired, t, -math.inf).amax(dim=0))
            bank.unit("fired_at").copy_(after[-1])
            bank.unit("silent").copy_(silent[-1])
            self._closed += len(steps)
        return {"positive": sums[..., 0], "alive_units": sums[..., 1], "confirmed_units": sums[..., 2]}

    def _inverse_units(self, bank: StateBank) -> torch.Tensor:
        """1 / units of each site (a site without units of this bank: 1), made once per layout."""
        key = (bank.n_sites, bank.n_units)
        if self._inverse is None or self._inverse[0] != key:
            units = torch.bincount(bank.owners(), minlength=bank.n_sites).clamp_min_(1).to(torch.float64)
            self._inverse = (key, units.reciprocal_())
        return self._inverse[1]

    def compute(self, record: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with np.errstate(divide="ignore", invalid="ignore"):
            return {
                # a step in which the site saw no element judges nothing (and does not count for the window)
                "dead_ratio": np.where(
                    record["elements"] > 0, (record["units"] - record["alive_units"]) / record["units"], np.nan
                ),
                "inactive_fraction": (record["elements"] - record["positive"]) / record["elements"],
                "confirmed_dead_ratio": record["confirmed_units"] / record["units"],
            }

    def reset(self) -> None:
        super().reset()
        self._closed = 0

    def extra_state(self) -> dict[str, int | float | str | bool]:
        return {"closed": self._closed}  # windows count recorded steps: the ordinal of the next one

    def load_extra_state(self, state: Mapping[str, object]) -> None:
        closed = state["closed"]
        if not isinstance(closed, int) or isinstance(closed, bool) or closed < 0:
            from hookscope.errors import StateError

            raise StateError(f"DeadReLU state `closed` must be an int >= 0, got {closed!r}")
        self._closed = closed

    def unit_state(self, site: Site, step: int, include_open: bool) -> dict[str, np.ndarray]:
        """Host copies of one site's per-unit state as of ``step`` (report time: this synchronises).

        Returns ``last_fired`` (step number, ``-inf`` if never), ``dead`` (bool), ``died_at`` (the step at which
        the current dead spell began, ``-inf`` if the unit never fired), ``revivals`` and ``last_revival``. With
        ``include_open``, ``step`` is the open step and units firing in it count as having fired then.

        Raises:
            KeyError: The site has no units in this collector's state.
        """
        where = self.bank.unit_range(site.index)
        if where is None:
            raise KeyError(site.index)
        offset, units = where
        return self._units_state(offset, offset + units, step, include_open)

    def _units_state(self, start: int, stop: int, step: int, include_open: bool | np.ndarray) -> dict[str, np.ndarray]:
        """:meth:`unit_state` of the units ``start:stop`` of the bank (any number of sites): one host copy per
        state, the same arithmetic for every unit (``include_open`` may be given per unit)."""
        bank = self.bank

        def host(name: str) -> np.ndarray:
            with torch._C.DisableTorchFunction():  # on CPU, .cpu().numpy() shares the live state's memory: copy
                return bank.unit(name)[start:stop].cpu().numpy().copy()

        last, fired_at, died_at = host("last_fired"), host("fired_at"), host("died_at")
        opened = np.asarray(include_open, dtype=bool)
        current = np.where(opened, float(self._closed), float(self._closed - 1))  # ordinal of `step`
        if opened.any():
            now = (host("positive") > 0) & opened
            alive_before = fired_at > current - 1 - self.window
            last = np.where(now, float(step), last)
            fired_at = np.where(now, current, fired_at)
        dead = fired_at <= current - self.window
        if opened.any():  # a spell that begins in the open step
            died_at = np.where(dead & alive_before & opened, float(step), died_at)
        return {
            "last_fired": last,
            "dead": dead,
            "died_at": died_at,
            "revivals": host("revivals").astype(np.int64),
            "last_revival": host("last_revival"),
        }

    def timeline(
        self, sites: Sequence[Site], step: int, include_open: bool, empty_open: Container[int] = ()
    ) -> pd.DataFrame:
        """Per-unit history of ``sites`` as of ``step``: one row per unit, columns :data:`TIMELINE_COLUMNS`.

        ``dead_since`` is the first step of the current dead spell: the first recorded step at which the unit
        counted as dead (``last_fired + window`` when every step is recorded), or the site's first step if the
        unit never fired. Sites this collector does not apply to, and sites without units, are left out. Sites in
        ``empty_open`` (their indices) saw no element in the open step: their state is that of the last closed step
        (a step without elements does not count).

        Built in one pass over all units (one host copy per state, array arithmetic, one frame), so its cost is
        linear in the number of units, whatever the number of sites.
        """
        import pandas as pd

        chosen = [
            (site, where)
            for site in sites
            if site.units and self.applies_to(site) and (where := self.bank.unit_range(site.index)) is not None
        ]
        if not chosen:
            return pd.DataFrame(columns=list(TIMELINE_COLUMNS))
        offsets = np.array([where[0] for _, where in chosen], dtype=np.int64)
        counts = np.array([where[1] for _, where in chosen], dtype=np.int64)
        unit = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        index = np.repeat(offsets, counts) + unit  # each chosen unit's place in the bank, in the order of `sites`
        lo, hi = int(index.min()), int(index.max()) + 1
        opened = np.zeros(hi - lo, dtype=bool)  # per unit: the open step counts (its site saw elements there)
        if include_open:
            seen = np.array([site.index not in empty_open for site, _ in chosen])
            opened[index - lo] = np.repeat(seen, counts)
        st = {name: values[index - lo] for name, values in self._units_state(lo, hi, step, opened).items()}
        first = [float(site.first_step if site.first_step is not None else step) for site, _ in chosen]
        never = np.isinf(st["last_fired"])
        since = np.where(never, np.repeat(np.array(first), counts), st["died_at"])
        layers = np.empty(len(chosen), dtype=object)
        layers[:] = [site.layer for site, _ in chosen]
        return pd.DataFrame(
            {
                "layer": pd.array(np.repeat(layers, counts), dtype="str"),
                "unit": unit,
                "last_fired": np.where(never, np.nan, st["last_fired"]),
                "dead": st["dead"],
                "dead_since": np.where(st["dead"], since, np.nan),
                "revivals": st["revivals"],
                "last_revival": np.where(np.isinf(st["last_revival"]), np.nan, st["last_revival"]),
            }
        )

    def __repr__(self) -> str:
        return f"DeadReLU(window={self.window})"


def _raise_to(state: torch.Tensor, values: torch.Tensor) -> None:
    """``state = max(state, values)`` in place."""
    torch.maximum(state, values, out=state)
