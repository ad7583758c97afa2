"""What hookscope puts into a graph that ``torch.compile`` traces: the traced side of the hooks, the statistics they
trace into the graph, and the operations of the fallback that replays events at run time.

Under ``torch.compile`` the hooks are traced by dynamo like the rest of the forward, but hookscope's own Python
(its stacks, dictionaries and per-site state) must never be: its containers and numbers would become guards and
graph breaks. So each event of a traced hook is *planned* (:func:`_plan`): while dynamo traces, the tracer runs its
own eager code for the event once (:meth:`hookscope.tracing._Replay.plan`), which names the site, fixes its units
and says whether it is recorded, exactly as an eager hook would. Naming (reused modules ``#k``, functional sites,
nested activations), units and the kinds of passes are thus one rule for eager and compiled models. The answer is a
constant of the graph: for a recorded site, the index of an entry of :class:`hookscope.in_graph.InGraph`, and the
collectors' own ``update`` (and, through a gradient hook that dynamo puts into the backward graph, ``update_grad``)
are traced into the graph, writing in place into that entry's accumulators. At run time the graph computes the
statistics itself, fused by the compiler, and no Python runs per site; the accumulators are folded into the
collectors' state when the ring is flushed (cadence is decided in ``step()``, evaluation passes when the counts
are folded, so the graph never changes).

An output's shape is read while dynamo traces from its fake tensor (the ``probe`` operation, whose result is unused:
the compiled graph drops it), so that planning never guards on a size that dynamo treats as dynamic.

Where the tracer cannot plan (a torch without ``CompileContext``), the graph calls the operations below instead
(namespace ``hookscope``), and the tracer replays each event at run time. The forward ones declare that they mutate
``order``, one small tensor shared by all of them: a graph input that they all write is never dropped as dead code,
and they stay in program order among themselves. (An ordered effect, ``register_effect``, did the same in
aot_eager, but inductor 2.14 then scheduled fused kernels across the operations while freeing their inputs in the
original order: ``UnboundLocalError`` in the generated code of a CNN and a GPT block.) The backward one, which no
forward input may be written from, keeps an ordered effect:

- ``enter(order, owner, module, training)``: a hooked module begins its forward (``training``: with gradients
  enabled and the module in train mode, as dynamo traced it: inside a compiled forward gradients are off);
- ``exit(order, owner, module, out) -> site``: a hooked module ends it; returns the index of the site recorded from
  ``out`` (a 0-d int64 tensor, -1 for none), which the gradient hook of ``out`` carries into the backward graph;
- ``functional(order, owner, function, out, x) -> site``: an activation function ran (seen by the function mode, which
  dynamo traces inline when the mode is active as the compiled region begins);
- ``grad(owner, site, grad)``: inside the compiled backward, the gradient with respect to a recorded output.

``owner`` is a token of the tracer (:func:`register`), ``module`` and ``function`` the ``id()`` of the object.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterator
from typing import Any, Protocol

import torch

__all__ = ["Replayer", "register", "trace_enter", "trace_exit", "trace_functional"]


class Replayer(Protocol):
    """The tracer side: replays an event at run time (``hookscope.tracing.Tracer``)."""

    def replay_enter(self, module: int, training: bool) -> None: ...

    def replay_exit(self, module: int, out: torch.Tensor | None) -> int: ...

    def replay_functional(self, function: int, out: torch.Tensor, x: torch.Tensor | None) -> int: ...

    def replay_grad(self, site: int, grad: torch.Tensor) -> None: ...

    def plan(
        self, kind: int, obj: int, training: bool, requires_grad: bool,
        meta: tuple[tuple[int, ...], torch.dtype, torch.device] | None, name: str,
    ) -> int: ...  # fmt: skip


#: The operations' namespace: the package's name, so that a renamed copy of the package imported beside it
#: (``benchmarks/compare.py``) registers operations of its own instead of replacing these.
_NAMESPACE = __name__.partition(".")[0]

#: The owners the operations answer to, by token, the next token, and what _plan learns at trace time: shared by
#: every copy of this module that
#: defines the operations of this namespace. A second copy under the same name (``importlib.reload``, a package
#: imported twice from two paths) replaces their implementations, and those must still find the tracers of the
#: first copy (else its models record nothing under compile). They live on the namespace object of ``torch.ops``,
#: which lasts as long as the process.
_owners: dict[int, weakref.ReferenceType[Replayer]]
_tokens: Iterator[int]
#: Trace time: the shape (size hints), dtype and device of the last output probed for each owner (see _plan).
_probed: dict[int, tuple[tuple[int, ...], torch.dtype, torch.device]]
_owners, _tokens, _probed = vars(getattr(torch.ops, _NAMESPACE)).setdefault(
    "_hookscope_owners", ({}, itertools.count(1), {})
)


def register(owner: Replayer) -> int:
    """A token for ``owner`` (held weakly: the token of a freed owner does nothing)."""
    token = next(_tokens)
    _owners[token] = weakref.ref(owner, lambda _, token=token: _owners.pop(token, None))  # type: ignore[misc]
    return token


#: What the forward operations declare that they write (they never do): keeps them in the graph and in order.
_ORDER = torch.zeros(1)


def _owner(token: int) -> Replayer | None:
    ref = _owners.get(token)
    return None if ref is None else ref()


def _index(site: int) -> torch.Tensor:
    return torch.tensor(site, dtype=torch.int64)


# The operations: a schema, a run-time implementation (what the compiled graph calls) and a fake (what tracing
# sees) each. They are defined with ``torch.library.Library`` rather than ``torch.library.custom_op``: a compiled
# graph calls each of them once per hooked module per step, and the dispatcher then calls the Python implementation
# directly, without custom_op's autograd and view wrappers (measured: about a third of the cost per call).
# Nothing here needs autograd: the outputs are integer tensors and no input is differentiated through.

_SCHEMAS = {
    "enter": "enter(Tensor(a!) order, int owner, int module, bool training) -> ()",
    "exit": "exit(Tensor(a!) order, int owner, int module, Tensor? out) -> Tensor",
    "functional": "functional(Tensor(a!) order, int owner, int function, Tensor out, Tensor? x) -> Tensor",
    "grad": "grad(int owner, Tensor site, Tensor grad) -> ()",
}
try:  # a library per operation that replaces an earlier definition (a copy of the package imported again)
    from torch._library.custom_ops import get_library_allowing_overwrite as _library_of
except ImportError:  # pragma: no cover - older torch

    def _library_of(namespace: str, name: str) -> torch.library.Library:
        return torch.library.Library(namespace, "FRAGMENT")


def _enter_impl(order: torch.Tensor, owner: int, module: int, training: bool) -> None:
    tracer = _owner(owner)
    if tracer is not None:
        tracer.replay_enter(module, training)


def _exit_impl(order: torch.Tensor, owner: int, module: int, out: torch.Tensor | None) -> torch.Tensor:
    tracer = _owner(owner)
    return _index(-1 if tracer is None else tracer.replay_exit(module, out))


def _functional_impl(
    order: torch.Tensor, owner: int, function: int, out: torch.Tensor, x: torch.Tensor | None
) -> torch.Tensor:
    tracer = _owner(owner)
    return _index(-1 if tracer is None else tracer.replay_functional(function, out, x))


def _grad_impl(owner: int, site: torch.Tensor, grad: torch.Tensor) -> None:
    tracer = _owner(owner)
    if tracer is not None:
        index = int(site)  # a host scalar made by ``exit`` in the forward
        if index >= 0:
            tracer.replay_grad(index, grad)


def _no_output(*args: Any) -> None:
    return None


def _an_index(*args: Any) -> torch.Tensor:
    return torch.empty((), dtype=torch.int64)


for _name, _impl, _fake in (
    ("enter", _enter_impl, _no_output),
    ("exit", _exit_impl, _an_index),
    ("functional", _functional_impl, _an_index),
    ("grad", _grad_impl, _no_output),
):
    _library = _library_of(_NAMESPACE, _name)
    _library.define(_SCHEMAS[_name])
    _library.impl(_name, _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{_NAMESPACE}::{_name}", _fake, lib=_library)
# no output: keep it, in order
_library._register_effectful_op(f"{_NAMESPACE}::grad", torch.library.EffectType.ORDERED)  # type: ignore[attr-defined]
_namespace = getattr(torch.ops, _NAMESPACE)
_enter, _exit, _functional, _grad = (
    _namespace.enter.default,
    _namespace.exit.default,
    _namespace.functional.default,
    _namespace.grad.default,
)


# The traced side: called by the hooks and the function mode while dynamo traces them (``torch.compiler.
# is_compiling()``), these functions are traced into the graph; they hold nothing but what the graph needs. Under
# ``torch.export`` they put nothing into the graph: an exported program is an artifact that runs elsewhere (without
# hookscope, without its tracer) and must not depend on either.
#
# Each event is first *planned*: :func:`_plan` runs the tracer's own code once, while dynamo traces (it is marked as
# a function whose result dynamo takes as a constant), and answers what the graph does with the event at every run:
#
# - an index ``k >= 0``: the event's output is a site's, recorded *inside the graph*: the collectors' ``update`` (and,
#   from a gradient hook, ``update_grad``) are traced into the graph and add into the accumulators of entry ``k``
#   of the tracer's :class:`hookscope.in_graph.InGraph` (``holder``), folded into the collectors'
#   state; no Python runs per site at run time;
# - ``NOT_A_SITE``: nothing;
# - ``REPLAY``: the graph calls the operations above, and the tracer replays the event at run time (a graph that
#   dynamo compiled after a restart, a graph break, or the rest of a frame after one: there, eager hooks run between
#   the graph's events, so the tracer must see them in order at every run).

#: What :func:`_plan` answers besides the index of an entry.
NOT_A_SITE, REPLAY = -1, -2
#: The kinds of events.
ENTER, EXIT, EXIT_NO_OUTPUT, FUNCTIONAL = range(4)


def _size_hint(size: Any) -> int:
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)  # a symbolic size: its value in the traced example
    return int(hint) if hint is not None else 1


def _probe_impl(out: torch.Tensor, owner: int) -> torch.Tensor:
    return out.new_empty(())


def _probe_fake(out: torch.Tensor, owner: int) -> torch.Tensor:
    # dynamo runs this while it traces the call, with the output's fake tensor: its shape without a guard on it
    _probed[owner] = (tuple(_size_hint(s) for s in out.shape), out.dtype, out.device)
    return out.new_empty(())


# what ``_plan`` learns from an output's fake tensor: its result is unused, so the compiled graph drops it
_library = _library_of(_NAMESPACE, "probe")
_library.define("probe(Tensor out, int owner) -> Tensor")
_library.impl("probe", _probe_impl, "CompositeExplicitAutograd")
torch.library.register_fake(f"{_NAMESPACE}::probe", _probe_fake, lib=_library)
_probe = _namespace.probe.default


def _plan(owner: int, kind: int, obj: int, training: bool, requires_grad: bool, name: str = "") -> int:
    """Trace time: what the graph does with an event (see above). ``training``: for ``ENTER``, whether the pass
    trains (gradients on and the module in train mode); else whether gradients are on, as dynamo traces the code.
    ``name``: a function's ``__name__`` (dynamo 2.14 gives the ``id()`` of its own wrapper for a tensor method such
    as ``Tensor.relu_``)."""
    planner = _owner(owner)
    meta = _probed.pop(owner, None) if kind in (EXIT, FUNCTIONAL) else None
    if planner is None:
        return NOT_A_SITE
    return planner.plan(kind, obj, training, requires_grad, meta, name)


_plan._dynamo_marked_constant = True  # type: ignore[attr-defined]  # torch._dynamo.assume_constant_result

_is_exporting = torch.compiler.is_exporting


def trace_enter(owner: int, holder: Any, module: torch.nn.Module) -> None:
    """A hooked module begins its forward. Its input is not handed over: reading it from the graph made inductor
    2.14 free a buffer that a fused kernel still read (a GPT block); under compile the unit dimension of a site is
    therefore found from the size of the layer before it, not from its place in the output."""
    if not _is_exporting():
        training = torch.is_grad_enabled() and module.training
        if _plan(owner, ENTER, id(module), training, False) == REPLAY:
            _enter(_ORDER, owner, id(module), training)


def trace_exit(
    owner: int, holder: Any, module: torch.nn.Module, out: Any, gives_output: bool, wants_grad: bool
) -> None:
    """A hooked module ends its forward (``gives_output``: an activation module or a module site, whose output is
    recorded; for a module site, the tensor it records)."""
    if _is_exporting():
        return
    if not (gives_output and isinstance(out, torch.Tensor)):
        if _plan(owner, EXIT_NO_OUTPUT, id(module), torch.is_grad_enabled(), False) == REPLAY:
            _exit(_ORDER, owner, id(module), None)
        return
    _probe(out, owner)
    entry = _plan(owner, EXIT, id(module), torch.is_grad_enabled(), out.requires_grad)
    if entry == REPLAY:
        site = _exit(_ORDER, owner, id(module), out)
        if wants_grad and out.requires_grad:
            out.register_hook(_grad_hook(owner, site))
    elif entry >= 0:
        _record(getattr(holder, f"e{entry}"), out, wants_grad)


def trace_functional(owner: int, holder: Any, function: Any, args: Any, out: Any, wants_grad: bool) -> None:
    """An activation function ran inside the traced region (under the function mode)."""
    if _is_exporting() or not isinstance(out, torch.Tensor):
        return
    _probe(out, owner)
    entry = _plan(owner, FUNCTIONAL, id(function), torch.is_grad_enabled(), out.requires_grad, function.__name__)
    if entry == REPLAY:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        site = _functional(_ORDER, owner, id(function), out, x)
        if wants_grad and out.requires_grad:
            out.register_hook(_grad_hook(owner, site))
    elif entry >= 0:
        _record(getattr(holder, f"e{entry}"), out, wants_grad)


def _record(entry: Any, out: torch.Tensor, wants_grad: bool) -> None:
    """Traced into the graph: one call of a site, added into its entry's accumulators (``hookscope.in_graph.
    Entry``) by the collectors' own ``update`` and, in the backward graph, ``update_grad``."""
    with torch.no_grad():
        entry.count[0].add_(1)  # calls
        entry.count[1].add_(out.numel())  # output elements
        for collector, state, site in entry.fwd:
            collector.update(state, out, site)
    if wants_grad and out.requires_grad:

        def hook(grad: torch.Tensor) -> None:
            with torch.no_grad():
                entry.backward.add_(1)
                for collector, state, site in entry.grad:
                    collector.update_grad(state, grad, site)

        out.register_hook(hook)


def _grad_hook(owner: int, site: torch.Tensor) -> Any:
    """The gradient hook of a traced output: puts ``grad`` into the compiled backward."""

    def hook(grad: torch.Tensor) -> None:
        _grad(owner, site, grad)

    return hook
