"""``HookManager``: attaches hooks to a model's activation sites and closes training steps.

Hooks are global state of a model: every forward pass of the model runs them, whoever calls it, until they are
removed. A manager therefore owns exactly the handles it created and removes them in ``detach()``, which the
context manager calls in ``finally`` so that an exception in the training loop never leaves hooks behind. The
manager never computes statistics itself: it finds sites, hands each output (and each gradient) to the
collectors, and records what they report when a step closes.

How a forward pass is followed:

- Every module of the model gets a forward pre-hook and an ``always_call`` forward hook, which keep a stack of
  running modules. A module entered while none is running starts a new forward pass: call indices restart there
  (nothing depends on the root's own ``forward`` being called, as with Lightning's ``training_step``).
- Activation modules are sites; their output is recorded in the forward hook. Functional activations
  (``F.relu``, ``torch.tanh``, ``x.relu_()``...) are captured by a ``TorchFunctionMode`` that is active only
  while a forward pass runs; calls made inside an activation module are not separate sites.
- Gradients are captured with a tensor hook on the output (``register_full_backward_hook`` fails on in-place
  activations). A forward pass recomputed by activation checkpointing runs inside autograd's backward: its
  outputs are not counted again, but they carry the tensor hook when the first pass had no graph (reentrant
  checkpointing).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from hookscope import distributed, report
from hookscope.activations import ActivationSpec, activation_for_function, activation_for_module
from hookscope.alerts import Alerts
from hookscope.collectors.base import RING_STEPS, Collector, SiteState, StateBank, host_to_device
from hookscope.collectors.dead_relu import DeadReLU
from hookscope.collectors.gradient_norm import GradientNorm
from hookscope.collectors.saturation import Saturation
from hookscope.errors import ConfigError, ConfigTypeError, StateError, UnknownLayerError
from hookscope.reporters.sink import Sink
from hookscope.sites import (
    ROOT_NAME,
    Site,
    iter_named_modules,
    matches,
    resolve_unit_dim,
    validate_patterns,
    validate_unit_dim,
)
from hookscope.warn import warn_once

if TYPE_CHECKING:
    import pandas as pd
    from rich.table import Table

__all__ = ["HookManager"]

_graph_task_id: Callable[[], int] = getattr(torch._C, "_current_graph_task_id", lambda: -1)
_MISSING: Any = object()

#: After discovery, every module is hooked again for one recorded step in this many (see HookManager._slim).
REDISCOVER_EVERY = 1000


def _in_backward() -> bool:
    """True while autograd's backward runs (where activation checkpointing recomputes forwards)."""
    return _graph_task_id() != -1


class _FunctionCapture(TorchFunctionMode):
    """Sees every torch function call of a forward pass and reports activation calls to the manager."""

    def __init__(self, manager: weakref.ReferenceType[HookManager]) -> None:
        super().__init__()
        self._manager = manager

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Iterable[type],
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        spec = activation_for_function(func)
        if spec is not None:
            manager = self._manager()
            if manager is not None:
                manager._record_function(func, spec, args, kwargs, out)
        return out


class HookManager:
    """Instrument the activation layers of a model.

    Args:
        model: The torch ``nn.Module`` to instrument (DDP / DataParallel / ``torch.compile`` wrappers are
            unwrapped for naming).
        collectors: Collector instances; ``None`` means ``[DeadReLU(), Saturation(), GradientNorm()]``.
        include: ``fnmatch`` pattern(s) of layer names to instrument (a pattern matching ``name`` also matches
            its further calls ``name#k``); ``None`` means every site.
        exclude: Pattern(s) of layer names to leave out.
        functional: Capture functional activations (``F.relu``, ``torch.tanh``, ``x.relu_()``...) with a
            ``TorchFunctionMode`` during forward passes.
        unit_dim: Override the dimension that holds units: one int for every site, or a mapping from layer-name
            patterns to ints (first match wins); ``None`` uses the default rule
            (see :func:`hookscope.sites.default_unit_dim`).
        every: Record one step in ``every`` (steps 0, every, 2*every, ...); the hooks do nothing in the others.
        max_history: Keep only the latest ``max_history`` steps for reports (memory stays bounded).
        alerts: ``True`` (the default rules, checked every 100 steps), ``False``/``None`` (off), or an
            :class:`~hookscope.alerts.Alerts`.
        sinks: Destinations that receive closed steps while training runs (``CSVSink``, ``TensorBoardSink``).
        start_step: Number of the first step (to continue the numbering of a resumed run).
        global_stats: Combine statistics across ``torch.distributed`` ranks at every ``step()`` (see
            :mod:`hookscope.distributed`); ``None`` does so when a process group with more than one rank is
            initialised, ``False`` keeps rank-local statistics.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or another argument has the wrong type.
        ValueError: A collector is given twice, or two collectors report the same column.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> with HookManager(model) as hm:
        ...     model(torch.randn(16, 4)).sum().backward()
        ...     hm.step()
        >>> hm.to_dataframe()[["step", "layer", "kind"]].values.tolist()
        [[0, '1', 'relu']]
    """

    def __init__(
        self,
        model: nn.Module,
        collectors: Iterable[Collector] | None = None,
        *,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        functional: bool = True,
        unit_dim: int | Mapping[str, int] | None = None,
        every: int = 1,
        max_history: int | None = None,
        alerts: Alerts | bool | None = True,
        global_stats: bool | None = None,
        sinks: Iterable[Sink] = (),
        start_step: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigTypeError(
                f"`model` must be a torch nn.Module (torch.nn.Module), got {type(model).__module__}."
                f"{type(model).__qualname__}: {model!r:.80}"
            )
        self.model = model
        self.collectors: list[Collector] = self._validate_collectors(collectors)
        self.include = validate_patterns("include", include)
        self.exclude = validate_patterns("exclude", exclude)
        if not isinstance(functional, bool):
            raise ConfigTypeError(f"`functional` must be True or False, got {functional!r}")
        self.functional = functional
        self.unit_dim = validate_unit_dim(unit_dim)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"`every` must be an int >= 1 (record one step in `every`), got {every!r}")
        self.every = every
        if max_history is not None and (
            isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 1
        ):
            raise ConfigError(f"`max_history` must be None (keep every step) or an int >= 1, got {max_history!r}")
        self.max_history = max_history
        if alerts is None or alerts is False:
            self.alerts: Alerts | None = None
        elif alerts is True:
            self.alerts = Alerts()
        elif isinstance(alerts, Alerts):
            self.alerts = alerts
        else:
            raise ConfigTypeError(f"`alerts` must be True, False, None or a hookscope.Alerts, got {alerts!r}")
        if global_stats is not None and not isinstance(global_stats, bool):
            raise ConfigTypeError(f"`global_stats` must be None (automatic), True or False, got {global_stats!r}")
        if global_stats and not distributed.is_distributed():
            raise ConfigError(
                "`global_stats=True` needs torch.distributed initialised with more than one rank "
                "(call torch.distributed.init_process_group first, or leave global_stats=None)"
            )
        self.global_stats = distributed.is_distributed() if global_stats is None else global_stats
        self._layout: list[int] = []
        self.sinks: list[Sink] = list(sinks) if not isinstance(sinks, Sink) else [sinks]
        for sink in self.sinks:
            if not isinstance(sink, Sink):
                raise ConfigTypeError(f"`sinks` must hold hookscope Sink instances (e.g. CSVSink), got {sink!r}")
        self._sink_buffers: list[list[report.StepRecord]] = [[] for _ in self.sinks]
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ConfigError(f"`start_step` must be an int >= 0 (the number of the first step), got {start_step!r}")
        self._last_record: report.StepRecord | None = None
        for c in self.collectors:
            c._bind(self)

        self._ref = weakref.ref(self)
        # every handle ever registered (the finalizer holds this very list); per module, the ones in place
        self._handles: list[RemovableHandle] = []
        self._module_handles: dict[str, list[RemovableHandle]] = {}
        self._activation_modules: set[str] = set()
        # Discovery: during the first recorded step (and one step in REDISCOVER_EVERY after it) every module is
        # hooked and the function mode covers whole forward passes. Afterwards only the modules that matter keep
        # their hooks (see _slim), because each hooked module call and each torch call seen by the mode costs
        # microseconds of Python.
        self._discovering = True
        self._entries: set[str] = set()  # modules that began a forward pass
        self._fn_parents: set[str] = set()  # modules that called a functional activation themselves
        self._mode_depth = 0  # stack depth of the module that pushed the function mode
        self._recorded_steps = 0
        self._forward_seen = False
        self._compiled = False  # a forward pass was traced by torch.compile: hooks are never slimmed
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._attached = False
        self._mode = _FunctionCapture(self._ref)
        self._mode_active = False
        self._want_grad = any(c.wants_grad for c in self.collectors)

        # sites
        self._sites: list[Site] = []
        self._site_by_key: dict[tuple[str, int], Site | None] = {}
        self._fwd_states: list[list[tuple[Collector, SiteState]]] = []
        self._grad_states: list[list[tuple[Collector, SiteState]]] = []
        self._grad_hooks: list[Callable[[torch.Tensor], None]] = []
        self._applies: list[list[bool]] = []
        self._device: torch.device | None = None
        self._device_index = -2  # get_device() of self._device: a cheaper first test in the hot path

        # the forward pass in progress
        self._stack: list[str] = []
        self._activation_stack: list[tuple[str, int, ActivationSpec, nn.Module] | None] = []
        self._counts: dict[str, int] = {}
        self._recompute = False
        self._recompute_task = -1
        self._recompute_counts: dict[str, int] = {}

        # the open step
        self._step = start_step
        self._order: list[int] = []
        self._touched: list[bool] = []
        self._calls: list[int] = []
        self._elements: list[int] = []
        self._backward: list[int] = []
        self._history = report.History(max_steps=max_history)
        self._pending: list[report.StepRecord] = []  # closed steps whose values wait in the collectors' rings
        self._pending_counts: list[torch.Tensor] = []  # their global counts (global_stats)
        self._fields: list[tuple[int, str]] | None = None
        self._include_checked = False
        self._paused = False
        self._update_recording()
        for sink in self.sinks:
            sink.bind(self)

    # ----------------------------------------------------------------------------------------------------------
    # validation

    @staticmethod
    def _validate_collectors(collectors: Iterable[Collector] | None) -> list[Collector]:
        if collectors is None:
            return [DeadReLU(), Saturation(), GradientNorm()]
        if isinstance(collectors, Collector):
            collectors = [collectors]
        if not isinstance(collectors, Iterable):
            raise ConfigTypeError(f"`collectors` must be None or a list of Collector instances, got {collectors!r}")
        out: list[Collector] = []
        for c in collectors:
            if isinstance(c, type) and issubclass(c, Collector):
                raise ConfigTypeError(
                    f"`collectors` must hold Collector instances, got the class {c.__name__}; "
                    f"write {c.__name__}() instead"
                )
            if not isinstance(c, Collector):
                raise ConfigTypeError(f"`collectors` must hold hookscope Collector instances, got {c!r}")
            if any(c is o for o in out):
                raise ConfigError(f"`collectors` holds {c!r} twice")
            out.append(c)
        seen: dict[str, Collector] = {}
        for c in out:
            for col in c.columns:
                if col in seen or col in report.ROW_COLUMNS:
                    other = seen.get(col)
                    by = repr(other) if other is not None else "the manager"
                    raise ConfigError(
                        f"`collectors`: column {col!r} of {c!r} is already reported by {by}; columns must be unique"
                    )
                seen[col] = c
        return out

    # ----------------------------------------------------------------------------------------------------------
    # attach / detach

    def attach(self) -> HookManager:
        """Attach hooks to every module of the model.

        Returns:
            The manager itself.

        Raises:
            RuntimeError: The manager is already attached.
        """
        if self._attached:
            raise StateError("this HookManager is already attached; call detach() first")
        if type(self.model).__name__ == "OptimizedModule":
            warn_once(
                "hookscope: attaching to a torch.compile'd model: hooks added after the compiled model first ran "
                "are ignored by torch.compile (pytorch/pytorch#117758), and nothing is recorded. Attach the "
                "HookManager to the model before calling torch.compile on it.",
                stacklevel=3,
            )
        self._handles = []
        self._module_handles = {}
        self._activation_modules = set()
        try:
            self._hook_modules(lambda name, spec: True)
        except BaseException:
            _remove_handles(self._handles)
            raise
        # a manager dropped without detach() still takes its hooks off the model when it is collected
        self._finalizer = weakref.finalize(self, _remove_handles, self._handles)
        self._stack.clear()
        self._activation_stack.clear()
        self._discovering = True
        self._attached = True
        return self

    def _hook_modules(self, wanted: Callable[[str, ActivationSpec | None], bool]) -> None:
        """Hook the modules that ``wanted(name, spec)`` selects and that have no hooks of ours yet."""
        ref = self._ref
        for name, module in iter_named_modules(self.model):
            spec = activation_for_module(module)
            if name in self._module_handles or not wanted(name, spec):
                continue
            pair = [
                module.register_forward_pre_hook(_pre_hook(ref, name, spec), prepend=True),
                module.register_forward_hook(_post_hook(ref, name, spec), always_call=True),
            ]
            self._module_handles[name] = pair
            self._handles.extend(pair)
            if spec is not None:
                self._activation_modules.add(name)

    def _slim(self) -> None:
        """End discovery: keep hooks only where they are needed to name and observe every site found.

        Kept: activation modules; modules that began a forward pass (so passes begin and end as before); modules
        that call a functional activation themselves, where the function mode is pushed, and their direct
        children (so that the innermost running module, which names a functional site, is the same as in
        discovery). Every other module loses its hooks.
        """
        parents = self._fn_parents if self.functional else set()
        keep = self._entries | parents | self._activation_modules | {""}
        for name, pair in list(self._module_handles.items()):
            parent = name.rpartition(".")[0] if name else None
            if name in keep or parent in parents:
                continue
            for h in pair:
                h.remove()
            del self._module_handles[name]
        self._handles[:] = [h for pair in self._module_handles.values() for h in pair]
        self._discovering = False

    def _rediscover(self) -> None:
        """Hook every module again for one recorded step (finds functional calls that began after discovery)."""
        self._hook_modules(lambda name, spec: True)
        self._discovering = True

    def detach(self) -> None:
        """Remove every hook this manager added, then flush and close the sinks. Idempotent; recorded results
        stay readable."""
        _remove_handles(self._handles)
        self._handles = []
        self._module_handles = {}
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        was_attached, self._attached = self._attached, False
        if was_attached:
            self._flush()
            for i, sink in enumerate(self.sinks):
                self._flush_sink(i)
                sink.close()
        if self._mode_active:  # detached from inside a forward pass
            self._mode.__exit__(None, None, None)
            self._mode_active = False
        self._stack.clear()
        self._activation_stack.clear()

    def pause(self) -> None:
        """Stop recording without removing hooks (evaluation passes inside training, for example)."""
        self._paused = True
        self._update_recording()

    def resume(self) -> None:
        """Record again after :meth:`pause`."""
        self._paused = False
        self._update_recording()

    def _update_recording(self) -> None:
        # a flag, not a property: the hooks read it on every module call
        self._recording = not self._paused and self._step % self.every == 0

    @property
    def attached(self) -> bool:
        """Whether the hooks are in place."""
        return self._attached

    def __enter__(self) -> HookManager:
        return self.attach()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.detach()

    # ----------------------------------------------------------------------------------------------------------
    # the forward pass (hot path)

    def _enter(self, name: str, spec: ActivationSpec | None, module: nn.Module) -> None:
        if not self._stack:
            self._begin_forward()
            if self._discovering:
                self._entries.add(name)
        self._stack.append(name)
        if not self._mode_active and name in self._fn_parents and self.functional:
            self._mode.__enter__()
            self._mode_active, self._mode_depth = True, len(self._stack)
        if spec is not None:
            if self._activation_stack:
                self._activation_stack.append(None)  # nested inside another activation: not a site
            else:
                k = self._counts.get(name, 0)
                self._counts[name] = k + 1
                self._activation_stack.append((name, k, spec, module))

    def _exit(self, name: str, spec: ActivationSpec | None, output: Any) -> None:
        if not self._stack or self._stack[-1] != name:
            return  # our pre-hook did not run for this call (an earlier pre-hook raised)
        self._stack.pop()
        if self._mode_active and len(self._stack) < self._mode_depth:
            self._mode_active = False
            self._mode.__exit__(None, None, None)
        if spec is not None and self._activation_stack:
            entry = self._activation_stack.pop()
            if entry is not None and isinstance(output, torch.Tensor):
                act_name, k, act_spec, module = entry
                site = self._site_by_key.get((act_name, k), _MISSING)
                if site is _MISSING:
                    layer = act_name or ROOT_NAME
                    site = self._new_site(
                        (act_name, k),
                        layer if k == 0 else f"{layer}#{k}",
                        layer,
                        act_name,
                        k,
                        act_spec,
                        None,
                        act_spec.resolve_bounds(module),
                    )
                if site is not None:
                    self._observe(site, output)
        if not self._stack:
            self._end_forward()

    def _begin_forward(self) -> None:
        self._forward_seen = True
        if torch.compiler.is_compiling():  # traced by torch.compile: the hooks must stay as they are
            self._compiled = True
        if _in_backward():  # activation checkpointing recomputes a forward inside backward
            task = _graph_task_id()
            if task != self._recompute_task:
                self._recompute_task, self._recompute_counts = task, {}
            self._counts, self._recompute = self._recompute_counts, True
        else:
            self._counts, self._recompute = {}, False
        if self.functional and self._discovering and not self._mode_active:
            self._mode.__enter__()
            self._mode_active, self._mode_depth = True, 1

    def _end_forward(self) -> None:
        if self._mode_active:
            self._mode_active = False
            self._mode.__exit__(None, None, None)

    def _record_function(
        self,
        func: Callable[..., Any],
        spec: ActivationSpec,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        out: Any,
    ) -> None:
        if not self._attached or self._activation_stack or not isinstance(out, torch.Tensor):
            return
        enclosing = self._stack[-1] if self._stack else ""
        if enclosing not in self._fn_parents:
            if not self._discovering:  # the mode runs in a child of a module that calls activations
                return
            self._fn_parents.add(enclosing)
        fname = getattr(func, "__name__", "function")
        base = f"{enclosing}.{fname}()" if enclosing else f"{fname}()"
        k = self._counts.get(base, 0)
        self._counts[base] = k + 1
        site = self._site_by_key.get((base, k), _MISSING)
        if site is _MISSING:
            site = self._new_site(
                (base, k),
                base if k == 0 else f"{base}#{k}",
                base,
                enclosing,
                k,
                spec,
                fname,
                spec.resolve_bounds(None, args, kwargs),
            )
        if site is not None:
            self._observe(site, out)

    def _new_site(
        self,
        key: tuple[str, int],
        layer: str,
        base: str,
        module: str,
        call: int,
        spec: ActivationSpec,
        function: str | None,
        bounds: tuple[float, float] | None,
    ) -> Site | None:
        if (self.include is not None and not matches(self.include, layer, base)) or (
            self.exclude is not None and matches(self.exclude, layer, base)
        ):
            self._site_by_key[key] = None
            return None
        # Closed steps are turned into values with the layout they were recorded with: the state grows when the
        # site is bound (right after this, in the same hook) or at the next step's close, with the ring empty.
        self._flush()
        site = Site(len(self._sites), layer, module, call, spec, function, bounds)
        self._sites.append(site)
        self._site_by_key[key] = site
        self._fwd_states.append([])
        self._grad_states.append([])
        self._applies.append([c.applies_to(site) for c in self.collectors])
        self._touched.append(False)
        self._calls.append(0)
        self._elements.append(0)
        self._backward.append(0)
        ref = self._ref

        def grad_hook(grad: torch.Tensor) -> None:
            manager = ref()
            if manager is not None and manager._attached:
                manager._on_grad(site, grad)

        self._grad_hooks.append(grad_hook)
        return site

    def _bind_site(self, site: Site, out: torch.Tensor) -> bool:
        """Fix a site's units and create its collector state at its first output. False if it cannot be."""
        shape = tuple(out.shape)
        try:
            site.bind_shape(shape, resolve_unit_dim(self.unit_dim, site.layer, site.layer.split("#")[0], len(shape)))
        except ConfigError as e:
            site.problem = str(e)
            self._problem(f"hookscope: {e}; the site is skipped")
            return False
        if self._device is None:
            self._device, self._device_index = out.device, out.get_device()
            for c in self.collectors:
                c._bank = StateBank(c.state_specs, out.device)
        for c, applies in zip(self.collectors, self._applies[site.index]):
            if applies:
                state = c._add_site(site, out.device)
                self._fwd_states[site.index].append((c, state))
                if c.wants_grad:
                    self._grad_states[site.index].append((c, state))
        return True

    def _observe(self, site: Site, output: torch.Tensor) -> None:
        if site.problem is not None:
            return
        if not site.units_fixed and not self._bind_site(site, output):
            return
        if self._recompute:  # a checkpointed forward recomputed in backward: counted in the first pass
            if self._want_grad and output.requires_grad:
                output.register_hook(self._grad_hooks[site.index])
            return
        shape = output.shape
        if shape != site.shape:
            if site.units_of(shape) != site.units:
                self._problem(
                    f"hookscope: site {site.layer!r} produced an output of shape {list(shape)} with "
                    f"{site.units_of(shape)} units after {site.units} units; such calls are skipped "
                    f"(use `unit_dim` if units sit in another dimension)"
                )
                return
            site.shape = tuple(shape)
        if output.get_device() != self._device_index and output.device != self._device:
            self._problem(
                f"hookscope: site {site.layer!r} runs on {output.device} while the statistics live on "
                f"{self._device}; calls on other devices are skipped (model parallelism is not supported)"
            )
            return
        i = site.index
        if not self._touched[i]:
            self._touched[i] = True
            self._order.append(i)
            if site.first_step is None:
                site.first_step = self._step
        self._calls[i] += 1
        self._elements[i] += output.numel()
        _feed(self._fwd_states[i], output, site, grad=False)
        if self._want_grad and output.requires_grad:
            output.register_hook(self._grad_hooks[i])

    def _on_grad(self, site: Site, grad: torch.Tensor) -> None:
        i = site.index
        if not self._touched[i]:
            self._touched[i] = True
            self._order.append(i)
        self._backward[i] += 1
        _feed(self._grad_states[i], grad, site, grad=True)

    def _problem(self, message: str) -> None:
        warn_once(message, stacklevel=4)

    # ----------------------------------------------------------------------------------------------------------
    # steps

    @property
    def current_step(self) -> int:
        """Number of the open step (steps are numbered from 0)."""
        return self._step

    @property
    def sites(self) -> list[Site]:
        """Sites found so far, in order of discovery."""
        return list(self._sites)

    @property
    def layers(self) -> list[str]:
        """Layer names of the sites found so far."""
        return [s.layer for s in self._sites]

    def step(self) -> None:
        """Close the current training step: its statistics are recorded and the next step begins.

        Does tensor work only (no host synchronisation); values reach the host when a report is asked for.
        Under ``torch.distributed`` (``global_stats``) this is a collective: every rank must call it.
        """
        # under torch.distributed the collective takes place even when nothing ran here in this step
        record = self._close(commit=True, force=self.global_stats and bool(self._sites))
        if record is not None:
            self._pending.append(record)
            self._last_record = record
            if len(self._pending) >= RING_STEPS:
                self._flush()
            if self.alerts is not None and self.alerts.due(record.step):
                self._check_alerts(record)
            for i, sink in enumerate(self.sinks):
                self._sink_buffers[i].append(record)
                if len(self._sink_buffers[i]) >= sink.every:
                    self._flush_sink(i)
        if self._forward_seen and self._attached:
            self._forward_seen = False
            self._recorded_steps += 1
            if self._compiled:
                pass  # changing hooks would make torch.compile recompile (and give up after a few times)
            elif self._discovering:
                self._slim()
            elif self._recorded_steps % REDISCOVER_EVERY == 0:
                self._rediscover()
        self._step += 1
        self._update_recording()
        self._check_include()

    def _frame_of(self, records: list[report.StepRecord]) -> pd.DataFrame:
        rows = report.Rows.concat([report.Rows.of(r) for r in records])
        return report.build_frame(rows, self._sites, self.collectors, self._fields or [], self._applies)

    def _flush_sink(self, i: int) -> None:
        self._flush()
        records, self._sink_buffers[i] = self._sink_buffers[i], []
        sink = self.sinks[i]
        if records and (sink.all_ranks or distributed.rank() == 0):
            sink.write(self._frame_of(records))

    def last_step_frame(self) -> pd.DataFrame:
        """The rows of the last closed step only (cheap, whatever the length of the history)."""
        self._flush()
        return self._frame_of([self._last_record] if self._last_record is not None else [])

    def _check_alerts(self, record: report.StepRecord) -> None:
        assert self.alerts is not None
        self._flush()
        self.alerts.check(self._frame_of([record]), record.step, primary=distributed.rank() == 0)

    def _check_include(self) -> None:
        if self._include_checked or self.include is None or not self._site_by_key:
            return
        self._include_checked = True
        if not self._sites:
            found = sorted(k[0] if k[1] == 0 else f"{k[0]}#{k[1]}" for k in self._site_by_key)
            warn_once(
                f"hookscope: `include` patterns {list(self.include)} matched none of the activation sites "
                f"({', '.join(found[:10])}{', ...' if len(found) > 10 else ''})",
                stacklevel=3,
            )

    def _close(self, commit: bool, force: bool = False) -> report.StepRecord | None:
        """Close the open step (``commit``), or take a snapshot of it. A closed step's per-step state goes to
        the collectors' rings and its record gets its values when the ring is flushed (see :meth:`_flush`)."""
        order = self._order
        if not order and not force:
            return None
        if not commit:
            self._flush()
        n = len(self._sites)
        values: torch.Tensor | None = None
        with torch._C.DisableTorchFunction(), torch.no_grad():
            banks = [c._bank for c in self.collectors if c._bank is not None]
            for bank in banks:
                bank.resize(n)
            counts = self._reduce_across_ranks(n, banks) if self.global_stats else None
            if commit:
                for bank in banks:
                    bank.push()
                if counts is not None:
                    self._pending_counts.append(counts)
            else:
                values = self._close_block([self._step], [counts] if counts is not None else [], commit=False)[0]
        sites = list(order)
        record = report.StepRecord(
            step=self._step,
            sites=sites,
            calls=[self._calls[i] for i in sites],
            elements=[self._elements[i] for i in sites],
            backward=[self._backward[i] for i in sites],
            units=[self._sites[i].units for i in sites],
            shapes=[self._sites[i].shape for i in sites],
            values=values,
        )
        if commit:
            for i in sites:
                self._touched[i] = False
                self._calls[i] = self._elements[i] = self._backward[i] = 0
            self._order = []
        return record

    def _close_block(self, steps: list[int], counts: list[torch.Tensor], commit: bool) -> torch.Tensor:
        """``(len(steps), n_sites, n_fields)`` float64 values of a block of steps: the pending rings when
        ``commit``, else the open step."""
        fields: list[tuple[int, str]] = []
        columns: list[torch.Tensor] = []
        if counts:  # global counts of calls, elements and backward passes: (steps, n_sites, 3)
            columns.extend(torch.stack(counts).unbind(2))
            fields.extend([(-1, "calls"), (-1, "elements"), (-1, "backward")])
        n = len(self._sites)
        banks = [c._bank for c in self.collectors if c._bank is not None]
        try:
            for ci, c in enumerate(self.collectors):
                if c._bank is None:
                    continue
                n = c._bank.n_sites
                block = c._bank.take() if commit else c._bank.current()
                for name, values in c.close_steps(steps, block, commit).items():
                    fields.append((ci, name))
                    columns.append(values)
            if self._fields is None:
                self._fields = fields
            elif fields != self._fields:
                raise StateError(
                    f"collectors must record the same fields at every step: got {fields}, expected {self._fields}"
                )
            if not columns:
                return torch.zeros(len(steps), n, 0, dtype=torch.float64, device=self._device)
            return torch.stack(columns, dim=2).to(torch.float64)  # a copy: the ring rows may be reused now
        finally:
            if commit:  # also when a collector raised: the hooks must never write into a closed row
                for bank in banks:
                    bank.recycle()

    def _flush(self) -> None:
        """Turn the closed steps waiting in the rings into recorded values and store them in the history."""
        records, self._pending = self._pending, []
        if not records:
            return
        counts, self._pending_counts = self._pending_counts, []
        with torch._C.DisableTorchFunction(), torch.no_grad():
            values = self._close_block([r.step for r in records], counts, commit=True)
        for record, row in zip(records, values.unbind(0)):  # one operation for all the rows
            record.values = row
            self._history.append(record)

    def _reduce_across_ranks(self, n: int, banks: list[StateBank]) -> torch.Tensor:
        """Make this step's state global (one all_reduce per reduction kind; ``banks`` cover ``n`` sites);
        returns global host counts."""
        assert self._device is not None
        counts = torch.tensor(
            [self._calls[:n], self._elements[:n], self._backward[:n]], dtype=torch.float64
        ).T.contiguous()
        counts = host_to_device(counts, self._device)  # without waiting for the device
        layout = [n, *(b.n_units for b in banks)]
        check = layout != self._layout
        self._layout = layout
        return distributed.reduce_step(banks, counts, n, self._device, check_layout=check)

    def state_bytes(self) -> int:
        """Bytes of collector state on the device (independent of the number of steps)."""
        return sum(c._bank.nbytes() for c in self.collectors if c._bank is not None)

    def history_bytes(self) -> int:
        """Bytes of the recorded history (device values and host counts)."""
        self._flush()
        return self._history.nbytes()

    # ----------------------------------------------------------------------------------------------------------
    # reports

    def rows(self) -> report.Rows:
        """Recorded (step, site) rows with their raw counts, the open step included when it has data."""
        self._flush()
        parts = [self._history.records()]
        # under torch.distributed the open step holds rank-local values until step() combines them: not reported
        snapshot = None if self.global_stats else self._close(commit=False)
        if snapshot is not None:
            parts.append(report.Rows.of(snapshot))
        rows = report.Rows.concat(parts)
        steps = np.unique(rows.step)
        if self.max_history is not None and len(steps) > self.max_history:
            return rows.select(rows.step >= steps[-self.max_history])
        return rows

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (step, layer) in which the layer ran, in forward execution order within each step.

        Columns: ``step, layer, kind, shape, units, calls, dead_ratio, inactive_fraction, saturation_rate,
        grad_norm`` and the columns of custom collectors. A statistic that does not apply to a layer, or whose
        collector is not attached, is NaN. The open step (no ``step()`` since its data) is included.
        """
        return report.build_frame(self.rows(), self._sites, self.collectors, self._fields or [], self._applies)

    def site(self, layer: str) -> Site:
        """The site called ``layer``.

        Raises:
            KeyError: No such layer; the message lists the known ones.
        """
        for site in self._sites:
            if site.layer == layer:
                return site
        known = ", ".join(s.layer for s in self._sites[:20]) + (", ..." if len(self._sites) > 20 else "")
        raise UnknownLayerError(f"unknown `layer` {layer!r}; known layers: {known or '(none recorded yet)'}")

    def _dead_collector(self) -> DeadReLU:
        for c in self.collectors:
            if isinstance(c, DeadReLU):
                return c
        raise StateError("dead units need a DeadReLU collector; add DeadReLU() to `collectors`")

    def _latest_step(self) -> tuple[int, bool]:
        """The step reports call latest, and whether it is the open one (brings persistent state up to date)."""
        self._flush()
        if self._order:
            return self._step, True
        return (self._history.steps[-1], False) if len(self._history) else (self._step, False)

    def dead_units(self, layer: str) -> list[int]:
        """Indices of the units of ``layer`` that are dead at the latest step (see ``DeadReLU``).

        Reads device state to the host (a synchronisation): call it for reports, not every step.

        Raises:
            KeyError: Unknown layer.
            ValueError: The layer is not a rectifier.
            RuntimeError: No ``DeadReLU`` collector is attached.
        """
        site = self.site(layer)
        collector = self._dead_collector()
        if not collector.applies_to(site):
            raise ConfigError(f"`layer` {layer!r} is a {site.kind}, not a rectifier: it has no dead units")
        step, is_open = self._latest_step()
        state = collector.unit_state(site, step, include_open=is_open)
        return [int(i) for i in np.flatnonzero(state["dead"])]

    def unit_timeline(self, layer: str | None = None) -> pd.DataFrame:
        """Per-unit history of rectifier layers: when each unit last fired, whether it is dead, since when, and
        how often it revived.

        Columns: ``layer, unit, last_fired`` (NaN if never), ``dead`` (at the latest step), ``dead_since`` (the
        first step of the current dead spell, NaN if alive), ``revivals`` (times the unit fired again after
        being dead, having fired before), ``last_revival`` (NaN if never).
        """
        import pandas as pd

        collector = self._dead_collector()
        step, is_open = self._latest_step()
        sites = [self.site(layer)] if layer is not None else [s for s in self._sites if collector.applies_to(s)]
        parts = []
        for site in sites:
            if site.units == 0 or not collector.applies_to(site):
                continue
            st = collector.unit_state(site, step, include_open=is_open)
            last = st["last_fired"]
            never = np.isinf(last)
            first = float(site.first_step if site.first_step is not None else step)
            since = np.where(never, first, last + collector.window)
            parts.append(
                pd.DataFrame(
                    {
                        "layer": site.layer,
                        "unit": np.arange(site.units),
                        "last_fired": np.where(never, np.nan, last),
                        "dead": st["dead"],
                        "dead_since": np.where(st["dead"], since, np.nan),
                        "revivals": st["revivals"],
                        "last_revival": np.where(np.isinf(st["last_revival"]), np.nan, st["last_revival"]),
                    }
                )
            )
        columns = ["layer", "unit", "last_fired", "dead", "dead_since", "revivals", "last_revival"]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)

    def to_csv(self, path: str | Any) -> None:
        """Write :meth:`to_dataframe` to ``path`` as CSV, atomically (no partial file on error).

        Raises:
            OSError: The directory does not exist or is not writable.
        """
        from hookscope.reporters.csv import write_csv

        write_csv(self.to_dataframe(), path)

    def table(self, step: int | None = None, *, ascii: bool = False) -> Table:
        """A rich table with one row per layer for the latest step (or ``step``).

        The latest step is built from that step's record alone, so a live view stays cheap however long the run.
        """
        from hookscope.reporters.table import build_table

        self._flush()
        if step is None:
            snapshot = None if self.global_stats else self._close(commit=False)
            latest = snapshot if snapshot is not None else self._last_record
            if latest is not None:
                return build_table(self._frame_of([latest]), ascii=ascii)
        return build_table(self.to_dataframe(), step=step, ascii=ascii)

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return (
            f"HookManager({type(self.model).__name__}, collectors={self.collectors}, "
            f"{state}, sites={len(self._sites)}, step={self._step})"
        )


def _feed(pairs: list[tuple[Collector, SiteState]], tensor: torch.Tensor, site: Site, grad: bool) -> None:
    """Give an output (or its gradient) to collectors with autograd and the function mode off.

    No graph is recorded, so no ``detach()`` is needed; switching the grad mode directly costs a third of
    ``torch.no_grad()`` as a context manager, and this runs twice per site and step.
    """
    grad_mode = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)
    try:
        with torch._C.DisableTorchFunction():
            for collector, state in pairs:
                if grad:
                    collector.update_grad(state, tensor, site)
                else:
                    collector.update(state, tensor, site)
    finally:
        torch._C._set_grad_enabled(grad_mode)


def _remove_handles(handles: list[RemovableHandle]) -> None:
    for h in handles:
        h.remove()


def _pre_hook(
    ref: weakref.ReferenceType[HookManager], name: str, spec: ActivationSpec | None
) -> Callable[[nn.Module, Any], None]:
    def hook(module: nn.Module, args: Any) -> None:
        manager = ref()
        # a forward that began while recording is followed to its end, so the module stack stays balanced
        if manager is not None and manager._attached and (manager._recording or manager._stack):
            manager._enter(name, spec, module)

    return hook


def _post_hook(
    ref: weakref.ReferenceType[HookManager], name: str, spec: ActivationSpec | None
) -> Callable[[nn.Module, Any, Any], None]:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        manager = ref()
        if manager is not None and manager._attached and manager._stack:
            manager._exit(name, spec, output)

    return hook
