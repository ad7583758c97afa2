"""Sinks: destinations that receive the rows of closed steps while training runs.

A sink knows nothing of the manager that feeds it: it receives frames, and may ask its source (a
:class:`SinkSource`, bound once with :meth:`Sink.bind`) for the per-unit timeline, nothing else.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from hookscope.checks import check_int, describe
from hookscope.errors import ConfigError, ConfigTypeError, StateError

if TYPE_CHECKING:
    import pandas as pd

    from hookscope.alerts import Alert

__all__ = ["Sink", "SinkSource", "sinks_of"]


class SinkSource(Protocol):
    """What a sink may ask of the manager that feeds it.

    A source may also record parameter statistics: then it has ``params`` set to ``True`` and a
    ``param_frame()`` method (``HookManager(params=True)``). These are optional, so they are not members of the
    protocol: a sink looks for them with ``getattr`` (see ``hookscope.integrations._logging.records_params``) and
    asks for ``param_frame()`` only when ``params`` is ``True``.
    """

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

    A sink belongs to one manager: binding it to a second one while the first is alive is an error. It holds its
    source by a weak reference (when the source allows it), so a sink never keeps a dropped manager alive.

    Args:
        every: Training steps between writes, recorded or not (a crash loses at most this many steps).
    """

    all_ranks = False

    def __init__(self, every: int = 100) -> None:
        self.every = check_int("every", every, minimum=1, meaning="steps between writes")
        self._source: Callable[[], SinkSource | None] = lambda: None

    @property
    def source(self) -> SinkSource | None:
        """The manager that feeds this sink (``None`` before :meth:`bind`, or once that manager is gone)."""
        return self._source()

    @source.setter
    def source(self, source: SinkSource | None) -> None:
        if source is None:
            self._source = lambda: None
            return
        try:
            self._source = weakref.ref(source)
        except TypeError:  # a source without weak references: hold it
            self._source = lambda: source

    def bind(self, source: SinkSource) -> None:
        """Called once by the manager that owns the sink, in its constructor. Subclasses check there what needs
        the source (its columns), so that a mistake raises before training starts.

        Raises:
            StateError: The sink is already bound to another source that is still alive.
        """
        current = self.source
        if current is not None and current is not source:
            raise StateError(
                f"{self!r} already feeds another HookManager; a sink belongs to one manager: give this one a sink "
                "of its own (or detach the other manager and drop it first)"
            )
        self.source = source

    def write(self, frame: pd.DataFrame) -> None:
        """Receive the rows of the closed steps since the last write."""
        raise NotImplementedError

    def close(self) -> None:
        """Make everything written durable and release resources."""

    def resume_from(self, step: int) -> None:
        """The manager continues a run at ``step`` (``start_step``, or a loaded state): rows this sink kept of that
        step and later ones belong to the interrupted run's future, and are dropped (``CSVSink``). Nothing by
        default."""

    def alerted(self, alerts: list[Alert]) -> None:
        """New alerts of one check, after every step up to the one checked was handed to :meth:`write` (the
        ``FlightRecorder`` dumps then). Nothing by default."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs of this sink (``HookManager.state_dict``): tensors and plain values."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

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
    seen: dict[int, int] = {}  # id -> first position
    for i, sink in enumerate(out):
        if not isinstance(sink, Sink):
            raise ConfigTypeError(f"`sinks` must hold hookscope Sink instances (e.g. CSVSink), got {describe(sink)}")
        first = seen.setdefault(id(sink), i)
        if first != i:
            raise ConfigError(
                f"`sinks` must hold each sink once, got {describe(sink)} at positions {first} and {i}; "
                "a sink listed twice would receive every row twice"
            )
    return out
