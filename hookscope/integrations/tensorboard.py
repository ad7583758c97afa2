"""TensorBoard: per-layer scalars (and optionally histograms of per-unit activity) through a ``SummaryWriter``."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np
import pandas as pd

from hookscope.checks import check_bool, describe
from hookscope.errors import ConfigError, ConfigPathError, ConfigTypeError, StateError
from hookscope.integrations._logging import param_scalars, records_params
from hookscope.report import ROW_COLUMNS, STAT_COLUMNS, check_stat_names, scalars, stat_names
from hookscope.sinks import Sink, SinkSource
from hookscope.warn import warn_once

__all__ = ["TensorBoardSink"]

INSTALL_HINT = "pip install 'hookscope[tensorboard]'"


def _summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch raises ImportError (not ModuleNotFoundError) for a too old tensorboard
        raise ModuleNotFoundError(
            f"the TensorBoard sink needs tensorboard: {INSTALL_HINT} (or pip install tensorboard)"
        ) from e
    return SummaryWriter


class TensorBoardSink(Sink):
    """Writes ``hookscope/{layer}/{stat}`` scalars for every recorded step, every ``every`` steps.

    When the manager records parameter statistics (``HookManager(params=True)``), their
    ``hookscope/params/{module}/{stat}`` scalars (``weight_norm``, ``grad_norm``, ``update_ratio``) are written
    too, at the same writes, for the closed steps up to the last one in the frame (read from the manager's
    ``param_frame()``: the frames a sink receives hold activation rows only).

    Failures of the environment (a full disk, a removed log directory) never stop training: the sink warns once
    (naming the log directory and the error), releases the writer it created and writes no more; the statistics
    stay available in memory through the manager's reports.

    Args:
        writer: A log directory (str or ``os.PathLike``) to create a ``torch.utils.tensorboard.SummaryWriter``
            in, or a writer object with ``add_scalar`` (a ``SummaryWriter``, a tensorboardX writer...; it needs
            ``add_histogram`` too with ``histograms=True``). A writer passed in is flushed, never closed.
        every: Steps between writes.
        stats: Column or columns to write: the built-in statistics
            (:data:`~hookscope.report.STAT_COLUMNS`) and the columns of custom collectors, checked when the sink
            is bound to its manager (NaN values are skipped).
        histograms: Also write, at each write, a histogram per rectifier layer of the steps since each unit
            last fired (``hookscope/{layer}/steps_since_fired``; units that never fired count as
            ``step + 1``). Needs a ``DeadReLU`` collector.

    Raises:
        ModuleNotFoundError: A log directory is given and tensorboard is not installed (with the pip hint).
        ConfigTypeError: ``writer``, ``stats`` or ``histograms`` has the wrong type.
        ConfigPathError: The log directory cannot be created (also an ``OSError``).
        ConfigError: ``stats`` names a column that is not a statistic (at bind: not one of the manager's), or
            ``histograms=True`` without a ``DeadReLU`` collector (at bind).
    """

    def __init__(
        self,
        writer: Any,
        every: int = 100,
        stats: str | tuple[str, ...] | list[str] = STAT_COLUMNS,
        histograms: bool = False,
    ) -> None:
        super().__init__(every)
        self.stats = stat_names(stats)
        check_stat_names(self.stats, STAT_COLUMNS, final=False)
        self.histograms = check_bool("histograms", histograms, meaning="write steps-since-fired histograms")
        self._owns = isinstance(writer, (str, os.PathLike))
        if not self._owns:
            needed = ("add_scalar", "add_histogram") if self.histograms else ("add_scalar",)
            missing = [name for name in needed if not callable(getattr(writer, name, None))]
            if missing:
                raise ConfigTypeError(
                    f"`writer` must be a log directory (str or os.PathLike) or a SummaryWriter-like object with "
                    f"{' and '.join(needed)}, got {describe(writer)} (it has no {', '.join(missing)})"
                )
        self.writer = self._create(writer) if self._owns else writer
        self._stopped = False
        self._params_written = -1  # the last step whose parameter statistics were written

    @staticmethod
    def _create(log_dir: str | os.PathLike[str]) -> Any:
        summary_writer = _summary_writer()
        try:
            return summary_writer(log_dir=os.fspath(log_dir))
        except OSError as e:
            raise ConfigPathError(
                f"`writer` must be a log directory that can be created and written, got {describe(log_dir)}: {e}"
            ) from e

    @property
    def _where(self) -> str:
        log_dir = getattr(self.writer, "log_dir", None)
        return f"log directory {str(log_dir)!r}" if log_dir is not None else f"writer {describe(self.writer)}"

    def bind(self, source: SinkSource) -> None:
        """Check ``stats`` against the manager's columns (and, with ``histograms``, that it records dead units).

        Raises:
            ConfigError: A name in ``stats`` is not one of the manager's statistic columns, or ``histograms``
                is set and the manager has no ``DeadReLU`` collector.
        """
        columns = tuple(source.columns)
        check_stat_names(self.stats, tuple(c for c in columns if c not in ROW_COLUMNS), final=True)
        if self.histograms:
            try:
                source.unit_timeline()
            except StateError as e:
                raise ConfigError(f"`histograms=True` needs the units' history: {e}") from e
        super().bind(source)

    def write(self, frame: pd.DataFrame) -> None:
        if self._stopped:
            return
        try:
            for tag, step, value in scalars(frame, self.stats):
                self.writer.add_scalar(tag, value, global_step=step)
            source = self.source
            if source is not None and records_params(source) and len(frame):
                self._write_params(source, int(frame["step"].to_numpy().max()))
            if self.histograms and source is not None and len(frame):
                step = int(frame["step"].to_numpy().max())
                timeline = source.unit_timeline()
                for layer, units in timeline.groupby("layer", sort=False):
                    last = units["last_fired"].to_numpy(dtype=float)
                    since = np.where(np.isnan(last), step + 1, step - last)
                    self.writer.add_histogram(f"hookscope/{layer}/steps_since_fired", since, global_step=step)
            self._flush()
        except OSError as e:
            self._stop(e)

    def _write_params(self, source: SinkSource, last: int) -> None:
        """Write the parameter statistics of the steps after those written already, up to ``last``."""
        params = source.param_frame()  # type: ignore[attr-defined]
        steps = params["step"]
        new = params[(steps > self._params_written) & (steps <= last)]
        for tag, step, value in param_scalars(new):
            self.writer.add_scalar(tag, value, global_step=step)
        if len(new):
            self._params_written = int(new["step"].max())

    def _flush(self) -> None:
        flush = getattr(self.writer, "flush", None)
        if callable(flush):
            flush()

    def _stop(self, error: OSError) -> None:
        """Warn once, release the writer we created and write no more."""
        self._stopped = True
        if self._owns:
            with contextlib.suppress(OSError):
                self.writer.close()
        warn_once(
            f"hookscope: TensorBoardSink stopped writing to {self._where}: {error}. Later steps are not written "
            "there. The statistics stay available in memory through the manager's reports "
            "(HookManager.to_dataframe(), .to_csv(); the last `max_history` steps)."
        )

    def close(self) -> None:
        """Flush the writer, and close it if the sink created it (idempotent)."""
        if self._stopped:
            return
        try:
            self._flush()
            if self._owns:
                self.writer.close()
        except OSError as e:
            self._stop(e)

    def __repr__(self) -> str:
        return f"TensorBoardSink({self._where}, every={self.every})"
