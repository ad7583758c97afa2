"""Re-export of :class:`hookscope.sinks.Sink` (its former home)."""

from __future__ import annotations

from hookscope.sinks import Sink, SinkSource

__all__ = ["Sink", "SinkSource"]
