"""Dtype numerics: exact counts and exact thresholds in low precision.

Statistics count with float reductions (several times faster than reducing boolean masks) and compare outputs
with thresholds in the output's own dtype; both must be exact. :func:`count_dtype` picks a dtype in which a sum
of 0/1 values is exact; :func:`round_to_dtype` and :func:`strict_threshold` turn a threshold into a value of the
output's dtype such that one comparison gives exactly the intended inequality, whatever precision the comparison
kernel uses (0.99 is not rounded to bf16's 0.98828125).
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

__all__ = ["count_dtype", "round_to_dtype", "strict_threshold"]

#: Largest count that float32 sums exactly (every partial sum of 0/1 values is an integer up to it).
_EXACT_F32 = 2**24


def count_dtype(n: int) -> torch.dtype:
    """The dtype in which a sum of ``n`` values of 0 or 1 is exact and cheapest: float32 up to 2**24 terms."""
    return torch.float32 if n <= _EXACT_F32 else torch.float64


def _f32_bits(x: float) -> int:
    return int(struct.unpack("<I", struct.pack("<f", x))[0])


def _bits_f32(b: int) -> float:
    return float(struct.unpack("<f", struct.pack("<I", b & 0xFFFFFFFF))[0])


def round_to_dtype(t: float, dtype: torch.dtype, up: bool) -> float | None:
    """The smallest (``up``) or largest value representable in ``dtype`` that is >= t (resp. <= t).

    Comparing an output ``y`` of that dtype with the returned value gives exactly ``y >= t`` (resp. ``y <= t``),
    whatever precision the comparison kernel uses. ``None`` for dtypes handled by upcasting.
    """
    direction = np.inf if up else -np.inf
    if dtype == torch.float64:
        return t
    if dtype in (torch.float32, torch.float16):
        npt = np.float32 if dtype == torch.float32 else np.float16
        v = npt(t)
        if (up and float(v) < t) or (not up and float(v) > t):
            v = np.nextafter(v, npt(direction))
        return float(v)
    if dtype == torch.bfloat16:
        f = np.float32(t)
        if (up and float(f) < t) or (not up and float(f) > t):
            f = np.nextafter(f, np.float32(direction))
        bits = _f32_bits(float(f))
        low = bits & 0xFFFF
        trunc = bits & 0xFFFF0000  # rounds toward zero
        if low == 0:
            return _bits_f32(trunc)
        negative = bool(bits & 0x80000000)
        away = up != negative  # rounding up a positive (or down a negative) number moves away from zero
        return _bits_f32(trunc + 0x10000 if away else trunc)
    return None


def _step_bf16(v: float, up: bool) -> float:
    """The bf16 value next to ``v`` (itself a bf16 value), towards +inf (``up``) or -inf."""
    if v == 0.0:
        return _bits_f32(0x00010000 if up else 0x80010000)
    bits = _f32_bits(v)
    positive = not bits & 0x80000000
    return _bits_f32(bits + 0x10000 if up == positive else bits - 0x10000)


def strict_threshold(t: float, dtype: torch.dtype, above: bool) -> float | None:
    """A value ``s`` of ``dtype`` with ``y > s`` exactly when ``y >= t`` (``above``), or ``y < s`` exactly when
    ``y <= t`` (not ``above``), for every ``y`` of that dtype. ``None`` for dtypes handled by upcasting.

    Statistics count ``y >= t`` as ``sign(max(y - s, 0))``, a float formulation that is several times faster than
    a boolean mask reduction; the sign of ``y - s`` is exact in IEEE arithmetic.
    """
    r = round_to_dtype(t, dtype, up=not above)  # largest value <= t (above) or smallest >= t
    if r is None or r != t:
        return r
    if dtype == torch.bfloat16:
        return _step_bf16(r, up=not above)
    if dtype == torch.float64:
        return math.nextafter(r, -math.inf if above else math.inf)
    npt = np.float32 if dtype == torch.float32 else np.float16
    return float(np.nextafter(npt(r), npt(-np.inf if above else np.inf)))
