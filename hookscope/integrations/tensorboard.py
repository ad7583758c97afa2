"""TensorBoard: per-layer scalars (and optionally histograms of per-unit activity) through a ``SummaryWriter``."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd

from hookscope.report import STAT_COLUMNS, scalars
from hookscope.sinks import Sink

__all__ = ["TensorBoardSink"]


def _summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the TensorBoard sink needs tensorboard: pip install 'hookscope[tensorboard]' (or pip install tensorboard)"
        ) from e
    return SummaryWriter


class TensorBoardSink(Sink):
    """Writes ``hookscope/{layer}/{stat}`` scalars for every recorded step, every ``every`` steps.

    Args:
        writer: A ``torch.utils.tensorboard.SummaryWriter``, or a log directory to create one in.
        every: Steps between writes.
        stats: Columns to write (NaN values are skipped).
        histograms: Also write, at each write, a histogram per rectifier layer of the steps since each unit
            last fired (``hookscope/{layer}/steps_since_fired``; units that never fired count as
            ``step + 1``).

    Raises:
        ModuleNotFoundError: tensorboard is not installed (with the pip hint).
    """

    def __init__(
        self,
        writer: Any,
        every: int = 100,
        stats: tuple[str, ...] = STAT_COLUMNS,
        histograms: bool = False,
    ) -> None:
        super().__init__(every)
        summary_writer = _summary_writer()
        self._owns = isinstance(writer, (str, os.PathLike))
        self.writer = summary_writer(log_dir=os.fspath(writer)) if self._owns else writer
        self.stats = tuple(stats)
        self.histograms = histograms

    def write(self, frame: pd.DataFrame) -> None:
        for tag, step, value in scalars(frame, self.stats):
            self.writer.add_scalar(tag, value, global_step=step)
        if self.histograms and self.source is not None and len(frame):
            step = int(frame["step"].to_numpy().max())
            timeline = self.source.unit_timeline()
            for layer, units in timeline.groupby("layer", sort=False):
                last = units["last_fired"].to_numpy(dtype=float)
                since = np.where(np.isnan(last), step + 1, step - last)
                self.writer.add_histogram(f"hookscope/{layer}/steps_since_fired", since, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()
        if self._owns:
            self.writer.close()
