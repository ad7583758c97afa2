"""Closed steps: what each one recorded, and the bounded history of them.

A :class:`StepRecord` is what closing a step keeps: host-side counts (calls, elements, backward passes, units,
shapes) and one device tensor with the summable numbers of every collector for every site, laid out as its
:class:`FieldLayout` says. :class:`History` stores closed records compactly; :class:`Rows` are (step, site) rows
on the host, ready to become a report frame. The device tensors reach the host only when rows are asked for, in
as few transfers as possible, and each stored block is moved once.
"""

from __future__ import annotations

import dataclasses
from array import array
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["FieldLayout", "History", "Rows", "StepRecord", "format_shape"]


@dataclasses.dataclass(frozen=True)
class FieldLayout:
    """What each column of a step record's ``values`` holds.

    Attributes:
        collectors: For each collector, in the manager's order, the names of the fields it recorded (the columns,
            collector after collector).
    """

    collectors: tuple[tuple[str, ...], ...] = ()

    def collector_columns(self, index: int) -> dict[str, int]:
        """Column of each field of the collector at ``index`` (empty when it recorded none)."""
        if index >= len(self.collectors):
            return {}
        start = sum(len(f) for f in self.collectors[:index])
        return {name: start + k for k, name in enumerate(self.collectors[index])}


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
        values: ``(n_sites, n_fields)`` float64 device tensor of collector fields, for every site known at the
            time (rows of sites that did not run hold defaults); ``None`` for a closed step until the collectors'
            rings are flushed (``Recorder.flush``), which every report does first.
    """

    step: int
    sites: list[int]
    calls: list[int]
    elements: list[int]
    backward: list[int]
    units: list[int]
    shapes: list[tuple[int, ...]]
    values: torch.Tensor | np.ndarray | None


def format_shape(shape: Sequence[int]) -> str:
    """``(16, 64, 32, 32)`` → ``"16x64x32x32"``."""
    return "x".join(str(int(d)) for d in shape) if len(shape) else "scalar"


class History:
    """Closed steps, kept compact: host counts in typed arrays, device values consolidated into blocks.

    Per stored step the device holds one ``(n_sites, n_fields)`` float64 row block; every ``chunk`` steps the
    loose rows are stacked into one tensor (a device operation, no synchronisation), so a long run holds a
    few dozen tensors rather than one per step. With ``max_steps`` the oldest blocks are dropped once more than
    ``max_steps`` steps are stored, which bounds memory for runs of any length.
    """

    def __init__(self, chunk: int = 64, max_steps: int | None = None) -> None:
        self.chunk = chunk
        self.max_steps = max_steps
        self.steps = array("q")  # step number of each stored step
        self.row_start = array("q")  # first row of each stored step
        self.rows: dict[str, array[int]] = {k: array("q") for k in ("site", "calls", "elements", "backward", "units")}
        self.row_shape = array("q")
        self._shapes: list[tuple[int, ...]] = []
        self._shape_ids: dict[tuple[int, ...], int] = {}
        self._blocks: list[torch.Tensor | np.ndarray] = []  # (k, n_sites, n_fields) each
        self._loose: list[torch.Tensor] = []  # stored values not yet stacked into a block
        self._dropped_steps = 0  # stored steps removed from the front (bounded history)

    def __len__(self) -> int:
        return len(self.steps)

    def append(self, record: StepRecord) -> None:
        """Store a closed step."""
        assert isinstance(record.values, torch.Tensor)
        self.steps.append(record.step)
        self.row_start.append(len(self.row_shape))
        self.rows["site"].extend(record.sites)
        self.rows["calls"].extend(record.calls)
        self.rows["elements"].extend(record.elements)
        self.rows["backward"].extend(record.backward)
        self.rows["units"].extend(record.units)
        for shape in record.shapes:
            sid = self._shape_ids.get(shape)
            if sid is None:
                sid = self._shape_ids[shape] = len(self._shapes)
                self._shapes.append(shape)
            self.row_shape.append(sid)
        self._loose.append(record.values)
        if len(self._loose) >= self.chunk:
            self._consolidate()

    def _consolidate(self) -> None:
        if not self._loose:
            return
        with torch._C.DisableTorchFunction():  # a user's torch function mode does not see hookscope's operations
            n = max(v.shape[0] for v in self._loose)
            pad = torch.nn.functional.pad
            blocks = [v if v.shape[0] == n else pad(v, (0, 0, 0, n - v.shape[0])) for v in self._loose]
            self._blocks.append(torch.stack(blocks))
        self._loose = []
        if self.max_steps is not None:
            self._trim()

    def _trim(self) -> None:
        assert self.max_steps is not None
        while self._blocks and len(self.steps) - len(self._blocks[0]) >= self.max_steps:
            k = len(self._blocks.pop(0))
            cut = self.row_start[k] if k < len(self.row_start) else len(self.row_shape)
            del self.steps[:k]
            del self.row_start[:k]
            for i in range(len(self.row_start)):
                self.row_start[i] -= cut
            for arr in (*self.rows.values(), self.row_shape):
                del arr[:cut]

    def nbytes(self) -> int:
        """Bytes held by the stored history (host arrays and device blocks)."""
        host = sum(a.itemsize * len(a) for a in (self.steps, self.row_start, self.row_shape, *self.rows.values()))
        device = sum(int(b.nbytes) if isinstance(b, np.ndarray) else b.numel() * b.element_size() for b in self._blocks)
        device += sum(v.numel() * v.element_size() for v in self._loose)
        return host + device

    def _host_values(self) -> np.ndarray:
        """All stored values as one host array ``(steps, n_sites, n_fields)``; each block moves to the host once."""
        self._consolidate()
        for i, b in enumerate(self._blocks):
            if isinstance(b, torch.Tensor):
                with torch._C.DisableTorchFunction():
                    self._blocks[i] = b.cpu().numpy()
        if not self._blocks:
            return np.zeros((0, 0, 0))
        n = max(b.shape[1] for b in self._blocks)
        f = self._blocks[0].shape[2]
        return np.concatenate([np.pad(b, ((0, 0), (0, n - b.shape[1]), (0, 0))) if b.shape[1] < n else b
                               for b in self._blocks]).reshape(-1, n, f)  # fmt: skip

    def state_dict(self) -> dict[str, object]:
        """The stored steps as host tensors and plain values (``HookManager.state_dict``; reads values to the host)."""
        values = self._host_values()
        arrays = {"steps": self.steps, "row_start": self.row_start, "row_shape": self.row_shape, **self.rows}
        out: dict[str, object] = {k: torch.tensor(list(a), dtype=torch.int64) for k, a in arrays.items()}
        out["shapes"] = [list(s) for s in self._shapes]
        out["values"] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor | list[list[int]]]) -> None:
        """Replace the stored steps with those of :meth:`state_dict` (already checked by the caller)."""
        self.__init__(self.chunk, self.max_steps)  # type: ignore[misc]
        for key in ("steps", "row_start", "row_shape"):
            getattr(self, key).extend(state[key].tolist())  # type: ignore[union-attr]
        for key in self.rows:
            self.rows[key].extend(state[key].tolist())  # type: ignore[union-attr]
        self._shapes = [tuple(s) for s in state["shapes"]]  # type: ignore[union-attr]
        self._shape_ids = {s: i for i, s in enumerate(self._shapes)}
        values = state["values"]
        assert isinstance(values, torch.Tensor)
        if len(self.steps):
            self._blocks = [values.numpy().copy()]
            if self.max_steps is not None:
                self._trim()

    def records(self) -> Rows:
        """The stored steps as rows."""
        self._consolidate()  # may trim a bounded history: before anything is read
        n_rows = len(self.row_shape)
        counts = (
            np.diff(np.append(np.array(self.row_start, dtype=np.int64), n_rows)) if len(self) else np.zeros(0, np.int64)
        )
        step_of_row = np.repeat(np.arange(len(self)), counts)
        site = np.array(self.rows["site"], dtype=np.int64) if n_rows else np.zeros(0, np.int64)
        values = self._host_values()
        return Rows(
            step=np.repeat(np.array(self.steps, dtype=np.int64), counts) if len(self) else np.zeros(0, np.int64),
            site=site,
            calls=np.array(self.rows["calls"], dtype=np.float64),
            elements=np.array(self.rows["elements"], dtype=np.float64),
            backward=np.array(self.rows["backward"], dtype=np.float64),
            units=np.array(self.rows["units"], dtype=np.float64),
            shape=[format_shape(self._shapes[i]) for i in self.row_shape],
            values=values[step_of_row, site] if n_rows else np.zeros((0, values.shape[2] if values.ndim == 3 else 0)),
        )


@dataclasses.dataclass
class Rows:
    """(step, site) rows with their host counts and collector fields, ready for :func:`build_frame`."""

    step: np.ndarray
    site: np.ndarray
    calls: np.ndarray
    elements: np.ndarray
    backward: np.ndarray
    units: np.ndarray
    shape: list[str]
    values: np.ndarray

    @staticmethod
    def of(record: StepRecord) -> Rows:
        """The rows of one (open) step."""
        assert record.values is not None, "a closed step's values are set when its ring is flushed"
        values = record.values
        if isinstance(values, torch.Tensor):
            with torch._C.DisableTorchFunction():
                values = values.cpu().numpy()
        n = len(record.sites)
        return Rows(
            step=np.full(n, record.step, dtype=np.int64),
            site=np.asarray(record.sites, dtype=np.int64),
            calls=np.asarray(record.calls, dtype=np.float64),
            elements=np.asarray(record.elements, dtype=np.float64),
            backward=np.asarray(record.backward, dtype=np.float64),
            units=np.asarray(record.units, dtype=np.float64),
            shape=[format_shape(s) for s in record.shapes],
            values=values[record.sites],
        )

    def select(self, keep: np.ndarray) -> Rows:
        """The rows where ``keep`` (a boolean array) is true."""
        return Rows(
            step=self.step[keep], site=self.site[keep], calls=self.calls[keep], elements=self.elements[keep],
            backward=self.backward[keep], units=self.units[keep],
            shape=[s for s, k in zip(self.shape, keep) if k], values=self.values[keep],
        )  # fmt: skip

    @staticmethod
    def concat(parts: Sequence[Rows]) -> Rows:
        """Rows of several parts, in order (no part: no row)."""
        if not parts:
            empty = np.zeros(0)
            return Rows(
                empty.astype(np.int64), empty.astype(np.int64), empty, empty, empty, empty, [], np.zeros((0, 0))
            )
        f = max((p.values.shape[1] for p in parts if p.values.ndim == 2 and len(p.values)), default=0)
        return Rows(
            step=np.concatenate([p.step for p in parts]),
            site=np.concatenate([p.site for p in parts]),
            calls=np.concatenate([p.calls for p in parts]),
            elements=np.concatenate([p.elements for p in parts]),
            backward=np.concatenate([p.backward for p in parts]),
            units=np.concatenate([p.units for p in parts]),
            shape=[s for p in parts for s in p.shape],
            values=np.concatenate(
                [p.values.reshape(len(p.step), -1) if len(p.step) else np.zeros((0, f)) for p in parts]
            ),
        )
