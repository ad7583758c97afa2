"""Native statistics kernels: the per-unit positive counts, saturation and non-finite counts of an activation
output, and the sum of squares and non-finite count of a gradient, each in one pass over the tensor.

On CPU the ATen formulation of these statistics costs several dispatched operations per output (each a few
microseconds, and a full pass over the tensor); the kernels do all of them in one pass, straight into the
collectors' float64 state, dispatching no ATen operation. They are a plain C library (``src/``) behind an
``extern "C"`` interface over raw pointers and sizes, with no torch or Python header, loaded with ctypes: one
binary serves every torch and Python version. It is compiled when the package is installed, if a C compiler is
there (see :mod:`hookscope.kernels.build`); without it hookscope uses ATen and says so once, when a CPU tensor
first reaches a statistic.

Which implementation a manager uses is decided when it is created (:func:`select`): the kernels when the library
loads, unless the environment variable ``HOOKSCOPE_KERNELS`` is ``aten`` or :func:`forced` says otherwise.
:func:`output_stats` and :func:`grad_stats` decline (return ``False``, doing nothing) what they cannot handle: a
tensor that is not a plain strided CPU tensor of float32, float64, bfloat16 or float16, code being traced by
torch.compile, or a missing library; the caller then uses ATen.

Example:
    >>> import torch
    >>> from hookscope import kernels
    >>> x = torch.tensor([[1.0, -1.0, 0.0], [2.0, 3.0, float("nan")]])
    >>> positive = torch.zeros(3, dtype=torch.float64)
    >>> nonfinite = torch.zeros((), dtype=torch.float64)
    >>> if kernels.output_stats(x, unit_dim=1, units=3, positive=positive, nonfinite=nonfinite):
    ...     assert positive.tolist() == [2.0, 1.0, 0.0] and nonfinite.item() == 1.0
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import math
import os
from collections.abc import Iterator
from typing import Any, Callable

import torch

from hookscope.errors import ConfigError, ConfigTypeError, StateError
from hookscope.kernels import _native
from hookscope.warn import warn_once

__all__ = [
    "BACKENDS",
    "DEAD_UNIT_STATES",
    "ENV_VAR",
    "MAGNITUDE_STATISTICS",
    "Backend",
    "Prepared",
    "available",
    "backend",
    "dead_units",
    "forced",
    "grad_stats",
    "info",
    "output_stats",
    "param_stats",
    "prepare_grad",
    "prepare_output",
    "select",
]

#: The environment variable that chooses the implementation ("aten" or "native"; unset: native when available).
ENV_VAR = "HOOKSCOPE_KERNELS"
#: The implementations.
BACKENDS = ("native", "aten")

_DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_SCALE_DTYPES = {torch.float32: 0, torch.float64: 1}
_F64 = torch.float64
_TENSOR = torch.Tensor
_STRIDED = torch.strided
_CHANNELS_LAST = torch.channels_last
_CHANNELS_LAST_3D = torch.channels_last_3d
_get_num_threads = torch.get_num_threads
_is_compiling: Callable[[], bool] = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)

# Loaded on first use: the library (or why not) and its entry points.
_loaded = False
_lib: _native.Native | None = None
_reason: str | None = None
_out_prepared: Any = None
_grad_prepared: Any = None
_dead_fn: Any = None
_param_fn: Any = None
_magnitude_fn: Any = None


def _one_thread() -> int:
    return 1


_threads_fn: Callable[[], int] = _one_thread

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("hookscope_kernels_forced", default=None)


def _load() -> bool:
    global _loaded, _lib, _reason, _out_prepared, _grad_prepared, _dead_fn, _param_fn, _threads_fn, _magnitude_fn
    if not _loaded:
        _lib, _reason = _native.load()
        if _lib is not None:
            _out_prepared, _grad_prepared = _lib.output_prepared, _lib.grad_prepared
            _magnitude_fn = _lib.magnitude_prepared
            _dead_fn, _param_fn = _lib.dead_units, _lib.param_stats
            _threads_fn = _get_num_threads if _lib.openmp else _one_thread
        _loaded = True
    return _lib is not None


def _library() -> _native.Native | None:
    """The loaded library (tests select its instruction set), or ``None``."""
    _load()
    return _lib


def available() -> bool:
    """Whether the native library is loaded (loading it on the first call)."""
    return _load()


def _resolve() -> tuple[str, str | None]:
    """The implementation a manager created now uses, and why ATen when it is ATen (``None``: chosen with
    :func:`forced`, nothing to say)."""
    name = _forced.get()
    if name is not None:
        return name, None
    value = os.environ.get(ENV_VAR, "")
    choice = value.strip().lower()
    if choice == "aten":
        return "aten", f"{ENV_VAR}=aten"
    if choice not in ("", "native"):
        warn_once(
            f"hookscope: environment variable {ENV_VAR}={value!r} is not one of 'native', 'aten' (or unset); "
            f"using ATen operations"
        )
        return "aten", f"{ENV_VAR}={value!r} is not one of 'native', 'aten'"
    if not _load():
        return "aten", f"the native kernels are not available: {_reason}"
    return "native", None


def backend() -> str:
    """What a manager created now will use: ``"native"`` or ``"aten"``.

    ``"native"`` when the library loads, unless ``HOOKSCOPE_KERNELS=aten`` or inside ``forced("aten")``. Any other
    value of the variable warns once and means ``"aten"``.
    """
    return _resolve()[0]


def info() -> dict[str, Any]:
    """What the kernels are doing here: ``backend`` (see :func:`backend`), ``library`` (the loaded library's path
    or ``None``), ``isa`` (``"avx2"`` or ``"baseline"``, ``None`` without the library), ``reason`` (why ATen, or
    ``None``) and ``threads`` (threads of a large call: ``torch.get_num_threads()``, 1 without OpenMP)."""
    name, reason = _resolve()
    if name == "aten" and reason is None:
        reason = "forced('aten')"
    return {
        "backend": name,
        "library": str(_lib.path) if _lib is not None else None,
        "isa": _lib.isa() if _lib is not None else None,
        "reason": reason,
        "threads": _threads_fn(),
    }


@contextlib.contextmanager
def forced(name: str) -> Iterator[None]:
    """Managers created inside use implementation ``name`` (``"native"`` or ``"aten"``), whatever
    ``HOOKSCOPE_KERNELS`` says; for tests and benchmarks. Nests; restores the previous choice on exit.

    Raises:
        ValueError: ``name`` is not ``"native"`` or ``"aten"``.
        TypeError: ``name`` is not a string.
        RuntimeError: ``"native"`` while the library is not available (the reason is in the message).
    """
    if not isinstance(name, str):
        raise ConfigTypeError(f"`name` must be a str, one of {', '.join(map(repr, BACKENDS))}; got {name!r}")
    if name not in BACKENDS:
        raise ConfigError(f"`name` must be one of {', '.join(map(repr, BACKENDS))}; got {name!r}")
    if name == "native" and not _load():
        raise StateError(f"forced('native'): the native kernels are not available: {_reason}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def _bad_buffer(arg: str, buf: Any, numel: int) -> None:
    what = f"a {buf.dtype} tensor of shape {list(buf.shape)} on {buf.device}" if isinstance(buf, _TENSOR) else repr(buf)
    raise ConfigError(
        f"`{arg}` must be a contiguous float64 CPU tensor of {numel} element(s) (a view of the collector's state), "
        f"got {what}"
    )


def _code_of(x: torch.Tensor) -> int | None:
    """The library's dtype code for a tensor the kernels take (a plain strided CPU tensor of one of their dtypes,
    outside code traced by torch.compile), else ``None``."""
    code = _DTYPES.get(x.dtype)
    if code is None or type(x) is not _TENSOR or not x.is_cpu or x.layout is not _STRIDED or _is_compiling():
        return None
    return code


def _dense(x: torch.Tensor) -> bool:
    """Whether ``x`` fills a block of memory without gaps or overlaps, in some order of its dimensions (its
    elements are then the ``numel()`` values from ``data_ptr()`` on). Contiguous tensors are, at the cost of one
    call."""
    if x.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(x.shape, x.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def output_stats(
    x: torch.Tensor,
    *,
    unit_dim: int | None,
    units: int,
    positive: torch.Tensor | None = None,
    lower: float | None = None,
    upper: float | None = None,
    saturated: torch.Tensor | None = None,
    nonfinite: torch.Tensor | None = None,
    **magnitude: torch.Tensor,
) -> bool:
    """Add one output's statistics to float64 CPU state, in one pass over ``x``; ``False`` (nothing done) when the
    kernels cannot handle ``x``.

    Layouts read in place: contiguous tensors with any unit dimension, ``channels_last`` 4-D and
    ``channels_last_3d`` 5-D tensors with unit dimension 1, and any dense layout without a unit dimension; other
    layouts are copied to a contiguous tensor first.

    Args:
        x: The output.
        unit_dim: The dimension that holds units, or ``None`` (the whole tensor is one unit).
        units: ``x.shape[unit_dim]`` (1 when ``unit_dim`` is ``None``).
        positive: ``units`` contiguous float64 values: ``positive[u] +=`` elements of unit ``u`` with ``x > 0``.
        lower: With ``saturated``: count elements ``x < lower`` (a value of ``x``'s dtype, see
            :func:`hookscope.numerics.strict_threshold`); ``None``: no lower band.
        upper: With ``saturated``: count elements ``x > upper``; ``None``: no upper band.
        saturated: One float64 value: ``+=`` elements below ``lower`` or above ``upper`` (NaN never; every element
            when ``lower > upper``).
        nonfinite: One float64 value: ``+=`` NaN, +inf and -inf elements.
        magnitude: ``Magnitude``'s statistics (:data:`MAGNITUDE_STATISTICS`): per unit ``count`` (finite elements),
            ``abs_sum``, ``sq_sum``, ``abs_max`` (``units`` values each); ``sum``, ``quad_sum``, ``zeros`` (one value
            each). With any of them the whole call runs as the magnitude pass (``hs_magnitude_stats_prepared``),
            which also computes the three statistics above.

    Returns:
        Whether the statistics were added.

    Raises:
        ValueError: A state tensor of the wrong dtype, size or device, or ``unit_dim`` / ``units`` that do not match
            ``x`` (mistakes of the caller, not of the data).
    """
    if not _load():
        return False
    if magnitude:
        built_m = _magnitude_args(x, unit_dim, units, positive, lower, upper, saturated, nonfinite, magnitude)
        if built_m is None:
            return False
        return bool(_magnitude_fn(built_m[0].data_ptr(), ctypes.addressof(built_m[1])) == 0)
    built = _output_args(x, unit_dim, units, positive, lower, upper, saturated, nonfinite)
    if built is None:
        return False
    y, args = built
    return bool(_out_prepared(y.data_ptr(), ctypes.addressof(args)) == 0)


#: The statistics of the magnitude pass (``Magnitude``'s states): per unit, then per site.
MAGNITUDE_STATISTICS = ("count", "abs_sum", "sq_sum", "abs_max", "sum", "quad_sum", "zeros")
_PER_UNIT_MAGNITUDE = frozenset(MAGNITUDE_STATISTICS[:4])


def _magnitude_args(
    x: torch.Tensor,
    unit_dim: int | None,
    units: int,
    positive: torch.Tensor | None,
    lower: float | None,
    upper: float | None,
    saturated: torch.Tensor | None,
    nonfinite: torch.Tensor | None,
    magnitude: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, _native.MagnitudeArgs] | None:
    """``(x or the copy the kernel reads, the magnitude pass's record)``, or ``None`` when the kernels decline ``x``."""
    unknown = set(magnitude) - set(MAGNITUDE_STATISTICS)
    if unknown:
        raise ConfigError(f"unknown statistics {sorted(unknown)}; the magnitude pass computes {MAGNITUDE_STATISTICS}")
    code = _code_of(x)
    if code is None:
        return None
    y, outer, inner = _output_layout(x, unit_dim, units)
    p, s, bounds, f = _output_buffers(units, positive, lower, upper, saturated, nonfinite)
    pointers: dict[str, int | None] = dict.fromkeys(MAGNITUDE_STATISTICS)
    for name, buf in magnitude.items():
        n = units if name in _PER_UNIT_MAGNITUDE else 1
        if buf.dtype is not _F64 or buf.numel() != n or not buf.is_contiguous() or not buf.is_cpu:
            _bad_buffer(name, buf, n)
        pointers[name] = buf.data_ptr()
    args = _native.MagnitudeArgs(
        outer, units, inner, *(pointers[name] for name in MAGNITUDE_STATISTICS), p, s, f,
        0.0 if lower is None else lower, 0.0 if upper is None else upper, code, bounds, _threads_fn(), 0,
    )  # fmt: skip
    return y, args


def _output_args(
    x: torch.Tensor,
    unit_dim: int | None,
    units: int,
    positive: torch.Tensor | None,
    lower: float | None,
    upper: float | None,
    saturated: torch.Tensor | None,
    nonfinite: torch.Tensor | None,
) -> tuple[torch.Tensor, _native.OutputArgs] | None:
    """``(x or the copy the kernel reads, its argument record)``, or ``None`` when the kernels decline ``x``. The
    record holds the thread count of now (the library runs calls of up to 32768 elements per thread on fewer)."""
    code = _code_of(x)
    if code is None:
        return None
    y, outer, inner = _output_layout(x, unit_dim, units)
    p, s, bounds, f = _output_buffers(units, positive, lower, upper, saturated, nonfinite)
    args = _native.OutputArgs(
        outer, units, inner, p, s, f,
        0.0 if lower is None else lower, 0.0 if upper is None else upper,
        code, bounds, _threads_fn(), 0,
    )  # fmt: skip
    return y, args


def _output_layout(x: torch.Tensor, unit_dim: int | None, units: int) -> tuple[torch.Tensor, int, int]:
    """``(x, outer, inner)``: ``x`` as a dense block ``(outer, units, inner)`` (itself, or a contiguous copy when its
    layout cannot be read in place)."""
    if unit_dim is None:
        if units != 1:
            raise ConfigError(f"`units` must be 1 when `unit_dim` is None, got {units!r}")
        if not _dense(x):
            x = x.contiguous()
        return x, 1, x.numel()
    shape = x.shape
    nd = len(shape)
    d = unit_dim + nd if unit_dim < 0 else unit_dim
    if not 0 <= d < nd or shape[d] != units:
        raise ConfigError(
            f"`unit_dim` {unit_dim!r} and `units` {units!r} do not match an output of shape {list(shape)}"
        )
    if x.is_contiguous():
        outer = 1 if d == 0 else shape[0] if d == 1 else math.prod(shape[:d])
    elif d == 1 and (
        (nd == 4 and x.is_contiguous(memory_format=_CHANNELS_LAST))
        or (nd == 5 and x.is_contiguous(memory_format=_CHANNELS_LAST_3D))
    ):
        outer = 0  # memory order N, spatial, C: the units are last
    else:
        x = x.contiguous()
        outer = math.prod(shape[:d])
    block = outer * units
    if block:
        return x, outer, x.numel() // block
    if outer == 0 and units:  # channels_last: (N * spatial, C, 1)
        return x, x.numel() // units, 1
    return x, 0, 0  # no element


def _output_buffers(
    units: int,
    positive: torch.Tensor | None,
    lower: float | None,
    upper: float | None,
    saturated: torch.Tensor | None,
    nonfinite: torch.Tensor | None,
) -> tuple[int | None, int | None, int, int | None]:
    """The state pointers of an output pass and its bounds flags, after checking the state tensors."""
    p = s = f = None
    if positive is not None:
        if (
            positive.dtype is not _F64
            or positive.numel() != units
            or not positive.is_contiguous()
            or not positive.is_cpu
        ):
            _bad_buffer("positive", positive, units)
        p = positive.data_ptr()
    bounds = 0
    if saturated is not None:
        if saturated.dtype is not _F64 or saturated.numel() != 1 or not saturated.is_cpu:
            _bad_buffer("saturated", saturated, 1)
        s = saturated.data_ptr()
        bounds = (lower is not None) | (upper is not None) << 1
    if nonfinite is not None:
        if nonfinite.dtype is not _F64 or nonfinite.numel() != 1 or not nonfinite.is_cpu:
            _bad_buffer("nonfinite", nonfinite, 1)
        f = nonfinite.data_ptr()
    return p, s, bounds, f


class Prepared:
    """A kernel call prepared for tensors of one dtype, shape and strides, into fixed state buffers (see
    :func:`prepare_output`, :func:`prepare_grad`): ``fn(t.data_ptr(), address) == 0`` runs it on ``t`` (the caller
    checks ``key == (t.dtype, t.shape, t.stride())`` first, and keeps the state buffers alive and in place).

    Attributes:
        key: ``(dtype, shape, strides)`` of the tensors it takes.
        fn: The library's prepared entry point.
        address: Address of the argument record.
    """

    __slots__ = ("_args", "_keep", "address", "fn", "key")

    def __init__(self, key: tuple[Any, ...], fn: Any, args: ctypes.Structure, keep: tuple[Any, ...]) -> None:
        self.key = key
        self.fn = fn
        self._args = args  # keeps the record alive
        # and the state tensors it points into: a call that outlived its buffers' place in the bank (the bank grew
        # while a hook raised) loses its counts instead of writing into freed memory
        self._keep = keep
        self.address = ctypes.addressof(args)


def prepare_output(
    x: torch.Tensor,
    *,
    unit_dim: int | None,
    units: int,
    positive: torch.Tensor | None = None,
    lower: float | None = None,
    upper: float | None = None,
    saturated: torch.Tensor | None = None,
    nonfinite: torch.Tensor | None = None,
    **magnitude: torch.Tensor,
) -> Prepared | None:
    """:func:`output_stats` for ``x`` and every later tensor of its dtype, shape and strides, as a :class:`Prepared`
    call (two arguments to pass instead of twelve, no checks repeated); ``None`` when the kernels would decline
    ``x`` or would read a copy of it. The thread count is that of now."""
    if not _load():
        return None
    if magnitude:
        built_m = _magnitude_args(x, unit_dim, units, positive, lower, upper, saturated, nonfinite, magnitude)
        if built_m is None or built_m[0] is not x:
            return None
        keep = (positive, saturated, nonfinite, *magnitude.values())
        return Prepared((x.dtype, x.shape, x.stride()), _magnitude_fn, built_m[1], keep)
    built = _output_args(x, unit_dim, units, positive, lower, upper, saturated, nonfinite)
    if built is None or built[0] is not x:
        return None
    return Prepared((x.dtype, x.shape, x.stride()), _out_prepared, built[1], (positive, saturated, nonfinite))


def grad_stats(
    g: torch.Tensor,
    *,
    sumsq: torch.Tensor | None = None,
    scale: float | torch.Tensor | None = None,
    nonfinite: torch.Tensor | None = None,
) -> bool:
    """Add one gradient's statistics to float64 CPU state, in one pass over ``g``; ``False`` (nothing done) when
    the kernels cannot handle it.

    Args:
        g: The gradient (any dense layout is read in place; others are copied first).
        sumsq: One float64 value: ``+=`` the sum of ``g**2`` divided by ``scale**2``, squares summed in float lanes
            within blocks of 4096 elements and in float64 across blocks (float64 throughout for float64 ``g``).
        scale: A ``GradScaler``'s scale: a positive number, or a one-element float32/float64 CPU tensor (read by
            the kernel, no ``.item()``); ``None``: 1.
        nonfinite: One float64 value: ``+=`` NaN, +inf and -inf elements of ``g``.

    Returns:
        Whether the statistics were added (``False`` also for a scale tensor that is not on the CPU).

    Raises:
        ValueError: A state tensor of the wrong dtype, size or device.
    """
    if not _load():
        return False
    built = _grad_args(g, sumsq, scale, nonfinite)
    if built is None:
        return False
    y, args = built
    return bool(_grad_prepared(y.data_ptr(), ctypes.addressof(args)) == 0)


def _grad_args(
    g: torch.Tensor, sumsq: torch.Tensor | None, scale: float | torch.Tensor | None, nonfinite: torch.Tensor | None
) -> tuple[torch.Tensor, _native.GradArgs] | None:
    """``(g or the copy the kernel reads, its argument record)``, or ``None`` when the kernels decline ``g`` or
    its scale tensor. The record holds the thread count of now."""
    code = _code_of(g)
    if code is None:
        return None
    if not _dense(g):
        g = g.contiguous()
    sp = None
    sd = 0
    value = 1.0
    if scale is not None:
        if isinstance(scale, _TENSOR):
            sd_or_none = _SCALE_DTYPES.get(scale.dtype)
            if sd_or_none is None or scale.numel() != 1 or not scale.is_cpu or scale.layout is not _STRIDED:
                return None
            sd, sp = sd_or_none, scale.data_ptr()
        else:
            value = float(scale)
    s = f = None
    if sumsq is not None:
        if sumsq.dtype is not _F64 or sumsq.numel() != 1 or not sumsq.is_cpu:
            _bad_buffer("sumsq", sumsq, 1)
        s = sumsq.data_ptr()
    if nonfinite is not None:
        if nonfinite.dtype is not _F64 or nonfinite.numel() != 1 or not nonfinite.is_cpu:
            _bad_buffer("nonfinite", nonfinite, 1)
        f = nonfinite.data_ptr()
    return g, _native.GradArgs(g.numel(), s, f, value, sp, code, sd, _threads_fn(), 0)


def prepare_grad(
    g: torch.Tensor,
    *,
    sumsq: torch.Tensor | None = None,
    scale: float | torch.Tensor | None = None,
    nonfinite: torch.Tensor | None = None,
) -> Prepared | None:
    """:func:`grad_stats` for ``g`` and every later gradient of its dtype, shape and strides, as a :class:`Prepared`
    call; ``None`` when the kernels would decline ``g``, would read a copy of it, or ``scale`` is a tensor (read
    at each call: use :func:`grad_stats`). The thread count is that of now."""
    if not _load() or isinstance(scale, _TENSOR):
        return None
    built = _grad_args(g, sumsq, scale, nonfinite)
    if built is None or built[0] is not g:
        return None
    return Prepared((g.dtype, g.shape, g.stride()), _grad_prepared, built[1], (sumsq, nonfinite))


#: The per-unit states :func:`dead_units` reads and (``commit``) writes.
DEAD_UNIT_STATES = ("fired_at", "silent", "revivals", "last_revival", "died_at", "last_fired")


def _f64_rows(x: torch.Tensor, rows: int, cols: int) -> int | None:
    """The row stride of a ``(rows, cols)`` float64 CPU tensor with contiguous rows, or ``None``."""
    if type(x) is not _TENSOR or x.dtype is not _F64 or not x.is_cpu or x.layout is not _STRIDED:
        return None
    if x.dim() != 2 or x.shape[0] != rows or x.shape[1] != cols or (cols > 1 and x.stride(1) != 1):
        return None
    return x.stride(0) if rows > 1 else cols


def dead_units(
    positive: torch.Tensor,
    elements: torch.Tensor,
    owners: torch.Tensor,
    inverse: torch.Tensor,
    steps: list[int],
    first: int,
    window: int,
    evidence: int,
    state: dict[str, torch.Tensor],
    commit: bool,
) -> torch.Tensor | None:
    """DeadReLU's per-unit bookkeeping for a block of recorded steps, in one pass (see ``hs_dead_units`` in
    ``src/hookscope_kernels.h``); ``None`` (nothing done) when the kernels cannot take these tensors.

    Args:
        positive: ``(T, U)`` positive elements of each unit in each step (float64, contiguous rows).
        elements: ``(T, S)`` output elements of each site in each step.
        owners: ``(U,)`` int64: the site of each unit.
        inverse: ``(S,)`` float64: 1 / units of each site.
        steps: The ``T`` step numbers; ``first`` the ordinal of the first among recorded steps.
        window: DeadReLU's window; ``evidence`` its silent-element threshold.
        state: The persistent per-unit states :data:`DEAD_UNIT_STATES` (``(U,)`` float64, contiguous); ``fired_at``
            and ``silent`` are read, and all of them move to the end of the block when ``commit``.

    Returns:
        ``(3, T, S)`` float64: per step and site, the positive elements, the alive units and the confirmed-dead
        units.
    """
    fn = _dead_fn
    if fn is None:
        if not _load():
            return None
        fn = _dead_fn
    t, u = len(steps), owners.numel()
    s = inverse.numel()
    pos_stride, el_stride = _f64_rows(positive, t, u), _f64_rows(elements, t, s)
    if pos_stride is None or el_stride is None or _is_compiling():
        return None
    if owners.dtype is not torch.int64 or not owners.is_cpu or not owners.is_contiguous():
        return None
    flat = [inverse, *(state[name] for name in DEAD_UNIT_STATES)]
    sizes = [s] + [u] * len(DEAD_UNIT_STATES)
    for x, n in zip(flat, sizes):
        if x.dtype is not _F64 or not x.is_cpu or not x.is_contiguous() or x.numel() != n:
            return None
    out = torch.zeros(3, t, s, dtype=_F64)
    host_steps = torch.tensor(steps, dtype=_F64)
    ptr = [x.data_ptr() for x in flat]
    rc = fn(
        t, u, s, positive.data_ptr(), pos_stride, elements.data_ptr(), el_stride, owners.data_ptr(), ptr[0],
        host_steps.data_ptr(), float(first), float(window), float(evidence), ptr[1], ptr[2], int(commit), *ptr[3:],
        out.data_ptr(),
    )  # fmt: skip
    return out if rc == 0 else None


_PARAM_DTYPES = {torch.float32: 0, torch.float64: 1}
_PARAM_TYPES = (torch.Tensor, torch.nn.Parameter)


def param_stats(
    params: list[torch.Tensor], previous: list[torch.Tensor] | None, grads: list[torch.Tensor | None]
) -> torch.Tensor | None:
    """Per parameter, in one pass over each tensor: ‖θ‖², ‖g‖² (0 where ``grads[i]`` is ``None``) and ‖θ − θ_prev‖²
    (0 without ``previous``), after which ``previous`` holds a copy of ``params``; ``None`` (nothing done, nothing
    copied) when the kernels cannot take these tensors.

    Args:
        params: Dense float32 or float64 CPU tensors.
        previous: Copies of ``params`` from an earlier step (same dtypes and strides), updated in place; or ``None``.
        grads: Each parameter's gradient (dense, same dtype) or ``None``.

    Returns:
        ``(len(params), 3)`` float64: squared norms of the parameters, gradients and updates.
    """
    fn = _param_fn
    if fn is None:
        if not _load():
            return None
        fn = _param_fn
    n = len(params)
    if _is_compiling() or len(grads) != n or (previous is not None and len(previous) != n):
        return None
    codes: list[int] = []
    sizes: list[int] = []
    theta: list[int] = []
    prev: list[int | None] = []
    grad: list[int | None] = []
    for i, p in enumerate(params):
        code = _PARAM_DTYPES.get(p.dtype)
        if code is None or type(p) not in _PARAM_TYPES:
            return None
        if not p.is_cpu or p.layout is not _STRIDED or not _dense(p):
            return None
        g = grads[i]
        if g is not None and (
            g.dtype is not p.dtype or not g.is_cpu or g.layout is not _STRIDED or g.numel() != p.numel()
        ):
            return None
        if g is not None and not _dense(g):
            return None
        if previous is not None:
            q = previous[i]
            if q.dtype is not p.dtype or not q.is_cpu or q.shape != p.shape or q.stride() != p.stride():
                return None
            prev.append(q.data_ptr())
        else:
            prev.append(None)
        codes.append(code)
        sizes.append(p.numel())
        theta.append(p.data_ptr())
        grad.append(None if g is None else g.data_ptr())
    out = torch.zeros(n, 3, dtype=_F64)
    pointers = ctypes.c_void_p * n
    rc = fn(
        n, pointers(*theta), pointers(*prev), pointers(*grad), (ctypes.c_int64 * n)(*sizes),
        (ctypes.c_int32 * n)(*codes), out.data_ptr(), _threads_fn(),
    )  # fmt: skip
    return out if rc == 0 else None


class Backend:
    """The statistics implementation one manager uses, chosen when it is created (:func:`select`).

    ``output_stats`` / ``grad_stats`` / ``prepare_output`` / ``prepare_grad`` / ``dead_units`` / ``param_stats`` have
    the signatures of the module's functions. For ``"native"`` they are those functions; for ``"aten"`` they always
    decline (``None`` from the last four), and the first CPU
    tensor ``output_stats`` or ``grad_stats`` sees (one the kernels would have handled) makes hookscope say once why it
    uses ATen, unless ATen was chosen with :func:`forced`.

    Attributes:
        name: ``"native"`` or ``"aten"``.
        reason: Why ATen (``None`` for native, or when chosen with :func:`forced`).
    """

    __slots__ = (
        "dead_units", "grad_stats", "name", "output_stats", "param_stats", "prepare_grad", "prepare_output", "reason",
    )  # fmt: skip

    def __init__(self, name: str, reason: str | None) -> None:
        self.name = name
        self.reason = reason
        self.output_stats: Callable[..., bool]
        self.grad_stats: Callable[..., bool]
        self.dead_units: Callable[..., torch.Tensor | None]
        self.param_stats: Callable[..., torch.Tensor | None]
        self.prepare_output: Callable[..., Prepared | None]
        self.prepare_grad: Callable[..., Prepared | None]
        if name == "native":
            self.output_stats, self.grad_stats = output_stats, grad_stats
            self.dead_units, self.param_stats = dead_units, param_stats
            self.prepare_output, self.prepare_grad = prepare_output, prepare_grad
        else:
            self.output_stats = self.grad_stats = _decline if reason is None else _declining(reason)
            self.dead_units = self.param_stats = self.prepare_output = self.prepare_grad = _none

    def __repr__(self) -> str:
        return f"Backend({self.name!r})" if self.reason is None else f"Backend({self.name!r}, reason={self.reason!r})"


def _decline(x: torch.Tensor, **kwargs: Any) -> bool:
    return False


def _none(*args: Any, **kwargs: Any) -> None:
    return None


def _declining(reason: str) -> Callable[..., bool]:
    said = False

    def decline(x: torch.Tensor, **kwargs: Any) -> bool:
        nonlocal said
        if not said and x.is_cpu and x.dtype in _DTYPES:
            said = True
            warn_once(f"hookscope: statistics of CPU tensors use ATen operations, not the native kernels ({reason})")
        return False

    return decline


def select() -> Backend:
    """The implementation a manager created now uses (call it once, in the manager's constructor)."""
    return Backend(*_resolve())
