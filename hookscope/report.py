"""Step records → pandas DataFrame. Pure data: nothing here renders or prints.

A :class:`StepRecord` is what ``HookManager.step()`` keeps for one step: host-side counts (calls, elements,
backward passes, units, shapes) and one device tensor with the summable numbers of every collector for every
site. The device tensors reach the host only here, when a report is asked for, in as few transfers as possible,
and each record is moved once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

if TYPE_CHECKING:
    from hookscope.collectors.base import Collector
    from hookscope.sites import Site

__all__ = ["ROW_COLUMNS", "STAT_COLUMNS", "StepRecord", "build_frame", "format_shape"]

#: Columns describing the row, in order.
ROW_COLUMNS: tuple[str, ...] = ("step", "layer", "kind", "shape", "units", "calls")
#: Columns of the built-in collectors, always present (NaN when the collector is not attached), in order.
STAT_COLUMNS: tuple[str, ...] = ("dead_ratio", "inactive_fraction", "saturation_rate", "grad_norm")


@dataclasses.dataclass
class StepRecord:
    """What one closed (or open) step recorded.

    Attributes:
        step: Step number.
        sites: Indices of the sites that ran, in execution order.
        calls: Forward calls of each of those sites in the step.
        elements: Output elements of each site in the step (all calls).
        backward: Backward passes that reached each site in the step.
        units: Units of each site.
        shapes: Latest output shape of each site.
        values: ``(n_sites, n_fields)`` float64 tensor of collector fields, for every site known at the time
            (rows of sites that did not run hold defaults). Moved to the host on first use.
    """

    step: int
    sites: list[int]
    calls: list[int]
    elements: list[int]
    backward: list[int]
    units: list[int]
    shapes: list[tuple[int, ...]]
    values: torch.Tensor | np.ndarray


def format_shape(shape: Sequence[int]) -> str:
    """``(16, 64, 32, 32)`` → ``"16x64x32x32"``."""
    return "x".join(str(int(d)) for d in shape) if len(shape) else "scalar"


def _to_host(records: Sequence[StepRecord]) -> None:
    """Move records' values to the host: one transfer per run of records with equal shapes."""
    pending = [r for r in records if isinstance(r.values, torch.Tensor)]
    i = 0
    while i < len(pending):
        j = i
        shape = pending[i].values.shape
        while j < len(pending) and pending[j].values.shape == shape:
            j += 1
        block = torch.stack([r.values for r in pending[i:j]]).cpu().numpy()  # type: ignore[misc]
        for r, v in zip(pending[i:j], block):
            r.values = v
        i = j


def build_frame(
    records: Sequence[StepRecord],
    sites: Sequence[Site],
    collectors: Sequence[Collector],
    fields: Sequence[tuple[int, str]],
    applies: Sequence[Sequence[bool]],
) -> pd.DataFrame:
    """Rows (step, layer) with the manager's columns, computed from the records on the host."""
    extra = [col for c in collectors for col in c.columns if col not in STAT_COLUMNS]
    columns = [*ROW_COLUMNS, *STAT_COLUMNS, *extra]
    if not records:
        frame = pd.DataFrame({c: pd.Series(dtype="float64") for c in columns})
        return frame.astype(
            {
                "step": "int64",
                "layer": "object",
                "kind": "object",
                "shape": "object",
                "units": "int64",
                "calls": "int64",
            }
        )
    _to_host(records)
    idx = np.concatenate([np.asarray(r.sites, dtype=np.int64) for r in records])
    values = np.concatenate([np.asarray(r.values)[r.sites] for r in records]) if fields else None

    def cat(attr: str) -> np.ndarray:
        return np.concatenate([np.asarray(getattr(r, attr), dtype=np.float64) for r in records])

    base = {"calls": cat("calls"), "elements": cat("elements"), "backward": cat("backward"), "units": cat("units")}
    out: dict[str, object] = {
        "step": np.concatenate([np.full(len(r.sites), r.step, dtype=np.int64) for r in records]),
        "layer": [sites[i].layer for i in idx],
        "kind": [sites[i].kind for i in idx],
        "shape": [format_shape(s) for r in records for s in r.shapes],
        "units": base["units"].astype(np.int64),
        "calls": base["calls"].astype(np.int64),
    }
    applies_arr = np.asarray(applies, dtype=bool).reshape(len(sites), len(collectors))[idx]
    for col in (*STAT_COLUMNS, *extra):
        out[col] = np.full(len(idx), np.nan)
    for ci, collector in enumerate(collectors):
        record = dict(base)
        for k, (fi, name) in enumerate(fields):
            if fi == ci:
                assert values is not None
                record[name] = values[:, k]
        computed = collector.compute(record)
        mask = applies_arr[:, ci]
        for col in collector.columns:
            column = np.asarray(computed[col], dtype=np.float64)
            out[col] = np.where(mask, column, np.nan)
    return pd.DataFrame(out, columns=columns)
