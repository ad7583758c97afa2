"""Tracing: following a model's forward passes and handing each activation output to the recorder.

Hooks are global state of a model: every forward pass runs them, whoever calls it, until they are removed. A
:class:`Tracer` therefore owns exactly the handles it created, removes them in :meth:`Tracer.detach`, and a
finalizer removes them too when the tracer (its manager) is garbage-collected without being detached. Hooks and
the function mode hold only weak references to the tracer, so they never keep a manager alive.

How a forward pass is followed:

- During discovery (the first recorded step, and one recorded step in :data:`REDISCOVER_EVERY` after it) every
  module of the model has a forward pre-hook and an ``always_call`` forward hook, which keep a stack of running
  modules. A module entered while none is running starts a new forward pass: call indices restart there
  (nothing depends on the root's own ``forward`` being called, as with Lightning's ``training_step``). After
  discovery only the modules that matter keep their hooks (see :meth:`Tracer.slim`).
- Activation modules are sites; their output is recorded in the forward hook, which runs after every other
  forward hook of the module (a user's hook that replaces the output, registered after attaching, would
  otherwise hide the output the rest of the model receives). Functional activations
  (``F.relu``, ``torch.tanh``, ``x.relu_()``...) are captured by a ``TorchFunctionMode`` that is active only
  while a forward pass runs (after discovery: only inside the modules that call them); calls made inside an
  activation module are not separate sites.
- Gradients are captured by the recorder with a tensor hook on the output (``register_full_backward_hook``
  fails on in-place activations). A forward pass recomputed by activation checkpointing runs inside autograd's
  backward: its outputs are not counted again, but they carry the tensor hook when the first pass had no graph
  (reentrant checkpointing).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from types import FrameType
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from hookscope import traced
from hookscope.activations import (
    DISTRIBUTION_KINDS,
    MODULE_OUTPUT,
    ActivationSpec,
    Bounds,
    activation_for_function,
    activation_for_module,
    list_activations,
)
from hookscope.in_graph import InGraph
from hookscope.recording import MISSING, Recorder, _in_transform, discard_open_step
from hookscope.sites import (
    ROOT_NAME,
    ModuleSelection,
    Producer,
    clean_name,
    inert_layer,
    producer_of,
    unwrap_model,
)
from hookscope.warn import warn_once

__all__ = ["REDISCOVER_EVERY", "Evaluation", "Tracer"]

_graph_task_id: Callable[[], int] = getattr(torch._C, "_current_graph_task_id", lambda: -1)

#: After discovery, every module is hooked again for one recorded step in this many (see Tracer.slim).
REDISCOVER_EVERY = 1000
#: Modules put in place of hooked ones while attached are hooked within this many recorded steps.
REHOOK_EVERY = 20


def _module_call_code() -> tuple[Any, frozenset[int]]:
    """The code of the function in which ``nn.Module._call_impl`` runs a module's hooks and its forward, and the
    offsets of its instructions that call the forward: a frame of that code whose last instruction is not one of
    them is running a hook (``(None, frozenset())`` where this torch has another layout: nothing is told apart)."""
    import dis

    outer = nn.Module._call_impl.__code__
    for inner in outer.co_consts:
        if getattr(inner, "co_name", None) == "inner":
            instructions = list(dis.get_instructions(inner))
            lines = {i.positions.lineno for i in instructions if i.argval == "forward_call" and i.positions}
            if len(lines) == 1:
                offsets = frozenset(i.offset for i in instructions if i.positions and i.positions.lineno in lines)
                return inner, offsets
    return None, frozenset()


#: See _module_call_code.
_MODULE_CALL, _FORWARD_OFFSETS = _module_call_code()


def _in_forward(frame: FrameType | None) -> bool:
    """Whether the code running in ``frame`` is a module's forward: the innermost module call among its callers
    is running its forward, not one of its hooks. Code run by a hook (a user's forward hook that logs
    ``torch.relu(out).mean()``) is not, nor is code that no module call runs (after a ``KeyboardInterrupt`` inside
    a forward pass, which our forward hooks do not see end, ``torch.relu(t)`` in a notebook cell: the stacks are
    recovered at the next forward, see :meth:`Tracer.pre_hook`). Only the innermost module call is looked at:
    each caller frame costs about 0.1 µs to read, and a model's are many."""
    while frame is not None:
        if frame.f_code is _MODULE_CALL:
            return frame.f_lasti in _FORWARD_OFFSETS
        frame = frame.f_back
    return _MODULE_CALL is None  # (another torch: nothing is told apart)


def _called_by_a_hook(frame: FrameType | None, anywhere: bool = False) -> bool:
    """Whether the module call that runs its hooks in ``frame`` (a frame of :data:`_MODULE_CALL`) was made by a
    hook of another module (a user's forward hook that runs ``model.act(out)`` to log it): the innermost module
    call among its callers is running hooks (``anywhere``: any of them, for a call that would begin a forward
    pass). Such a call is not part of the model's forward: nothing in it is a site, nor is it a forward pass. A
    call that no module call makes (a training loop's) is not one."""
    if frame is None or frame.f_code is not _MODULE_CALL:
        return False
    frame = frame.f_back
    while frame is not None:
        if frame.f_code is _MODULE_CALL and (frame.f_lasti not in _FORWARD_OFFSETS or not anywhere):
            return frame.f_lasti not in _FORWARD_OFFSETS
        frame = frame.f_back
    return False


#: An activation module's call on the activation stack: its name, call index, kind, module, unit-dim producer.
_Activation = tuple[str, int, ActivationSpec, nn.Module, Producer | None]


class _HookCall:
    """On the activation stack: a module run by a hook (see :func:`_called_by_a_hook`); nothing inside is a site."""


_HOOK_CALL = _HookCall()


def _in_backward() -> bool:
    """True while autograd's backward runs (where activation checkpointing recomputes forwards)."""
    return _graph_task_id() != -1


def _remove_handles(handles: list[RemovableHandle]) -> None:
    for h in handles:
        h.remove()


# --------------------------------------------------------------------------------------------------------------
# Hooks under torch.compile
#
# hookscope's Python (dictionaries, thresholds, per-site state) must never be traced into a compiled graph: its
# floats and containers become guards that fail ("Guard failed on the same frame it was created"), and values
# that dynamo turns into tensors break it ("'NoneType' object has no attribute 'item'"). So a hook that dynamo
# traces (``torch.compiler.is_compiling()``) only puts one of hookscope's operations into the graph
# (:mod:`hookscope.traced`), and the compiled graph calls it at run time, where the tracer replays the event with
# the eager code (``replay_*`` below): no graph break, and the graph is the same at every step. A hook is never
# compiled as a frame of its own (a per-code "skip" strategy): the hooks of a compiled root module, which torch
# runs outside its compiled forward, run eagerly, with dynamo disabled so that the functions they call are not
# compiled either, and note that the model is compiled (its hooks must then never change: each change would make
# it recompile).

_no_torch_function = torch._C.DisableTorchFunction

_dynamo_c: Any
try:
    from torch._C._dynamo import eval_frame as _dynamo_c

    _compile_region: Callable[[], object] = _dynamo_c.get_eval_frame_callback
except (ImportError, AttributeError):  # pragma: no cover - torch builds without dynamo
    _dynamo_c = None

    def _compile_region() -> object:
        return None


def _never_a_compiled_frame(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``fn`` so that dynamo never compiles it as a frame of its own (it may still trace it inline)."""
    if _dynamo_c is not None:
        with contextlib.suppress(AttributeError, TypeError):
            strategy = _dynamo_c._FrameExecStrategy(_dynamo_c._FrameAction.SKIP, _dynamo_c._FrameAction.DEFAULT)
            _dynamo_c.set_code_exec_strategy(fn.__code__, strategy)
    return fn


def _opaque_to_dynamo(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``fn`` so that torch.compile neither traces nor compiles it (see above)."""
    fn._torchdynamo_disable = True  # type: ignore[attr-defined]
    return _never_a_compiled_frame(fn)


_is_compiling: Callable[[], bool] = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)
_is_exporting: Callable[[], bool] = torch.compiler.is_exporting


_disabled: Callable[..., None] | None = None


@_opaque_to_dynamo
def _outside_compile(fn: Callable[..., None], *args: Any) -> None:
    """Run ``fn(*args)`` with dynamo disabled (from a hook called inside a compiled region)."""
    global _disabled
    if _disabled is None:
        _disabled = torch.compiler.disable(_call)
    _disabled(fn, *args)


def _run_by_a_graph(frame: FrameType | None) -> bool:
    """Whether ``frame`` (the function mode's, or a caller of it) or one of its next three callers is the forward of
    a graph that torch.fx generated (a compiled graph run as torch calls)."""
    for _ in range(4):
        if frame is None:
            return False
        if frame.f_code.co_filename.startswith("<eval_with_key>"):
            return True
        frame = frame.f_back
    return False


def _call(fn: Callable[..., None], *args: Any) -> None:
    fn(*args)


class _FunctionCapture(TorchFunctionMode):
    """Sees every torch function call of a forward pass and reports activation calls to the tracer."""

    def __init__(self, tracer: weakref.ReferenceType[Tracer], token: int, wants_grad: bool, holder: InGraph) -> None:
        super().__init__()
        self._tracer = tracer
        self.token = token  # the tracer's token in hookscope.traced
        self.wants_grad = wants_grad
        self.holder = holder  # where compiled graphs record

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
            if _is_compiling():
                traced.trace_functional(self.token, self.holder, func, args, out, self.wants_grad)
            else:
                _functional_call(self._tracer, func, spec, args, kwargs, out)
        return out


# Its frames run whenever torch calls go through the mode; compiled on their own, they were reused across
# different functions (a sigmoid recorded as a relu): only a forward traced by dynamo may trace it inline.
_never_a_compiled_frame(_FunctionCapture.__torch_function__)


class Tracer:
    """Module hooks and the function mode of one manager; hands activation outputs to a :class:`Recorder`.

    Args:
        model: The model to follow.
        recorder: Where outputs go.
        functional: Capture functional activations with the function mode.
        modules: The modules whose outputs are module sites (checked against the model here), or ``None``.

    Attributes:
        recording: Whether forward passes that begin now are followed (the manager sets it: paused, or a step
            that ``every`` skips, is not recorded). A pass that began while recording is followed to its end.
        attached: Whether the hooks are in place.
    """

    def __init__(
        self, model: nn.Module, recorder: Recorder, functional: bool, modules: ModuleSelection | None = None
    ) -> None:
        if modules is not None:
            modules.check(model, lambda m: activation_for_module(m) is not None)
        self.modules = modules
        #: Module sites: the name of each module whose output is recorded, by ``id(module)``, and which raw module
        #: holds each name (a wrapper and the module it wraps share a name: the outer one is the site).
        self.outputs: dict[int, str] = {}
        self._output_raw: dict[str, str] = {}
        self.model = model
        self._root = unwrap_model(model)  # whether the model trains: see outside_training
        self._pass_trains = False  # the forward pass in progress is a training pass (see pre_hook)
        self._trains: bool | None = None  # in this forward pass: some parameter requires grad (asked lazily)
        self.recorder = recorder
        self.functional = functional
        self.recording = True
        self.attached = False
        self._ref = weakref.ref(self)
        self._replay = _Replay(self)  # the events of compiled graphs
        self._token = traced.register(self._replay)
        self.evaluation = Evaluation()
        self._in_graph = recorder.in_graph = _in_graph_of(self)  # what compiled graphs record themselves
        self._mode = _FunctionCapture(self._ref, self._token, recorder.wants_grad, self._in_graph)
        self._mode_active = False
        self._mode_depth = 0  # stack depth of the module that pushed the function mode
        # every handle registered (the finalizer holds this very list); per module, the ones in place
        self._handles: list[RemovableHandle] = []
        self._module_handles: dict[str, list[RemovableHandle]] = {}
        self._module_ids: dict[str, int] = {}  # id() of the module each raw name's hooks are on
        self._clean: dict[str, str] = {}  # raw qualified name -> name without wrapper components
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._activation_modules: set[str] = set()
        self._layers: set[int] = set()  # id() of torch's own layers, hooked after their forward only (see _hook)
        # Discovery: during the first recorded step (and one in REDISCOVER_EVERY after it) every module is hooked and
        # the function mode covers whole forward passes; afterwards only the modules that matter keep hooks (slim).
        self.discovering = True
        self._entries: set[str] = set()  # modules that began a forward pass
        self._fn_parents: set[str] = set()  # modules that called a functional activation themselves
        self._compiled = _Compiled()  # a forward pass was traced by torch.compile: hooks never change
        # shared by the modules of one role: [0] other modules, [1] activation modules and module sites (a compiled
        # graph hands these their output; no other tensor is read from it: see hookscope.traced.trace_enter)
        self._hooks = _hook_pairs(self._ref, self._compiled, self._token, recorder.wants_grad, self._in_graph)
        self._modules: dict[int, nn.Module] = {}  # hooked modules by id() (the compiled graph names them so)
        self._pass_recorded = True  # the pass in progress is recorded (under compile every pass is followed)
        #: The name and activation kind of each hooked module, by ``id(module)``.
        self.names: dict[int, tuple[str, ActivationSpec | None]] = {}
        # Layers with a feature count, and the last of them that ran in this pass (during discovery): the unit
        # dimension of an activation is that of the layer that produced its input (see sites.infer_unit_dim).
        self._producers: dict[int, Producer] = {}
        self._producer: Producer | None = None
        self._produced: tuple[int, tuple[int, ...], tuple[int, ...]] | None = None  # its output's signature
        # a layer with features entered after the last one finished, still running: it makes its output itself,
        # with an activation inside (timm's BatchNormAct2d: batch_norm, then self.act)
        self._running_producer: Producer | None = None
        self._pass_done = False  # a forward pass ran to its end since the last end_step()
        # calls of the torch.compile wrapper the model is (when it is one) since the last end_step(), counted by a
        # hook on the wrapper itself, which runs outside the compiled code
        self._wrapper_calls = 0
        self._wrapper_handles: list[RemovableHandle] = []
        #: Forward passes followed to their end since the last end_step() (compared across ranks).
        self.passes = 0
        self._recorded_steps = 0
        # the forward pass in progress
        self.stack: list[str] = []
        self._pass_frame: FrameType | None = None  # the frame of the module call that began the pass
        self._activation_stack: list[_Activation | _HookCall | None] = []
        self._counts: dict[str, int] = {}
        self._recompute = False
        self._recompute_task = -1
        self._recompute_counts: dict[str, int] = {}
        self._replaying = False  # an event of a compiled graph is being replayed (see replay_enter)
        # the output of the last activation function recorded eagerly: a graph that dynamo's "eager" backend runs
        # goes through the function mode as well as calling hookscope.functional on the same output
        self._eager_out: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------------------------------
    # hooks in place

    def attach(self) -> None:
        """Hook every module (discovery)."""
        self._handles = []
        self._module_handles = {}
        self._module_ids = {}
        self._activation_modules = set()
        self._layers = set()
        try:
            self._hook()
            if type(self.model).__name__ == "OptimizedModule":
                self._wrapper_handles = [self.model.register_forward_pre_hook(_wrapper_hook(self._ref))]
                self._handles.extend(self._wrapper_handles)
        except BaseException:
            _remove_handles(self._handles)
            raise
        # a manager dropped without detach() still takes its hooks off the model when it is collected
        self._finalizer = weakref.finalize(self, _remove_handles, self._handles)
        self.stack.clear()
        self._activation_stack.clear()
        self.discovering = True
        self.attached = True

    def detach(self) -> None:
        """Remove every hook (idempotent), and leave the function mode if a forward pass is interrupted."""
        _remove_handles(self._handles)
        self._handles = []
        self._module_handles = {}
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self.attached = False
        self.recover()  # detached from inside (or after an interrupted) forward pass

    def unseen_compiled_calls(self) -> int:
        """Calls of the ``torch.compile`` wrapper (the model, when it is one) in this recorded step that ran none of
        the hooks: compiled before the hooks were added, its code ignores them (pytorch/pytorch#117758)."""
        return self._wrapper_calls if not (self.passes or self._in_graph.entries) and self.recording else 0

    def compiled_without_hookscope(self) -> bool:
        """Whether forward passes ran in compiled code whose graph never calls hookscope's operations (compiled
        before attaching, or shared with an uninstrumented instance of the model's class)."""
        return self._compiled.seen and not self._compiled.replayed

    def hooked_modules(self) -> list[str]:
        """Names (wrapper components removed) of the modules that have hooks of this tracer now."""
        return list(dict.fromkeys(self._clean[raw] for raw, handles in self._module_handles.items() if handles))

    def _hook(self, wanted: Callable[[str, nn.Module], bool] = lambda name, module: True) -> None:
        """Hook the modules of the model that ``wanted`` selects (by default every one) and have no hooks of ours."""
        # Keyed by the raw qualified name: a wrapper and the module it wraps (checkpoint_wrapper(nn.ReLU())) have
        # the same cleaned name, and both need their hooks.
        for raw, module in unwrap_model(self.model).named_modules():
            if not wanted(raw, module):
                continue
            if raw in self._module_handles:
                if self._module_ids.get(raw) == id(module):
                    continue
                for h in self._module_handles.pop(raw):  # replaced while attached: hook the new module
                    h.remove()
            name = clean_name(raw)
            self._clean[raw] = name
            spec = activation_for_module(module)
            self.names[id(module)] = (name, spec)
            producer = producer_of(module) if spec is None else None
            if producer is not None:
                self._producers[id(module)] = producer
            self._modules[id(module)] = module
            selected = spec is None and self.modules is not None and self.modules.selects(name, module)
            if selected and self._output_raw.setdefault(name, raw) == raw:
                self.outputs[id(module)] = name
            records = spec is not None or id(module) in self.outputs
            self._layers -= {self._module_ids.get(raw, -1), id(module)}  # (a module replaced; an id() reused)
            self._module_ids[raw] = id(module)
            layer = bool(raw) and not records and inert_layer(module)
            if layer:
                self._layers.add(id(module))
            pair = _register(module, self._hooks[records], layer, producer is not None)
            self._module_handles[raw] = pair
            self._handles.extend(pair)
            if spec is not None:
                self._activation_modules.add(name)

    def slim(self) -> None:
        """End discovery: keep hooks only where they are needed to name and observe every site found.

        Kept: activation modules; modules that began a forward pass (so passes begin and end as before); modules
        that call a functional activation themselves, where the function mode is pushed, and their direct
        children but torch's own layers (so that the innermost running module, which names a functional site, is
        the same as in discovery). Every other module loses its hooks; under ``torch.compile``, whose graphs call
        hookscope's operations for every module hooked when they were traced, its events are ignored instead.
        """
        parents = self._fn_parents if self.functional else set()
        keep = self._entries | parents | self._activation_modules | set(self._output_raw) | {""}
        names = {raw: self._clean[raw] for raw in self._module_handles}
        parent = {raw: n.rpartition(".")[0] if n else None for raw, n in names.items()}
        layers = {raw for raw in names if self._module_ids[raw] in self._layers}  # (never the innermost module)
        dropped = [raw for raw, n in names.items() if raw in layers or (n not in keep and parent[raw] not in parents)]
        self.discovering = False
        if self._compiled.seen:  # its hooks stay (a compiled graph never changes): their events are ignored
            self._compiled.followed = {self._module_ids[raw] for raw in names.keys() - set(dropped)}
            return
        for raw in dropped:
            for h in self._module_handles.pop(raw):
                h.remove()
            self._module_ids.pop(raw, None)
        self._handles[:] = [h for pair in self._module_handles.values() for h in pair] + self._wrapper_handles

    def end_step(self) -> None:
        """Housekeeping after a step closed: end discovery after the first recorded step, rediscover now and
        then; under ``torch.compile`` without changing hooks (it would recompile, and give up after a few times)."""
        self.passes = 0
        self.evaluation.open = False
        self._wrapper_calls = 0
        if self.stack and self._interrupted():  # no forward runs between steps
            self.recover()
        # discovery ends after a step in which a pass ran to its end (an interrupted one saw only part of it)
        if not (self._pass_done and self.attached):
            return
        self._pass_done = False
        self._recorded_steps += 1
        if self._recorded_steps % REHOOK_EVERY == 0 and not self._compiled.seen:
            self._hook(lambda name, module: name in self._module_ids)  # modules put in place of hooked ones
        if self.discovering:
            self.slim()
        elif self._recorded_steps % REDISCOVER_EVERY == 0:  # one recorded step with every module followed again
            if not self._compiled.seen:  # (under compile every module kept its hooks)
                self._hook()
            self._compiled.followed, self.discovering = None, True

    # ----------------------------------------------------------------------------------------------------------
    # the forward pass (hot path)

    def pre_hook(self, module: nn.Module, args: Any = (), training: bool | None = None) -> None:
        """Called by every hooked module's forward pre-hook (directly: ``sys._getframe(2)`` is the frame of
        torch's module call that runs the hook)."""
        if not self.attached:
            return
        if self.stack:
            entry = self.names.get(id(module))
            if entry is None:
                return _copied_module()
            name, spec = entry
            if name in self._entries and self._interrupted():
                self.recover()
        elif (self.recording or self._compiled.seen) and not _is_exporting():
            entry = self.names.get(id(module))
            if entry is None:
                return _copied_module()
            if module is not self._root and _called_by_a_hook(sys._getframe(2), anywhere=True):
                return  # a part of the model run by a hook after the forward pass (the model itself always begins one)
            # compiled: every pass is followed (the graph never changes); torch.export's passes are never followed
            # a training pass: with gradients, the module that begins it in train mode (what dynamo traced, compiled)
            self._pass_trains = torch.is_grad_enabled() and module.training if training is None else training
            admitted = self.recording and (
                _in_backward()  # a forward recomputed by checkpointing: its pass was admitted in the forward
                or self.evaluation.admit(self._pass_trains, self.recorder)
            )
            if not (admitted or self._compiled.seen):
                return
            self._pass_recorded = admitted
            self._in_graph.passes[admitted] += 1
            name, spec = entry
            # the frame of the module call that begins this forward pass lives exactly as long as the pass
            self._pass_frame = None if self._compiled.seen else sys._getframe(2)
        else:
            return
        # a forward that began while recording is followed to its end, so the module stack stays balanced
        self.enter(name, spec, module, args)

    def _interrupted(self) -> bool:
        """Whether the forward pass on the stack ended without our forward hooks (torch runs ``always_call``
        hooks for ``Exception`` only: a ``KeyboardInterrupt`` or ``SystemExit`` inside a forward skips them)."""
        frame = self._pass_frame
        if frame is None:
            return False
        try:
            frame.clear()  # only a frame that finished can be cleared
        except RuntimeError:
            return False  # still executing: the pass is running and this module is nested in it
        return True

    def recover(self) -> None:
        """Forget a forward pass that was interrupted: empty the stacks and leave the function mode."""
        self._pass_frame = None
        if self._mode_active:
            self._mode_active = False
            if torch.overrides._get_current_function_mode_stack()[-1:] == [self._mode]:
                self._mode.__exit__(None, None, None)
        self.stack.clear()
        self._activation_stack.clear()

    def post_hook(self, module: nn.Module, output: Any) -> int:
        """Called by every hooked module's forward hook (``always_call``: also when the forward raised). Returns
        the index of the site recorded from ``output``, or -1."""
        site = -1
        if self.attached and self.stack:
            entry = self.names.get(id(module))
            if entry is None:
                return site  # a module of a copy of the model (see _copied_module)
            name, spec = entry
            if id(module) not in self._layers:  # (a layer is never entered: see _hook)
                site = self.exit(name, spec, output, id(module))
            if self.discovering and spec is None and id(module) in self._producers:
                # the last layer with features, and what it produced: it tells where units sit
                self._producer = self._producers[id(module)]
                self._produced = _signature(output)
                self._running_producer = None
        return site

    def enter(self, name: str, spec: ActivationSpec | None, module: nn.Module, args: Any = ()) -> None:
        """A hooked module begins its forward."""
        if not self.stack:
            self._begin_forward()
            if self.discovering:
                self._entries.add(name)
        self.stack.append(name)
        if not self._mode_active and name in self._fn_parents and self.functional and not self._replaying:
            self._mode.__enter__()
            self._mode_active, self._mode_depth = True, len(self.stack)
        acts = self._activation_stack
        by_hook = bool(acts) and acts[-1] is _HOOK_CALL
        if not by_hook and len(self.stack) > 1 and not (self._recompute or self._compiled.seen):
            by_hook = _called_by_a_hook(sys._getframe(3))
        if spec is None:
            if by_hook:
                acts.append(_HOOK_CALL)
            elif self.discovering and id(module) in self._producers:
                self._running_producer = self._producers[id(module)]
        else:
            hooks = module._forward_hooks
            post = self._hooks[1][1]  # the activation modules' forward hook
            if len(hooks) > 1 and next(reversed(hooks.values())) is not post:
                _run_last(hooks, post)  # a hook registered after ours may replace the output
            if acts or by_hook:
                acts.append(None)  # nested inside another activation, or a hook's: not a site
            else:
                k = _call_index(self, name)
                feed = self._producer_for(args[0] if args else None) if self.discovering else None
                self._activation_stack.append((name, k, spec, module, feed))

    def exit(self, name: str, spec: ActivationSpec | None, output: Any, module_id: int = 0) -> int:
        """A hooked module ends its forward (also when it raised: ``always_call``). Returns the index of the
        activation site recorded from ``output``, or -1."""
        recorded = -1
        if not self.stack or self.stack[-1] != name:
            return recorded  # our pre-hook did not run for this call (an earlier pre-hook raised)
        self.stack.pop()
        if self._mode_active and len(self.stack) < self._mode_depth:
            self._mode_active = False
            self._mode.__exit__(None, None, None)
        if spec is None and self._activation_stack and self._activation_stack[-1] is _HOOK_CALL:
            self._activation_stack.pop()  # (run by a hook: not a module site either)
        elif module_id in self.outputs:
            recorded = _module_output(self, name, module_id, output)
        if spec is not None and self._activation_stack:
            entry = self._activation_stack.pop()
            if isinstance(entry, tuple) and isinstance(output, torch.Tensor):
                with _no_torch_function():  # modes (the user's, ours) do not see hookscope's tensor calls
                    recorded = _activation_output(self, entry, output)
        if not self.stack:
            self._pass_frame = None
            self._pass_done = True
            self.passes += 1
            self._end_forward()
        return recorded

    def outside_training(self, output: torch.Tensor) -> bool:
        """Whether an activation's output is outside the network being trained: it does not require grad while the
        model trains (in a training pass, as :class:`Evaluation` tells them apart, with grad mode on and some
        parameter requiring grad). Faster R-CNN's RPN ranks detached scores with a sigmoid (``rpn.sigmoid()``,
        thousands of "units", no gradient); the activations of a frozen part feed the trained one but are not
        trained. Such calls are not sites. Evaluation passes (``torch.no_grad()``/``inference_mode()``, eval
        mode) and models without a parameter that requires grad are not concerned."""
        if output.requires_grad or not torch.is_grad_enabled() or not self._pass_trains or _in_transform(output):
            return False  # (torch.func's wrapped tensors are skipped by the recorder, with a warning)
        if self._trains is None:  # once per forward pass, and only here: never on the common path
            self._trains = any(p.requires_grad for p in self._root.parameters())
        return self._trains

    def _producer_for(self, x: Any) -> Producer | None:
        """What tells the unit dim of an activation whose input is ``x``: the last layer with features, with its
        place when ``x`` is that layer's output itself; else a layer with features that encloses the activation
        and was entered after that one finished (its own computation made ``x``: timm's ``BatchNormAct2d``),
        with its place; else the last layer's size alone (something came in between)."""
        producer = self._producer
        if producer is not None and producer[1] != 0:
            signature = _signature(x)
            if signature is not None and signature == self._produced:
                return producer
        running = self._running_producer
        if running is not None:
            return running
        if producer is None or producer[1] == 0:
            return producer
        return (producer[0], 0, producer[2])

    def _begin_forward(self) -> None:
        self._producer = None
        self._produced = None
        self._running_producer = None
        self._trains = None
        if _in_backward():  # activation checkpointing recomputes a forward inside backward
            task = _graph_task_id()
            if task != self._recompute_task:
                self._recompute_task, self._recompute_counts = task, {}
            self._counts, self._recompute = self._recompute_counts, True
        else:
            self._counts, self._recompute = {}, False
        if self._replaying:  # a pass that begins inside a compiled graph: the mode would come too late
            if self.functional:
                warn_once(
                    "hookscope: torch.compile traced a forward pass from its first module's call (an "
                    "nn.Sequential root, or a compiled function that calls the model), before hookscope's function "
                    "mode could be active: functional activations in it (F.relu, torch.tanh, x.relu_()...), if "
                    "any, are not recorded; module activations are. To record them, compile a module whose forward "
                    "is your own code (wrap an nn.Sequential in one) rather than a function that calls the model"
                )
        elif self.functional and (self.discovering or self._compiled.seen) and not self._mode_active:
            # (under torch.compile always as in discovery: dynamo guards on the function mode stack it traced with)
            self._mode.__enter__()
            self._mode_active, self._mode_depth = True, 1

    def _end_forward(self) -> None:
        self._eager_out = None
        if self._mode_active:
            self._mode_active = False
            self._mode.__exit__(None, None, None)

    def functional_call(
        self,
        func: Callable[..., Any],
        spec: ActivationSpec,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        out: Any,
    ) -> int:
        """The function mode saw a call of an activation function. Returns the index of the site recorded from
        ``out``, or -1."""
        if not self.attached or self._activation_stack or not isinstance(out, torch.Tensor):
            return -1
        if self._pass_frame is not None and not self._compiled.seen and not _in_forward(sys._getframe(3)):
            return -1  # (frame 3: the caller of the function; compiled code has no module call frames to read)
        enclosing = self.stack[-1] if self.stack else ""
        if enclosing not in self._fn_parents:
            if not self.discovering:  # the mode runs in a child of a module that calls activations
                return -1
            self._fn_parents.add(enclosing)
        fname = getattr(func, "__name__", "function")
        base = f"{enclosing}.{fname}()" if enclosing else f"{fname}()"
        with _no_torch_function():  # modes (the user's) do not see hookscope's tensor calls
            if not out.requires_grad and self.outside_training(out):
                return -1
            k = _call_index(self, base)
            recorder = self.recorder
            site = recorder.site_by_key.get((base, k), MISSING)
            if site is MISSING:
                layer = base if k == 0 else f"{base}#{k}"
                bounds = _site_bounds(spec, layer, None, args, kwargs)
                site = recorder.new_site((base, k), layer, enclosing, k, spec, fname, bounds)
                if site is not None:
                    site.dim = _site_dim(spec, None, args, kwargs)
            if site is not None and self._pass_recorded:
                feed = self._producer_for(args[0] if args else None) if self.discovering else None
                if recorder.observe(site, out, self._recompute, feed, hook_grad=not self._replaying):
                    return int(site.index)
        return -1


def _call_index(tracer: Tracer, name: str) -> int:
    """The index of this call of ``name`` in the forward pass (its ``#k``), counted. A call seen at run time skips
    the indices that compiled graphs record themselves in passes of its kind: those calls were planned while dynamo
    traced, are not seen at run time, and in the pass that planned them they took their indices first (a compiled
    frame, then the eager rest of the frame after a graph break dynamo cannot resume from)."""
    k = tracer._counts.get(name, 0)
    taken = tracer._in_graph.planned.get(tracer._pass_trains)
    if taken and not tracer.recorder.planning:
        while (name, k) in taken:
            k += 1
    tracer._counts[name] = k + 1
    return k


def _module_output(tracer: Tracer, name: str, module_id: int, output: Any) -> int:
    """A module site's module returned ``output``: record its tensor (see :func:`output_tensor`). Returns the index
    of the site recorded, or -1."""
    tensor = output_tensor(output)
    if tensor is None or name in tracer._activation_modules:  # a wrapper of an activation: that site it is
        return -1
    k = _call_index(tracer, name)
    recorder = tracer.recorder
    site = recorder.site_by_key.get((name, k), MISSING)
    if site is MISSING:
        layer = name or ROOT_NAME
        site = recorder.new_site((name, k), layer if k == 0 else f"{layer}#{k}", name, k, MODULE_OUTPUT, None, None)
    if site is not None and tracer._pass_recorded:
        feed = None
        if tracer.discovering:  # the layer itself when it has features (a Linear), else the last one inside it
            own = tracer._producers.get(module_id)
            feed = own if own is not None else tracer._producer_for(tensor)
        with _no_torch_function():
            if recorder.observe(site, tensor, tracer._recompute, feed, hook_grad=not tracer._replaying):
                return int(site.index)
    return -1


def _activation_output(tracer: Tracer, entry: _Activation, output: torch.Tensor) -> int:
    """An activation module's call (``entry``, from :meth:`enter`) returned ``output``: record it. Returns the
    index of the site recorded, or -1."""
    act_name, k, act_spec, module, feed = entry
    if not output.requires_grad and tracer.outside_training(output):
        tracer._counts[act_name] = k  # not a call of the site: the next call takes its index
        return -1
    recorder = tracer.recorder
    site = recorder.site_by_key.get((act_name, k), MISSING)
    if site is not MISSING and site is not None and site.spec is not act_spec:
        site = MISSING  # the module was replaced by another kind: a new site under the same name
    if site is MISSING:
        layer = act_name or ROOT_NAME
        layer_k = layer if k == 0 else f"{layer}#{k}"
        bounds = _site_bounds(act_spec, layer_k, module, (), {})
        site = recorder.new_site((act_name, k), layer_k, act_name, k, act_spec, None, bounds)
        if site is not None:
            site.dim = _site_dim(act_spec, module, (), {})
    recorded = site is not None and tracer._pass_recorded
    if recorded and recorder.observe(site, output, tracer._recompute, feed, hook_grad=not tracer._replaying):
        return int(site.index)
    return -1


class _Replay:
    """The events of a compiled graph (see :mod:`hookscope.traced`, whose ``Replayer`` this is): a tracer's eager
    code, run where the graph calls it. Holds the tracer weakly (the tracer holds it)."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = weakref.ref(tracer)
        self._saved: tuple[Any, int, dict[str, Any]] | None = None  # (compile id, attempt, state before it)
        self.planned = False  # compiled graphs record sites themselves (see plan)

    def replay_enter(self, module: int, training: bool) -> None:
        """A hooked module traced into a compiled graph begins its forward."""
        tracer = self._tracer()
        found = None if tracer is None else tracer._modules.get(module)
        if tracer is None or found is None:
            return
        tracer._compiled.seen = tracer._compiled.replayed = True
        if not tracer._compiled.follows(module):
            return
        tracer._replaying = True
        try:
            with _no_torch_function():
                tracer.pre_hook(found, (), training)
        finally:
            tracer._replaying = False

    def replay_exit(self, module: int, out: torch.Tensor | None) -> int:
        """A hooked module traced into a compiled graph ends its forward; the site recorded from ``out``."""
        tracer = self._tracer()
        found = None if tracer is None else tracer._modules.get(module)
        if tracer is None or found is None or not tracer._compiled.follows(module):
            return -1
        tracer._replaying = True
        try:
            with _no_torch_function():
                return tracer.post_hook(found, out)
        finally:
            tracer._replaying = False

    def replay_functional(self, function: int, out: torch.Tensor, x: torch.Tensor | None) -> int:
        """An activation function traced into a compiled graph ran; the site recorded from ``out``."""
        tracer = self._tracer()
        func = _function_of_id(function)
        spec = None if func is None else activation_for_function(func)
        # (recorded already, by the function mode, when ``out`` is the output it saw)
        if tracer is None or func is None or spec is None or out is tracer._eager_out:
            return -1
        tracer._replaying = True
        try:
            with _no_torch_function():
                return tracer.functional_call(func, spec, () if x is None else (x,), {}, out)
        finally:
            tracer._replaying = False

    def replay_grad(self, site: int, grad: torch.Tensor) -> None:
        """Inside a compiled backward: the gradient with respect to an output recorded as site ``site``."""
        tracer = self._tracer()
        if tracer is None:
            return
        recorder = tracer.recorder
        if recorder.enabled and site < len(recorder.sites):
            with _no_torch_function():
                recorder.observe_grad(recorder.sites[site], grad)

    def plan(
        self, kind: int, obj: int, training: bool, requires_grad: bool,
        meta: tuple[tuple[int, ...], torch.dtype, torch.device] | None, name: str,
    ) -> int:  # fmt: skip
        """While dynamo traces a frame: what its graph does with an event (see :mod:`hookscope.traced`). The event
        is run now, as it will be at every run of the graph: the site is named and bound as an eager hook would
        (the output is a stand-in of its shape, dtype and device), and gets an entry of the tracer's
        :class:`~hookscope.in_graph.InGraph`, which the graph records into."""
        tracer = self._tracer()
        if tracer is None:
            return traced.NOT_A_SITE
        if not self._in_graph_here(tracer):
            return traced.REPLAY
        self.planned = True
        standin = None
        if meta is not None:
            shape, dtype, device = meta
            with torch._C.DisableTorchFunction(), torch.inference_mode(False):
                base = torch.empty((), dtype=dtype, device=device)
                if requires_grad and (dtype.is_floating_point or dtype.is_complex):
                    base.requires_grad_(True)
                standin = base.expand(shape)
        recorder = tracer.recorder
        recorder.planning = True
        try:
            # with the grad mode of the traced code (an output that needs no gradient while the model trains is
            # not a site: see outside_training)
            with torch.set_grad_enabled(training and kind != traced.ENTER):
                if kind == traced.ENTER:
                    self.replay_enter(obj, training)
                    return traced.NOT_A_SITE
                if kind == traced.FUNCTIONAL:
                    func = _function_of_id(obj) or _function_named(name)
                    site = -1 if standin is None or func is None else self.replay_functional(id(func), standin, None)
                else:
                    site = self.replay_exit(obj, standin)
        finally:
            recorder.planning = False
        if site < 0 or meta is None:
            return traced.NOT_A_SITE
        return tracer._in_graph.entry_for(recorder, recorder.sites[site], tracer._pass_trains, meta[1])

    def _in_graph_here(self, tracer: Tracer) -> bool:
        """Whether the frame dynamo traces now records its sites itself (else the operations replay them). Dynamo
        may trace a frame several times (a restart: a graph break, a Python scalar made a tensor), and each attempt
        must take the path of the first: the tracer's state is restored to what it was before the first attempt
        planned anything, and the answer is the same."""
        try:
            trace = torch._guards.CompileContext.current_trace_id()
        except Exception:  # another torch: replay (the operations work everywhere)
            return False
        if trace is None:
            return False
        _watch_compiles(self)
        saved = self._saved
        if saved is None or saved[0] != trace.compile_id:
            self._saved = (trace.compile_id, trace.attempt, _save(tracer))
            tracer._in_graph.keep_claims()
        elif saved[1] != trace.attempt:  # the frame is traced again: from the state its first attempt began with
            _restore(tracer, saved[2])
            tracer._in_graph.drop_claims()
            self._saved = (trace.compile_id, trace.attempt, saved[2])
        return True

    def compile_ended(self, compile_id: Any, attempt: int, graphs: int) -> None:
        """Dynamo finished compiling a frame (``graphs``: the graphs it made). When that left none of the events
        planned for it in a graph (no graph: the frame runs eagerly; or a last attempt that planned nothing: a
        graph break before them), the tracer forgets them: they will be seen again, eagerly or in other frames."""
        saved, self._saved = self._saved, None
        tracer = self._tracer()
        if saved is None or saved[0] != compile_id or tracer is None:
            return
        if graphs == 0 or saved[1] != attempt:
            _restore(tracer, saved[2])
            tracer._in_graph.drop_claims()
        else:
            tracer._in_graph.keep_claims()


_planners: weakref.WeakSet[_Replay] = weakref.WeakSet()  # the replays that planned events, told when compiles end
_compile_start = [0]  # unique graphs counted when the compile in progress began


def _compile_started(args: Any) -> None:
    from torch._dynamo.utils import counters

    _compile_start[0] = counters["stats"]["unique_graphs"]


def _compile_ended(args: Any) -> None:
    from torch._dynamo.utils import counters

    trace = torch._guards.CompileContext.current_trace_id()
    if trace is None:
        return
    graphs = counters["stats"]["unique_graphs"] - _compile_start[0]
    for planner in list(_planners):
        planner.compile_ended(trace.compile_id, trace.attempt, graphs)


def _watch_compiles(replay: _Replay) -> None:
    """Have ``replay`` told when dynamo finishes a compile (the callbacks are registered again after
    ``torch._dynamo.reset()``, which drops them)."""
    from torch._dynamo.callback import callback_handler

    if _compile_ended not in callback_handler.end_callbacks:
        callback_handler.register_start_callback(_compile_started)
        callback_handler.register_end_callback(_compile_ended)
        # (registered while a compile is in progress: this one's start was missed)
        from torch._dynamo.utils import counters

        _compile_start[0] = counters["stats"]["unique_graphs"]
    _planners.add(replay)


#: What a forward pass changes in a tracer: saved when dynamo begins to plan a frame's events, and restored when it
#: traces the frame again (see _Replay._in_graph_here).
_PASS_STATE = (
    "stack", "_activation_stack", "_counts", "_producer", "_produced", "_running_producer", "_trains", "_recompute",
    "_pass_done", "_pass_recorded", "_pass_trains", "_pass_frame", "_mode_active", "_mode_depth", "passes",
)  # fmt: skip


def _save(tracer: Tracer) -> dict[str, Any]:
    state = {name: copy.copy(getattr(tracer, name)) for name in _PASS_STATE}
    state["evaluation"] = (tracer.evaluation.trained, tracer.evaluation.open, tracer.evaluation.said)
    return state


def _restore(tracer: Tracer, state: dict[str, Any]) -> None:
    for name in _PASS_STATE:
        setattr(tracer, name, copy.copy(state[name]))  # (a copy: the saved state serves every attempt)
    tracer.evaluation.trained, tracer.evaluation.open, tracer.evaluation.said = state["evaluation"]


def _in_graph_of(tracer: Tracer) -> InGraph:
    """The entries that a tracer's compiled graphs record into, and what their fold asks of the tracer."""
    ref = tracer._ref

    def keep() -> bool:
        t = ref()
        return t is not None and t.recording

    return InGraph(keep, tracer.evaluation)


class Evaluation:
    """Keeps evaluation passes out of training statistics.

    A forward pass is a *training* pass when gradients are enabled and the module that begins it is in train
    mode; else (``torch.no_grad()``, ``inference_mode()``, ``model.eval()``) an *evaluation* pass. Evaluation
    passes are recorded as long as no training pass was, so that a model that never trains is observed as before;
    once one was, they are not recorded (one message says so), and evaluation passes that the open step recorded
    before its first training pass (an evaluation at the top of a training loop's first iteration) are dropped.

    Attributes:
        trained: A training pass was recorded.
        open: The open step holds evaluation passes, recorded before any training pass.
    """

    __slots__ = ("open", "said", "trained")

    def __init__(self) -> None:
        self.trained = self.open = self.said = False

    def admit(self, training: bool, recorder: Recorder) -> bool:
        """Whether a forward pass that begins now is recorded."""
        if training:
            if self.open:
                self.open = False
                discard_open_step(recorder)
            self.trained = True
            return True
        if not self.trained:
            self.open = True
            return True
        if not self.said:
            self.said = True
            warn_once(
                f"hookscope: a forward pass without gradients or in eval mode ran while the model trains (step "
                f"{recorder.step}): evaluation passes are not recorded into training statistics; use "
                "`hs.audit(model, batches)` for the statistics of evaluation data"
            )  # at the user's call of the model (hookscope.warn finds it)
        return False


def output_tensor(output: Any) -> torch.Tensor | None:
    """The tensor a module site records: the output itself when it is a tensor; for a tuple, a list or a mapping (a
    Hugging Face ``ModelOutput``), its first floating-point tensor (decoder layers return ``(hidden_states, ...)``);
    ``None`` when there is none (only the top level is searched)."""
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor) and item.is_floating_point():
                return item
    return None


def _run_last(hooks: dict[int, Any], hook: Callable[..., Any]) -> None:
    """Move ``hook`` to the end of a module's forward hooks (from its pre-hook: torch reads the forward hooks after
    the forward), so that it sees the output the rest of the model receives, whatever a hook registered after it
    returns in its place (masking, pruning, steering)."""
    if isinstance(hooks, OrderedDict):
        for key, value in list(hooks.items()):
            if value is hook:
                hooks.move_to_end(key)


def _copied_module() -> None:
    """A module that carries this tracer's hooks without being one it hooked ran: a copy of the model made while
    attached (``copy.deepcopy`` copies hooks, and ``torch.optim.swa_utils.AveragedModel`` and EMA helpers are built
    on it). Its forwards are not the model's: recording them would mix another model's outputs into the model's
    sites (and, under DDP, give one rank more forward passes than the others). Its hooks do nothing."""
    warn_once(
        "hookscope: a copy of an instrumented model ran a forward pass (copy.deepcopy copies hooks, and so do "
        "torch.optim.swa_utils.AveragedModel and EMA helpers built on it): the copy is not recorded and its hooks "
        "do nothing. Attach a HookManager of its own to the copy to record it."
    )


class _Compiled:
    """What torch.compile did with a tracer's hooks.

    Attributes:
        seen: A hook ran inside a torch.compile region (from then on the hooks never change: see follows).
        replayed: A compiled graph called hookscope's operations.
        followed: After discovery, the ``id()`` of the modules whose events count (see follows).
    """

    __slots__ = ("followed", "replayed", "seen")

    def __init__(self) -> None:
        self.seen = self.replayed = False
        self.followed: set[int] | None = None

    def follows(self, module: int) -> bool:
        """Whether the events of the module with this ``id()`` count, when they come from a compiled region: after
        discovery only those of the modules that ``Tracer.slim`` keeps, as the hooks left in an eager model."""
        return self.followed is None or module in self.followed


def _signature(x: Any) -> tuple[int, tuple[int, ...], tuple[int, ...]] | None:
    """Where a tensor's data is and how it is laid out (to tell a layer's output from a view of it)."""
    with _no_torch_function():
        if not isinstance(x, torch.Tensor) or x.is_nested or x.layout != torch.strided:
            return None
        try:
            return x.data_ptr(), tuple(x.shape), tuple(x.stride())
        except RuntimeError:  # tensors without storage (meta, fake)
            return None


def _site_dim(
    spec: ActivationSpec, module: nn.Module | None, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> int | None:
    """The ``dim`` of a softmax-like site: the module's attribute, or the call's ``dim`` argument (the second
    positional one); ``None`` for other kinds or when not given (torch's legacy rule then applies)."""
    if spec.name not in DISTRIBUTION_KINDS:
        return None
    dim = getattr(module, "dim", None) if module is not None else kwargs.get("dim", args[1] if len(args) > 1 else None)
    return dim if isinstance(dim, int) and not isinstance(dim, bool) else None


def _site_bounds(
    spec: ActivationSpec, layer: str, module: nn.Module | None, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> Bounds | None:
    """A new site's output range; ``None`` (no saturation there, with one warning) when the kind's bounds callable
    raises or returns bounds that are not finite with lo < hi: a forward pass never fails because of it."""
    try:
        return spec.resolve_bounds(module, args, kwargs)
    except Exception as e:
        warn_once(f"hookscope: site {layer!r}: cannot read its output range ({e}); saturation is not recorded there")
        return None


_functions_by_id: dict[int, Callable[..., Any]] = {}


def _function_named(name: str) -> Callable[..., Any] | None:
    """A registered activation function with this ``__name__`` (functions that share one are of one kind)."""
    for spec in list_activations():
        for func in spec.functions:
            if getattr(func, "__name__", None) == name:
                _functions_by_id[id(func)] = func
                return func
    return None


def _function_of_id(function: int) -> Callable[..., Any] | None:
    """The registered activation function whose ``id()`` a compiled graph carries."""
    func = _functions_by_id.get(function)
    if func is None:  # a kind registered since the last look-up
        _functions_by_id.update((id(f), f) for spec in list_activations() for f in spec.functions)
        func = _functions_by_id.get(function)
    return func


def _pre_hook(
    ref: weakref.ReferenceType[Tracer], compiled: _Compiled, token: int, holder: InGraph
) -> Callable[[nn.Module, Any], None]:
    @_never_a_compiled_frame
    def hook(module: nn.Module, args: Any) -> None:
        if _is_compiling():  # dynamo traces this forward (see hookscope.traced)
            traced.trace_enter(token, holder, module)
            return
        tracer = ref()
        if tracer is None:
            return
        if _compile_region() is None:
            tracer.pre_hook(module, args)
        else:
            compiled.seen = True
            if compiled.follows(id(module)):
                _outside_compile(tracer.pre_hook, module, args)

    return hook


def _register(module: nn.Module, hooks: tuple[Any, Any], layer: bool, producer: bool) -> list[RemovableHandle]:
    """Hook a module: before its forward and after it (``always_call``); or, for one of torch's own layers
    (``layer``, :func:`hookscope.sites.inert_layer`: never on the module stack, as nothing inside it names or records
    a site), after its forward when it has features (``producer``: they tell the units of the activation after it),
    else not at all. Fewer hooks make discovery cheaper, and a compiled graph, whose hooks never change, has fewer
    guards to check at every call."""
    pre, post = hooks
    if layer:
        return [module.register_forward_hook(post)] if producer else []
    return [module.register_forward_pre_hook(pre, prepend=True), module.register_forward_hook(post, always_call=True)]


def _hook_pairs(
    ref: weakref.ReferenceType[Tracer], compiled: _Compiled, token: int, wants_grad: bool, holder: InGraph
) -> list[tuple[Callable[[nn.Module, Any], None], Callable[[nn.Module, Any, Any], None]]]:
    """A tracer's forward pre-hook and forward hook for each role: [0] other modules, [1] activation modules and
    module sites (whose output a compiled graph hands over)."""
    return [
        (_pre_hook(ref, compiled, token, holder), _post_hook(ref, compiled, token, activation, wants_grad, holder))
        for activation in (False, True)
    ]


def _wrapper_hook(ref: weakref.ReferenceType[Tracer]) -> Callable[[nn.Module, Any], None]:
    @_opaque_to_dynamo  # (a compiled region that calls the wrapper)
    def hook(module: nn.Module, args: Any) -> None:
        tracer = ref()
        if tracer is None or not (tracer.attached and tracer.recording):
            return
        # a call that would be recorded: not an evaluation pass once the model trains (see Evaluation)
        if (torch.is_grad_enabled() and module.training) or not tracer.evaluation.trained:
            tracer._wrapper_calls += 1

    return hook


def _post_hook(
    ref: weakref.ReferenceType[Tracer],
    compiled: _Compiled,
    token: int,
    gives_output: bool,
    wants_grad: bool,
    holder: InGraph,
) -> Callable[[nn.Module, Any, Any], None]:
    @_never_a_compiled_frame
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if _is_compiling():  # (a module site hands over the tensor it records)
            traced.trace_exit(
                token, holder, module, output_tensor(output) if gives_output else output, gives_output, wants_grad
            )
            return
        tracer = ref()
        if tracer is None:
            return
        if _compile_region() is None:
            tracer.post_hook(module, output)
        else:
            compiled.seen = True
            if compiled.follows(id(module)):
                _outside_compile(tracer.post_hook, module, output)

    return hook


@_opaque_to_dynamo
def _functional_call(
    ref: weakref.ReferenceType[Tracer],
    func: Callable[..., Any],
    spec: ActivationSpec,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    out: Any,
) -> None:
    tracer = ref()
    if tracer is None:
        return
    if tracer._replay.planned and _run_by_a_graph(sys._getframe(1)):
        return  # an FX graph that dynamo's "eager" backend runs: it records its sites itself (hookscope.traced)
    if _compile_region() is None:
        tracer.functional_call(func, spec, args, kwargs, out)
    else:
        tracer._compiled.seen = True
        _outside_compile(tracer.functional_call, func, spec, args, kwargs, out)
    if tracer._compiled.seen:  # a graph run by dynamo's "eager" backend also calls hookscope.functional on it
        tracer._eager_out = out
