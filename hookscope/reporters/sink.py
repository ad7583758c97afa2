"""Sinks: destinations that receive the rows of closed steps while training runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from hookscope.errors import ConfigError, ConfigTypeError

if TYPE_CHECKING:
    from hookscope.manager import HookManager

__all__ = ["Sink"]


class Sink:
    """Base class of sinks given to ``HookManager(sinks=[...])``.

    Every ``every`` closed steps the manager hands :meth:`write` one frame with the rows of those steps (the
    values reach the host then: one synchronisation per ``every`` steps); :meth:`close` runs when the manager
    detaches, after a last :meth:`write` of what is left. Under ``torch.distributed`` only rank zero writes
    (the values are global), unless :attr:`all_ranks` is set.

    Args:
        every: Steps between writes (a crash loses at most this many steps).
    """

    all_ranks = False

    def __init__(self, every: int = 100) -> None:
        if isinstance(every, bool) or not isinstance(every, int):
            raise ConfigTypeError(f"`every` must be an int >= 1, got {every!r}")
        if every < 1:
            raise ConfigError(f"`every` must be >= 1 (steps between writes), got {every}")
        self.every = every
        self.manager: HookManager | None = None

    def bind(self, manager: HookManager) -> None:
        """Called once by the manager that owns the sink."""
        self.manager = manager

    def write(self, frame: pd.DataFrame) -> None:
        """Receive the rows of the closed steps since the last write."""
        raise NotImplementedError

    def close(self) -> None:
        """Make everything written durable and release resources."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(every={self.every})"
