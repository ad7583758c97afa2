"""Recording: the site table, the open step, and closing steps into records.

The tracer (:mod:`hookscope.tracing`) follows forward passes and hands each activation output to a
:class:`Recorder`, which owns everything that is recorded:

- the site table: which activation calls are sites (``include`` / ``exclude``), their names, units and bounds,
  each site's collector states and its gradient hook;
- the open step: per site, forward calls, output elements, backward passes, in order of first appearance; the
  collectors' per-step state is updated in place on the device from the hooks;
- closing a step: its per-step state moves to the collectors' rings (no tensor operation) and its record waits
  there until the ring is *flushed* (every :data:`~hookscope.collectors.base.RING_STEPS` steps, or when a report
  asks), which turns the closed rows into recorded values and stores them in the :class:`~hookscope.history.History`;
- under ``torch.distributed``, each step is handed to the cross-rank combination
  (:mod:`hookscope.distributed`).

The hooks call :meth:`Recorder.new_site`, :meth:`Recorder.observe` and, through each site's gradient hook,
:meth:`Recorder.observe_grad`; the manager calls :meth:`Recorder.close_step`, :meth:`Recorder.snapshot`,
:meth:`Recorder.flush` and the report helpers.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hookscope.collectors.base import RING_STEPS, Collector, SiteState, StateBank, host_to_device
from hookscope.distributed import Combiner
from hookscope.errors import ConfigError, StateError
from hookscope.history import FieldLayout, History, Rows, StepRecord
from hookscope.in_graph import merge_counts
from hookscope.kernels import Backend, Prepared
from hookscope.kernels import select as select_kernels
from hookscope.report import build_frame
from hookscope.sites import Producer, Site, UnitDim, matches, resolve_unit_dim
from hookscope.warn import warn_once

if TYPE_CHECKING:
    import pandas as pd

    from hookscope.activations import ActivationSpec, Bounds
    from hookscope.in_graph import InGraph

__all__ = ["MISSING", "Recorder", "SiteKey", "discard_open_step", "note_unfinished"]

#: A site's key in the table: (base name, call index within one forward pass).
SiteKey = tuple[str, int]
#: What :attr:`Recorder.site_by_key` answers for a key never seen (``None`` means "seen, not a site").
MISSING: Any = object()

_TENSOR = torch.Tensor
_STRIDED = torch.strided
_no_torch_function = torch._C.DisableTorchFunction


class _Pass:
    """One site's fused native pass over its outputs (or gradients): which states each statistic is added to, and
    the kernel calls prepared for it."""

    __slots__ = ("band_of", "calls", "gradient", "scale_of", "targets")

    def __init__(self, gradient: bool) -> None:
        self.gradient = gradient  # a pass over gradients, else over outputs
        self.targets: list[tuple[str, SiteState, str]] = []  # (statistic, state, state name)
        self.band_of: Collector | None = None  # the collector whose band the "saturated" count uses
        self.scale_of: Collector | None = None  # the collector whose gradient scale "sumsq" divides by
        # Per row of the state ring (the views of each row have their own addresses): (the recorder's generation,
        # the tensors' key, the prepared call or None where the kernels take no prepared call for them).
        self.calls: list[tuple[int, tuple[Any, ...], Prepared | None] | None] = [None] * (RING_STEPS + 1)

    def arguments(self, tensor: torch.Tensor, site: Site, scale: torch.Tensor | float | None) -> dict[str, Any] | None:
        """The kernel's keyword arguments for one tensor (``None``: the pass cannot take this dtype)."""
        kwargs: dict[str, Any] = {statistic: state[name] for statistic, state, name in self.targets}
        if not self.gradient:
            kwargs["unit_dim"], kwargs["units"] = site.unit_dim, site.units
        if self.band_of is not None:
            lower, upper = self.band_of.band(site, tensor.dtype)
            if lower is None and upper is None:
                return None
            kwargs["lower"], kwargs["upper"] = lower, upper
        if self.scale_of is not None:
            kwargs["scale"] = scale
        return kwargs

    def run(self, tensor: torch.Tensor, site: Site, kernels: Backend, row: int, generation: int) -> bool:
        """Add the pass's statistics of ``tensor`` (an output, or a gradient) to the states, in one native pass:
        with the call prepared for this state row (``row``, valid while the recorder's ``generation`` stays) and
        ``tensor``'s dtype, shape and strides, made at the first such tensor; else with the plain kernel call.
        ``False``: the kernels declined the tensor (the caller feeds the collectors)."""
        scale = None if self.scale_of is None else self.scale_of.gradient_scale(tensor.device)
        if (
            kernels.name == "native"
            and type(tensor) is _TENSOR
            and tensor.is_cpu
            and tensor.layout is _STRIDED
            and not isinstance(scale, _TENSOR)  # a scale tensor is read at each call: the plain call
        ):
            key = (tensor.dtype, tensor.shape, tensor.stride(), scale)
            entry = self.calls[row]
            if entry is None or entry[0] != generation or entry[1] != key:
                kwargs = self.arguments(tensor, site, scale)
                prepare = kernels.prepare_grad if self.gradient else kernels.prepare_output
                entry = self.calls[row] = (generation, key, None if kwargs is None else prepare(tensor, **kwargs))
            call = entry[2]
            if call is not None:
                return bool(call.fn(tensor.data_ptr(), call.address) == 0)
        kwargs = self.arguments(tensor, site, scale)
        if kwargs is None:
            return False
        return (kernels.grad_stats if self.gradient else kernels.output_stats)(tensor, **kwargs)


class _Slot:
    """A site's row in the table: its collector states, its gradient hook and its counts in the open step."""

    __slots__ = (
        "applies", "backward", "calls", "elements", "fwd", "fwd_rest", "grad", "grad_hook", "grad_pass",
        "grad_rest", "out_pass", "per_unit", "site", "touched",
    )  # fmt: skip

    def __init__(self, site: Site, applies: tuple[bool, ...], grad_hook: Callable[[torch.Tensor], None]) -> None:
        self.site = site
        self.applies = applies  # per collector: whether it records this site
        self.fwd: list[tuple[Collector, SiteState]] = []  # states fed with outputs
        self.grad: list[tuple[Collector, SiteState]] = []  # states fed with gradients
        self.out_pass: _Pass | None = None  # the fused pass over outputs, and the states it does not feed
        self.fwd_rest: list[tuple[Collector, SiteState]] = []
        self.grad_pass: _Pass | None = None
        self.grad_rest: list[tuple[Collector, SiteState]] = []
        self.grad_hook = grad_hook
        self.per_unit = False  # some collector keeps per-unit state here (its number of units is fixed)
        self.touched = False  # ran (forward or backward) in the open step
        self.calls = 0
        self.elements = 0
        self.backward = 0

    def clear(self) -> None:
        """Forget the open step's counts (it closed, or was dropped)."""
        self.touched = False
        self.calls = self.elements = self.backward = 0

    def plan(self) -> None:
        """Split the states into those the fused passes feed and the rest (a statistic feeds one state)."""
        states = [spec for c, _ in (*self.fwd, *self.grad) for spec in c.state_specs.values()]
        self.per_unit = any(spec.per_unit for spec in states)
        self.out_pass, self.fwd_rest = _plan(self.fwd, self.site, gradient=False)
        self.grad_pass, self.grad_rest = _plan(self.grad, self.site, gradient=True)


def _plan(
    pairs: list[tuple[Collector, SiteState]], site: Site, gradient: bool
) -> tuple[_Pass | None, list[tuple[Collector, SiteState]]]:
    fused = _Pass(gradient)
    rest = []
    taken: set[str] = set()
    for collector, state in pairs:
        wanted = collector.fused_gradient(site) if gradient else collector.fused_output(site)
        if not wanted or taken & set(wanted):
            rest.append((collector, state))
            continue
        taken |= set(wanted)
        fused.targets.extend((statistic, state, name) for statistic, name in wanted.items())
        if "saturated" in wanted:
            fused.band_of = collector
        if "sumsq" in wanted:
            fused.scale_of = collector
    return (fused if fused.targets else None), rest


def _feed(pairs: list[tuple[Collector, SiteState]], tensor: torch.Tensor, site: Site, grad: bool) -> None:
    """Give an output (or its gradient) to collectors with autograd off (the hooks that call the recorder have
    already switched torch function modes off).

    No graph is recorded, so no ``detach()`` is needed; switching the grad mode directly costs a third of
    ``torch.no_grad()`` as a context manager, and this runs twice per site and step.
    """
    grad_mode = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)
    try:
        for collector, state in pairs:
            if grad:
                collector.update_grad(state, tensor, site)
            else:
                collector.update(state, tensor, site)
    finally:
        torch._C._set_grad_enabled(grad_mode)


# Keys of hookscope's gradient hooks in a tensor's hook dict: negative, so no RemovableHandle (ids from 0 up) takes one.
_hook_keys = itertools.count(-1, -1)
_private_hooks = True  # false once the private path below turned out missing in this torch


def _hook_gradient(tensor: torch.Tensor, hook: Callable[[torch.Tensor], None]) -> None:
    """``tensor.register_hook(hook)`` without what hookscope does not need: the steps of ``Tensor.register_hook``
    (torch/_tensor.py: the tensor's hook dict, handed once to its ``grad_fn``) without the ``RemovableHandle`` (the
    hook goes with the tensor) and without the ``__torch_function__`` dispatch (modes do not see hookscope's hooks).
    A fifth of its cost; this runs once per site and forward pass."""
    global _private_hooks
    if _private_hooks:
        hooks = tensor._backward_hooks
        if hooks is not None:
            hooks[next(_hook_keys)] = hook
            return
        grad_fn = tensor.grad_fn
        if grad_fn is None or hasattr(grad_fn, "_register_hook_dict"):
            hooks = tensor._backward_hooks = OrderedDict()
            if grad_fn is not None:
                grad_fn._register_hook_dict(tensor)
            hooks[next(_hook_keys)] = hook
            return
        _private_hooks = False  # a torch without it: the public way from now on
    tensor.register_hook(hook)


class Recorder:
    """The site table, the open step and the closed ones, for one manager.

    Args:
        collectors: The manager's collectors (validated).
        include: Layer-name patterns to record, or ``None`` for every site.
        exclude: Layer-name patterns to leave out.
        unit_dim: The ``unit_dim`` override (validated).
        global_stats: Combine each step across ``torch.distributed`` ranks.
        max_history: Steps kept for reports (``None``: all).
        start_step: Number of the first step.
    """

    def __init__(
        self,
        collectors: Sequence[Collector],
        *,
        include: tuple[str, ...] | None,
        exclude: tuple[str, ...] | None,
        unit_dim: UnitDim,
        global_stats: bool,
        max_history: int | None,
        start_step: int,
    ) -> None:
        self.collectors = list(collectors)
        self.include = include
        self.exclude = exclude
        self.unit_dim = unit_dim
        self.global_stats = global_stats
        self.max_history = max_history
        self.wants_grad = any(c.wants_grad for c in self.collectors)
        #: Whether gradient hooks still record (false once the manager detached).
        self.enabled = False
        self.step = start_step  # the open step
        self.sites: list[Site] = []
        self.site_by_key: dict[SiteKey, Site | None] = {}  # None: an activation call left out by the patterns
        self._slots: list[_Slot] = []
        self._banks: list[StateBank] = []  # one per collector, once the device is known
        self._device: torch.device | None = None
        self._device_index = -2  # get_device() of the device: a cheaper first test in the hot path
        # prepared kernel calls (state addresses, a thread count) are valid while _generation stays (see _close)
        self._generation, self._generation_of = 0, (-1, -1)
        self._order: list[_Slot] = []  # slots that ran in the open step, in order of first appearance
        self.history = History(max_steps=max_history)
        self.layout: FieldLayout | None = None  # fixed at the first flush
        self.last_closed: StepRecord | None = None  # the latest step closed (and, distributed, combined)
        self._last_kept: StepRecord | None = None  # the latest closed step stored in the history
        self._sized = -1  # the sites the banks were last resized for (see _close)
        self._in_ring: list[StepRecord] = []  # closed steps whose values wait in the collectors' rings
        self._failures: list[Exception] = []  # errors of collectors' close_steps not raised yet
        self._keys: list[SiteKey] = []  # each site's key in the table
        self._cross: Combiner | None = Combiner(self) if global_stats else None
        #: The statistics implementation (native kernels or ATen), chosen once for this manager.
        self.kernels = select_kernels()
        self._include_checked = False
        self._ref = weakref.ref(self)
        #: Sites recorded inside compiled graphs (set by the tracer), folded into their steps when the ring is flushed.
        self.in_graph: InGraph | None = None
        #: The tracer plans a compiled graph's event: ``observe`` binds the site and records nothing.
        self.planning = False
        for c in self.collectors:
            c.bind_owner(self)

    # ----------------------------------------------------------------------------------------------------------
    # the site table (called from the hooks)

    def new_site(
        self,
        key: SiteKey,
        layer: str,
        module: str,
        call: int,
        spec: ActivationSpec,
        function: str | None,
        bounds: Bounds | None,
    ) -> Site | None:
        """Enter an activation call seen for the first time; ``None`` when the patterns leave it out."""
        base = layer.split("#")[0]  # a pattern matching `name` also matches its further calls `name#k`
        if (self.include is not None and not matches(self.include, layer, base)) or (
            self.exclude is not None and matches(self.exclude, layer, base)
        ):
            self.site_by_key[key] = None
            return None
        # Closed steps get their values in the layout they were recorded with: the state grows when the site is
        # bound (next, in this hook) or when the step closes (a step still being combined stays, with defaults).
        self._flush_ring(wait=False)  # inside a hook: a collector's error waits for the next step()
        site = Site(len(self.sites), layer, module, call, spec, function, bounds)
        ref = self._ref

        def grad_hook(grad: torch.Tensor) -> None:
            recorder = ref()
            if recorder is not None and recorder.enabled:
                with _no_torch_function():  # a mode active during backward does not see hookscope's calls
                    recorder.observe_grad(site, grad)

        self.sites.append(site)
        self.site_by_key[key] = site
        self._keys.append(key)
        self._slots.append(_Slot(site, tuple(c.applies_to(site) for c in self.collectors), grad_hook))
        return site

    def _bind(self, site: Site, out: torch.Tensor, producer: Producer | None) -> bool:
        """Fix a site's units and create its collector state at its first output. False if it cannot be."""
        shape = tuple(out.shape)
        try:
            dim, note = resolve_unit_dim(self.unit_dim, site.layer, site.layer.split("#")[0], shape, producer)
            site.bind_shape(shape, dim)
        except ConfigError as e:
            site.problem = str(e)
            _problem(f"hookscope: {e}; the site is skipped")
            return False
        if note is not None and site.spec.rectifier:  # units matter for per-unit (dead-unit) statistics
            _problem(f"hookscope: site {site.layer!r} with output shape {list(shape)}: {note}")
        if self._device is None:
            self._bind_device(out.device)
        self._bind_state(site)
        return True

    def _bind_device(self, device: torch.device) -> None:
        self._device = device
        self._device_index = device.index if device.type != "cpu" and device.index is not None else -1
        self._banks = [c.bind_device(device) for c in self.collectors]
        for bank in self._banks:
            bank.kernels = self.kernels
            for _ in self._in_ring:  # steps closed before any state existed (distributed): rows of defaults
                bank.push()

    def _bind_state(self, site: Site) -> None:
        slot = self._slots[site.index]
        try:
            for c, bank, applies in zip(self.collectors, self._banks, slot.applies):
                if applies:
                    state = bank.add_site(site.index, site.units)
                    if type(c).update is not Collector.update:  # a collector of gradients only is not fed outputs
                        slot.fwd.append((c, state))
                    if c.wants_grad:
                        slot.grad.append((c, state))
            slot.plan()
        finally:  # a bank may have grown (also when a later one or a collector raised): views have new addresses
            self._generation += 1

    def observe(
        self,
        site: Site,
        output: torch.Tensor,
        recompute: bool,
        producer: Producer | None = None,
        hook_grad: bool = True,
    ) -> bool:
        """Record one output of a site (``recompute``: a checkpointed forward recomputed in backward, already
        counted in the first pass; only its gradient hook matters). ``producer``: the layer that produced the
        activation's input, which tells the unit dimension at the site's first output. ``hook_grad``: give the
        output the site's gradient hook when it requires grad (a compiled graph puts its own into the backward).
        Returns whether the output was recorded (its gradient is wanted)."""
        if site.problem is not None:
            return False
        odd = type(output) is not torch.Tensor or output.is_nested or output.is_meta or output.layout != torch.strided
        if odd or _in_transform(output):
            _problem(f"hookscope: site {site.layer!r}: skipped {_odd(output)}: its statistics are not recorded")
            return False
        if not site.units_fixed and not self._bind(site, output, producer):
            return False
        slot = self._slots[site.index]
        if recompute:
            if hook_grad and self.wants_grad and output.requires_grad:
                _hook_gradient(output, slot.grad_hook)
            return False
        shape = output.shape
        if shape != site.shape:
            units = site.units_of(shape)
            if units != site.units:
                if units < 0 or slot.per_unit:  # per-unit state cannot follow another number of units
                    _problem(
                        f"hookscope: site {site.layer!r}: its outputs changed their number of units (first "
                        f"{site.units}, along dim {site.unit_dim}); calls with another number are skipped for "
                        "its per-unit statistics (use `unit_dim` if units sit in another dimension)"
                    )
                    return False
                site.units = units  # statistics without per-unit state follow the latest output
            site.shape = tuple(shape)
        if output.get_device() != self._device_index and output.device != self._device:
            _problem(
                f"hookscope: site {site.layer!r} runs on {output.device} while the statistics live on "
                f"{self._device}; calls on other devices are skipped (model parallelism is not supported)"
            )
            return False
        if self.planning:  # a compiled graph records this call itself (see hookscope.in_graph)
            return True
        if not slot.touched:
            slot.touched = True
            self._order.append(slot)
            if site.first_step is None:
                site.first_step = self.step
        slot.calls += 1
        slot.elements += output.numel()
        fused = slot.out_pass
        if fused is not None and fused.run(output, site, self.kernels, self._banks[0].closed_rows, self._generation):
            if slot.fwd_rest:
                _feed(slot.fwd_rest, output, site, grad=False)
        else:
            _feed(slot.fwd, output, site, grad=False)
        if hook_grad and self.wants_grad and output.requires_grad:
            _hook_gradient(output, slot.grad_hook)
        return self.wants_grad

    def observe_grad(self, site: Site, grad: torch.Tensor) -> None:
        """Record one gradient with respect to a site's output (called by the site's gradient hook)."""
        slot = self._slots[site.index]
        if not slot.touched:
            slot.touched = True
            self._order.append(slot)
        slot.backward += 1
        fused = slot.grad_pass
        if fused is not None and fused.run(grad, site, self.kernels, self._banks[0].closed_rows, self._generation):
            if slot.grad_rest:
                _feed(slot.grad_rest, grad, site, grad=True)
        else:
            _feed(slot.grad, grad, site, grad=True)

    def check_include(self) -> None:
        """Warn once when ``include`` matched none of the activation calls seen so far."""
        if self._include_checked or self.include is None or not self.site_by_key:
            return
        self._include_checked = True
        if not self.sites:
            found = sorted(k[0] if k[1] == 0 else f"{k[0]}#{k[1]}" for k in self.site_by_key)
            warn_once(
                f"hookscope: `include` patterns {list(self.include)} matched none of the activation sites "
                f"({', '.join(found[:10])}{', ...' if len(found) > 10 else ''})"
            )

    # ----------------------------------------------------------------------------------------------------------
    # closing steps

    def close_step(self, passes: int = 0) -> list[StepRecord]:
        """Close the open step and number the next one. Returns the records that are final now (their values
        arrive with the next :meth:`flush`): the step just closed, or nothing when nothing ran in it; under
        ``torch.distributed`` the previous step, combined across ranks (``passes``: forward passes followed in the
        step just closed, compared across ranks).

        Errors of collectors' ``close_steps`` are kept for :meth:`take_failures`, never raised here: the step is
        closed and numbered exactly once.

        Raises:
            StateError: Under ``torch.distributed``, the ranks closed different steps or hold different sites
                under one name (raised on every rank).
        """
        final: list[StepRecord] = []
        mismatch: StateError | None = None
        if self._cross is not None:
            try:
                final = self._cross.advance()
            except StateError as e:  # the step is closed and numbered all the same
                mismatch = self._give_up_global(e)
        record = self._close(commit=True, force=self._cross is not None)
        self.step += 1
        if self._cross is not None and record is not None:
            if self.in_graph is not None:
                self.in_graph.settle(self)  # the record's counts are combined across ranks now
                self.in_graph.realign()
            self._cross.post(record, passes)
        elif record is not None:
            final = [record]
        if record is not None:
            self._in_ring.append(record)
        for r in final:
            self.last_closed = r
        if self._banks and self._banks[0].closed_rows >= RING_STEPS:
            self._flush_ring(wait=False)  # a collector's error is kept for take_failures()
            if self.in_graph is not None:
                self.in_graph.realign()
        if mismatch is not None:
            raise mismatch
        return final

    def _give_up_global(self, error: StateError) -> StateError:
        """After the ranks disagreed, record rank-local statistics (no more collectives that could hang). Returns
        the error to raise: a fresh one, whose traceback holds none of the frames that held the process groups.

        The groups and their works are released now, while the interpreter is alive: a gloo group or work freed
        during interpreter shutdown (kept alive until then by a traceback the user kept, or by the exception's
        reference cycle with the frame that raised it) aborts the process ("terminate called without an active
        exception")."""
        if self._cross is not None:
            self._cross.release()
        self._cross, self.global_stats = None, False
        warn_once(f"{error}. hookscope records rank-local statistics from now on")
        return StateError(str(error))

    def finish(self, timeout: float, release: bool = True) -> list[StepRecord]:
        """Under ``torch.distributed``: combine the last closed step (at ``detach()``, waiting at most ``timeout``
        seconds for the other ranks); returns it when it is final. ``release=False`` keeps the groups (state_dict)."""
        if self._cross is None:
            return []
        error: StateError | None = None
        try:
            final = self._cross.advance(timeout) + self._cross.finish_combining(timeout)
        except StateError as e:
            error = self._give_up_global(e)
        finally:
            if self._cross is not None and release:
                self._cross.release()
        if error is not None:
            raise error  # outside the handler: its context would hold the groups' frames
        for r in final:
            self.last_closed = r
        return final

    def snapshot(self) -> StepRecord | None:
        """The open step's record with its values, or ``None`` when nothing ran in it (or, under
        ``torch.distributed``, always: its values are rank-local until :meth:`close_step` combines them)."""
        return None if self.global_stats else self._close(commit=False)

    def _close(self, commit: bool, force: bool = False) -> StepRecord | None:
        """Close the open step (``commit``), or take a snapshot of it. A closed step's per-step state goes to
        the collectors' rings and its record gets its values when the ring is flushed."""
        in_graph = self.in_graph
        snapshot = None
        if not commit:
            self.flush()
            # what the graphs recorded in the open step so far, added to the rings' open rows until the values are taken
            snapshot = in_graph.snapshot_open(self) if in_graph is not None else None
        order = self._order
        if self._sized != len(self.sites):
            for bank in self._banks:  # no tensor operation but when a bank grows (it guards its own)
                bank.resize(len(self.sites))
            self._sized = len(self.sites) if self._banks else -1
        now = (sum(bank.generation for bank in self._banks), torch.get_num_threads())
        if now != self._generation_of:  # a bank grew, or the thread count changed: new prepared calls
            self._generation_of, self._generation = now, self._generation + 1
        # the graphs' row of a recorded step waits with its record (its counts are added when it is settled)
        compiled = commit and in_graph is not None and in_graph.close_open()
        if not order and not force and not compiled and snapshot is None:
            return None
        record = _record_of(self.step, order)
        if commit:
            if compiled and in_graph is not None:
                in_graph.pend(record, self._banks[0].closed_rows)
            for bank in self._banks:
                bank.push()
        else:
            try:
                if snapshot is not None:
                    merge_counts(record, snapshot[0])
                with _no_torch_function(), torch.no_grad():
                    block, failure = _values(self, [record], commit=False)
            finally:
                if snapshot is not None:
                    snapshot[1]()
            if failure is not None:
                raise failure
            record.values = block[0]
        if commit:
            for slot in order:
                slot.clear()
            self._order = []
        return record

    def flush(self) -> None:
        """Turn the closed steps waiting in the rings into recorded values and store them in the history.

        Raises:
            Exception: What a collector's ``close_steps`` raised (user code), once every record is stored (with NaN
                for that collector's fields); also an error kept from an earlier flush inside a hook.
        """
        self._flush_ring()
        failures = self.take_failures()
        if failures:
            raise failures[0]

    def take_failures(self) -> list[Exception]:
        """The errors collectors raised in flushes that could not raise (inside hooks, in :meth:`close_step`)."""
        failures, self._failures = self._failures, []
        return failures

    def _flush_ring(self, wait: bool = True) -> None:
        """Flush the combined closed steps; ``wait`` (reports only: never inside a hook or ``step()``) first waits for
        the step being combined across ranks, which every rank posted at its last ``step()``."""
        if self.in_graph is not None:
            self.in_graph.settle(self)  # the records' counts, and the rings' rows, of steps the graphs recorded
        records = self._in_ring
        if self._cross is not None:
            if self._cross.combining is not None and wait:
                self._cross.ready.extend(self._cross.finish_combining())
            if self._cross.unfinished:  # the latest steps are combined across ranks at the next step() calls
                records = records[: -self._cross.unfinished]
        if not records:
            return
        self._in_ring = self._in_ring[len(records) :]
        with _no_torch_function(), torch.no_grad():
            values, failure = _values(self, records, commit=True)
            rows = values.unbind(0)  # one operation for all the rows
        for record, row in zip(records, rows):
            record.values = row
            if record.sites:  # (a step the graphs recorded nothing in, or one that only other ranks ran)
                self.history.append(record)
                self._last_kept = record
            elif record is self.last_closed and self._cross is None:
                self.last_closed = self._last_kept
        if failure is not None:
            self._failures.append(failure)

    # ----------------------------------------------------------------------------------------------------------
    # reports

    def frame(self, records: Sequence[StepRecord]) -> pd.DataFrame:
        """The report frame of some records (their values must be set: flush first)."""
        return self.frame_of_rows(Rows.concat([Rows.of(r) for r in records]))

    def frame_of_rows(self, rows: Rows) -> pd.DataFrame:
        """The report frame of some rows."""
        applies = [slot.applies for slot in self._slots]  # per site, per collector: whether it records the site
        return build_frame(rows, self.sites, self.collectors, self.layout or FieldLayout(), applies)

    def rows(self) -> Rows:
        """Recorded (step, site) rows with their raw counts, the open step included when it has data."""
        self.flush()
        parts = [self.history.records()]
        snapshot = self.snapshot()
        if snapshot is not None:
            parts.append(Rows.of(snapshot))
        rows = Rows.concat(parts)
        steps = np.unique(rows.step)
        if self.max_history is not None and len(steps) > self.max_history:
            return rows.select(rows.step >= steps[-self.max_history])
        return rows

    def latest(self) -> tuple[int, set[int]]:
        """The latest step; if it is the open one, the sites that saw elements in it (brings state up to date)."""
        self.flush()
        if self._order:
            return self.step, {slot.site.index for slot in self._order if slot.elements}
        return (self.history.steps[-1] if len(self.history) else self.step), set()

    def state_bytes(self) -> int:
        """Bytes of collector state on the device (independent of the number of steps)."""
        return sum(bank.nbytes() for bank in self._banks)


def _record_of(step: int, order: list[_Slot]) -> StepRecord:
    """The record of a step whose sites ran in ``order`` (its values arrive when the ring is flushed)."""
    if not order:  # (a step only compiled graphs ran in: their counts arrive with the values)
        return StepRecord(step, [], [], [], [], [], [], None)
    sites = [slot.site for slot in order]
    return StepRecord(
        step=step,
        sites=[site.index for site in sites],
        calls=[slot.calls for slot in order],
        elements=[slot.elements for slot in order],
        backward=[slot.backward for slot in order],
        units=[site.units for site in sites],
        shapes=[site.shape for site in sites],
        values=None,
    )


def note_unfinished(recorder: Recorder) -> None:
    """Say once, at a report, why it lacks the latest closed steps under ``torch.distributed`` (an empty report
    right after the first ``step()`` calls reads as a bug otherwise)."""
    if recorder._cross is not None and recorder._cross.unfinished:
        warn_once(
            "hookscope: under torch.distributed, a closed step reaches the reports one or two step() calls later, "
            "once every rank's statistics are combined (step() never waits for the other ranks), or at detach(): "
            "this report lacks the latest closed steps (empty right after the first step() calls), and so will "
            "every report read while training runs"
        )


def _values(rec: Recorder, records: list[StepRecord], commit: bool) -> tuple[torch.Tensor, Exception | None]:
    """``(len(records), n_sites, n_fields)`` float64 values of a block of ``rec``'s steps: the first ``len(records)``
    closed rows of the rings when ``commit``, else the open step; and the first error a collector raised.

    Besides the per-step states, collectors' blocks hold ``elements``: the output elements of each site in
    each step, ``(len(records), n_sites)``.

    A collector whose ``close_steps`` raises (user code) gets NaN for its fields in this block, so that the
    other collectors' values and every record are kept; the error is returned for the caller to raise once
    its own state is consistent.
    """
    columns: list[torch.Tensor] = []
    steps = [r.step for r in records]
    n = len(rec.sites)
    if not rec._banks:  # no site has been bound yet: no collector has state
        return torch.zeros(len(steps), n, 0, dtype=torch.float64, device=rec._device), None
    rows = [[0.0] * n for _ in records]  # on the host first: one tensor operation, not one per record
    for row, record in zip(rows, records):
        for i, count in zip(record.sites, record.elements):
            row[i] = float(count)
    elements = host_to_device(torch.tensor(rows, dtype=torch.float64).reshape(len(records), n), rec._banks[0].device)
    fields: list[tuple[str, ...]] = []
    failure: Exception | None = None
    try:
        for ci, (c, bank) in enumerate(zip(rec.collectors, rec._banks)):
            n = bank.n_sites
            block = dict(bank.take(len(steps)) if commit else bank.current())
            block["elements"] = elements[:, :n]
            try:
                closed = c.close_steps(steps, block, commit)
            except Exception as e:
                failure = failure or e
                nan = torch.full((len(steps), n), math.nan, dtype=torch.float64, device=rec._device)
                closed = dict.fromkeys(_fields_of(rec.layout, ci, c, bank), nan)
            fields.append(tuple(closed))
            columns.extend(closed.values())
        layout = FieldLayout(collectors=tuple(fields))
        if rec.layout is None:
            rec.layout = layout
        elif layout != rec.layout:
            raise StateError(
                f"collectors must record the same fields at every step: got {layout}, expected {rec.layout}"
            )
        if not columns:
            return torch.zeros(len(steps), n, 0, dtype=torch.float64, device=rec._device), failure
        # a copy: the ring rows may be reused now
        return torch.stack(columns, dim=2).to(torch.float64), failure
    finally:
        if commit:  # also when a collector raised: the hooks must never write into a closed row
            for bank in rec._banks:
                bank.recycle(len(steps))


def _fields_of(layout: FieldLayout | None, index: int, collector: Collector, bank: StateBank) -> tuple[str, ...]:
    """The fields a collector records (for NaN values when its ``close_steps`` raised): from the layout, or from a
    block of no step."""
    if layout is not None:
        return layout.collectors[index]
    empty = {name: rows[:0] for name, rows in bank.current().items()}
    empty["elements"] = torch.zeros(0, bank.n_sites, dtype=torch.float64, device=bank.device)
    try:
        return tuple(collector.close_steps([], empty, commit=False))
    except Exception:
        return ()


#: Whether a tensor is one of torch.func's wrappers (vmap's batched tensors, grad's tracked ones): it has no storage
#: of its own and ATen's out= variants have no batching rules, so neither path can take it.
_in_transform: Callable[[torch.Tensor], bool] = getattr(
    getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", lambda tensor: False
)


def discard_open_step(recorder: Recorder) -> None:
    """Drop what the open step recorded so far (its per-step states and counts): evaluation passes that ran
    before the step's first training pass (see :class:`hookscope.tracing.Evaluation`)."""
    for bank in recorder._banks:
        bank.clear_open()
    for slot in recorder._order:
        slot.clear()
    recorder._order = []


def _odd(tensor: torch.Tensor) -> str:
    """What makes an output one that hookscope does not take (for the warning)."""
    if _in_transform(tensor):
        return "an output inside a torch.func transform (vmap, grad, jacrev...)"
    if tensor.is_nested:
        return "a nested tensor"
    if tensor.is_meta:
        return "an output on the meta device"
    if tensor.layout != torch.strided:
        return f"a {tensor.layout} output"
    return f"an output of tensor type {type(tensor).__module__}.{type(tensor).__qualname__}"


def _problem(message: str) -> None:
    warn_once(message)
