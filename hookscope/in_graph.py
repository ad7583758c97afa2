"""Statistics computed inside compiled graphs: the accumulators a graph adds into, and how a step takes them.

Under ``torch.compile`` a site's event is planned once, while dynamo traces it (:mod:`hookscope.traced`): the tracer
names the site as an eager hook would, and the graph gets the collectors' own ``update`` (and, in the backward graph,
``update_grad``) traced into it, adding in place into an :class:`Entry`: one accumulator per per-step state of each
collector that records the site, and the site's calls, output elements and backward passes. Those tensors are
allocated once, when the event is planned, and never replaced: they are inputs of the graph (dynamo guards on them),
so a graph does the same work at every run and nothing recompiles. No Python runs per site at run time.

``step()`` folds the entries into the collectors' state (:meth:`InGraph.fold`): the open step's rows get each
accumulator, combined by its state's reduction (sum, max, min), a few ``torch._foreach_*`` operations for all sites,
and the accumulators return to the reduction's identity. The calls, elements and backward passes of every entry
reach the host at once (one small copy per step: on CUDA, that copy waits for the step's work), because a step's
record lists the sites that ran and their counts. What the eager path decides per forward pass is decided here per
step, from those counts: a step that is not recorded (``every``, ``pause()``) keeps nothing; the entries of graphs
traced in evaluation passes (``torch.no_grad()``, eval mode) count only while the model has not trained, as
:class:`hookscope.tracing.Evaluation` says, and not in a step in which a training pass ran.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch

from hookscope.collectors.base import Collector, SiteState
from hookscope.warn import warn_once

if TYPE_CHECKING:
    from hookscope.sites import Site

#: A ``hookscope.recording.Recorder`` (which imports this module): its site table, state banks and counts.
Recorder = Any

__all__ = ["Entry", "InGraph"]

_IDENTITY = {"sum": 0.0, "max": -math.inf, "min": math.inf}
_FOLD: dict[str, Callable[..., object]] = {
    "sum": torch._foreach_add_, "max": torch._foreach_maximum_, "min": torch._foreach_minimum_,
}  # fmt: skip


class Entry:
    """The accumulators of one site in graphs of one kind of pass (training or evaluation)."""

    def __init__(self, site: Site, trains: bool, device: torch.device) -> None:
        self.site = site
        self.trains = trains

        def zero() -> torch.Tensor:
            with torch.inference_mode(False):
                return torch.zeros(1, dtype=torch.float64, device=device)

        self.calls, self.elements, self.backward = zero(), zero(), zero()
        #: What the graph traces: ``(collector, state, site)``, the state holding this entry's accumulators.
        self.fwd: list[tuple[Collector, SiteState, Site]] = []
        self.grad: list[tuple[Collector, SiteState, Site]] = []
        #: ``(collector index, state name, reduction, accumulator, its view of the state's shape)`` of every
        #: accumulator. A per-site state's accumulator has one element, not zero dimensions: dynamo treats a 0-d
        #: float64 tensor as a Python number and guards on its value (``.item()`` at every call).
        self.accumulators: list[tuple[int, str, str, torch.Tensor, torch.Tensor]] = []


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


class InGraph:
    """A recorder's entries, by index (attributes ``e0``, ``e1``... which the traced code reads: adding one never
    invalidates a compiled graph), and the fold of their accumulators into the collectors' state.

    Args:
        keep: Whether the open step is recorded (``every``, ``pause()``), asked when it closes.
        evaluation: The tracer's ``hookscope.tracing.Evaluation``: its ``trained`` says whether the model has
            trained (a training pass was recorded); a fold that finds a training graph's calls sets it.
    """

    def __init__(self, keep: Callable[[], bool], evaluation: _Trained) -> None:
        self.entries: list[Entry] = []
        #: Calls the graphs made in the step folded last.
        self.ran = 0
        #: Forward passes that began outside the graphs in the open step (the hooks of a compiled model's root run
        #: eagerly): ``[not recorded, recorded]``, as the tracer admitted them when they began.
        self.passes = [0, 0]
        self._by_key: dict[tuple[int, bool], int] = {}
        #: The keys (name, call index) of the sites that compiled graphs record, for passes that train or not.
        self.planned: dict[bool, set[tuple[str, int]]] = {}
        self._claims: list[tuple[bool, tuple[str, int]]] = []  # keys the compile being traced added to planned
        self._refused: set[tuple[int, bool]] = set()  # entries a collector's update cannot be traced for
        self._said: set[tuple[str, str]] = set()  # (collector, method) whose update could not be traced
        self._counts: list[torch.Tensor] = []  # every entry's calls, elements and backward passes, in order
        self._plans: dict[Any, list[Any]] = {}  # see _plan
        self._reset_plans: dict[tuple[int, ...], Any] = {}  # see _resets
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
            for name, spec in collector.state_specs.items():
                if spec.persistent:
                    continue  # update() and update_grad() write per-step states only
                with torch.inference_mode(False):
                    acc = torch.full(
                        (site.units if spec.per_unit else 1,), _IDENTITY[spec.reduce], dtype=spec.dtype, device=device
                    )
                    folded = acc if spec.per_unit else acc.view(())
                state._views[name] = acc
                entry.accumulators.append((ci, name, spec.reduce, acc, folded))
        index_of = {id(c): i for i, c in enumerate(recorder.collectors)}
        entry.fwd = [(c, states[index_of[id(c)]], site) for c, _ in slot.fwd]
        entry.grad = [(c, states[index_of[id(c)]], site) for c, _ in slot.grad]
        return entry if _warm_up(entry, dtype, device, self._said) else None

    def keep_claims(self) -> None:
        """The keys the compile traced last planned are in a graph (or a new compile begins)."""
        self._claims.clear()

    def drop_claims(self) -> None:
        """The keys the compile being traced planned are in no graph (it made none, or traces again)."""
        for trains, site_key in self._claims:
            self.planned[trains].discard(site_key)
        self._claims.clear()

    def fold(self, recorder: Recorder, commit: bool) -> int:
        """Add what the graphs accumulated since the last fold into the open step (when it is recorded) and return
        the accumulators to their identities (``commit``: the step closes). Returns the calls the graphs made (kept
        or not)."""
        entries = self.entries
        self.ran = 0
        began, self.passes = self.passes, (self.passes if not commit else [0, 0])
        if not entries:
            return 0
        with torch._C.DisableTorchFunction(), torch.no_grad():
            if len(self._counts) != 3 * len(entries):
                self._counts = [t for e in entries for t in (e.calls, e.elements, e.backward)]
            counts = torch.cat(self._counts).tolist()  # the one copy to the host
            ran = tuple(i for i in range(len(entries)) if counts[3 * i] or counts[3 * i + 2])
            if not ran:
                return 0
            if any(counts[3 * i] for i in ran if entries[i].trains):
                self._evaluation.trained = True  # (an evaluation pass of the same step is dropped, as in eager mode)
            # the open step is recorded: as its passes were admitted when they began, if any began outside the graphs
            # (a pause() just before step() does not drop them); else as the manager says now
            keep = began[1] > 0 if any(began) else self._keep()
            evaluation = not self._evaluation.trained
            kept = tuple(i for i in ran if keep and (entries[i].trains or evaluation))
            for i in kept:
                recorder.add_counts(entries[i].site, int(counts[3 * i]), int(counts[3 * i + 1]), int(counts[3 * i + 2]))
            banks = recorder._banks
            rows = tuple((bank.closed_rows, bank.generation) for bank in banks)
            for fold, dests, accs in self._plan(kept, rows, banks):
                fold(dests, accs)
            zeros, others = self._resets(ran)
            torch._foreach_zero_(zeros)
            for acc, value in others:  # (max and min states: rare)
                acc.fill_(value)
            if kept:
                # rows in the order of the sites' first calls, as eager steps list them (a graph's sites were made
                # in the order it calls them)
                recorder._order.sort(key=lambda slot: slot.site.index)
        self.ran = int(sum(counts[0::3]))
        return self.ran

    def _plan(self, kept: tuple[int, ...], rows: tuple[tuple[int, int], ...], banks: list[Any]) -> list[Any]:
        """The foreach calls that add the accumulators of entries ``kept`` into the open rows ``rows`` of the
        banks (made once per set of entries and row: the views of a row are fixed until the banks grow)."""
        key = (kept, rows)
        plan = self._plans.get(key)
        if plan is None:
            grouped: dict[tuple[bool, str], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
            for i in kept:
                entry = self.entries[i]
                for ci, name, reduce, _, acc in entry.accumulators:
                    dests, accs = grouped.setdefault((entry.trains, reduce), ([], []))
                    dests.append(banks[ci].site_state(entry.site.index)[name])
                    accs.append(acc)
            plan = [(_FOLD[reduce], dests, accs) for (_, reduce), (dests, accs) in grouped.items()]
            if len(self._plans) >= 4 * 16:  # (16 rows of a ring, a few sets of entries)
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _resets(self, ran: tuple[int, ...]) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, float]]]:
        """What returns the accumulators of entries ``ran`` to their identities: the tensors to zero, and the
        others with their identity."""
        resets = self._reset_plans.get(ran)
        if resets is None:
            zeros: list[torch.Tensor] = []
            others: list[tuple[torch.Tensor, float]] = []
            for i in ran:
                entry = self.entries[i]
                zeros += (entry.calls, entry.elements, entry.backward)
                for _, _, reduce, acc, _ in entry.accumulators:
                    if reduce == "sum":
                        zeros.append(acc)
                    else:
                        others.append((acc, _IDENTITY[reduce]))
            if len(self._reset_plans) >= 16:
                self._reset_plans.clear()
            resets = self._reset_plans[ran] = (zeros, others)
        return resets
