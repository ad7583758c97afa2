"""Feeding the sinks: the closed steps each sink has not received yet, when each writes next, and the alerts that
some sinks (the flight recorder) act on.

A sink writes every ``every`` training steps (recorded or not): its rows wait here as records, whose values reach
the host only when the sink writes. Under ``torch.distributed`` only rank zero writes, unless the sink asks
otherwise (``Sink.all_ranks``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hookscope import distributed
from hookscope.sinks import Sink

if TYPE_CHECKING:
    from hookscope.alerts import Alert
    from hookscope.history import StepRecord
    from hookscope.recording import Recorder

__all__ = ["SinkFeed"]


class SinkFeed:
    """The closed steps waiting for each of a manager's sinks, and when each writes next.

    Args:
        sinks: The manager's sinks.
        recorder: Its recorder (flushed before a write; it builds the frames).
    """

    def __init__(self, sinks: Sequence[Sink], recorder: Recorder) -> None:
        self.sinks = list(sinks)
        self.recorder = recorder
        self.buffers: list[list[StepRecord]] = [[] for _ in self.sinks]  # closed steps not yet written
        #: The step at which each sink writes next: it counts training steps, recorded or not.
        self.due = [recorder.step + sink.every - 1 for sink in self.sinks]

    def add(self, record: StepRecord, fired: list[Alert], errors: list[Exception]) -> None:
        """A final closed step (and the alerts its check fired): each sink gets it at its next write; a sink that
        acts on alerts is handed every step up to this one first, then the alerts."""
        for i, sink in enumerate(self.sinks):
            self.buffers[i].append(record)
            listens = bool(fired) and type(sink).alerted is not Sink.alerted
            if record.step >= self.due[i]:  # `every` training steps since the last write
                self.due[i] = record.step + sink.every
                self.write(i, errors)
            elif listens:
                self.write(i, errors)
            if listens and self.writes(sink):
                try:
                    sink.alerted(list(fired))
                except Exception as e:  # user code: raised at the end of step()
                    errors.append(e)

    @staticmethod
    def writes(sink: Sink) -> bool:
        return sink.all_ranks or distributed.rank() == 0

    def write(self, i: int, errors: list[Exception]) -> None:
        """Hand sink ``i`` the closed steps it has not received yet (rank zero only, unless it asks otherwise).

        When the sink raises, its rows are kept and handed to it again at its next write, and the error goes to
        ``errors``; so does an error of a collector when the ring is flushed first.
        """
        try:
            self.recorder.flush()
        except Exception as e:
            errors.append(e)
        records, self.buffers[i] = self.buffers[i], []
        sink = self.sinks[i]
        if records and self.writes(sink):
            try:
                sink.write(self.recorder.frame(records))
            except Exception as e:
                self.buffers[i][:0] = records
                errors.append(e)
