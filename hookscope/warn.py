"""Warnings issued once per cause."""

from __future__ import annotations

import warnings

__all__ = ["HookscopeWarning", "warn_once"]

_seen: set[str] = set()


class HookscopeWarning(UserWarning):
    """A problem hookscope noticed while recording (a site skipped, a pattern that matched nothing...)."""


def warn_once(message: str, stacklevel: int = 2) -> None:
    """Warn with ``message`` the first time this process sees it (on rank zero only under torch.distributed)."""
    import torch.distributed as dist

    if message in _seen or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        return
    _seen.add(message)
    warnings.warn(message, HookscopeWarning, stacklevel=stacklevel + 1)
