"""Loading the native kernels library with ctypes (once, on first use, never at import)."""

from __future__ import annotations

import ctypes
import dataclasses
from pathlib import Path
from typing import Any

from hookscope.kernels.build import ABI_VERSION, LIBRARY_NAME, SOURCE_DIR, source_hash

__all__ = ["ISA_NAMES", "LIBRARY_PATH", "GradArgs", "MagnitudeArgs", "Native", "OutputArgs", "load"]

#: Where the build puts the library: inside the package, next to this file (editable and wheel installs alike).
LIBRARY_PATH = Path(__file__).resolve().parent / LIBRARY_NAME

#: hs_select_isa codes.
ISA_NAMES = {"baseline": 0, "avx2": 1, "avx512": 2}

_p = ctypes.c_void_p
_i32 = ctypes.c_int32
_i64 = ctypes.c_int64
_f64 = ctypes.c_double


class OutputArgs(ctypes.Structure):
    """``hs_output_args``: the arguments of ``hs_output_stats`` but ``x``, for ``hs_output_stats_prepared``."""

    _fields_ = [
        ("outer", _i64), ("units", _i64), ("inner", _i64),
        ("positive", _p), ("saturated", _p), ("nonfinite", _p),
        ("lower", _f64), ("upper", _f64),
        ("dtype", _i32), ("bounds", _i32), ("threads", _i32), ("reserved", _i32),
    ]  # fmt: skip


class GradArgs(ctypes.Structure):
    """``hs_grad_args``: the arguments of ``hs_grad_stats`` but ``g``, for ``hs_grad_stats_prepared``."""

    _fields_ = [
        ("n", _i64), ("sumsq", _p), ("nonfinite", _p), ("scale", _f64), ("scale_ptr", _p),
        ("dtype", _i32), ("scale_dtype", _i32), ("threads", _i32), ("reserved", _i32),
    ]  # fmt: skip


class MagnitudeArgs(ctypes.Structure):
    """``hs_magnitude_args``: the arguments of ``hs_magnitude_stats_prepared`` but ``x``."""

    _fields_ = [
        ("outer", _i64), ("units", _i64), ("inner", _i64),
        ("count", _p), ("abs_sum", _p), ("sq_sum", _p), ("abs_max", _p), ("sum", _p), ("quad_sum", _p),
        ("zeros", _p), ("positive", _p), ("saturated", _p), ("nonfinite", _p),
        ("lower", _f64), ("upper", _f64),
        ("dtype", _i32), ("bounds", _i32), ("threads", _i32), ("reserved", _i32),
    ]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Native:
    """The loaded library and its entry points (ctypes function objects with their argument types set)."""

    path: Path
    output_stats: Any
    grad_stats: Any
    output_prepared: Any
    grad_prepared: Any
    dead_units: Any
    param_stats: Any
    magnitude_prepared: Any
    openmp: bool
    _lib: ctypes.CDLL

    def isa(self) -> str:
        """The instruction set in use ("avx512": AVX2 and, for the magnitude pass, AVX-512; "avx2"; "baseline")."""
        return str(self._lib.hs_isa().decode())

    def select_isa(self, name: str) -> str:
        """Use the ``name`` instruction set ("baseline", "avx2" or "avx512" where the CPU has it, else the best below
        it, or "best"); returns the one in use. Tests run each."""
        code = -1 if name == "best" else ISA_NAMES[name]
        self._lib.hs_select_isa(code)
        return self.isa()


def load(path: Path = LIBRARY_PATH) -> tuple[Native | None, str | None]:
    """Load the library: ``(native, None)``, or ``(None, reason)`` saying why it cannot be used."""
    if not path.exists():
        return None, (
            f"{path.name} was not built (no C compiler when hookscope was installed?); install a C compiler and "
            f"reinstall, or run `python -m hookscope.kernels`"
        )
    try:
        lib = ctypes.CDLL(str(path))
        lib.hs_abi_version.restype = _i32
        lib.hs_abi_version.argtypes = []
        version = int(lib.hs_abi_version())
    except (OSError, AttributeError) as e:
        return None, f"{path} does not load ({e})"
    if version != ABI_VERSION:
        return None, f"{path} has ABI version {version}, this hookscope needs {ABI_VERSION}; reinstall hookscope"
    lib.hs_source_hash.restype = ctypes.c_char_p
    lib.hs_source_hash.argtypes = []
    built = lib.hs_source_hash().decode()
    expected = source_hash(SOURCE_DIR)
    if expected is not None and built != expected:
        return None, (
            f"{path} was built from other sources than those in {SOURCE_DIR} (hash {built or 'none'}, sources "
            f"{expected}); rebuild it with `python -m hookscope.kernels` or `pip install -e .`"
        )
    lib.hs_isa.restype = ctypes.c_char_p
    lib.hs_isa.argtypes = []
    lib.hs_select_isa.restype = _i32
    lib.hs_select_isa.argtypes = [_i32]
    lib.hs_openmp.restype = _i32
    lib.hs_openmp.argtypes = []
    out = lib.hs_output_stats
    out.restype = _i32
    # x, dtype, outer, units, inner, positive, saturated, bounds, lower, upper, nonfinite, threads
    out.argtypes = [_p, _i32, _i64, _i64, _i64, _p, _p, _i32, _f64, _f64, _p, _i32]
    grad = lib.hs_grad_stats
    grad.restype = _i32
    # g, dtype, n, sumsq, scale, scale_ptr, scale_dtype, nonfinite, threads
    grad.argtypes = [_p, _i32, _i64, _p, _f64, _p, _i32, _p, _i32]
    out_prepared = lib.hs_output_stats_prepared
    out_prepared.restype = _i32
    out_prepared.argtypes = [_p, _p]  # x, &hs_output_args
    grad_prepared = lib.hs_grad_stats_prepared
    grad_prepared.restype = _i32
    grad_prepared.argtypes = [_p, _p]  # g, &hs_grad_args
    dead = lib.hs_dead_units
    dead.restype = _i32
    # T, U, S, positive, pos_stride, elements, el_stride, owners, inverse, steps, first, window, evidence,
    # fired_at, silent, commit, revivals, last_revival, died_at, last_fired, out
    dead.argtypes = [_i64, _i64, _i64, _p, _i64, _p, _i64, _p, _p, _p, _f64, _f64, _f64, _p, _p, _i32, *[_p] * 5]
    params = lib.hs_param_stats
    params.restype = _i32
    # n, theta[], prev[], grad[], sizes[], dtypes[], out, threads
    params.argtypes = [_i64, _p, _p, _p, _p, _p, _p, _i32]
    magnitude = lib.hs_magnitude_stats_prepared
    magnitude.restype = _i32
    magnitude.argtypes = [_p, _p]  # x, &hs_magnitude_args
    openmp = bool(lib.hs_openmp())
    return Native(path, out, grad, out_prepared, grad_prepared, dead, params, magnitude, openmp, lib), None
