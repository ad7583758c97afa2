"""The collector base class and the device-side state it declares.

A collector is modelled on torchmetrics' ``Metric``: it declares its state with :meth:`Collector.add_state`
(default value, how it combines across calls, steps and ranks), updates it from the hot path with tensor
operations only, and turns the summable numbers recorded at each step into the reported columns at report
time, on the host. Ratios are kept as numerator and denominator and divided only in :meth:`Collector.compute`,
so a ratio over several calls, micro-batches or ranks is Σ numerator / Σ denominator, never a mean of ratios.

State lives in one flat tensor per declared state, shared by all sites: per-site scalars are a vector indexed by
site, per-unit states a vector of all sites' units back to back (per-step states: one such vector per row of a
ring of closed steps). Each site gets views into those tensors, so the hooks update state in place; closing a
step moves the views to the next row, and the collectors process the closed rows of all sites a ring at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import torch

from hookscope.errors import ConfigError, ConfigTypeError, StateError

if TYPE_CHECKING:
    from hookscope.kernels import Backend
    from hookscope.sites import Site

__all__ = [
    "RING_STEPS",
    "Collector",
    "SiteState",
    "StateBank",
    "StateSpec",
    "check_computed",
    "host_to_device",
    "validate_collectors",
]


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host tensor to ``device`` without making the host wait for the device.

    On CUDA the copy goes through pinned memory: a copy from pageable memory may first synchronise with the
    stream (CUDA's "API synchronization behavior"), which would stall the training loop at every step.
    """
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


Reduce = Literal["sum", "max", "min"]


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """One declared piece of collector state.

    Attributes:
        name: State name; also the field name in step records for per-step scalars.
        default: Initial value (and the value restored at each step close for per-step states).
        reduce: How values combine across calls and ranks: ``"sum"``, ``"max"`` or ``"min"``.
        per_unit: One value per unit (else one per site).
        persistent: Kept across steps (else reset to ``default`` when a step closes).
        dtype: Storage dtype (float64 by default, so that counts stay exact up to 2**53).
    """

    name: str
    default: float = 0.0
    reduce: Reduce = "sum"
    per_unit: bool = False
    persistent: bool = False
    dtype: torch.dtype = torch.float64


class SiteState(Mapping[str, torch.Tensor]):
    """One site's views into a collector's state tensors: ``state["name"]`` is updated in place."""

    __slots__ = ("_views", "site_index")

    def __init__(self, site_index: int) -> None:
        self.site_index = site_index
        self._views: dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._views[key]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)


#: Closed steps whose per-step state waits in the ring before a collector turns it into recorded numbers.
RING_STEPS = 16


class StateBank:
    """Flat device tensors holding one collector's declared state for all sites.

    Persistent states are one flat tensor each. Per-step states live in a *ring* of :data:`RING_STEPS` rows
    (``(RING_STEPS, n)`` each): the open step's state is row :attr:`closed_rows`, and closing a step only moves the
    sites' views to the next row (no tensor operation). The collector turns the closed rows into recorded
    numbers for many steps at once (:meth:`Collector.close_steps`) when the ring is full or a report is asked
    for; then the ring is emptied (:meth:`recycle`). The layout (sites, units) only changes while the ring holds
    no closed step.
    """

    def __init__(self, specs: Mapping[str, StateSpec], device: torch.device) -> None:
        self.specs = dict(specs)
        self.device = device
        self.ring: dict[str, torch.Tensor] = {}
        self.closed_rows = 0  # closed steps waiting in the ring; the open step is the row after them
        self.n_sites = 0
        self.n_units = 0
        self._site_cap = 0
        self._unit_cap = 0
        self.scalars: dict[str, torch.Tensor] = {}  # persistent per-site states
        self.units: dict[str, torch.Tensor] = {}  # persistent per-unit states
        self.unit_owner = torch.empty(0, dtype=torch.long, device=device)
        self._unit_offsets: dict[int, tuple[int, int]] = {}
        self._states: dict[int, SiteState] = {}
        # Views made once per layout (each view is a dispatched op): whole-bank views by (name, row) (row -1 for
        # persistent states), and each site's views by (site, row).
        self._views: dict[tuple[str, int], torch.Tensor] = {}
        self._site_views: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._bindings: dict[int, list[tuple[SiteState, dict[str, torch.Tensor]]]] = {}  # per row: (state, views)
        #: The statistics implementation of the manager that owns the bank (set by its recorder; ``None``: ATen).
        self.kernels: Backend | None = None
        #: Bumped whenever the state tensors are replaced (grown): the sites' views then have other addresses.
        self.generation = 0
        self._alloc(16, 1024)

    # -- allocation ---------------------------------------------------------------------------------------------
    def _new(self, spec: StateSpec, *shape: int) -> torch.Tensor:
        with torch.inference_mode(False):  # state must stay usable outside inference_mode
            return torch.full(shape, spec.default, dtype=spec.dtype, device=self.device)

    def _alloc(self, site_cap: int, unit_cap: int) -> None:
        # closed rows are copied with the rest: a site added now holds the defaults in them (it had not run)
        # (called from hooks and step(), under any grad mode and torch function mode: neither sees these ops)
        with torch._C.DisableTorchFunction(), torch.no_grad():
            for name, spec in self.specs.items():
                cap, used = (unit_cap, self.n_units) if spec.per_unit else (site_cap, self.n_sites)
                if spec.persistent:
                    table = self.units if spec.per_unit else self.scalars
                    new = self._new(spec, cap)
                    if name in table:
                        new[:used].copy_(table[name][:used])
                    table[name] = new
                else:
                    new = self._new(spec, RING_STEPS, cap)
                    if name in self.ring:  # row 0 holds the open step
                        new[:, :used].copy_(self.ring[name][:, :used])
                    self.ring[name] = new
            with torch.inference_mode(False):
                owner = torch.zeros(unit_cap, dtype=torch.long, device=self.device)
            owner[: self.n_units].copy_(self.unit_owner[: self.n_units])
            self.unit_owner = owner
        self._site_cap, self._unit_cap = site_cap, unit_cap
        self.generation += 1
        self._views.clear()
        self._site_views.clear()
        self._bindings.clear()
        self._bind_all()

    def _flat(self, name: str, row: int) -> torch.Tensor:
        """The whole flat tensor of a state: for a per-step state, that of one row of the ring."""
        spec = self.specs[name]
        if spec.persistent:
            return (self.units if spec.per_unit else self.scalars)[name]
        return self.ring[name][row]

    def _point(self, state: SiteState) -> None:
        """Point a site's views at the open step's row."""
        state._views = self.row_views(state.site_index, self.closed_rows)

    def row_views(self, site_index: int, row: int) -> dict[str, torch.Tensor]:
        """A site's views of its states: of row ``row`` of the ring for per-step states (made once per layout)."""
        key = (site_index, row)
        views = self._site_views.get(key)
        if views is None:
            views = {}
            # Views made under inference_mode could not be updated in place outside it.
            with torch.inference_mode(False), torch._C.DisableTorchFunction():
                for name, spec in self.specs.items():
                    flat = self._flat(name, row)
                    if not spec.per_unit:
                        views[name] = flat[site_index]
                    elif site_index in self._unit_offsets:
                        off, n = self._unit_offsets[site_index]
                        views[name] = flat[off : off + n]
            self._site_views[key] = views
        return views

    def block(self, site_index: int, name: str, row: int, rows: int) -> torch.Tensor:
        """A site's values of per-step state ``name`` in ``rows`` consecutive rows of the ring from ``row``:
        ``(rows, units)``, or ``(rows, 1)`` for a per-site state."""
        ring = self.ring[name]
        if self.specs[name].per_unit:
            off, n = self._unit_offsets[site_index]
            return ring[row : row + rows, off : off + n]
        return ring[row : row + rows, site_index : site_index + 1]

    def _bind_all(self) -> None:
        row = self.closed_rows
        bindings = self._bindings.get(row)
        if bindings is None:  # (made once per row and layout: this runs at every step)
            bindings = self._bindings[row] = [(s, self.row_views(s.site_index, row)) for s in self._states.values()]
        for state, views in bindings:
            state._views = views

    def unit_range(self, site_index: int) -> tuple[int, int] | None:
        """``(offset, units)`` of a site's units in the per-unit vectors, or ``None`` when it has none here."""
        return self._unit_offsets.get(site_index)

    def sites_with_state(self) -> set[int]:
        """Indices of the sites that have state in this bank."""
        return set(self._states)

    def site_state(self, site_index: int) -> SiteState:
        """The views of one site (the open step's row for per-step states).

        Raises:
            KeyError: The site has no state in this bank.
        """
        return self._states[site_index]

    def add_site(self, site_index: int, units: int) -> SiteState:
        """Allocate state for a site (site indices are the manager's; they may skip sites this bank ignores)."""
        if site_index in self._states:
            return self._states[site_index]
        site_cap, unit_cap = self._site_cap, self._unit_cap
        while site_index >= site_cap:
            site_cap *= 2
        has_units = any(s.per_unit for s in self.specs.values())
        needed = self.n_units + (units if has_units else 0)
        while needed > unit_cap:
            unit_cap *= 2
        if (site_cap, unit_cap) != (self._site_cap, self._unit_cap):
            self._alloc(site_cap, unit_cap)
        if has_units:
            self._unit_offsets[site_index] = (self.n_units, units)
            with torch._C.DisableTorchFunction(), torch.no_grad():
                self.unit_owner[self.n_units : needed].fill_(site_index)
            self.n_units = needed
        self.n_sites = max(self.n_sites, site_index + 1)
        self._views.clear()
        state = SiteState(site_index)
        self._states[site_index] = state
        self._bindings.clear()
        self._point(state)
        return state

    def resize(self, n_sites: int) -> None:
        """Make the per-site vectors cover ``n_sites`` sites (sites this bank ignores keep the defaults)."""
        if n_sites > self._site_cap:
            cap = self._site_cap
            while n_sites > cap:
                cap *= 2
            self._alloc(cap, self._unit_cap)
        if n_sites > self.n_sites:
            self.n_sites = n_sites
            self._views.clear()

    # -- whole-bank views ---------------------------------------------------------------------------------------
    def _whole(self, name: str, n: int) -> torch.Tensor:
        row = -1 if self.specs[name].persistent else self.closed_rows
        view = self._views.get((name, row))
        if view is None:
            with torch.inference_mode(False):
                view = self._views[(name, row)] = self._flat(name, row)[:n]
        return view

    def scalar(self, name: str) -> torch.Tensor:
        """The per-site vector of a scalar state (``n_sites`` long; the open step's, for a per-step state)."""
        return self._whole(name, self.n_sites)

    def unit(self, name: str) -> torch.Tensor:
        """The flat vector of a per-unit state (all sites' units back to back; the open step's, for a per-step
        state)."""
        return self._whole(name, self.n_units)

    def owners(self) -> torch.Tensor:
        """For every unit, the index of the site it belongs to."""
        view = self._views.get(("", -2))
        if view is None:
            with torch.inference_mode(False):
                view = self._views[("", -2)] = self.unit_owner[: self.n_units]
        return view

    def per_site_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum per-unit values (``(units, ...)``) within each site: one ``index_add_`` for all sites (and all
        steps of a block); ``(n_sites, ...)``."""
        out = torch.zeros((self.n_sites, *values.shape[1:]), dtype=values.dtype, device=self.device)
        return out.index_add_(0, self.owners(), values)

    # -- the ring of closed steps -------------------------------------------------------------------------------
    def _rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        return {
            name: self.ring[name][start:stop, : self.n_units if spec.per_unit else self.n_sites]
            for name, spec in self.specs.items()
            if not spec.persistent
        }

    def push(self) -> None:
        """Close the open step: its row joins the closed ones and the sites' views move to the next row, which
        holds the defaults. When the ring is full, :meth:`take` and :meth:`recycle` must follow before the next
        update."""
        assert self.closed_rows < RING_STEPS
        self.closed_rows += 1
        if self.closed_rows < RING_STEPS:
            self._bind_all()

    def take(self, count: int | None = None) -> dict[str, torch.Tensor]:
        """The first ``count`` closed rows (all by default) of every per-step state (``(count, n)`` each; views,
        valid until :meth:`recycle`)."""
        return self._rows(0, self.closed_rows if count is None else count)

    def recycle(self, count: int | None = None) -> None:
        """Drop the first ``count`` closed rows (all by default) once they have been processed: the rows after
        them, and the open step's row, move to the front."""
        rows = self.closed_rows if count is None else count
        if rows == 0:
            return
        keep = self.closed_rows - rows  # closed rows that stay
        moved = keep + (1 if self.closed_rows < RING_STEPS else 0)  # and the open row, if the ring had one
        self.closed_rows = keep
        for name, spec in self.specs.items():
            if spec.persistent:
                continue
            ring = self.ring[name]
            if moved:
                source = ring[rows : rows + moved]
                ring[:moved].copy_(source if moved <= rows else source.clone())  # clone: the slices overlap
            ring[moved : rows + moved].fill_(spec.default)  # the rows after them held defaults already
        self._bind_all()

    def clear_open(self) -> None:
        """Restore the open step's per-step states to their defaults (what it recorded is dropped)."""
        if self.closed_rows >= RING_STEPS:
            return  # no open row: the ring waits for a flush, and no update ran since
        for name, spec in self.specs.items():
            if not spec.persistent:
                self.ring[name][self.closed_rows].fill_(spec.default)

    def current(self) -> dict[str, torch.Tensor]:
        """The per-step states of the open step, as a block of one row."""
        return self._rows(self.closed_rows, self.closed_rows + 1)

    def nbytes(self) -> int:
        """Bytes held by the state tensors (the ring included)."""
        tensors = [*self.scalars.values(), *self.units.values(), *self.ring.values(), self.unit_owner]
        return sum(t.numel() * t.element_size() for t in tensors)

    def reset(self) -> None:
        """Restore every state to its default (the ring included)."""
        for tensor_by_name in (self.scalars, self.units, self.ring):
            for name, tensor in tensor_by_name.items():
                tensor.fill_(self.specs[name].default)


class Collector:
    """Base class of collectors: per-site statistics computed on the device from activations and gradients.

    Subclasses declare state in ``__init__`` with :meth:`add_state`, set :attr:`columns`, and implement
    :meth:`update` (forward outputs), :meth:`update_grad` (gradients w.r.t. outputs, when
    :attr:`wants_grad`), and :meth:`compute` (record fields → columns). :meth:`close_steps` turns the per-step
    state of closed steps into the summable numbers recorded for each; by default it records every per-step
    scalar state as is.

    Hot-path rules (:meth:`update`, :meth:`update_grad`, :meth:`close_steps`): tensor operations only, in place on
    the state views; never ``.item()``, ``.cpu()``, ``.tolist()`` or ``bool(tensor)``. Both run under
    ``torch.no_grad()`` with the manager's function capture disabled.

    Example:
        >>> import torch
        >>> class MeanActivation(Collector):
        ...     columns = ("mean_activation",)
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.add_state("total")
        ...     def update(self, state, output, site):
        ...         state["total"].add_(output.sum(dtype=torch.float64))
        ...     def compute(self, record):
        ...         return {"mean_activation": record["total"] / record["elements"]}
        >>> MeanActivation().columns
        ('mean_activation',)
    """

    #: Reported column names, in order.
    columns: ClassVar[tuple[str, ...]] = ()
    #: Whether :meth:`update_grad` must be called (a tensor hook is registered on outputs that require grad).
    wants_grad: ClassVar[bool] = False
    #: Per-unit statistics the collector reports through :meth:`unit_values` (``HookManager.unit_frame``).
    unit_columns: ClassVar[tuple[str, ...]] = ()
    #: Sets of unit indices the collector records for each (step, site), named (``Magnitude``:
    #: ``"massive_units"``), read through :meth:`unit_set` (alert rules with ``target = "units"``).
    unit_sets: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._state_specs: dict[str, StateSpec] = {}
        self._bank: StateBank | None = None
        self._owner: object | None = None

    # -- declaration --------------------------------------------------------------------------------------------
    def add_state(
        self,
        name: str,
        default: float = 0.0,
        *,
        reduce: Reduce = "sum",
        per_unit: bool = False,
        persistent: bool = False,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        """Declare a piece of state.

        Args:
            name: State name (a valid identifier).
            default: Initial value, restored at each step close unless ``persistent``.
            reduce: How values combine across calls, micro-batches and ranks: ``"sum"``, ``"max"`` or ``"min"``.
            per_unit: One value per unit instead of one per site.
            persistent: Keep the value across steps.
            dtype: Storage dtype.

        Raises:
            ValueError: Bad name, duplicate name or unknown reduction.
        """
        if "_state_specs" not in vars(self):
            raise ConfigTypeError(
                f"collector {type(self).__name__} was not initialised: its __init__ must call super().__init__() "
                "before add_state()"
            )
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"`name` must be an identifier, got {name!r}")
        if name in self._state_specs or name in ("calls", "elements", "units", "backward"):
            raise ConfigError(
                f"state `name` {name!r} is already declared or reserved (calls, elements, units, backward)"
            )
        if reduce not in ("sum", "max", "min"):
            raise ConfigError(f"`reduce` must be 'sum', 'max' or 'min'; got {reduce!r}")
        if not isinstance(dtype, torch.dtype):
            raise ConfigTypeError(f"`dtype` must be a torch.dtype, got {dtype!r}")
        self._state_specs[name] = StateSpec(name, float(default), reduce, per_unit, persistent, dtype)

    @property
    def state_specs(self) -> Mapping[str, StateSpec]:
        """The declared states."""
        return dict(self._state_specs)

    @property
    def name(self) -> str:
        """The collector's class name."""
        return type(self).__name__

    # -- binding (called by the manager's recorder) -------------------------------------------------------------
    def bind_owner(self, owner: object) -> None:
        """Claim the collector for one manager (a collector's state belongs to one model).

        Raises:
            RuntimeError: Another manager uses it already.
        """
        if self._owner is not None and self._owner is not owner:
            raise StateError(
                f"collector {self.name} is already used by another HookManager; create one collector per manager"
            )
        self._owner = owner

    def bind_device(self, device: torch.device) -> StateBank:
        """Create the state tensors on ``device`` (once: the device of the first recorded output)."""
        if self._bank is None:
            self._bank = StateBank(self._state_specs, device)
        return self._bank

    @property
    def bank(self) -> StateBank:
        """The state tensors (available once the first site has been recorded)."""
        if self._bank is None:
            raise StateError(f"{self.name} has no state yet: no site has been recorded")
        return self._bank

    @property
    def has_state(self) -> bool:
        """Whether :attr:`bank` exists yet."""
        return self._bank is not None

    # -- the protocol -------------------------------------------------------------------------------------------
    def applies_to(self, site: Site) -> bool:
        """Whether the collector records this site (its columns are NaN for sites it does not)."""
        return True

    def update(self, state: SiteState, output: torch.Tensor, site: Site) -> None:
        """Fold one forward output into the site's state (hot path: tensor operations only)."""

    def update_grad(self, state: SiteState, grad: torch.Tensor, site: Site) -> None:
        """Fold one gradient w.r.t. the site's output into its state (hot path: tensor operations only)."""

    # -- the fused passes (native kernels) ------------------------------------------------------------------
    # On CPU one native pass over each output (and each gradient) computes what every attached collector needs
    # from it. A collector says here which of the pass's statistics it takes, and into which of its states
    # they are added; for a site where the pass runs, its update() / update_grad() are not called. Where the
    # pass cannot run (CUDA tensors, the ATen backend), they are, and must give the same numbers.

    def fused_output(self, site: Site) -> Mapping[str, str] | None:
        """Statistics of the fused output pass that replace :meth:`update` at ``site``: ``{"positive" | "saturated"
        | "nonfinite": state name}`` (per-unit count of outputs > 0; count of outputs in the band of :meth:`band`;
        count of NaN/inf outputs), or ``Magnitude``'s (``hookscope.kernels.MAGNITUDE_STATISTICS``, which make the
        pass the magnitude pass). ``None``: :meth:`update` always runs."""
        return None

    def band(self, site: Site, dtype: torch.dtype) -> tuple[float | None, float | None]:
        """With ``"saturated"``: ``(lower, upper)`` of ``dtype``; an output counts when ``y < lower`` or
        ``y > upper`` (``None``: no such band). Asked when the site's pass is prepared (per dtype and layout of its
        outputs): it must be the same at every call."""
        return None, None

    def fused_gradient(self, site: Site) -> Mapping[str, str] | None:
        """Statistics of the fused gradient pass that replace :meth:`update_grad`: ``{"sumsq" | "nonfinite": state
        name}`` (sum of squares divided by :meth:`gradient_scale` squared; count of NaN/inf elements)."""
        return None

    def gradient_scale(self, device: torch.device) -> torch.Tensor | float | None:
        """With ``"sumsq"``: the scale the gradients carry (a ``GradScaler``'s), or ``None``. Asked at each gradient
        (a number is part of the prepared call's key; a tensor is read by a plain call)."""
        return None

    def close_steps(self, steps: list[int], block: Mapping[str, torch.Tensor], commit: bool) -> dict[str, torch.Tensor]:
        """Summable per-site numbers to record for a block of closed steps (``(len(steps), n_sites)`` each).

        ``block`` holds every per-step state as it was when each step closed: ``(len(steps), n_sites)`` for
        per-site states, ``(len(steps), n_units)`` for per-unit ones (see :meth:`StateBank.per_site_sum`).
        Called for all sites and several steps at once (every :data:`RING_STEPS` steps, and when a report is
        asked for), in order; persistent state is brought up to the last step of the block. ``commit=False``
        asks for a snapshot of the open step (a block of one row): persistent state must not change. By default
        every per-site per-step state is recorded as is.
        """
        return {n: block[n] for n, s in self._state_specs.items() if not s.per_unit and not s.persistent}

    def compute(self, record: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Turn recorded numbers into columns, on the host, for many (step, site) rows at once.

        ``record`` holds the fields returned by :meth:`close_steps`, plus ``calls`` (forward calls in the step),
        ``elements`` (output elements in the step), ``units`` and ``backward`` (backward passes in the step).
        """
        raise NotImplementedError(f"{self.name} must implement compute()")

    def unit_values(self, site: Site, step: int, include_open: bool) -> tuple[int | None, dict[str, np.ndarray]]:
        """Host copies of one site's :attr:`unit_columns` at the latest step in which it ran (report time: this
        synchronises): ``(that step or None, {column: one value per unit})``. ``include_open``: the open step,
        numbered ``step``, counts."""
        raise NotImplementedError(f"{self.name} reports no per-unit statistics")

    def unit_set(self, name: str, record: Mapping[str, float]) -> tuple[int, ...] | None:
        """The units of the set ``name`` (one of :attr:`unit_sets`) in one (step, site) record of this collector's
        fields, ascending; ``None`` when the record does not hold the whole set."""
        raise NotImplementedError(f"{self.name} records no unit sets")

    def extra_state(self) -> dict[str, int | float | str | bool]:
        """Python-side values a resumed run needs besides the declared state tensors (``HookManager.state_dict``):
        plain values only. None by default."""
        return {}

    def load_extra_state(self, state: Mapping[str, object]) -> None:
        """Restore what :meth:`extra_state` returned (checked by the caller to hold the same keys)."""

    def reset(self) -> None:
        """Restore every state (persistent ones included) to its default."""
        if self._bank is not None:
            self._bank.reset()

    def __repr__(self) -> str:
        return f"{self.name}()"


def validate_collectors(collectors: object, reserved: Iterable[str] = ()) -> list[Collector]:
    """Check ``HookManager(collectors=...)``: one collector or an iterable of distinct instances whose columns are
    unique and none of ``reserved`` (the manager's own columns)."""
    if isinstance(collectors, Collector):
        collectors = [collectors]
    if not isinstance(collectors, Iterable):
        raise ConfigTypeError(f"`collectors` must be None or a list of Collector instances, got {collectors!r}")
    out: list[Collector] = []
    for c in collectors:
        if isinstance(c, type) and issubclass(c, Collector):
            raise ConfigTypeError(
                f"`collectors` must hold Collector instances, got the class {c.__name__}; write {c.__name__}() instead"
            )
        if not isinstance(c, Collector):
            raise ConfigTypeError(f"`collectors` must hold hookscope Collector instances, got {c!r}")
        if any(c is o for o in out):
            raise ConfigError(f"`collectors` holds {c!r} twice")
        _check_collector(c)
        out.append(c)
    seen: dict[str, Collector] = {}
    for c in out:
        for col in c.columns:
            if col in seen or col in reserved:
                other = seen.get(col)
                by = repr(other) if other is not None else "the manager"
                raise ConfigError(
                    f"`collectors`: column {col!r} of {c!r} is already reported by {by}; columns must be unique"
                )
            seen[col] = c
    return out


def _check_collector(c: Collector) -> None:
    """A custom collector's mistakes, found when the manager is built rather than at the first report."""
    name = type(c).__name__
    if "_state_specs" not in vars(c):
        raise ConfigTypeError(f"collector {name} was not initialised: its __init__ must call super().__init__()")
    columns = type(c).columns
    if not isinstance(columns, tuple) or not all(isinstance(col, str) and col for col in columns):
        raise ConfigTypeError(f"`{name}.columns` must be a tuple of column names (str), got {columns!r}")
    if type(c).compute is Collector.compute:
        raise ConfigTypeError(f"collector {name} must implement compute(record) -> {{column: values}}")
    if type(c).close_steps is not Collector.close_steps:
        return  # its recorded fields are known only once it closes a step
    fields = [n for n, s in c.state_specs.items() if not s.per_unit and not s.persistent]
    record = dict.fromkeys(["calls", "elements", "units", "backward", *fields], np.zeros(0))
    try:
        computed = c.compute(record)
    except Exception:
        return  # it may need real rows; build_frame checks the columns then
    check_computed(c, computed)


def check_computed(c: Collector, computed: object) -> None:
    """Raise when ``compute`` did not return a mapping with every declared column."""
    if not isinstance(computed, Mapping):
        raise ConfigTypeError(f"{type(c).__name__}.compute() must return a dict of columns, got {computed!r:.80}")
    missing = [col for col in type(c).columns if col not in computed]
    if missing:
        raise ConfigError(
            f"{type(c).__name__}.compute() returned no {', '.join(map(repr, missing))}: it must return every "
            f"column declared in `columns` {type(c).columns!r}"
        )
