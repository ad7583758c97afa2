"""Argument checks with the house message: the argument, the value received, what is allowed.

Every public entry point checks its arguments up front with these helpers, so that a mistake raises when the
object is built (never from inside a hook or from ``step()`` in the middle of training) and reads the same
everywhere. A wrong type raises :class:`~hookscope.errors.ConfigTypeError` (a ``TypeError``), a value out of
range :class:`~hookscope.errors.ConfigError` (a ``ValueError``).

Example:
    >>> check_int("every", 4, minimum=1, meaning="record one step in `every`")
    4
    >>> check_int("every", 0, minimum=1)
    Traceback (most recent call last):
    ...
    hookscope.errors.ConfigError: `every` must be an int >= 1, got 0
"""

from __future__ import annotations

import math
import numbers
from typing import Literal, overload

from hookscope.errors import ConfigError, ConfigTypeError

__all__ = ["check_bool", "check_int", "check_number", "describe"]


def describe(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _message(arg: str, allowed: str, value: object, meaning: str) -> str:
    hint = f" ({meaning})" if meaning else ""
    return f"`{arg}` must be {allowed}{hint}, got {describe(value)}"


@overload
def check_int(
    arg: str, value: object, *, minimum: int = ..., meaning: str = ..., optional: Literal[False] = False
) -> int: ...
@overload
def check_int(
    arg: str, value: object, *, minimum: int = ..., meaning: str = ..., optional: Literal[True]
) -> int | None: ...
def check_int(arg: str, value: object, *, minimum: int = 1, meaning: str = "", optional: bool = False) -> int | None:
    """``value`` as an int >= ``minimum``; ``None`` passes when ``optional``. Integral numpy scalars are accepted
    (``np.int64(4)``); booleans and floats are not.

    Raises:
        ConfigTypeError: Not an integer (nor ``None`` when ``optional``).
        ConfigError: Below ``minimum``.
    """
    allowed = f"{'None or ' if optional else ''}an int >= {minimum}"
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigTypeError(_message(arg, allowed, value, meaning))
    number = int(value)
    if number < minimum:
        raise ConfigError(_message(arg, allowed, value, meaning))
    return number


def check_bool(arg: str, value: object, meaning: str = "") -> bool:
    """``value`` if it is ``True`` or ``False``.

    Raises:
        ConfigTypeError: Anything else (``1``, ``"yes"``, ``None``).
    """
    if not isinstance(value, bool):
        raise ConfigTypeError(_message(arg, "True or False", value, meaning))
    return value


def check_number(
    arg: str,
    value: object,
    *,
    low: float,
    high: float,
    low_open: bool = True,
    high_open: bool = False,
    meaning: str = "",
) -> float:
    """``value`` as a float in the interval from ``low`` to ``high`` (open or closed at each end), NaN never;
    integral and real numpy scalars are accepted, booleans are not.

    Raises:
        ConfigTypeError: Not a real number.
        ConfigError: NaN or outside the interval.
    """
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    allowed = f"a number in {interval}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigTypeError(_message(arg, allowed, value, meaning))
    number = float(value)
    below = number <= low if low_open else number < low
    above = number >= high if high_open else number > high
    if math.isnan(number) or below or above:
        raise ConfigError(_message(arg, allowed, value, meaning))
    return number
