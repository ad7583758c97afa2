"""The flight recorder: a sink that keeps the last steps in memory and writes them to a file when an alert fires.

What people most want from a monitor on a long run is what the layers looked like *just before* a loss spike or a
NaN. A :class:`FlightRecorder` keeps the rows of the latest recorded steps (every column, every layer, and the
parameter statistics when the manager records them) and, when any alert fires, writes them with the alert into
``directory/flight-<step>.csv``: the report columns (``hookscope show`` / ``hookscope plot`` read it), after comment
lines (``# ...``) that name the alerts. Parameter statistics go to ``flight-<step>.params.csv`` beside it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hookscope.checks import check_int, describe
from hookscope.errors import ConfigPathError, ConfigTypeError
from hookscope.files import PathLike, atomic_write_text
from hookscope.integrations._logging import records_params
from hookscope.sinks import Sink, SinkSource
from hookscope.warn import warn_once

if TYPE_CHECKING:
    import pandas as pd

    from hookscope.alerts import Alert

__all__ = ["FlightRecorder"]


class FlightRecorder(Sink):
    """Keep the last ``steps`` recorded steps and write them to ``directory/flight-<step>.csv`` when an alert fires.

    The file holds at least the ``steps`` recorded steps up to and including the alert's step (and the steps the
    recorder received after it, up to the check that found the alert), every column and layer, preceded by one
    ``# hookscope flight recorder: ...`` comment line per alert of that check. It is written atomically; at most one
    dump is written per ``steps`` steps (the alerts in between are reported as usual, without a file). A full disk
    or an unwritable directory warns once and never stops training.

    The recorder receives rows like any sink, every ``steps`` steps (one host transfer), and at each alert check
    that fires (so that the dump holds the steps up to the check). Because spike alerts name a step that may lie up
    to one alert period (``Alerts.every``) before the check, it keeps ``steps + Alerts.every`` steps.

    Args:
        directory: Where the files go; created if missing.
        steps: Recorded steps kept and dumped, and the smallest distance between two dumps.

    Raises:
        ConfigTypeError: ``directory`` is not a str or ``os.PathLike``.
        ConfigPathError: ``directory`` cannot be created or is not a writable directory.
        ConfigError: ``steps`` < 1.

    Example:
        >>> import tempfile
        >>> FlightRecorder(tempfile.mkdtemp(), steps=32)  # doctest: +ELLIPSIS
        FlightRecorder('...', steps=32)
    """

    def __init__(self, directory: PathLike, steps: int = 64) -> None:
        self.steps = check_int("steps", steps, minimum=1, meaning="recorded steps kept before an alert")
        super().__init__(every=self.steps)
        if not isinstance(directory, (str, os.PathLike)):
            raise ConfigTypeError(f"`directory` must be a str or os.PathLike, got {describe(directory)}")
        self.directory = Path(os.fspath(directory))
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigPathError(f"`directory` {str(self.directory)!r} cannot be created: {e}") from e
        if not self.directory.is_dir() or not os.access(self.directory, os.W_OK | os.X_OK):
            raise ConfigPathError(f"`directory` {str(self.directory)!r} must be a writable directory")
        self._keep = self.steps
        self._frames: list[pd.DataFrame] = []
        self._last_dump: int | None = None
        self.dumps: list[Path] = []  # the files written so far

    def bind(self, source: SinkSource) -> None:
        super().bind(source)
        alerts = getattr(source, "alerts", None)
        self._keep = self.steps + int(getattr(alerts, "every", 0) or 0)

    def write(self, frame: pd.DataFrame) -> None:
        """Keep the rows; drop the steps older than the ones kept."""
        import pandas as pd

        if not len(frame):
            return
        self._frames.append(frame)
        whole = pd.concat(self._frames, ignore_index=True) if len(self._frames) > 1 else frame
        steps = whole["step"].unique()
        if len(steps) > self._keep:
            whole = whole[whole["step"] >= sorted(steps)[-self._keep]].reset_index(drop=True)
        self._frames = [whole]

    def alerted(self, alerts: list[Alert]) -> None:
        """Dump the kept steps for the first alert of a check (at most one dump per ``steps`` steps)."""
        if not alerts:
            return
        step = min(a.step for a in alerts)
        if self._last_dump is not None and step < self._last_dump + self.steps:
            return
        self._last_dump = step
        frame = self._frames[0] if self._frames else None
        path = self.directory / f"flight-{step}.csv"
        try:
            if frame is not None and len(frame):
                kept = sorted(s for s in frame["step"].unique() if s <= step)[-self.steps :]
                start = kept[0] if kept else step
                frame = frame[frame["step"] >= start]
            # one line each, no double quote (a CSV reader would open a quoted field)
            texts = [a.message.replace("\n", " ").replace('"', "'") for a in alerts]
            lines = [f"# hookscope flight recorder: {text}\n" for text in texts]
            body = frame.to_csv(index=False, lineterminator="\n") if frame is not None else ""
            atomic_write_text(path, "".join(lines) + body)
            self.dumps.append(path)
            params = self._params_frame(start if frame is not None and len(frame) else step)
            if params is not None:
                atomic_write_text(path.with_suffix(".params.csv"), params.to_csv(index=False, lineterminator="\n"))
        except OSError as e:
            warn_once(f"hookscope: FlightRecorder could not write {str(path)!r}: {e}; training goes on without it")

    def _params_frame(self, start: int) -> pd.DataFrame | None:
        source = self.source
        if source is None or not records_params(source):
            return None
        frame: pd.DataFrame = source.param_frame()  # type: ignore[attr-defined]
        return frame[frame["step"] >= start]

    def state_dict(self) -> dict[str, Any]:
        frame = self._frames[0] if self._frames else None
        rows = None if frame is None else {str(k): list(v) for k, v in frame.to_dict("list").items()}
        return {"last_dump": self._last_dump, "rows": rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import pandas as pd

        last, rows = state.get("last_dump"), state.get("rows")
        self._last_dump = last if isinstance(last, int) else None
        self._frames = [pd.DataFrame(rows)] if isinstance(rows, dict) and rows else []

    def resume_from(self, step: int) -> None:
        if self._frames:
            frame = self._frames[0]
            self._frames = [frame[frame["step"] < step].reset_index(drop=True)]

    def __repr__(self) -> str:
        return f"FlightRecorder({str(self.directory)!r}, steps={self.steps})"
