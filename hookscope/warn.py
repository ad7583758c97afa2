"""Warnings issued once per cause."""

from __future__ import annotations

import warnings

__all__ = ["HookscopeWarning", "warn_once"]

_seen: set[str] = set()


class HookscopeWarning(UserWarning):
    """A problem hookscope noticed while recording (a site skipped, a pattern that matched nothing...)."""


def warn_once(message: str, stacklevel: int = 2) -> None:
    """Warn with ``message`` the first time this process sees it."""
    if message in _seen:
        return
    _seen.add(message)
    warnings.warn(message, HookscopeWarning, stacklevel=stacklevel + 1)
