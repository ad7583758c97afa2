"""Sinks: destinations that receive the rows of closed steps while training runs.

A sink knows nothing of the manager that feeds it: it receives frames, and may ask its source (a
:class:`SinkSource`, bound once with :meth:`Sink.bind`) for the per-unit timeline, nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from hookscope.checks import check_int
from hookscope.errors import ConfigTypeError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Sink", "SinkSource", "sinks_of"]


class SinkSource(Protocol):
    """What a sink may ask of the manager that feeds it."""

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns of every frame the sink will receive, in order (known when the sink is bound)."""
        ...

    def unit_timeline(self, layer: str | None = None) -> pd.DataFrame:
        """Per-unit history of the rectifier layers (see ``HookManager.unit_timeline``)."""
        ...


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
        self.every = check_int("every", every, minimum=1, meaning="steps between writes")
        self.source: SinkSource | None = None

    def bind(self, source: SinkSource) -> None:
        """Called once by the manager that owns the sink."""
        self.source = source

    def write(self, frame: pd.DataFrame) -> None:
        """Receive the rows of the closed steps since the last write."""
        raise NotImplementedError

    def close(self) -> None:
        """Make everything written durable and release resources."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(every={self.every})"


def sinks_of(sinks: object) -> list[Sink]:
    """Check ``HookManager(sinks=...)``: one sink or an iterable of them."""
    if isinstance(sinks, Sink):
        return [sinks]
    if isinstance(sinks, (str, bytes)) or not isinstance(sinks, Iterable):
        raise ConfigTypeError(
            f"`sinks` must be a list of hookscope Sink instances (e.g. [CSVSink(path)]), got {sinks!r}"
        )
    out = list(sinks)
    for sink in out:
        if not isinstance(sink, Sink):
            raise ConfigTypeError(f"`sinks` must hold hookscope Sink instances (e.g. CSVSink), got {sink!r}")
    return out
