"""Hook sites: where statistics are recorded, what they are called, and which dimension holds the units.

A *site* is one call site of an activation in a forward pass, not a module: torchvision's ``BasicBlock`` calls
``self.relu`` twice, and resnet50 calls one ``nn.ReLU`` object on 64, 64 and 256 channels in one forward, so
per-module state cannot work. Sites are named:

- activation-module sites, and module sites (the outputs of the modules ``HookManager(modules=...)`` selects): the
  module's qualified name from ``named_modules()``; the k-th call (k >= 1) of the same module
  in one forward pass is ``name#k`` (``layer1.0.relu``, ``layer1.0.relu#1``);
- functional sites: the qualified name of the innermost running module, a dot, the function's name and ``()``
  (``conv1.relu()`` for the ``F.relu`` inside googlenet's ``conv1``; ``relu()`` for a call in the root's own
  ``forward``); the k-th call of the same function in the same module is ``conv1.relu()#k``.

Wrapper components (``_orig_mod`` of ``torch.compile``, ``_checkpoint_wrapped_module``, ``_fsdp_wrapped_module``)
are dropped from names, and ``DistributedDataParallel`` / ``DataParallel`` are unwrapped, so names are those of
the user's model.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable, Iterator, Mapping
from typing import Callable, Union

import torch
import torch.nn as nn

from hookscope.activations import ActivationSpec, Bounds
from hookscope.errors import ConfigError, ConfigTypeError
from hookscope.numerics import strict_threshold

__all__ = [
    "ROOT_NAME",
    "ModuleSelection",
    "Site",
    "UnitDim",
    "default_unit_dim",
    "iter_named_modules",
    "unwrap_model",
]

#: Name of the root module when it is itself an activation module.
ROOT_NAME = "(root)"

#: What ``HookManager(unit_dim=...)`` accepts: ``None`` (the default rule), one dim for every site, or a mapping
#: from layer-name patterns (``fnmatch``) to dims, the first matching pattern winning.
UnitDim = Union[None, int, Mapping[str, int]]

_WRAPPER_COMPONENTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile`` wrappers."""
    while True:
        inner = None
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = model.module
        elif type(model).__name__ == "OptimizedModule":
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def clean_name(name: str) -> str:
    """A qualified module name without wrapper components."""
    if not any(part in name for part in _WRAPPER_COMPONENTS):
        return name
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_COMPONENTS)


def iter_named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` of the unwrapped model (each module once), with wrapper components removed."""
    for name, module in unwrap_model(model).named_modules():
        yield clean_name(name), module


def default_unit_dim(ndim: int) -> int | None:
    """The dimension that holds units for an output of ``ndim`` dimensions.

    The rule used when nothing tells more (see :func:`infer_unit_dim`): ``(N, C)``, ``(N, C, H, W)`` and
    ``(N, C, D, H, W)`` outputs: dim 1 (channels). 3-D outputs: the last dim, ``(B, T, F)`` as produced by
    transformers, RNNs and ``nn.Linear`` on sequences (also right for ``(T, B, F)``). 1-D outputs: each element is
    a unit. 0-D outputs: one unit (``None``).
    """
    if ndim == 0:
        return None
    if ndim == 1:
        return 0
    if ndim == 3:
        return 2
    return 1


def validate_unit_dim(unit_dim: object) -> UnitDim:
    """Check ``HookManager(unit_dim=...)`` up front."""
    if unit_dim is None:
        return None
    if isinstance(unit_dim, bool) or not isinstance(unit_dim, (int, Mapping)):
        raise ConfigTypeError(
            f"`unit_dim` must be None, an int, or a mapping of layer-name patterns to ints; got {unit_dim!r}"
        )
    if isinstance(unit_dim, int):
        return unit_dim
    for k, v in unit_dim.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int):
            raise ConfigTypeError(
                f"`unit_dim` mapping must map layer-name patterns (str) to dims (int); got {k!r}: {v!r}"
            )
    return dict(unit_dim)


def validate_patterns(arg: str, value: object) -> tuple[str, ...] | None:
    """Check ``include`` / ``exclude``: ``None``, one pattern, or an iterable of ``fnmatch`` patterns."""
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable):
        out = tuple(value)
        for p in out:
            if not isinstance(p, str):
                raise ConfigTypeError(f"`{arg}` must hold layer-name patterns (str); got {p!r} in {value!r}")
        return out
    raise ConfigTypeError(f"`{arg}` must be None, a pattern or a list of patterns (str); got {value!r}")


def matches(patterns: tuple[str, ...], layer: str, base: str) -> bool:
    """Whether a layer (or its base name without ``#k``) matches any of the patterns."""
    return any(fnmatch.fnmatchcase(layer, p) or fnmatch.fnmatchcase(base, p) for p in patterns)


# --------------------------------------------------------------------------------------------------------------
# Sites


@dataclasses.dataclass(eq=False)
class Site:
    """One activation call site.

    Attributes:
        index: Position in the manager's site table (order of first discovery).
        layer: Stable name (see the module docstring).
        module: Qualified name of the activation module, or of the module enclosing a functional call.
        call: Call index within one forward pass (``#k`` suffix).
        spec: The activation kind.
        function: Name of the functional entry point, ``None`` for activation-module and module sites.
        bounds: ``(lo, hi)`` output range for bounded kinds, else ``None``.
        unit_dim: Dimension holding units (``None``: the whole output is one unit); set at the first call.
        units: Number of units; set at the first call.
        shape: Shape of the latest output.
        first_step: The first step in which the site ran.
        units_fixed: Whether units were fixed from a first output (a site may have zero units).
        dim: The ``dim`` argument of a softmax-like call (``None``: not given, or not such a site), read when the
            site is created (the ``Entropy`` collector reduces along it).
    """

    index: int
    layer: str
    module: str
    call: int
    spec: ActivationSpec
    function: str | None = None
    bounds: Bounds | None = None
    unit_dim: int | None = None
    units: int = 0
    shape: tuple[int, ...] = ()
    reduce_dims: tuple[int, ...] = ()
    problem: str | None = None
    first_step: int | None = None
    units_fixed: bool = False
    dim: int | None = None
    _thresholds: dict[tuple[torch.dtype, float, bool], float | None] = dataclasses.field(
        default_factory=dict, repr=False
    )

    @property
    def kind(self) -> str:
        """Lower-case activation name."""
        return self.spec.name

    def bind_shape(self, shape: tuple[int, ...], unit_dim: int | None) -> None:
        """Fix the unit dimension from the first output's shape (``unit_dim`` already resolved for the site)."""
        ndim = len(shape)
        if unit_dim is not None and not -ndim <= unit_dim < max(ndim, 1):
            raise ConfigError(
                f"`unit_dim` {unit_dim} is out of range for site {self.layer!r} with output shape {list(shape)}"
            )
        if ndim == 0 or unit_dim is None:
            self.unit_dim, self.units, self.reduce_dims = None, 1, tuple(range(ndim))
        else:
            d = unit_dim % ndim
            self.unit_dim, self.units = d, int(shape[d])
            self.reduce_dims = tuple(i for i in range(ndim) if i != d)
        self.shape = shape
        self.units_fixed = True

    def units_of(self, shape: tuple[int, ...]) -> int:
        """Number of units an output of ``shape`` has at this site (to detect shape changes)."""
        if self.unit_dim is None:
            return 1
        return int(shape[self.unit_dim]) if self.unit_dim < len(shape) else -1

    def threshold(self, value: float, dtype: torch.dtype, above: bool) -> float | None:
        """:func:`~hookscope.numerics.strict_threshold` of ``value`` in ``dtype``, cached per site."""
        key = (dtype, value, above)
        if key not in self._thresholds:
            self._thresholds[key] = strict_threshold(value, dtype, above)
        return self._thresholds[key]


#: What produced an activation's input, as far as units go: (feature count, the dimension that holds them:
#: ``-1`` for the last one, ``1`` for channels, ``0`` when only the size tells, and a short description).
Producer = tuple[int, int, str]


def _torch_classes(*names: str) -> tuple[type, ...]:
    """The classes ``names`` of ``torch.nn.modules`` (``"conv._ConvNd"``) that this torch has."""
    found = (getattr(getattr(nn.modules, name.partition(".")[0], None), name.partition(".")[2], None) for name in names)
    return tuple(cls for cls in found if isinstance(cls, type))


#: torch.nn layers whose own ``forward`` calls no activation and runs no module (see :func:`inert_layer`).
_INERT_LAYERS = _torch_classes(
    "linear.Linear", "linear.Bilinear", "linear.Identity", "conv._ConvNd", "batchnorm._NormBase",
    "normalization.LayerNorm", "normalization.GroupNorm", "normalization.LocalResponseNorm", "normalization.RMSNorm",
    "sparse.Embedding", "sparse.EmbeddingBag", "dropout._DropoutNd", "flatten.Flatten", "flatten.Unflatten",
    "pooling._MaxPoolNd", "pooling._AvgPoolNd", "pooling._AdaptiveAvgPoolNd", "pooling._AdaptiveMaxPoolNd",
    "upsampling.Upsample", "pixelshuffle.PixelShuffle", "pixelshuffle.PixelUnshuffle", "padding._ConstantPadNd",
    "padding._ReflectionPadNd", "padding._ReplicationPadNd", "padding._CircularPadNd",
)  # fmt: skip


def inert_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one of torch's own layers that hold no module and call no activation (linear,
    convolution, normalisation, embedding, dropout, pooling, reshaping and padding layers, not a subclass defined
    elsewhere): nothing that names or records a site runs inside it, so it never needs to be on the module stack.
    A tracer hooks such a layer only when it has features (:func:`producer_of`), and only after its forward."""
    return (
        isinstance(module, _INERT_LAYERS)
        and type(module).__module__.startswith("torch.nn.modules.")
        and not module._modules
    )


def producer_of(module: nn.Module) -> Producer | None:
    """The features a layer produces and where they sit in its output, or ``None`` for layers that say nothing
    about units (containers, activations, pooling...).

    ``Linear`` (and Hugging Face's GPT-2 ``Conv1D``, ``Embedding``, ``LayerNorm``/``RMSNorm``): the last dim;
    convolutions, batch / instance / group norms: dim 1. Other layers with an int ``out_features`` (last) or
    ``out_channels`` / ``num_features`` (dim 1) attribute count too.
    """
    name = type(module).__name__
    if isinstance(module, nn.Linear):
        return module.out_features, -1, f"{name}(out_features={module.out_features})"
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels, 1, f"{name}(out_channels={module.out_channels})"
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.num_features, 1, f"{name}(num_features={module.num_features})"
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, 1, f"{name}(num_channels={module.num_channels})"
    if isinstance(module, nn.Embedding):
        return module.embedding_dim, -1, f"{name}(embedding_dim={module.embedding_dim})"
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and shape and isinstance(shape[-1], int):
        # nn.LayerNorm normalises the last dims; its subclasses may run channels-first (torchvision's and timm's
        # LayerNorm2d): for them only the size tells, not the place
        where = -1 if type(module) in (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm)) else 0
        return int(shape[-1]), where, f"{name}(normalized_shape={tuple(shape)})"
    for attr, dim in (("out_features", -1), ("nf", -1), ("out_channels", 1), ("num_features", 1)):
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, dim, f"{name}({attr}={value})"
    return None


def infer_unit_dim(shape: tuple[int, ...], producer: Producer | None) -> tuple[int | None, str | None]:
    """The unit dimension of an output of ``shape`` whose input came from ``producer`` (the last layer with a
    feature count that ran before the activation), and a note when the evidence is ambiguous or does not fit.

    The producer's own dimension wins when it has the producer's feature count and the activation's input is the
    producer's output itself (the tracer passes a producer with ``where=0`` otherwise): a ``Linear`` before a
    GELU on ``(N, H, W, C)`` (ConvNeXt, Swin) puts units last, a ``Conv1d`` before a GELU on ``(N, C, L)``
    (Whisper, wav2vec2) puts them in dim 1. Else the one dimension (not the batch) with that size, if exactly
    one has it; else :func:`default_unit_dim`, with a note.
    """
    ndim = len(shape)
    rule = default_unit_dim(ndim)
    if producer is None or ndim < 2:
        return rule, None
    features, where, what = producer
    if where != 0:
        natural = ndim - 1 if where == -1 else min(where, ndim - 1)
        if shape[natural] == features:
            return natural, None
    candidates = [d for d in range(1, ndim) if shape[d] == features]
    if len(candidates) == 1:
        return candidates[0], None
    if candidates:
        return rule, (
            f"dims {candidates} all have the {features} features of the layer before it, {what}: ambiguous, took "
            f"dim {rule} by the shape rule (set `unit_dim` for this layer)"
        )
    return rule, (
        f"no dim has the {features} features of the layer before it, {what}: took dim {rule} by the shape rule "
        "(set `unit_dim` for this layer if that is wrong)"
    )


def resolve_unit_dim(
    unit_dim: UnitDim, layer: str, base: str, shape: tuple[int, ...], producer: Producer | None = None
) -> tuple[int | None, str | None]:
    """The unit dimension of a site: the user's override (int or first matching pattern), else inferred from the
    layer that produced its input (:func:`infer_unit_dim`); and a note for a warning, if any."""
    if isinstance(unit_dim, int):
        return unit_dim, None
    if isinstance(unit_dim, Mapping):
        for pattern, dim in unit_dim.items():
            if fnmatch.fnmatchcase(layer, pattern) or fnmatch.fnmatchcase(base, pattern):
                return dim, None
    return infer_unit_dim(shape, producer)


# --------------------------------------------------------------------------------------------------------------
# Module sites


class ModuleSelection:
    """Which modules' outputs are *module sites* (``HookManager(modules=...)``): ``fnmatch`` patterns over the
    qualified module names (wrapper components removed; the root module is ``""`` or ``(root)``) and module
    classes (``isinstance``). Activation modules are activation sites already and are never module sites.

    Args:
        modules: One pattern or class, or an iterable of them.

    Raises:
        ConfigTypeError: Something else than patterns (str) and ``nn.Module`` subclasses.
        ConfigError: No pattern or class at all.
    """

    def __init__(self, modules: object) -> None:
        allowed = "a module-name pattern (str), an nn.Module subclass, or a list of them"
        items: tuple[object, ...]
        if isinstance(modules, (str, type)):
            items = (modules,)
        elif isinstance(modules, Iterable) and not isinstance(modules, (bytes, Mapping)):
            items = tuple(modules)
        else:
            raise ConfigTypeError(f"`modules` must be None, {allowed}; got {modules!r}")
        if not items:
            raise ConfigError(f"`modules` must name at least one module ({allowed}); got {modules!r}")
        for item in items:
            if not isinstance(item, str) and not (isinstance(item, type) and issubclass(item, nn.Module)):
                raise ConfigTypeError(f"`modules` must hold module-name patterns (str) or nn.Module subclasses; got "
                                      f"{item!r} in {modules!r}")  # fmt: skip
        self.items = items
        self.patterns = tuple(i for i in items if isinstance(i, str))
        self.classes: tuple[type[nn.Module], ...] = tuple(i for i in items if isinstance(i, type))

    def _names(self, name: str) -> tuple[str, ...]:
        return (name, ROOT_NAME) if name == "" else (name,)

    def selects(self, name: str, module: nn.Module) -> bool:
        """Whether the module called ``name`` (wrapper components removed) is selected (activations included)."""
        if self.classes and isinstance(module, self.classes):
            return True
        return any(fnmatch.fnmatchcase(n, p) for n in self._names(name) for p in self.patterns)

    def check(self, model: nn.Module, is_activation: Callable[[nn.Module], bool]) -> None:
        """Raise when a pattern or class selects no module of ``model`` that can be a module site.

        Raises:
            ConfigError: Naming the pattern (or class), and what it matched instead (activation modules only) or
                some module names.
        """
        named = list(iter_named_modules(model))
        for item in self.items:
            one = ModuleSelection(item)
            hits = [(n, m) for n, m in named if one.selects(n, m)]
            if any(not is_activation(m) for _, m in hits):
                continue
            what = f"pattern {item!r}" if isinstance(item, str) else f"class {getattr(item, '__name__', item)}"
            if hits:
                found = ", ".join(n or ROOT_NAME for n, _ in hits[:5])
                raise ConfigError(
                    f"`modules` {what} matches only activation modules ({found}), which are activation sites "
                    "already: record their magnitudes with "
                    "collectors=[..., Magnitude(activations=True)]"
                )
            names = [n for n, _ in named if n][:8]
            raise ConfigError(
                f"`modules` {what} matches no module of {type(model).__name__}; module names look like "
                f"{', '.join(names) or '(the root only)'}{', ...' if len(named) > 9 else ''} (fnmatch's * also "
                "matches dots: 'blocks.*' selects every submodule of the blocks too; a class selects the blocks alone)"
            )

    def __repr__(self) -> str:
        return f"ModuleSelection({list(self.items)!r})"
