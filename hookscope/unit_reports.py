"""Per-unit reports of a manager: dead units and their timeline (``DeadReLU``), massive units (``Magnitude``),
and one per-unit statistic of a layer (``unit_frame``: ``Magnitude``'s m_u / a_u / r_u, ``Entropy``'s heads).

They read device state or the history to the host (a synchronisation): they are for reports, not for every step.
:class:`UnitReports` is a part of :class:`~hookscope.HookManager` (its base class), kept apart because these
reports need the collectors' per-unit state and the recorder, and nothing else of the manager.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from hookscope.checks import check_int
from hookscope.collectors.base import Collector
from hookscope.collectors.dead_relu import DeadReLU
from hookscope.collectors.magnitude import Magnitude
from hookscope.errors import ConfigError, StateError
from hookscope.warn import warn_once

if TYPE_CHECKING:
    import pandas as pd

    from hookscope.history import Rows
    from hookscope.recording import Recorder
    from hookscope.sites import Site

__all__ = ["UnitReports"]


class UnitReports:
    """The per-unit reports of :class:`~hookscope.HookManager`."""

    collectors: list[Collector]
    _recorder: Recorder

    def site(self, layer: str) -> Site:
        raise NotImplementedError

    def _dead_collector(self) -> DeadReLU:
        for c in self.collectors:
            if isinstance(c, DeadReLU):
                return c
        raise StateError("dead units need a DeadReLU collector; add DeadReLU() to `collectors`")

    def dead_units(self, layer: str) -> list[int]:
        """Indices of the units of ``layer`` that are dead at the latest step (see ``DeadReLU``).

        Reads device state to the host (a synchronisation): call it for reports, not every step.

        Raises:
            KeyError: Unknown layer.
            ValueError: The layer is not a rectifier.
            RuntimeError: No ``DeadReLU`` collector is attached.
        """
        site = self.site(layer)
        collector = self._dead_collector()
        if not collector.applies_to(site):
            raise ConfigError(f"`layer` {layer!r} is a {site.kind}, not a rectifier: it has no dead units")
        step, seen = self._recorder.latest()  # (a site that saw nothing in the open step: as at the last closed one)
        state = collector.unit_state(site, step, include_open=site.index in seen)
        return [int(i) for i in np.flatnonzero(state["dead"])]

    def _collector(self, kind: type[Collector], hint: str) -> Collector:
        for c in self.collectors:
            if isinstance(c, kind):
                return c
        raise StateError(hint)

    def massive_units(self, layer: str, step: int | None = None) -> list[int]:
        """Indices of the massive units of ``layer`` (see ``Magnitude``) at ``step`` (a recorded step kept in the
        history, or the open one; ``None``: the latest step in which the layer ran), ascending.

        At most the :data:`~hookscope.collectors.magnitude.MASSIVE_SLOTS` (8) largest are recorded per step;
        when a step had more (its ``massive_units`` column says how many), this warns once and returns those.
        Reads the history to the host (a synchronisation): call it for reports, not every step.

        Raises:
            UnknownLayerError: Unknown layer.
            ConfigError: ``Magnitude`` does not record the layer, or ``step`` is not a recorded step of it.
            StateError: No ``Magnitude`` collector is attached.
        """
        site = self.site(layer)
        check_int("step", step, minimum=0, optional=True, meaning="None: the latest step")
        collector = self._collector(Magnitude, "massive units need a Magnitude collector; add Magnitude()")
        assert isinstance(collector, Magnitude)
        ci = self.collectors.index(collector)
        if not collector.applies_to(site):
            raise ConfigError(
                f"`layer` {layer!r} is a {site.kind} site, which {collector!r} does not record (activation sites "
                "need Magnitude(activations=True))"
            )
        rows = self._recorder.rows()
        mine = np.flatnonzero(rows.site == site.index)
        steps = rows.step[mine]
        if step is not None:
            mine = mine[steps == step]
            if not len(mine):
                last = steps.max() if len(steps) else "none"
                raise ConfigError(
                    f"`step` {step} is not a recorded step of layer {layer!r} (it ran in {len(steps)} kept steps, "
                    f"the last {last})"
                )
        if not len(mine):
            return []
        row = mine[np.argmax(rows.step[mine])]
        record = self._record(rows, int(row), ci)
        found = collector.massive_indices(record)
        total = record.get("massive_units", 0.0)
        if total > len(found):
            warn_once(
                f"hookscope: {layer!r} had {int(total)} massive units at step {int(rows.step[row])}; the "
                f"{len(found)} largest are recorded"
            )
        return found

    def _record(self, rows: Rows, row: int, collector_index: int) -> dict[str, float]:
        """The fields that one collector recorded in one row."""
        layout = self._recorder.layout
        fields = layout.collector_columns(collector_index) if layout is not None else {}
        return {name: float(rows.values[row, k]) for name, k in fields.items()}

    def _unit_sets_of(self, rows: Rows, names: Iterable[str]) -> dict[str, dict[str, tuple[int, ...]]]:
        """For each set name (a collector's :attr:`~hookscope.collectors.Collector.unit_sets`), each layer of
        ``rows`` (one step's) whose whole set the collector recorded → its units, ascending. Host values only."""
        out: dict[str, dict[str, tuple[int, ...]]] = {}
        sites = self._recorder.sites
        for name in names:
            found: dict[str, tuple[int, ...]] = {}
            for ci, collector in enumerate(self.collectors):
                if name not in collector.unit_sets:
                    continue
                for row, index in enumerate(rows.site):
                    site = sites[int(index)]
                    if site.layer in found or not collector.applies_to(site):
                        continue
                    units = collector.unit_set(name, self._record(rows, row, ci))
                    if units is not None:
                        found[site.layer] = units
            out[name] = found
        return out

    def unit_frame(self, layer: str, stat: str) -> pd.DataFrame:
        """One row per unit of ``layer`` with a per-unit statistic at the latest step in which the layer ran:
        columns ``layer, unit, step, {stat}``. ``stat`` is ``"entropy"`` (``Entropy``: each unit's — each head's —
        mean entropy), or ``"mean_abs"``, ``"abs_max"``, ``"rms"`` (``Magnitude``: m_u, a_u, r_u). The lowest-entropy
        head: ``hm.unit_frame(layer, "entropy").nsmallest(1, "entropy")``.

        Reads device state to the host (a synchronisation): call it for reports, not every step.

        Raises:
            UnknownLayerError: Unknown layer.
            ConfigError: No attached collector reports ``stat`` per unit, or it does not record the layer.
        """
        import pandas as pd

        site = self.site(layer)
        for collector in self.collectors:
            if stat in collector.unit_columns:
                break
        else:
            known = sorted({c for col in self.collectors for c in col.unit_columns})
            raise ConfigError(
                f"`stat` {stat!r} is not a per-unit statistic of this manager's collectors; per-unit statistics: "
                f"{', '.join(known) or 'none (attach Magnitude() or Entropy())'}"
            )
        if not collector.applies_to(site) or not collector.has_state or site.units == 0:
            raise ConfigError(f"`layer` {layer!r} ({site.kind}) has no per-unit {stat!r}: {collector!r} does not "
                              "record it")  # fmt: skip
        step, seen = self._recorder.latest()
        found, values = collector.unit_values(site, step, include_open=site.index in seen)
        column = values[stat]
        return pd.DataFrame({
            "layer": site.layer, "unit": np.arange(len(column)),
            "step": np.full(len(column), np.nan if found is None else float(found)), stat: column,
        })  # fmt: skip

    def unit_timeline(self, layer: str | None = None) -> pd.DataFrame:
        """Per-unit history of rectifier layers: when each unit last fired, whether it is dead, since when, and
        how often it revived.

        Columns: ``layer, unit, last_fired`` (NaN if never), ``dead`` (at the latest step), ``dead_since`` (the
        first step of the current dead spell, NaN if alive), ``revivals`` (times the unit fired again after
        being dead, having fired before), ``last_revival`` (NaN if never).
        """
        collector = self._dead_collector()
        step, seen = self._recorder.latest()
        sites = [self.site(layer)] if layer is not None else self._recorder.sites
        return collector.timeline(sites, step, bool(seen), empty_open={s.index for s in sites} - seen)
