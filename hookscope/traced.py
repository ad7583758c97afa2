"""What hookscope puts into a graph that ``torch.compile`` traces: four custom operations and the traced side of
the hooks that call them.

Under ``torch.compile`` the hooks are traced by dynamo like the rest of the forward, but hookscope's own Python
(its stacks, dictionaries and per-site state) must never be: its containers and numbers would become guards and
graph breaks. So a traced hook puts one opaque operation into the graph instead of running its body, and the
compiled graph calls that operation at run time, in program order, where it runs the very same tracer and recorder
code as an eager hook (:class:`~hookscope.tracing.Tracer` replays the event). Naming (reused modules ``#k``,
functional sites, nested activations), units, cadence (``every``, ``pause()``) and the statistics kernels are thus
one rule for eager and compiled models, and cadence never changes the graph: the graph calls the operations at
every step and the tracer decides at run time whether the step is recorded.

The operations (namespace ``hookscope``), with fake implementations that return nothing or an empty index. The
forward ones declare that they mutate ``order``, one small tensor shared by all of them: a graph input that they
all write is never dropped as dead code, and they stay in program order among themselves. (An ordered effect,
``register_effect``, did the same in aot_eager, but inductor 2.14 then scheduled fused kernels across the
operations while freeing their inputs in the original order: ``UnboundLocalError`` in the generated code of a CNN
and a GPT block.) The backward one, which no forward input may be written from, keeps an ordered effect:

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
from typing import Any, Protocol

import torch

__all__ = ["Replayer", "register", "trace_enter", "trace_exit", "trace_functional"]


class Replayer(Protocol):
    """The tracer side: replays an event at run time (``hookscope.tracing.Tracer``)."""

    def replay_enter(self, module: int, training: bool) -> None: ...

    def replay_exit(self, module: int, out: torch.Tensor | None) -> int: ...

    def replay_functional(self, function: int, out: torch.Tensor, x: torch.Tensor | None) -> int: ...

    def replay_grad(self, site: int, grad: torch.Tensor) -> None: ...


_owners: dict[int, weakref.ReferenceType[Replayer]] = {}
_tokens = itertools.count(1)


def register(owner: Replayer) -> int:
    """A token for ``owner`` (held weakly: the token of a freed owner does nothing)."""
    token = next(_tokens)
    _owners[token] = weakref.ref(owner, lambda _, token=token: _owners.pop(token, None))  # type: ignore[misc]
    return token


#: The operations' namespace: the package's name, so that a renamed copy of the package imported beside it
#: (``benchmarks/compare.py``) registers operations of its own instead of replacing these.
_NAMESPACE = __name__.partition(".")[0]
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

_is_exporting = torch.compiler.is_exporting


def trace_enter(owner: int, module: torch.nn.Module) -> None:
    """A hooked module begins its forward. Its input is not handed over: reading it from the graph made inductor
    2.14 free a buffer that a fused kernel still read (a GPT block); under compile the unit dimension of a site is
    therefore found from the size of the layer before it, not from its place in the output."""
    if not _is_exporting():
        _enter(_ORDER, owner, id(module), torch.is_grad_enabled() and module.training)


def trace_exit(owner: int, module: torch.nn.Module, out: Any, gives_output: bool, wants_grad: bool) -> None:
    """A hooked module ends its forward (``gives_output``: an activation module or a module site, whose output is
    recorded; for a module site, the tensor it records)."""
    if _is_exporting():
        return
    if not (gives_output and isinstance(out, torch.Tensor)):
        _exit(_ORDER, owner, id(module), None)
        return
    site = _exit(_ORDER, owner, id(module), out)
    if wants_grad and out.requires_grad:
        out.register_hook(_grad_hook(owner, site))


def trace_functional(owner: int, function: Any, args: Any, out: Any, wants_grad: bool) -> None:
    """An activation function ran inside the traced region (under the function mode)."""
    if _is_exporting() or not isinstance(out, torch.Tensor):
        return
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    site = _functional(_ORDER, owner, id(function), out, x)
    if wants_grad and out.requires_grad:
        out.register_hook(_grad_hook(owner, site))


def _grad_hook(owner: int, site: torch.Tensor) -> Any:
    """The gradient hook of a traced output: puts ``grad`` into the compiled backward."""

    def hook(grad: torch.Tensor) -> None:
        _grad(owner, site, grad)

    return hook
