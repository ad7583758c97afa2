"""The activation registry: what counts as an activation, and what hookscope knows about each kind.

Every kind of activation is described by one frozen :class:`ActivationSpec`: its lower-case name, the module
classes and class *names* that implement it, the functional entry points that compute it, whether it is a
rectifier (dead-unit statistics apply) and, for bounded activations, its output range (saturation applies).

Modules are matched by class *and* by class name, walking the class hierarchy from the most specific class up,
because many libraries ship their own activation classes that are not subclasses of torch's (Hugging Face's
``GELUActivation``, timm's ``GELU``/``Swish``, hand-written ``class GELU(nn.Module)``), and because some torch
classes subclass others (``nn.ReLU6`` is an ``nn.Hardtanh``).

Example:
    >>> import torch.nn as nn
    >>> from hookscope.activations import activation_for_module, get_activation
    >>> activation_for_module(nn.ReLU6()).name
    'relu6'
    >>> get_activation("swish").name
    'silu'
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from hookscope.checks import check_bool
from hookscope.errors import ConfigError, ConfigTypeError, UnknownActivationError

__all__ = [
    "DISTRIBUTION_KINDS",
    "MODULE_OUTPUT",
    "ActivationSpec",
    "activation_for_function",
    "activation_for_module",
    "get_activation",
    "list_activations",
    "register_activation",
    "unregister_activation",
]

Bounds = tuple[float, float]
#: A static ``(lo, hi)`` range, or a callable ``(module_or_None, args, kwargs) -> (lo, hi) | None`` that reads the
#: range from a module's attributes (activation-module sites) or from a functional call's arguments (functional sites).
BoundsLike = Union[Bounds, Callable[[Union[nn.Module, None], tuple[Any, ...], Mapping[str, Any]], Union[Bounds, None]]]
Saturate = Literal["both", "upper", "lower"]


@dataclasses.dataclass(frozen=True)
class ActivationSpec:
    """Everything hookscope knows about one kind of activation.

    Attributes:
        name: Lower-case kind name, reported in the ``kind`` column (``"relu"``, ``"gelu"``, ...).
        modules: Module classes of this kind (matched with the class hierarchy, most specific first).
        class_names: Class names of this kind, for third-party classes that do not subclass a torch class.
        functions: Functional entry points (``F.relu``, ``torch.relu``, ``torch.Tensor.relu_``, ...).
        rectifier: Whether dead-unit statistics apply (an element is inactive when the output is <= 0).
        bounds: Output range ``(lo, hi)`` for bounded activations (saturation applies), a callable that reads it
            from the module or call, or ``None`` for unbounded activations.
        saturate: Which bounds count for saturation: ``"both"``, ``"upper"`` (relu6, whose lower bound is the
            inactive region) or ``"lower"``.
        aliases: Other names that :func:`get_activation` accepts.
        nonnegative: The output is never negative (relu, relu6), which lets statistics skip a clamp.
    """

    name: str
    modules: tuple[type[nn.Module], ...] = ()
    class_names: tuple[str, ...] = ()
    functions: tuple[Callable[..., Any], ...] = ()
    rectifier: bool = False
    bounds: BoundsLike | None = None
    saturate: Saturate = "both"
    aliases: tuple[str, ...] = ()
    nonnegative: bool = False

    @property
    def bounded(self) -> bool:
        """Whether saturation statistics apply to this kind."""
        return self.bounds is not None

    def resolve_bounds(
        self,
        module: nn.Module | None = None,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Bounds | None:
        """The ``(lo, hi)`` range of one site, or ``None`` when the kind is unbounded.

        Raises:
            ConfigError: A bounds callable returned bounds that are not finite with lo < hi (anything it raises
                propagates too).
        """
        if self.bounds is None:
            return None
        if callable(self.bounds):
            got = self.bounds(module, args, kwargs or {})
            if got is None:
                return None
            lo, hi = (float(v) for v in got)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ConfigError(f"the bounds of {self.name!r} must be finite with lo < hi, got {tuple(got)!r}")
            return (lo, hi)
        return (float(self.bounds[0]), float(self.bounds[1]))


#: The kind of module sites (``HookManager(modules=...)``): the output of a chosen module, not an activation. It is
#: not in the registry (no module or function is matched by it), but :func:`get_activation` knows its name, which is
#: reserved.
MODULE_OUTPUT = ActivationSpec("output")

#: Kinds whose outputs are probability distributions along a ``dim`` argument (log_softmax: their logarithms).
DISTRIBUTION_KINDS = frozenset({"softmax", "softmin", "log_softmax"})


# --------------------------------------------------------------------------------------------------------------
# The registry

_SPECS: dict[str, ActivationSpec] = {}
_ALIASES: dict[str, str] = {}
_BY_CLASS: dict[type, ActivationSpec] = {}
_BY_CLASS_NAME: dict[str, ActivationSpec] = {}
_BY_FUNCTION: dict[Any, ActivationSpec] = {}


def _check_str(arg: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigTypeError(f"`{arg}` must be a non-empty string, got {value!r}")
    return value


def _as_tuple(arg: str, value: object) -> tuple[Any, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, type)) or callable(value):
        return (value,)
    if isinstance(value, Iterable):
        return tuple(value)
    raise ConfigTypeError(f"`{arg}` must be a sequence, got {value!r}")


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _validate_bounds(value: object) -> BoundsLike | None:
    if value is None or callable(value):
        return value  # type: ignore[return-value]
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_real(v) for v in value):
        lo, hi = float(value[0]), float(value[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ConfigError(f"`bounds` must be finite with lo < hi, got {value!r}")
        return (lo, hi)
    raise ConfigTypeError(
        f"`bounds` must be None, a (lo, hi) pair of numbers, or a callable (module, args, kwargs) -> (lo, hi); "
        f"got {value!r}"
    )


def register_activation(
    name: str,
    *,
    modules: Iterable[type[nn.Module]] | type[nn.Module] = (),
    class_names: Iterable[str] | str = (),
    functions: Iterable[Callable[..., Any]] | Callable[..., Any] = (),
    rectifier: bool = False,
    bounds: BoundsLike | None = None,
    saturate: Saturate = "both",
    aliases: Iterable[str] | str = (),
    nonnegative: bool = False,
    replace: bool = False,
) -> ActivationSpec:
    """Add a kind of activation to the registry, so that :class:`~hookscope.HookManager` hooks it.

    Managers look the registry up when they attach; register before creating the manager.

    Args:
        name: Lower-case kind name reported in the ``kind`` column.
        modules: Module classes of this kind.
        class_names: Class names of this kind (matched anywhere in a module's class hierarchy).
        functions: Functional entry points whose calls are sites of this kind.
        rectifier: Whether dead-unit statistics apply.
        bounds: ``(lo, hi)`` output range if saturation applies, or a callable reading it from the module/call.
        saturate: ``"both"``, ``"upper"`` or ``"lower"``: which bounds count as saturation.
        aliases: Other names for :func:`get_activation`.
        nonnegative: Promise that outputs are never negative (a faster dead-unit count).
        replace: Replace an existing kind of the same name instead of raising.

    Returns:
        The registered spec.

    Raises:
        ValueError: ``name`` is already registered (and ``replace`` is false), or an argument is malformed.
        TypeError: An argument has the wrong type.

    Example:
        >>> import torch, torch.nn as nn
        >>> class SMU(nn.Module):
        ...     def forward(self, x):
        ...         return ((1 + 0.01) * x + (1 - 0.01) * x * torch.erf(x)) / 2
        >>> spec = register_activation("smu", modules=[SMU], rectifier=True)
        >>> activation_for_module(SMU()).name
        'smu'
        >>> unregister_activation("smu")
    """
    name = _check_str("name", name)
    if name != name.lower():
        raise ConfigError(f"`name` must be lower case, got {name!r}; use {name.lower()!r}")
    if name == MODULE_OUTPUT.name:
        raise ConfigError(f"activation `name` {name!r} is reserved for module sites (HookManager(modules=...))")
    if saturate not in ("both", "upper", "lower"):
        raise ConfigError(f"`saturate` must be one of 'both', 'upper', 'lower'; got {saturate!r}")
    mods = _as_tuple("modules", modules)
    for m in mods:
        if not (isinstance(m, type) and issubclass(m, nn.Module)):
            raise ConfigTypeError(f"`modules` must hold nn.Module subclasses, got {m!r}")
    names = tuple(_check_str("class_names", n) for n in _as_tuple("class_names", class_names))
    funcs = _as_tuple("functions", functions)
    for f in funcs:
        if not callable(f):
            raise ConfigTypeError(f"`functions` must hold callables, got {f!r}")
    alias_t = tuple(_check_str("aliases", a).lower() for a in _as_tuple("aliases", aliases))
    if MODULE_OUTPUT.name in alias_t:
        raise ConfigError(f"`aliases` {alias_t!r}: {MODULE_OUTPUT.name!r} is reserved for module sites")
    spec = ActivationSpec(
        name=name,
        modules=mods,
        class_names=names,
        functions=funcs,
        rectifier=check_bool("rectifier", rectifier),
        bounds=_validate_bounds(bounds),
        saturate=saturate,
        aliases=alias_t,
        nonnegative=check_bool("nonnegative", nonnegative),
    )
    check_bool("replace", replace)
    if (name in _SPECS or name in _ALIASES) and not replace:
        raise ConfigError(f"activation `name` {name!r} is already registered; pass replace=True to redefine it")
    replaced = _ALIASES.get(name, name)
    # An entry point of another kind is never taken over: unregistering this kind would then remove it from the
    # registry of the whole process (torch.relu would stop being a relu).
    lookups: tuple[tuple[str, tuple[Any, ...], dict[Any, ActivationSpec]], ...] = (
        ("modules", mods, _BY_CLASS),
        ("class_names", names, _BY_CLASS_NAME),
        ("functions", funcs, _BY_FUNCTION),
    )
    for arg, keys, lookup in lookups:
        for key in keys:
            owner = lookup.get(key)
            if owner is not None and owner.name != replaced:
                shown = key if isinstance(key, str) else f"{key.__module__}.{key.__name__}"
                raise ConfigError(
                    f"`{arg}`: {shown!s} is already the activation {owner.name!r}; a module class, class name or "
                    f"function belongs to one kind (redefine {owner.name!r} with replace=True instead)"
                )
    if name in _SPECS or name in _ALIASES:
        unregister_activation(replaced)
    _SPECS[name] = spec
    for a in alias_t:
        _ALIASES[a] = name
    for m in mods:
        _BY_CLASS[m] = spec
    for n in names:
        _BY_CLASS_NAME[n] = spec
    for f in funcs:
        _BY_FUNCTION[f] = spec
    return spec


def unregister_activation(name: str) -> None:
    """Remove a kind from the registry (mainly for tests and for redefining a kind).

    Raises:
        KeyError: ``name`` is not registered.
    """
    spec = get_activation(name)
    del _SPECS[spec.name]
    for alias in [a for a, target in _ALIASES.items() if target == spec.name]:
        del _ALIASES[alias]
    lookups: tuple[dict[Any, ActivationSpec], ...] = (_BY_CLASS, _BY_CLASS_NAME, _BY_FUNCTION)
    for lookup in lookups:
        for key in [k for k, v in lookup.items() if v is spec]:
            del lookup[key]


def get_activation(key: str | nn.Module | type[nn.Module] | ActivationSpec) -> ActivationSpec:
    """Look a kind up by name (or alias), module, module class or spec.

    Raises:
        KeyError: The name is unknown; the message lists the known names.
    """
    if isinstance(key, ActivationSpec):
        return key
    if isinstance(key, str):
        low = key.lower()
        name = _ALIASES.get(low, low)
        if name in _SPECS:
            return _SPECS[name]
        if name == MODULE_OUTPUT.name:
            return MODULE_OUTPUT
        raise UnknownActivationError(
            f"unknown activation {key!r}; known activations: {', '.join(sorted(_SPECS))} "
            f"(register new ones with hookscope.register_activation)"
        )
    cls = key if isinstance(key, type) else type(key)
    spec = _match_class(cls)
    if spec is None:
        raise UnknownActivationError(
            f"{cls.__name__} is not a registered activation class; known activations: {', '.join(sorted(_SPECS))}"
        )
    return spec


def _match_class(cls: type) -> ActivationSpec | None:
    for klass in cls.__mro__:
        if klass is nn.Module or klass is object:
            break
        spec = _BY_CLASS.get(klass)
        if spec is None:
            spec = _BY_CLASS_NAME.get(klass.__name__)
        if spec is not None:
            return spec
    return None


def activation_for_module(module: nn.Module) -> ActivationSpec | None:
    """The kind of an activation module, or ``None`` when the module is not an activation."""
    return _match_class(type(module))


def activation_for_function(func: Callable[..., Any]) -> ActivationSpec | None:
    """The kind computed by a functional entry point (as seen by a ``TorchFunctionMode``), or ``None``."""
    try:
        return _BY_FUNCTION.get(func)
    except TypeError:  # unhashable callables are never registered
        return None


def list_activations() -> list[ActivationSpec]:
    """All registered kinds, sorted by name."""
    return [_SPECS[k] for k in sorted(_SPECS)]


# --------------------------------------------------------------------------------------------------------------
# Built-in kinds


def _funcs(*candidates: tuple[object, str]) -> tuple[Callable[..., Any], ...]:
    """The entry points that exist in this torch version (``(namespace, attribute)`` pairs)."""
    out = []
    for ns, attr in candidates:
        f = getattr(ns, attr, None)
        if f is not None and f not in out:
            out.append(f)
    return tuple(out)


def _variants(*names: str) -> tuple[Callable[..., Any], ...]:
    """``F.x``, ``torch.x``, ``torch.Tensor.x`` and ``torch._C._nn.x`` for each name (where they exist)."""
    namespaces: tuple[object, ...] = (F, torch, torch.Tensor, torch._C._nn, torch.special)
    return _funcs(*[(ns, n) for n in names for ns in namespaces])


def _arg(args: tuple[Any, ...], kwargs: Mapping[str, Any], pos: int, key: str, default: float) -> float:
    if key in kwargs:
        return float(kwargs[key])
    if len(args) > pos and isinstance(args[pos], (int, float)):
        return float(args[pos])
    return default


def _hardtanh_bounds(module: nn.Module | None, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Bounds:
    if module is not None:
        return (float(getattr(module, "min_val", -1.0)), float(getattr(module, "max_val", 1.0)))
    return (_arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0))


def _register_builtins() -> None:
    reg = register_activation
    reg(
        "relu",
        modules=[nn.ReLU],
        class_names=["ReLU"],
        functions=_variants("relu", "relu_"),
        rectifier=True,
        nonnegative=True,
    )
    reg(
        "relu6",
        modules=[nn.ReLU6],
        class_names=["ReLU6"],
        functions=_variants("relu6", "relu6_"),
        rectifier=True,
        bounds=(0.0, 6.0),
        saturate="upper",
        nonnegative=True,
    )
    reg(
        "leaky_relu",
        modules=[nn.LeakyReLU],
        class_names=["LeakyReLU"],
        functions=_variants("leaky_relu", "leaky_relu_"),
        rectifier=True,
        aliases=["leakyrelu"],
    )
    reg("prelu", modules=[nn.PReLU], class_names=["PReLU"], functions=_variants("prelu"), rectifier=True)
    reg("rrelu", modules=[nn.RReLU], class_names=["RReLU"], functions=_variants("rrelu", "rrelu_"), rectifier=True)
    reg("elu", modules=[nn.ELU], class_names=["ELU"], functions=_variants("elu", "elu_"), rectifier=True)
    reg("selu", modules=[nn.SELU], class_names=["SELU"], functions=_variants("selu", "selu_"), rectifier=True)
    reg("celu", modules=[nn.CELU], class_names=["CELU"], functions=_variants("celu", "celu_"), rectifier=True)
    reg(
        "gelu",
        modules=[nn.GELU],
        class_names=[
            "GELU",
            "GELUActivation",
            "NewGELUActivation",
            "FastGELUActivation",
            "QuickGELUActivation",
            "ClippedGELUActivation",
            "AccurateGELUActivation",
            "GELUTanh",
            "QuickGELU",
            "GeLU",
        ],
        functions=_variants("gelu"),
        rectifier=True,
    )
    reg(
        "silu",
        modules=[nn.SiLU],
        class_names=["SiLU", "SiLUActivation", "Swish", "SwishMe", "SwishActivation"],
        functions=_variants("silu", "silu_"),
        rectifier=True,
        aliases=["swish"],
    )
    reg(
        "mish",
        modules=[nn.Mish],
        class_names=["Mish", "MishActivation", "MishMe", "HardMish", "HardMishMe"],
        functions=_variants("mish", "mish_"),
        rectifier=True,
    )
    # Hugging Face classes whose bodies call other activations (the calls inside an activation module are not sites)
    reg("relu_squared", class_names=["ReLUSquaredActivation", "SquaredReLU"], rectifier=True, nonnegative=True)
    reg("xielu", class_names=["XIELUActivation"], rectifier=True)
    reg("laplace", class_names=["LaplaceActivation"], bounds=(0.0, 1.0))
    reg(
        "hardswish",
        modules=[nn.Hardswish],
        class_names=["Hardswish", "HardSwish", "HardSwishMe"],
        functions=_variants("hardswish", "hardswish_"),
        rectifier=True,
        aliases=["hard_swish"],
    )
    reg(
        "hardsigmoid",
        modules=[nn.Hardsigmoid],
        class_names=["Hardsigmoid", "HardSigmoid", "HardSigmoidMe"],
        functions=_variants("hardsigmoid", "hardsigmoid_"),
        bounds=(0.0, 1.0),
        aliases=["hard_sigmoid"],
    )
    reg(
        "hardtanh",
        modules=[nn.Hardtanh],
        class_names=["Hardtanh", "HardTanh"],
        functions=_variants("hardtanh", "hardtanh_"),
        bounds=_hardtanh_bounds,
    )
    reg(
        "sigmoid",
        modules=[nn.Sigmoid],
        class_names=["Sigmoid", "SigmoidActivation"],
        functions=_variants("sigmoid", "sigmoid_", "expit", "special_expit"),
        bounds=(0.0, 1.0),
    )
    reg(
        "tanh",
        modules=[nn.Tanh],
        class_names=["Tanh", "TanhActivation"],
        functions=_variants("tanh", "tanh_"),
        bounds=(-1.0, 1.0),
    )
    reg("softplus", modules=[nn.Softplus], class_names=["Softplus"], functions=_variants("softplus"))
    reg(
        "softsign",
        modules=[nn.Softsign],
        class_names=["Softsign"],
        functions=_variants("softsign"),
        bounds=(-1.0, 1.0),
    )
    reg("softmax", modules=[nn.Softmax], class_names=["Softmax"], functions=_variants("softmax"))
    reg("softmin", modules=[nn.Softmin], class_names=["Softmin"], functions=_variants("softmin"))
    reg(
        "log_softmax",
        modules=[nn.LogSoftmax],
        class_names=["LogSoftmax"],
        functions=_variants("log_softmax"),
        aliases=["logsoftmax"],
    )
    reg(
        "log_sigmoid",
        modules=[nn.LogSigmoid],
        class_names=["LogSigmoid"],
        functions=_variants("logsigmoid", "log_sigmoid"),
        aliases=["logsigmoid"],
    )


_register_builtins()
