"""Spikes: a value far above its own recent past, in a per-step series (the loss, the total gradient norm, a column
aggregated over layers).

:class:`SpikeRule` follows OLMo-core's stability monitor: a value spikes when it exceeds the mean plus ``sigma``
standard deviations of the previous ``window`` recorded values. A non-finite value is an alert of its own at once
(rule ``nonfinite``, no window needed) and never enters the window.

The series reach the host with the alert checks (:class:`~hookscope.alerts.Alerts` ``every``): ``step(loss=...)``
keeps the loss on its device, and a check reads every value since the previous check in one transfer. An alert's
``step`` is the step whose value spiked, even when the check that sees it comes later.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

from hookscope.alerts import AlertRule, Hit
from hookscope.checks import check_int, check_number, describe
from hookscope.errors import ConfigError, ConfigTypeError, StateError

if TYPE_CHECKING:
    import pandas as pd

    from hookscope.alerts import Alerts
    from hookscope.history import StepRecord
    from hookscope.params import ParamStats

__all__ = ["AGGREGATES", "SERIES_STATS", "Series", "SpikeHit", "SpikeRule"]

#: The series that are not report columns: the loss given to ``step(loss=...)`` and the model's total parameter
#: gradient norm sqrt(Σ over modules of grad_norm²) (``HookManager(params=True)``).
SERIES_STATS = ("loss", "grad_norm")
#: How a report column is aggregated over a step's layers into one value per step.
AGGREGATES: dict[str, Callable[[np.ndarray], float]] = {
    "max": lambda v: float(np.max(v)),
    "mean": lambda v: float(np.mean(v)),
    "min": lambda v: float(np.min(v)),
    "sum": lambda v: float(np.sum(v)),
}

#: ``(step, layer, value, threshold, text)``: a hit that names its own step.
SpikeHit = tuple[int, str, float, float, str]


class SpikeRule(AlertRule):
    """A value above mean + ``sigma`` × std of the previous ``window`` recorded values (population standard
    deviation; the rule waits until it has ``window`` finite values). Non-finite values alert at once as
    ``nonfinite`` and stay out of the window.

    Args:
        stat: ``"loss"`` (the value given to ``HookManager.step(loss=...)``), ``"grad_norm"`` (the model's total
            parameter-gradient norm, needs ``HookManager(params=True)``), or any other statistic column of the report
            (``dead_ratio``, ``saturation_rate``, a custom collector's...) aggregated over the step's layers with
            ``aggregate``.
        sigma: Standard deviations above the mean that count as a spike (OLMo-core uses 6).
        window: Previous values the mean and standard deviation are taken over (OLMo-core uses 128).
        aggregate: For a report column: ``"max"`` (default), ``"mean"``, ``"min"`` or ``"sum"`` over the step's
            layers (NaN values left out).

    Raises:
        ConfigTypeError: ``stat`` is not a str.
        ConfigError: ``sigma`` <= 0, ``window`` < 2, or an unknown ``aggregate``.

    Example:
        >>> SpikeRule("loss", sigma=6.0, window=128)
        SpikeRule(stat='loss', sigma=6.0, window=128)
    """

    name = "spike"
    target = "series"

    def __init__(self, stat: str = "loss", sigma: float = 6.0, window: int = 128, aggregate: str = "max") -> None:
        if not isinstance(stat, str) or not stat:
            raise ConfigTypeError(
                f"`stat` must be a series name ('loss', 'grad_norm') or a report column, got {stat!r}"
            )
        self.stat = stat
        self.sigma = check_number("sigma", sigma, low=0.0, high=math.inf, low_open=True, high_open=True)
        self.window = check_int("window", window, minimum=2, meaning="previous values the spike is measured against")
        if aggregate not in AGGREGATES:
            raise ConfigError(f"`aggregate` must be one of {', '.join(map(repr, AGGREGATES))}; got {aggregate!r}")
        self.aggregate = aggregate
        self._values: deque[float] = deque(maxlen=self.window)

    def observe(self, steps: Iterable[int], values: Iterable[float]) -> list[SpikeHit]:
        """Feed the next values of the series in step order; the hits among them."""
        hits: list[SpikeHit] = []
        for step, value in zip(steps, values):
            if not math.isfinite(value):
                hits.append((step, self.stat, value, math.nan, f"{self.stat} is {value} (non-finite)"))
                continue
            if len(self._values) == self.window:
                past = np.fromiter(self._values, dtype=np.float64)
                mean, std = float(past.mean()), float(past.std())
                limit = mean + self.sigma * std
                if value > limit:
                    text = (
                        f"{self.stat} {value:.6g} exceeds the mean {mean:.6g} + {self.sigma:g} std ({std:.3g}) of the "
                        f"previous {self.window} values"
                    )
                    hits.append((step, self.stat, value, limit, text))
            self._values.append(value)
        return hits

    def check(self, rows: pd.DataFrame) -> list[Hit]:
        return []  # a series rule: see observe()

    def state_dict(self) -> dict[str, object]:
        return {"values": list(self._values)}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        values = state.get("values")
        if not isinstance(values, list) or not all(isinstance(v, float) for v in values):
            raise StateError(f"SpikeRule state `values` must be a list of floats, got {values!r:.80}")
        self._values = deque(values[-self.window :], maxlen=self.window)

    def __repr__(self) -> str:
        extra = f", aggregate={self.aggregate!r}" if self.aggregate != "max" else ""
        return f"SpikeRule(stat={self.stat!r}, sigma={self.sigma!r}, window={self.window}{extra})"


class Series:
    """Per-step values of the series that spike rules follow, kept on the device until a check reads them.

    ``add`` costs a detach and an append (no synchronisation); :meth:`drain` reads every pending value of a series
    to the host in one transfer per device.
    """

    def __init__(self) -> None:
        self._device: dict[str, list[tuple[int, torch.Tensor]]] = {}
        self.host: dict[str, list[tuple[int, float]]] = {}  # read, not yet given to the rules

    def add(self, stat: str, step: int, value: torch.Tensor | float) -> None:
        if isinstance(value, torch.Tensor):
            with torch._C.DisableTorchFunction():
                value = value.detach().reshape(())
            self._device.setdefault(stat, []).append((step, value))
        else:
            self.host.setdefault(stat, []).append((step, float(value)))

    def to_host(self) -> None:
        """Read the pending device values to the host (one transfer per device and series)."""
        with torch._C.DisableTorchFunction(), torch.no_grad():
            for stat, pending in self._device.items():
                by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
                for step, value in pending:
                    by_device.setdefault(value.device, []).append((step, value))
                read: list[tuple[int, float]] = []
                for items in by_device.values():
                    values = torch.stack([v.to(torch.float64) for _, v in items]).cpu().tolist()
                    read.extend(zip((s for s, _ in items), values))
                self.host.setdefault(stat, []).extend(sorted(read))
        self._device = {}

    def drain(self) -> dict[str, list[tuple[int, float]]]:
        """Every pending value, by series, in step order; the buffer is emptied."""
        self.to_host()
        out, self.host = self.host, {}
        return out

    def state_dict(self) -> dict[str, list[list[float]]]:
        self.to_host()
        return {stat: [[float(s), v] for s, v in values] for stat, values in self.host.items()}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        host: dict[str, list[tuple[int, float]]] = {}
        for stat, values in state.items():
            if not isinstance(values, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(x, float) for x in p) for p in values
            ):
                raise StateError(f"series state {stat!r} must be a list of [step, value] pairs, got {values!r:.80}")
            host[stat] = [(int(s), v) for s, v in values]
        self._device, self.host = {}, host


def column_series(frame: pd.DataFrame, column: str, aggregate: str) -> list[tuple[int, float]]:
    """One value per step of ``frame``: ``column`` aggregated over the step's layers (NaN left out; a step with
    none: NaN is not reported, the step is skipped)."""
    out: list[tuple[int, float]] = []
    if column not in frame.columns or not len(frame):
        return out
    fn = AGGREGATES[aggregate]
    steps = frame["step"].to_numpy()
    values = frame[column].to_numpy(dtype=float)
    for step in np.unique(steps):
        v = values[steps == step]
        v = v[~np.isnan(v)]
        if len(v):
            out.append((int(step), fn(v)))
    return out


class SpikeFeed:
    """The series a manager's spike rules follow, fed by ``step()``: the loss, the total parameter-gradient norm,
    and report columns (the closed steps are kept until the next check aggregates them).

    Raises:
        ConfigError: A rule follows ``grad_norm`` without ``params``, or a stat that is no statistic column.
    """

    def __init__(self, alerts: Alerts | None, columns: tuple[str, ...], params: bool) -> None:
        self.rules = [r for r in (alerts.rules if alerts is not None else []) if isinstance(r, SpikeRule)]
        self.stats = {r.stat for r in self.rules}
        for stat in sorted(self.stats):
            if stat == "grad_norm" and not params:
                raise ConfigError(
                    "`SpikeRule(stat='grad_norm')` follows the model's total parameter-gradient norm: it needs "
                    "HookManager(params=True)"
                )
            if stat not in SERIES_STATS and stat not in columns:
                raise ConfigError(
                    f"`SpikeRule(stat={stat!r})`: stat must be 'loss', 'grad_norm' or a statistic column of this "
                    f"manager ({', '.join(columns)})"
                )
        self.series = Series()
        self._columns = any(stat not in SERIES_STATS for stat in self.stats)
        self._records: list[StepRecord] = []  # closed steps whose columns are aggregated at the next check

    def follows(self, stat: str) -> bool:
        return stat in self.stats

    def add(self, step: int, loss: object, params: ParamStats | None) -> None:
        """At ``step()``: keep the step's loss and, when recorded at this step, the total gradient norm."""
        if loss is not None:
            self.add_loss(step, loss)
        if "grad_norm" in self.stats and params is not None and params.last is not None and params.last.step == step:
            self.add_grad_norm(step, params.total_grad_norm())

    def add_loss(self, step: int, loss: object) -> None:
        """Keep the step's loss (a one-element tensor stays on its device) when a rule follows it."""
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ConfigError(f"`loss` must be a one-element tensor or a number, got shape {list(loss.shape)}")
        elif isinstance(loss, bool) or not isinstance(loss, (int, float)):
            raise ConfigTypeError(f"`loss` must be a tensor or a number, got {describe(loss)}")
        if "loss" in self.stats:
            self.series.add("loss", step, loss)

    def add_grad_norm(self, step: int, total: torch.Tensor | None) -> None:
        if total is not None:
            self.series.add("grad_norm", step, total)

    def closed(self, record: StepRecord) -> None:
        """A closed step, final: its columns feed the rules at the next check."""
        if self._columns:
            self._records.append(record)

    def drain(self, frame: Callable[[list[StepRecord]], pd.DataFrame]) -> dict[str, list[tuple[int, float]]]:
        """Every value since the last check, on the host: device series in one transfer each, report columns
        aggregated over each step's layers (``frame`` builds the report frame of closed records)."""
        values = self.series.drain()
        if self._records:
            records, self._records = self._records, []
            rows = frame(records)
            for rule in self.rules:
                if rule.stat not in SERIES_STATS:
                    values[rule.stat] = column_series(rows, rule.stat, rule.aggregate)
        return values

    def settle(self, frame: Callable[[list[StepRecord]], pd.DataFrame]) -> None:
        """Turn the kept closed steps into series values (for ``state_dict``: records are not saved)."""
        if self._records:
            for stat, pairs in self.drain(frame).items():
                for step, value in pairs:
                    self.series.add(stat, step, value)
