"""All cross-rank reduction in one place.

Under ``torch.distributed`` every statistic is global: each step's per-step collector state (per-site counts,
per-unit counts) and its host counts (calls, elements, backward passes) are summed (or maxed, minned) across
ranks before any ratio is formed. So ``inactive_fraction`` is Σ inactive / Σ elements over ranks, a unit is dead
only if it was inactive on every rank, and ``grad_norm`` is sqrt(Σ over ranks of squared local norms). Persistent
state (when each unit last fired) is then updated from global values and is identical on every rank, so reports
need no collective: any rank may ask for one at any time.

How a step is combined (:class:`CrossRank`):

- Sites are identified across ranks **by name**, not by the order in which each rank met them: with
  data-dependent routing (mixture of experts) rank 0 may meet expert A first and rank 1 expert B. When some rank
  has sites that the ranks have not agreed on yet, the ranks exchange their descriptions (name, kind, units) and
  every rank enters the sites it never ran itself, so that all ranks hold the same sites; the same name with
  another kind or unit count on another rank is an error on every rank. A site that runs on some ranks only in a
  step is reported from the ranks where it ran.
- hookscope's collectives run in process groups of their own, never interleaved with DDP's, and ``step()`` never
  waits for the other ranks' current ``step()``: each ``step()`` posts a small header (step number, forward
  passes, sites) without waiting, and the step is combined at the *next* ``step()``, once every rank's header has
  arrived. A rank that skipped ``step()`` (or called it once too often) then shows a different number of forward
  passes, and every rank raises an error naming it — instead of its collective meeting DDP's gradient all_reduce,
  which gloo answers by aborting the process.
- So the latest closed step becomes part of the reports one ``step()`` later (or at ``detach()``, which combines
  it); the open step is never reported under ``torch.distributed``.
"""

from __future__ import annotations

import dataclasses
import datetime
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist

from hookscope.errors import ConfigError, ConfigTypeError, StateError

if TYPE_CHECKING:
    from hookscope.activations import ActivationSpec, Bounds
    from hookscope.collectors.base import StateBank
    from hookscope.history import StepRecord
    from hookscope.sites import Site

__all__ = [
    "CombinedRecorder",
    "Combiner",
    "CrossRank",
    "PendingReduction",
    "RankSum",
    "SiteDescription",
    "global_stats_of",
    "is_distributed",
    "rank",
    "world_size",
]

_no_torch_function = torch._C.DisableTorchFunction
_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}
_last_rank: int | None = None  # this process's rank while a process group existed


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of ranks (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank: 0 when not distributed. After the process group is destroyed, the rank the process
    had (``dist.get_rank()`` would then say 0 on every rank, and every rank would write the sinks)."""
    global _last_rank
    if dist.is_available() and dist.is_initialized():
        _last_rank = dist.get_rank()
        return _last_rank
    return _last_rank if _last_rank is not None else 0


def global_stats_of(global_stats: object) -> bool:
    """Check ``HookManager(global_stats=...)``; ``None`` means: when a process group of several ranks exists."""
    if global_stats is not None and not isinstance(global_stats, bool):
        raise ConfigTypeError(f"`global_stats` must be None (automatic), True or False, got {global_stats!r}")
    if global_stats and not is_distributed():
        raise ConfigError(
            "`global_stats=True` needs torch.distributed initialised with more than one rank "
            "(call torch.distributed.init_process_group first, or leave global_stats=None)"
        )
    if is_distributed():
        rank()  # remember it while it can be asked
    return is_distributed() if global_stats is None else global_stats


@dataclasses.dataclass(frozen=True)
class SiteDescription:
    """What the ranks exchange about a site they must agree on."""

    name: str
    key: tuple[str, int]
    module: str
    call: int
    kind: str
    function: str | None
    bounds: tuple[float, float] | None
    unit_dim: int | None
    units: int
    shape: tuple[int, ...]
    dim: int | None = None


#: Header columns each rank writes into its row: step number, forward passes in the step, sites it holds.
_HEADER = ("step", "passes", "sites")


class CrossRank:
    """The cross-rank side of one manager's recorder: process groups, the agreed sites, and combining steps.

    Args:
        device: Where the collector state lives (CUDA state is reduced with NCCL, CPU state with gloo).
        timeout: How long ``detach()`` waits for the other ranks to combine the last step.
    """

    def __init__(self, device: torch.device | None, timeout: float = 120.0) -> None:
        self.world = dist.get_world_size()
        self.rank = rank()
        self.timeout = timeout
        self.agreed: list[SiteDescription] = []
        self._agreed_names: dict[str, int] = {}
        self._host: Any = None  # gloo group: headers, site descriptions, host counts
        self._device_group: Any = None  # the group that reduces device state
        self._device = device
        self._header: tuple[Any, torch.Tensor, int] | None = None  # (work, tensor, step) posted, not yet read

    # -- groups ------------------------------------------------------------------------------------------------
    def _groups(self, device: torch.device | None) -> None:
        if self._host is not None:
            return
        # every rank calls step(), so every rank creates the groups in the same order
        self._host = dist.new_group(backend="gloo")
        if device is not None and device.type == "cuda":
            self._device_group = dist.new_group(backend="nccl")
        else:
            self._device_group = self._host

    # -- the header --------------------------------------------------------------------------------------------
    def post_header(self, step: int, passes: int, sites: int, device: torch.device | None) -> None:
        """Post this rank's header for the step just closed, without waiting for the other ranks."""
        self._groups(device)
        header = torch.zeros(self.world, len(_HEADER), dtype=torch.float64)
        header[self.rank] = torch.tensor([step, passes, sites], dtype=torch.float64)
        work = dist.all_reduce(header, group=self._host, async_op=True)
        self._header = (work, header, step)

    @property
    def posted(self) -> bool:
        """Whether a step's header waits to be read."""
        return self._header is not None

    def read_header(self, timeout: float | None = None) -> tuple[int, bool]:
        """Wait for every rank's header of the posted step; check that the ranks closed the same step after the
        same forward passes. Returns the step and whether some rank holds sites that are not agreed yet.

        Raises:
            StateError: The ranks' steps differ (a rank skipped ``step()`` or called it once too often), or
                ``timeout`` seconds passed.
        """
        assert self._header is not None
        work, header, step = self._header
        self._header = None
        try:
            _wait(work, timeout)
        except StateError as e:
            raise StateError(f"{e} (step {step})") from None
        rows = header.to(torch.int64).tolist()
        steps = [r[0] for r in rows]
        passes = [r[1] for r in rows]
        if len(set(steps)) > 1 or len(set(passes)) > 1:
            described = ", ".join(f"rank {r}: step {s}, {p} forward passes" for r, (s, p, _) in enumerate(rows))
            odd = [r for r, p in enumerate(passes) if passes.count(p) == 1] if self.world > 2 else []
            who = f"rank {odd[0]}" if len(odd) == 1 else "a rank"
            raise StateError(
                f"hookscope: the ranks closed different training steps as step {step} ({described}): {who} "
                "skipped step() or called it once too often. Every rank must call HookManager.step() once per "
                "training step, after the same number of forward passes (as DDP requires); use "
                "global_stats=False for rank-local statistics"
            )
        return step, any(r[2] != len(self.agreed) for r in rows)

    # -- agreeing on sites -------------------------------------------------------------------------------------
    def agree(self, local: Sequence[SiteDescription]) -> list[SiteDescription]:
        """Exchange the sites not agreed yet (every rank calls this in the same step); returns the newly agreed
        ones in the global order (by the lowest rank that holds each, then that rank's order).

        Raises:
            StateError: A name stands for different sites (kind or units) on two ranks.
        """
        mine = [d for d in local if d.name not in self._agreed_names]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, mine, group=self._host)
        new: list[SiteDescription] = []
        seen: dict[str, tuple[int, SiteDescription]] = {}
        for r, descriptions in enumerate(gathered):
            for d in descriptions:
                if d.name in seen:
                    r0, first = seen[d.name]
                    if (first.kind, first.units, first.unit_dim) != (d.kind, d.units, d.unit_dim):
                        raise StateError(
                            f"hookscope: ranks recorded different activation sites under one name: {d.name!r} is "
                            f"{first.kind} with {first.units} units (unit dim {first.unit_dim}) on rank {r0} and "
                            f"{d.kind} with {d.units} units (unit dim {d.unit_dim}) on rank {r}; every rank must "
                            "run the same model so that statistics can be combined"
                        )
                    continue
                seen[d.name] = (r, d)
                new.append(d)
        for d in new:
            self._agreed_names[d.name] = len(self.agreed)
            self.agreed.append(d)
        return new

    # -- reducing a step ---------------------------------------------------------------------------------------
    def post_reduce(
        self,
        banks: Sequence[StateBank],
        row: int,
        site_order: torch.Tensor,
        unit_orders: Sequence[torch.Tensor],
        counts: torch.Tensor,
    ) -> PendingReduction:
        """Post the combination of one closed ring row of every bank, and of the host counts, without waiting.

        Args:
            banks: Collector state banks (their per-step states of ``row`` get global values at
                :meth:`PendingReduction.wait`).
            row: The ring row of the step.
            site_order: Local site index of each agreed site, in the agreed order.
            unit_orders: Per bank, the local positions of the agreed sites' units, in the agreed order.
            counts: ``(3, n_agreed)`` float64 host counts (calls, elements, backward) in the agreed order.
        """
        groups: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"sum": [], "max": [], "min": []}
        for bank, unit_order in zip(banks, unit_orders):
            for name, spec in bank.specs.items():
                if spec.persistent:
                    continue  # derived from reduced values, identical on every rank
                groups[spec.reduce].append((bank.ring[name][row], unit_order if spec.per_unit else site_order))
        posted = []
        for kind, parts in groups.items():
            if parts:
                flat = torch.cat([values[order].to(torch.float64) for values, order in parts])
                op = getattr(dist.ReduceOp, _OPS[kind])
                posted.append((dist.all_reduce(flat, op=op, group=self._device_group, async_op=True), flat, parts))
        counts = counts.clone()
        count_work = dist.all_reduce(counts, group=self._host, async_op=True)
        return PendingReduction(posted, count_work, counts)


class RankSum:
    """Sums small tensors over every rank, in process groups of hookscope's own (gloo for CPU tensors, NCCL for CUDA
    ones), never interleaved with the training's collectives (FSDP2's all-gathers and reduce-scatters run in the
    mesh's groups). :meth:`post` does not wait; the returned function waits and gives the sum. Every rank must
    post the same tensors in the same order (parameter statistics at every recorded ``step()``)."""

    def __init__(self) -> None:
        self._groups: dict[str, Any] = {}

    def post(self, tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
        kind = tensor.device.type
        if kind not in self._groups:  # every rank gets here at the same step(): the groups are made in step
            self._groups[kind] = dist.new_group(backend="nccl" if kind == "cuda" else "gloo")
        work = dist.all_reduce(tensor, group=self._groups[kind], async_op=True)

        def result() -> torch.Tensor:
            _wait(work, None)
            return tensor

        return result


class PendingReduction:
    """A step's combination, posted; :meth:`wait` writes the global values into the ring row it came from."""

    def __init__(self, posted: list[tuple[Any, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]],
                 count_work: Any, counts: torch.Tensor) -> None:  # fmt: skip
        self._posted = posted
        self._count_work = count_work
        self._counts = counts

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        """Wait for the other ranks; returns the global ``(3, n_agreed)`` counts.

        Raises:
            StateError: ``timeout`` seconds passed, or a peer vanished.
        """
        for work, flat, parts in self._posted:
            _wait(work, timeout)
            offset = 0
            for values, order in parts:
                n = order.numel()
                values.index_copy_(0, order, flat[offset : offset + n].to(values.dtype))
                offset += n
        _wait(self._count_work, timeout)
        return self._counts


def _wait(work: Any, timeout: float | None) -> None:
    try:
        done = work.wait() if timeout is None else work.wait(timeout=datetime.timedelta(seconds=timeout))
    except RuntimeError as e:  # gloo raises on a timeout or a vanished peer
        raise StateError(f"hookscope: rank {rank()}: the other ranks did not combine a step: {e}") from None
    if done is False:
        raise StateError(f"hookscope: rank {rank()}: the other ranks did not combine a step within {timeout} s")


class CombinedRecorder(Protocol):
    """What :class:`Combiner` reads and calls on the recorder whose steps it combines (``hookscope.recording``)."""

    sites: list[Site]
    _device: torch.device | None
    _banks: list[StateBank]
    _keys: list[tuple[str, int]]

    def new_site(
        self,
        key: tuple[str, int],
        layer: str,
        module: str,
        call: int,
        spec: ActivationSpec,
        function: str | None,
        bounds: Bounds | None,
    ) -> Site | None: ...

    def _bind_device(self, device: torch.device) -> None: ...

    def _bind_state(self, site: Site) -> None: ...


def _default_device() -> torch.device:
    """The device for the state of a rank that has run no site yet: the current CUDA device under NCCL."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Combiner:
    """Combines each closed step across ranks, two ``step()`` calls later, without ever waiting in ``step()`` for an
    operation that another rank posts in its current ``step()`` (see :mod:`hookscope.distributed`): at each call
    it waits for what every rank posted at the previous call (a step's combined values, the next step's header),
    posts the combination of the step whose header it read, and posts the header of the step it closes."""

    def __init__(self, recorder: CombinedRecorder) -> None:
        self._recorder = weakref.ref(recorder)
        self.cross: CrossRank | None = None
        #: Closed, its header posted: the last closed row of the ring.
        self.waiting: StepRecord | None = None
        #: Its combination posted (the row before it), with what finishing it needs.
        self.combining: tuple[StepRecord, PendingReduction, list[int]] | None = None
        self.ready: list[StepRecord] = []  # combined by a report since the last step(): final at the next one
        self._orders: tuple[list[int], torch.Tensor, list[torch.Tensor]] | None = None

    @property
    def recorder(self) -> CombinedRecorder:
        recorder = self._recorder()
        assert recorder is not None
        return recorder

    @property
    def unfinished(self) -> int:
        """Closed rows at the end of the ring that are not combined yet."""
        return (self.waiting is not None) + (self.combining is not None)

    def release(self) -> None:
        """Drop the process groups and any pending work (at ``detach()``; a later ``step()`` makes new groups).

        Now, not whenever the garbage collector frees the manager: a gloo group that
        ``torch.distributed.destroy_process_group()`` already dropped, freed while the interpreter shuts down,
        aborts the process ("terminate called without an active exception").
        """
        self.cross = None
        self.waiting = None
        self.combining = None

    def post(self, record: StepRecord, passes: int) -> None:
        rec = self.recorder
        if self.cross is None:
            self.cross = CrossRank(rec._device)
        self.cross.post_header(record.step, passes, len(rec.sites), rec._device)
        self.waiting = record

    def advance(self, timeout: float | None = None) -> list[StepRecord]:
        """At ``step()`` (and ``detach()``): finish the step being combined, then post the combination of the waiting
        one. Returns the records that became final."""
        final = [*self.ready, *self.finish_combining(timeout)]
        self.ready = []
        record = self.waiting
        if record is None or self.cross is None:
            return final
        try:  # it stays waiting (in the ring) while sites of other ranks are entered
            self._post_combination(record, timeout)
        finally:
            self.waiting = None
        return final

    def finish_combining(self, timeout: float | None = None) -> list[StepRecord]:
        """Wait for the step being combined (posted by every rank at its previous ``step()``) and finalise it."""
        if self.combining is None:
            return []
        record, pending, order = self.combining
        rec = self.recorder
        try:
            with _no_torch_function(), torch.no_grad():
                calls, elements, backward = pending.wait(timeout).tolist()
        finally:
            self.combining = None
        shapes = dict(zip(record.sites, record.shapes))
        ran = [g for g in range(len(order)) if calls[g] + backward[g] > 0]
        record.sites = [order[g] for g in ran]
        record.calls = [int(calls[g]) for g in ran]
        record.elements = [int(elements[g]) for g in ran]
        record.backward = [int(backward[g]) for g in ran]
        record.units = [rec.sites[i].units for i in record.sites]
        record.shapes = [shapes.get(i, rec.sites[i].shape) for i in record.sites]
        return [record] if record.sites else []

    def _post_combination(self, record: StepRecord, timeout: float | None) -> None:
        assert self.cross is not None
        rec = self.recorder
        _, changed = self.cross.read_header(timeout)
        if changed:
            local = {s.layer for s in rec.sites}
            for d in self.cross.agree(self.describe_sites()):
                if d.name not in local:
                    self.enter_remote_site(d)
            self._orders = None
        if not self.cross.agreed or not rec._banks:
            record.sites, record.calls, record.elements, record.backward = [], [], [], []
            record.units, record.shapes = [], []
            return
        order, site_order, unit_orders = self._order_tensors()
        position = {i: g for g, i in enumerate(order)}
        counts = torch.zeros(3, len(order), dtype=torch.float64)
        for i, c, e, b in zip(record.sites, record.calls, record.elements, record.backward):
            if i in position:
                counts[:, position[i]] = torch.tensor([c, e, b], dtype=torch.float64)
        row = rec._banks[0].closed_rows - 1
        with _no_torch_function(), torch.no_grad():
            pending = self.cross.post_reduce(rec._banks, row, site_order, unit_orders, counts)
        self.combining = (record, pending, order)

    def describe_sites(self) -> list[SiteDescription]:
        """The sites this rank can describe to the others (bound, not skipped)."""
        rec = self.recorder
        return [
            SiteDescription(
                s.layer,
                rec._keys[s.index],
                s.module,
                s.call,
                s.kind,
                s.function,
                s.bounds,
                s.unit_dim,
                s.units,
                s.shape,
                s.dim,
            )
            for s in rec.sites
            if s.units_fixed and s.problem is None
        ]

    def enter_remote_site(self, d: SiteDescription) -> Site:
        """Enter a site that only other ranks have run so far, as they described it."""
        from hookscope.activations import get_activation

        rec = self.recorder
        site = rec.new_site(d.key, d.name, d.module, d.call, get_activation(d.kind), d.function, d.bounds)
        if site is None:
            raise StateError(
                f"hookscope: site {d.name!r} of another rank is left out by this rank's `include`/`exclude`; every "
                "rank must use the same patterns"
            )
        site.unit_dim, site.units, site.shape, site.units_fixed = d.unit_dim, d.units, d.shape, True
        site.dim = d.dim
        site.reduce_dims = tuple(i for i in range(len(d.shape)) if i != d.unit_dim)
        if rec._device is None:
            rec._bind_device(_default_device())
        rec._bind_state(site)
        return site

    def _order_tensors(self) -> tuple[list[int], torch.Tensor, list[torch.Tensor]]:
        """The agreed sites as local site indices, and the positions of their units in each bank."""
        if self._orders is None:
            rec = self.recorder
            assert self.cross is not None and rec._device is not None
            index = {s.layer: s.index for s in rec.sites}
            order = [index[d.name] for d in self.cross.agreed]
            device = rec._device
            units = []
            for bank in rec._banks:
                ranges = [r for r in map(bank.unit_range, order) if r is not None]
                parts = [torch.arange(off, off + n, device=device) for off, n in ranges]
                units.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device))
            self._orders = (order, torch.tensor(order, dtype=torch.long, device=device), units)
        return self._orders
