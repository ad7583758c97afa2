"""Statistics computed inside compiled graphs: the accumulators a graph adds into, and how a step takes them.

Under ``torch.compile`` a site's event is planned once, while dynamo traces it (:mod:`hookscope.traced`): the tracer
names the site as an eager hook would, and the graph gets the collectors' own ``update`` (and, in the backward graph,
``update_grad``) traced into it, adding in place into an :class:`Entry`: one accumulator per per-step state of each
collector that records the site, and the site's calls, output elements and backward passes. Those tensors are
allocated when the event is planned; they are inputs of the graph, which dynamo fetches through the entry's
attributes at every call and guards on their shapes, not on their identity, so a graph does the same work at every
run and nothing recompiles. No Python runs per site at run time.

Each entry has a row of accumulators per step that may wait to be folded (:data:`ROWS`: the steps of a ring, and
the open one). ``step()`` does no tensor work for them (:meth:`InGraph.close_open`, :meth:`InGraph.pend`): the
closed step keeps its row, and every entry points its attributes at a free row (plain attribute assignments). A
recorded step's record waits with its row: its counts (the calls, elements and
backward passes of the sites the graphs ran) reach the host, and its accumulators the collectors' ring, when the
ring is flushed (:meth:`InGraph.settle`: one copy to the host and a few ``torch._foreach_*`` operations for all the
waiting steps and sites, every :data:`~hookscope.collectors.base.RING_STEPS` steps or when a report asks), which
is when every record's values arrive anyway; so a compiled step has no host synchronisation. A step that is not
recorded (``every``, ``pause()``) returns its row to the identities at once. What the eager path decides per
forward pass is decided per step, from the counts: the entries of graphs traced in evaluation passes
(``torch.no_grad()``, eval mode) count only while the model has not trained, as
:class:`hookscope.tracing.Evaluation` says, and not in a step in which a training pass ran. A recorded step in
which no graph ran and nothing was recorded eagerly has no row in the history. hookscope never modifies in place a
row that a compiled backward still to run has saved (autograd would refuse that backward): see :class:`Entry` and
:meth:`InGraph.snapshot_open`.

Under ``torch.distributed`` a step's record is handed to the cross-rank combination as it closes, so its row is
settled at once (one host copy per step there, as every step already waits for collectives).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

from hookscope.collectors.base import RING_STEPS, Collector, SiteState
from hookscope.warn import warn_once

if TYPE_CHECKING:
    from hookscope.history import StepRecord
    from hookscope.sites import Site

#: A ``hookscope.recording.Recorder`` (which imports this module): its site table, state banks and counts.
Recorder = Any

__all__ = ["ROWS", "Entry", "InGraph", "merge_counts"]

#: Rows of accumulators per entry: the closed steps a ring holds before it is flushed, and the open step.
ROWS = RING_STEPS + 1

_IDENTITY = {"sum": 0.0, "max": -math.inf, "min": math.inf}
_FOLD: dict[str, Callable[..., object]] = {
    "sum": torch._foreach_add_, "max": torch._foreach_maximum_, "min": torch._foreach_minimum_,
}  # fmt: skip


class Entry:
    """The accumulators of one site in graphs of one kind of pass (training or evaluation), with :data:`ROWS` rows
    each: the graphs read one row (:meth:`use`) through ``count`` (calls and output elements), ``backward`` and the
    views of the collectors' states.

    What the forward graph adds into (the calls, the elements, the states of collectors that only read outputs) is
    one ``(ROWS, n)`` tensor per accumulator, whose rows are the views the graphs take (a view of its own base: no
    two inputs of a graph alias), so that the rows of several steps are folded and reset as one block. What the
    backward graph adds into (the backward passes, the states of collectors that read gradients) is saved by
    autograd with the forward pass, and autograd refuses a backward whose saved tensors were modified in place
    since: those rows are separate tensors that hookscope never modifies, only reads and *replaces* (a backward
    still to run after its row was folded adds into the replaced tensor). A per-site state's row has one element,
    not zero dimensions: dynamo treats a 0-d float64 tensor as a Python number and guards on its value (``.item()``
    at every call)."""

    def __init__(self, site: Site, trains: bool, device: torch.device) -> None:
        self.site = site
        self.trains = trains
        self.device = device
        #: Calls and output elements, ``(ROWS, 2)``: one tensor (each input of a graph is guarded at every call).
        self.counts = self._new((ROWS, 2))
        with torch.inference_mode(False):
            self._count_views = list(self.counts.unbind(0))  # (views are operations)
        #: The forward graph's accumulators: ``(collector index, state name, reduction, rows)``.
        self.accumulators: list[tuple[int, str, str, torch.Tensor]] = []
        #: The backward graph's: ``(collector index, state name, reduction, index in a grad row, state)``.
        self.grad_accumulators: list[tuple[int, str, str, int, int]] = []
        self.grad_rows: list[list[torch.Tensor]] = [[] for _ in range(ROWS)]  # per row: backward, then each state's
        #: What the graph traces: ``(collector, state, site)``, the state holding this entry's accumulators.
        self.fwd: list[tuple[Collector, SiteState, Site]] = []
        self.grad: list[tuple[Collector, SiteState, Site]] = []
        self.states: list[SiteState] = []  # those states, one per collector that records the site
        self._views: list[list[dict[str, torch.Tensor]]] = [[] for _ in range(ROWS)]  # per row, per state
        self._add_grad("sum", 1)  # the backward passes
        self.use(0)

    def _new(self, shape: tuple[int, ...], value: float = 0.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        with torch.inference_mode(False):
            return torch.full(shape, value, dtype=dtype, device=self.device)

    def _add_grad(self, reduce: str, n: int, dtype: torch.dtype = torch.float64) -> int:
        block = self._new((ROWS, n), _IDENTITY[reduce], dtype)
        with torch.inference_mode(False):
            for r, t in enumerate(block.unbind(0)):
                self.grad_rows[r].append(t.clone())  # (a tensor of its own per row)
        return len(self.grad_rows[0]) - 1

    def add_state(self, ci: int, state: SiteState, specs: dict[str, Any], grad: bool) -> None:
        """Accumulators for the per-step states ``specs`` of collector ``ci`` (``grad``: it reads gradients, so the
        backward graph adds into them); ``state``'s views of a row once the row is used."""
        self.states.append(state)
        for r in range(ROWS):
            self._views[r].append({})
        for name, spec in specs.items():
            n = state_units(self.site, spec)
            if grad:
                k = self._add_grad(spec.reduce, n, spec.dtype)
                self.grad_accumulators.append((ci, name, spec.reduce, k, len(self.states) - 1))
                for r in range(ROWS):
                    self._views[r][-1][name] = self.grad_rows[r][k]
            else:
                rows = self._new((ROWS, n), _IDENTITY[spec.reduce], spec.dtype)
                self.accumulators.append((ci, name, spec.reduce, rows))
                with torch.inference_mode(False):
                    for r in range(ROWS):
                        self._views[r][-1][name] = rows[r]

    def use(self, row: int) -> None:
        """Point what the graphs read at row ``row``."""
        self._row = row
        self.count = self._count_views[row]
        self.backward = self.grad_rows[row][0]
        for state, views in zip(self.states, self._views[row]):
            state._views = views

    def forward_blocks(self) -> list[tuple[str, torch.Tensor]]:
        """``(reduction, rows)`` of the counts and every accumulator of the forward graph."""
        return [("sum", self.counts), *((r, rows) for _, _, r, rows in self.accumulators)]

    def replace_grad(self, rows: list[int]) -> None:
        """New tensors, at the identities, for the backward graph's accumulators of rows ``rows``."""
        reduces = ["sum", *(reduce for _, _, reduce, _, _ in self.grad_accumulators)]
        with torch.inference_mode(False):
            for k, reduce in enumerate(reduces):
                # one tensor for all the rows: hookscope never modifies them in place, so the version counter
                # their views share never moves but by the graphs' own writes
                old = self.grad_rows[rows[0]][k]
                fresh = torch.full((len(rows), *old.shape), _IDENTITY[reduce], dtype=old.dtype, device=old.device)
                for r, t in zip(rows, fresh.unbind(0)):
                    self.grad_rows[r][k] = t
            for r in rows:
                for _, name, _, k, state in self.grad_accumulators:
                    self._views[r][state][name] = self.grad_rows[r][k]
        if self._row in rows:
            self.use(self._row)


def state_units(site: Site, spec: Any) -> int:
    """The values a per-step state holds for a site: its units, or one."""
    return site.units if spec.per_unit else 1


def _warm_up(entry: Entry, dtype: torch.dtype, device: torch.device, said: set[tuple[str, str]]) -> bool:
    """Run the collectors' updates once on a small tensor of the site's layout (every dim but the units' of size 1),
    into scratch copies of the accumulators: what they compute once and keep (a site's saturation thresholds for a
    dtype) then exists before dynamo traces them, which would otherwise guard on its absence and recompile. False
    (said once) when one of them raises (a custom collector that reads a persistent state in ``update()``: a graph
    gets per-step states only): its trace would fail the same way, inside dynamo's."""
    site = entry.site
    shape = [1] * max(len(site.shape), 1 if site.unit_dim is not None else 0)
    if site.unit_dim is not None:
        shape[site.unit_dim] = site.units
    with torch._C.DisableTorchFunction(), torch.no_grad(), torch.inference_mode(False):
        x = torch.zeros(shape, dtype=dtype, device=device)
        for pairs, grad in ((entry.fwd, False), (entry.grad, True)):
            for collector, state, s in pairs:
                scratch = SiteState(state.site_index)
                scratch._views = {name: acc.clone() for name, acc in state._views.items()}
                try:
                    if grad:
                        collector.update_grad(scratch, x, s)
                    else:
                        collector.update(scratch, x, s)
                except Exception as e:
                    method = "update_grad" if grad else "update"
                    if (collector.name, method) not in said:
                        said.add((collector.name, method))
                        warn_once(
                            f"hookscope: {collector.name}.{method}() cannot run inside a compiled graph "
                            f"({type(e).__name__}: {e}): compiled code does not record the sites it applies to "
                            f"({s.layer!r} first; inside a graph, {method}() gets the collector's per-step states "
                            "only, and must be tensor operations)"
                        )
                    return False
    return True


class _Trained(Protocol):
    trained: bool


#: A foreach call that folds sources into destinations: ``(function, destinations, sources)``.
_Fold = tuple[Callable[..., object], list[torch.Tensor], list[torch.Tensor]]
#: A site's counts in a step: ``(site, calls, elements, backward passes)``.
_Counts = tuple["Site", float, float, float]
#: A step's row waiting to be settled: (the entries' row, the collectors' ring row of the step, its record, whether
#: the model had trained when it closed).
_Pending = tuple[int, int, "StepRecord", bool]


class InGraph:
    """A recorder's entries, by index (attributes ``e0``, ``e1``... which the traced code reads: adding one never
    invalidates a compiled graph), the rows of closed steps waiting to be settled, and the fold of their
    accumulators into the collectors' state.

    Args:
        keep: Whether the open step is recorded (``every``, ``pause()``), asked when it closes.
        evaluation: The tracer's ``hookscope.tracing.Evaluation``: its ``trained`` says whether the model has
            trained (a training pass was recorded); settling a training graph's calls sets it.
    """

    def __init__(self, keep: Callable[[], bool], evaluation: _Trained) -> None:
        self.entries: list[Entry] = []
        #: Forward passes that began outside the graphs in the open step (the hooks of a compiled model's root run
        #: eagerly): ``[not recorded, recorded]``, as the tracer admitted them when they began.
        self.passes = [0, 0]
        self._by_key: dict[tuple[int, bool], int] = {}
        #: The keys (name, call index) of the sites that compiled graphs record, for passes that train or not.
        self.planned: dict[bool, set[tuple[str, int]]] = {}
        self._claims: list[tuple[bool, tuple[str, int]]] = []  # keys the compile being traced added to planned
        self._refused: set[tuple[int, bool]] = set()  # entries a collector's update cannot be traced for
        self._said: set[tuple[str, str]] = set()  # (collector, method) whose update could not be traced
        self._open = 0  # the row the graphs add into
        self._free = list(range(ROWS - 1, 0, -1))  # (taken from the end: rows in order)
        self._pending: list[_Pending] = []
        self._plans: dict[Any, list[Any]] = {}  # see _plan
        self._resets: dict[Any, tuple[list[torch.Tensor], list[Any]]] = {}  # see _reset
        self._blocks: dict[Any, list[torch.Tensor]] = {}  # see _counts
        self._dests: dict[tuple[int, int, str, int], torch.Tensor] = {}  # see _fold
        self._dest_generation: tuple[int, ...] = ()
        self._keep, self._evaluation = keep, evaluation

    def entry_for(self, recorder: Recorder, site: Site, trains: bool, dtype: torch.dtype) -> int:
        """The index of the entry of ``site`` in passes that train (or not), made at its first planned event (whose
        output has ``dtype``); -1 when a collector's update cannot run inside a graph (said once): compiled code
        then does not record the site."""
        key = (site.index, trains)
        index = self._by_key.get(key)
        if index is None:
            if key in self._refused:
                return -1
            entry = self._entry(recorder, site, trains, dtype)
            if entry is None:
                self._refused.add(key)
                return -1
            index = len(self.entries)
            self.entries.append(entry)
            self._by_key[key] = index
            setattr(self, f"e{index}", entry)
        taken = self.planned.setdefault(trains, set())
        site_key = recorder._keys[site.index]
        if site_key not in taken:
            taken.add(site_key)
            self._claims.append((trains, site_key))
        return index

    def _entry(self, recorder: Recorder, site: Site, trains: bool, dtype: torch.dtype) -> Entry | None:
        slot = recorder._slots[site.index]
        device = recorder._device
        assert device is not None  # the site is bound
        entry = Entry(site, trains, device)
        states: dict[int, SiteState] = {}
        for ci, collector in enumerate(recorder.collectors):
            if not slot.applies[ci]:
                continue
            state = states[ci] = SiteState(site.index)
            # update() and update_grad() write per-step states only
            specs = {n: spec for n, spec in collector.state_specs.items() if not spec.persistent}
            entry.add_state(ci, state, specs, grad=any(c is collector for c, _ in slot.grad))
        index_of = {id(c): i for i, c in enumerate(recorder.collectors)}
        entry.fwd = [(c, states[index_of[id(c)]], site) for c, _ in slot.fwd]
        entry.grad = [(c, states[index_of[id(c)]], site) for c, _ in slot.grad]
        entry.use(0)
        if not _warm_up(entry, dtype, device, self._said):
            return None
        entry.use(self._open)
        return entry

    def keep_claims(self) -> None:
        """The keys the compile traced last planned are in a graph (or a new compile begins)."""
        self._claims.clear()

    def drop_claims(self) -> None:
        """The keys the compile being traced planned are in no graph (it made none, or traces again)."""
        for trains, site_key in self._claims:
            self.planned[trains].discard(site_key)
        self._claims.clear()

    # ----------------------------------------------------------------------------------------------------------
    # steps

    def close_open(self) -> bool:
        """The open step closes: whether the graphs' row of it is kept (the step is recorded: as its passes were
        admitted when they began, if any began outside the graphs, so that a ``pause()`` just before ``step()``
        does not drop them; else as the manager says now). When it is, :meth:`pend` must follow with its record;
        when not, the row returns to the identities now."""
        began, self.passes = self.passes, [0, 0]
        if not self.entries:
            return False
        keep = began[1] > 0 if any(began) else self._keep()
        if not keep:
            self._reset(((self._open, 1),))
        return keep

    def pend(self, record: StepRecord, ring_row: int) -> None:
        """The graphs' row of the step just closed waits with its record (``ring_row``: the step's row in the
        collectors' rings) until :meth:`settle`; the graphs add into a free row from now on."""
        self._pending.append((self._open, ring_row, record, self._evaluation.trained))
        self._open = self._free.pop()
        for entry in self.entries:
            entry.use(self._open)

    def realign(self) -> None:
        """Right after a step closed (the open row holds nothing yet) with no step waiting: the graphs add into row 0
        from now on, so that the waiting steps of each ring take the same rows (and the same prepared calls)."""
        if self._pending or self._open == 0 or not self.entries:
            return
        self._free = list(range(ROWS - 1, 0, -1))  # (nothing waits: every other row is free)
        self._open = 0
        for entry in self.entries:
            entry.use(0)

    def settle(self, recorder: Recorder) -> None:
        """Give the waiting steps their counts (added to their records) and fold their accumulators into their rows
        of the collectors' rings: before the rings are flushed, and when the site table grows."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        entries = self.entries
        runs = _runs([(row, ring_row) for row, ring_row, _, _ in pending])
        with torch._C.DisableTorchFunction(), torch.no_grad():
            # the counts of every entry in every waiting step, in one copy: a row per step
            steps = torch.cat(self._counts(runs)).tolist()
            dropped: list[tuple[int, int]] = []
            trained = False  # a step settled before trained (for graphs whose passes the tracer does not see begin)
            for (row, _, record, trained_then), step in zip(pending, steps):
                # the evaluation rule as of each step, in order: whether the model had trained when it closed
                kept, drop = self._kept(step, keep=True, trained=trained_then or trained)
                trained = trained or any(step[3 * i] for i, e in enumerate(entries) if e.trains)
                if kept:
                    merge_counts(record, [(entries[i].site, *step[3 * i : 3 * i + 3]) for i in kept])
                dropped += ((i, row) for i in drop)
            self._fold(runs, recorder._banks, dropped)
        self._free.extend(row for row, _, _, _ in pending)
        self._free.sort(reverse=True)

    def snapshot_open(self, recorder: Recorder) -> tuple[list[_Counts], Callable[[], None]] | None:
        """For a report's snapshot of the open step: add what the graphs accumulated in it so far to the open rows of
        the rings (when the step is recorded), without modifying the graphs' rows (a backward still to run saved
        them). Returns the counts ``(site, calls, elements, backward)`` for the snapshot's record and what restores
        the rings exactly, or ``None`` when the graphs recorded nothing in the open step."""
        entries = self.entries
        if not entries:
            return None
        began, row = self.passes, self._open
        banks = recorder._banks
        with torch._C.DisableTorchFunction(), torch.no_grad():
            counts = torch.cat([t for e in entries for t in (e._count_views[row], e.grad_rows[row][0])]).tolist()
            kept, _ = self._kept(counts, began[1] > 0 if any(began) else self._keep(), self._evaluation.trained)
            if not kept:
                return None
            ring_row = banks[0].closed_rows
            pairs = []
            for i in kept:
                e = entries[i]
                sources = [(ci, name, reduce, rows[row]) for ci, name, reduce, rows in e.accumulators]
                sources += [(ci, name, reduce, e.grad_rows[row][k]) for ci, name, reduce, k, _ in e.grad_accumulators]
                pairs += [
                    (e.trains, reduce, banks[ci].block(e.site.index, name, ring_row, 1)[0], source)
                    for ci, name, reduce, source in sources
                ]  # fmt: skip
            plan = _grouped(pairs)
            touched = [d for _, dests, _ in plan for d in dests]
            saved = [d.clone() for d in touched]
            for fold, dests, sources_ in plan:
                fold(dests, sources_)

        def restore() -> None:
            with torch._C.DisableTorchFunction(), torch.no_grad():
                torch._foreach_copy_(touched, saved)

        return [(entries[i].site, *counts[3 * i : 3 * i + 3]) for i in kept], restore

    def _counts(self, runs: tuple[tuple[int, int, int], ...]) -> list[torch.Tensor]:
        """The counts of the rows ``runs``, a row per step: ``calls, elements, backward`` of each entry in turn."""
        key = (tuple((row, n) for row, _, n in runs), len(self.entries))
        blocks = _memo(self._blocks, key, lambda: [e.counts[r : r + n] for r, _, n in runs for e in self.entries])
        out, k = [], 0
        for r, _, n in runs:
            parts = []
            for e in self.entries:
                parts += [blocks[k], torch.stack([e.grad_rows[j][0] for j in range(r, r + n)])]
                k += 1
            out.append(torch.cat(parts, 1))
        return out

    def _kept(self, counts: list[float], keep: bool, trained: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Of the entries that ran in one step (``counts``: calls, elements, backward per entry), those whose counts
        are recorded (when the step is, ``keep``; an evaluation graph's only while the model has not trained: had
        not, ``trained``, nor in this step), and the others."""
        entries = self.entries
        ran = [i for i in range(len(entries)) if counts[3 * i] or counts[3 * i + 2]]
        if any(counts[3 * i] for i in ran if entries[i].trains):
            self._evaluation.trained = trained = True  # (an evaluation pass of the same step is dropped, as in eager)
        evaluation = not trained
        kept = tuple(i for i in ran if keep and (entries[i].trains or evaluation))
        return kept, tuple(i for i in ran if i not in kept)

    def _fold(self, runs: tuple[tuple[int, int, int], ...], banks: list[Any], dropped: list[tuple[int, int]]) -> None:
        """Fold rows into rows of the rings (``runs``: ``(row, ring row, rows)``, consecutive ones) and return them
        to the identities; the accumulators of ``dropped`` ``(entry, row)`` are not folded. Every accumulator of every
        entry is folded (the forward graph's as one block per run): those that did not run hold identities."""
        entries = self.entries
        for i, row in dropped:  # (an evaluation graph once the model trained, a step that is not recorded: rare)
            for reduce, rows in entries[i].forward_blocks():
                rows[row].fill_(_IDENTITY[reduce])
            entries[i].replace_grad([row])
        for fold, dests, sources in self._plan(runs, banks):
            fold(dests, sources)
        # the backward graph's accumulators: a tensor per row (see Entry)
        generation = tuple(bank.generation for bank in banks)
        if generation != self._dest_generation:
            self._dests.clear()
            self._dest_generation = generation
        pairs = []
        for row, ring_row, n in runs:
            for e in entries:
                for ci, name, reduce, k, _ in e.grad_accumulators:
                    for j in range(n):
                        key = (ci, e.site.index, name, ring_row + j)
                        dest = self._dests.get(key)
                        if dest is None:
                            with torch.inference_mode(False):
                                dest = self._dests[key] = banks[ci].block(e.site.index, name, ring_row + j, 1)[0]
                        pairs.append((e.trains, reduce, dest, e.grad_rows[row + j][k]))
        for fold, dests, sources in _grouped(pairs):
            fold(dests, sources)
        self._reset(tuple((row, n) for row, _, n in runs))

    def _plan(self, runs: tuple[tuple[int, int, int], ...], banks: list[Any]) -> list[Any]:
        """The foreach calls that fold the forward graph's blocks of rows ``runs`` into the rings' blocks (made once
        per runs, set of entries and layout of the banks)."""
        key = (runs, len(self.entries), tuple(bank.generation for bank in banks))
        return _memo(
            self._plans,
            key,
            lambda: _grouped(
                (entry.trains, reduce, banks[ci].block(entry.site.index, name, ring_row, n), rows[row : row + n])
                for row, ring_row, n in runs
                for entry in self.entries
                for ci, name, reduce, rows in entry.accumulators
            ),
        )

    def _reset(self, runs: tuple[tuple[int, int], ...]) -> None:
        """Return the rows ``runs`` (``(row, rows)``) of every entry to the identities: the forward graph's blocks in
        place, the backward graph's tensors replaced."""

        def make() -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, float]]]:
            zeros: list[torch.Tensor] = []
            others: list[tuple[torch.Tensor, float]] = []
            for row, n in runs:
                for entry in self.entries:
                    for reduce, rows in entry.forward_blocks():
                        if reduce == "sum":
                            zeros.append(rows[row : row + n])
                        else:
                            others.append((rows[row : row + n], _IDENTITY[reduce]))
            return zeros, others

        resets = _memo(self._resets, (runs, len(self.entries)), make)
        with torch._C.DisableTorchFunction(), torch.no_grad():
            torch._foreach_zero_(resets[0])
            for rows, value in resets[1]:  # (max and min states: rare)
                rows.fill_(value)
        replaced = [row + j for row, n in runs for j in range(n)]
        for entry in self.entries:
            entry.replace_grad(replaced)


_T = TypeVar("_T")


def _memo(cache: dict[Any, _T], key: Any, make: Callable[[], _T]) -> _T:
    """``cache[key]``, made by ``make()`` the first time, outside inference mode (views made in it could not be
    updated in place outside it). The caches of prepared views are keyed by a layout of rows and entries: a full
    one (64 layouts) is cleared first."""
    value = cache.get(key)
    if value is None:
        with torch.inference_mode(False):
            value = make()
        if len(cache) >= 64:
            cache.clear()
        cache[key] = value
    return value


def _grouped(pairs: Iterable[tuple[bool, str, torch.Tensor, torch.Tensor]]) -> list[_Fold]:
    """The foreach calls that fold ``(trains, reduction, destination, source)`` pairs: one per reduction and kind
    of pass (a site's training and evaluation entries fold into the same views: separate calls, since a foreach
    call may update its tensors in parallel)."""
    grouped: dict[tuple[bool, str], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for trains, reduce, dest, source in pairs:
        dests, sources = grouped.setdefault((trains, reduce), ([], []))
        dests.append(dest)
        sources.append(source)
    return [(_FOLD[reduce], dests, sources) for (_, reduce), (dests, sources) in grouped.items()]


def _runs(steps: list[tuple[int, int]]) -> tuple[tuple[int, int, int], ...]:
    """``(row, ring row)`` of consecutive steps as runs ``(first row, first ring row, steps)`` in which both go up
    by one (the rows of an entry wrap around)."""
    runs: list[list[int]] = []
    for row, ring_row in steps:
        if runs and row == runs[-1][0] + runs[-1][2] and ring_row == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([row, ring_row, 1])
    return tuple((r, b, n) for r, b, n in runs)


def merge_counts(record: StepRecord, counts: list[_Counts]) -> None:
    """Add the counts ``(site, calls, elements, backward)`` of sites the graphs ran in a closed step to its record
    (a site it lists already adds to its counts), whose sites are then in the order of their index: the order of
    first calls when the graphs were planned, as eager steps list them."""
    for site, calls, _, _ in counts:
        if site.first_step is None and calls:
            site.first_step = record.step
    if not record.sites and len({site.index for site, *_ in counts}) == len(counts):  # (a step only graphs ran in)
        counts = sorted(counts, key=lambda c: c[0].index)
        record.sites[:] = [site.index for site, *_ in counts]
        record.calls[:] = [int(c[1]) for c in counts]
        record.elements[:] = [int(c[2]) for c in counts]
        record.backward[:] = [int(c[3]) for c in counts]
        record.units[:] = [site.units for site, *_ in counts]
        record.shapes[:] = [site.shape for site, *_ in counts]
        return
    position = {site: k for k, site in enumerate(record.sites)}
    for site, calls, elements, backward in counts:
        k = position.get(site.index)
        if k is None:
            position[site.index] = len(record.sites)
            record.sites.append(site.index)
            record.calls.append(int(calls))
            record.elements.append(int(elements))
            record.backward.append(int(backward))
            record.units.append(site.units)
            record.shapes.append(site.shape)
        else:
            record.calls[k] += int(calls)
            record.elements[k] += int(elements)
            record.backward[k] += int(backward)
    order = sorted(range(len(record.sites)), key=record.sites.__getitem__)
    for name in ("sites", "calls", "elements", "backward", "units", "shapes"):
        values = getattr(record, name)
        values[:] = [values[k] for k in order]
