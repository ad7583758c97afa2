"""Saving and restoring what a manager needs to continue a run: ``HookManager.state_dict()`` /
``load_state_dict()``.

A state is made of tensors and plain Python values only (dicts, lists, str, int, float, bool, None), so that
``torch.save`` writes it and ``torch.load(..., weights_only=True)`` reads it back; it holds no pickled hookscope
object. What it holds (:data:`STATE_VERSION` names the layout):

- ``step``: the open step (the next one ``step()`` closes), ``every``, whether a training pass was recorded
  (evaluation passes are not recorded after one);
- ``collectors``: each collector's class, columns, declared states and configuration (public plain attributes), and
  its extra Python-side state (``Collector.extra_state``; ``DeadReLU``'s count of recorded steps);
- ``sites``: each site's description (name, key, module, call, kind, function, bounds, unit dimension, units, shape,
  first step) and, per collector, its persistent state tensors (per-unit windows, evidence, last-fired steps,
  death and revival timelines);
- ``layout``, ``history`` (closed-step records, unless ``history=False``);
- ``alerts`` (de-duplication, the next check due, the alerts fired, spike windows), ``series`` (loss and other
  series values not checked yet);
- ``params``: the module rows, the recorded parameter statistics and, unless ``param_copies=False``, the parameter
  copies the next ``update_ratio`` is measured from;
- ``sinks``: each sink's next write step and its own state.

Loading checks everything first and changes nothing when something is wrong (:class:`StateError` naming what
differs); then the saved sites are entered into the fresh manager's site table with their state, so the first
forward pass finds each site as if it had discovered it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from copy import deepcopy
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from hookscope.checks import check_bool
from hookscope.distributed import SiteDescription
from hookscope.errors import StateError
from hookscope.history import StepRecord
from hookscope.sites import ROOT_NAME, iter_named_modules, matches
from hookscope.warn import warn_once

if TYPE_CHECKING:
    import torch.nn as nn

    from hookscope.alerts import AlertRule, Alerts
    from hookscope.collectors.base import Collector
    from hookscope.feeding import SinkFeed
    from hookscope.params import ParamStats
    from hookscope.recording import Recorder
    from hookscope.sinks import Sink
    from hookscope.sites import Site
    from hookscope.spikes import SpikeFeed
    from hookscope.tracing import Tracer


class _Manager(Protocol):
    """What saving and loading use of a ``HookManager`` (which imports this module, so it is not named here)."""

    model: nn.Module
    every: int
    alerts: Alerts | None
    spikes: SpikeFeed
    sinks: list[Sink]
    _feed: SinkFeed

    @property
    def recorder(self) -> Recorder: ...

    @property
    def tracer(self) -> Tracer: ...

    @property
    def param_stats(self) -> ParamStats | None: ...


__all__ = ["STATE_FORMAT", "STATE_VERSION", "Resumable", "load_state", "save_state", "state_bytes"]

#: The value of a state's ``format`` key.
STATE_FORMAT = "hookscope.HookManager"
#: The version of the state layout; a state of another version is refused.
STATE_VERSION = 1

_PLAIN = (int, float, str, bool, type(None))
#: Seconds ``state_dict()`` waits for the other ranks (as ``detach()`` does).
_DETACH_TIMEOUT = 60.0


class _Internals(_Manager, Protocol):
    """The manager's own steps that saving uses."""

    def _deliver(self, records: list[StepRecord], errors: list[Exception]) -> None: ...

    def _update_recording(self) -> None: ...

    @property
    def _params(self) -> ParamStats | None: ...


class Resumable:
    """``HookManager``'s saving and restoring (a base class of it, so that this responsibility has its own file)."""

    def flush(self: _Internals) -> None:
        """Write what the sinks hold now (under ``torch.distributed``: a collective that first combines the steps
        still waiting for the other ranks). ``state_dict()`` does it, so that files match the checkpoint.

        Raises:
            Exception: What a sink or custom collector raised, once every sink was fed.
        """
        errors: list[Exception] = []
        self._deliver(self.recorder.finish(_DETACH_TIMEOUT, release=False), errors)
        try:  # the closed steps waiting in the ring become records of the history
            self.recorder.flush()
        except Exception as e:
            errors.append(e)
        for i in range(len(self.sinks)):
            self._feed.write(i, errors)
        if errors:
            raise errors[0]

    def state_dict(self: _Internals, *, history: bool = True, param_copies: bool = True) -> dict[str, Any]:
        """Everything needed to continue this run in a new process as if it had never stopped, as tensors and plain
        Python: ``torch.save`` it; ``torch.load(..., weights_only=True)`` reads it back (see the module docstring).

        Call it between ``step()`` and the next forward pass (what ran in the open step is not saved: a resumed run
        runs that step again). It writes what the sinks hold first (:meth:`flush`); under ``torch.distributed`` it
        is a collective, and every rank gets the same global state.

        Args:
            history: Include the closed steps (the resumed ``to_dataframe()`` then also holds the earlier ones).
            param_copies: Include the parameter copies that the next ``update_ratio`` is measured from (the
                model's size again); without them the first resumed ``update_ratio`` is NaN.
        """
        check_bool("history", history)
        check_bool("param_copies", param_copies)
        Resumable.flush(self)
        self.spikes.settle(self.recorder.frame)  # the columns of the steps not checked yet, as series values
        return save_state(self, history=history, param_copies=param_copies)

    def load_state_dict(self: _Internals, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Continue the run that :meth:`state_dict` saved, on a new manager (before or after ``attach()``, before
        the first forward pass and ``step()``): reports, alerts, sinks and parameter statistics go on as if the run
        had never been interrupted. Sites are matched by name; a saved site whose module the model does not have
        (or that ``include``/``exclude`` leave out) is an error, or, with ``strict=False``, left out with one
        warning. Sites the state does not hold start fresh when discovered.

        Raises:
            StateError: Not a hookscope state, another layout version, other collectors, ``every`` or alert rules, a
                site or parameter the model does not have, a tensor of the wrong shape, dtype or device, a truncated
                or edited state, or a manager that has recorded something; nothing is loaded then.
        """
        load_state(self, state_dict, strict=check_bool("strict", strict))
        self._update_recording()

    @property
    def param_stats(self: _Internals) -> ParamStats | None:
        """The parameter statistics (``None`` without ``params=True``; internal, documented for tests)."""
        return self._params


def _config(c: Collector) -> dict[str, Any]:
    """A collector's configuration: its public attributes that are plain values (``DeadReLU``'s window...)."""
    return {k: v for k, v in sorted(vars(c).items()) if not k.startswith("_") and isinstance(v, _PLAIN)}


def _collector_entry(c: Collector) -> dict[str, Any]:
    return {
        "name": type(c).__name__,
        "columns": list(type(c).columns),
        "states": sorted(n for n, s in c.state_specs.items() if s.persistent),
        "config": _config(c),
        "extra": dict(c.extra_state()),
    }


def _state_views(c: Collector, index: int) -> dict[str, torch.Tensor] | None:
    """Views of the persistent states that collector ``c`` holds for site ``index`` (its units' slice of each
    per-unit state, its element of each per-site one): what a state saves and a load writes back. ``None`` when
    ``c`` holds no state for the site."""
    bank = c.bank if c.has_state else None
    if bank is None or index not in bank.sites_with_state():
        return None
    span = bank.unit_range(index)
    off, n = span if span is not None else (0, 0)
    return {
        name: bank.units[name][off : off + n] if spec.per_unit else bank.scalars[name][index]
        for name, spec in c.state_specs.items()
        if spec.persistent
    }


def save_state(manager: _Manager, *, history: bool, param_copies: bool) -> dict[str, Any]:
    """The state of ``manager`` (its ring flushed and, under ``torch.distributed``, its steps combined: by the
    caller)."""
    rec = manager.recorder
    sites: list[dict[str, Any]] = []
    keys = {site.index: key for key, site in rec.site_by_key.items() if site is not None}
    for site in rec.sites:
        key = keys[site.index]
        state: list[dict[str, torch.Tensor] | None] = []
        for c in rec.collectors:
            views = _state_views(c, site.index)
            state.append(None if views is None else {name: v.detach().clone() for name, v in views.items()})
        sites.append(
            {
                "layer": site.layer,
                "key": [key[0], key[1]],
                "module": site.module,
                "call": site.call,
                "kind": site.kind,
                "function": site.function,
                "bounds": None if site.bounds is None else [float(b) for b in site.bounds],
                "unit_dim": site.unit_dim,
                "units": site.units if site.units_fixed else -1,
                "shape": list(site.shape),
                "first_step": site.first_step,
                "problem": site.problem,
                "state": state,
            }
        )
    params = manager.param_stats
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "step": rec.step,
        "trained": manager.tracer.evaluation.trained,
        "every": manager.every,
        "collectors": [_collector_entry(c) for c in rec.collectors],
        "sites": sites,
        "layout": None if rec.layout is None else [list(f) for f in rec.layout.collectors],
        "history": rec.history.state_dict() if history else None,
        "alerts": manager.alerts.state_dict() if manager.alerts is not None else None,
        "series": manager.spikes.series.state_dict(),
        "params": params.state_dict(copies=param_copies, history=history) if params is not None else None,
        "sinks": [
            {"type": type(s).__name__, "due": due, "state": s.state_dict()}
            for s, due in zip(manager.sinks, manager._feed.due)
        ],
    }


def state_bytes(state: object) -> int:
    """Bytes of the tensors in a state (what ``torch.save`` writes, give or take a few kilobytes of plain values)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, Mapping):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# checking


class _Check:
    """Reads a state defensively: every missing key or wrong type is a :class:`StateError` naming its path."""

    def __init__(self, state: object) -> None:
        if not isinstance(state, Mapping):
            raise StateError(
                f"`state_dict` must be a dict made by HookManager.state_dict(), got {type(state).__name__}"
            )
        self.state = state

    @staticmethod
    def get(d: Mapping[str, Any], key: str, kinds: type | tuple[type, ...], path: str) -> Any:
        if key not in d:
            raise StateError(f"`state_dict` has no {path}{key!r} (a truncated or edited state?)")
        value = d[key]
        if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
            raise StateError(f"`state_dict` {path}{key!r} must be {_names(kinds)}, got {value!r}")
        if not isinstance(value, kinds):
            raise StateError(f"`state_dict` {path}{key!r} must be {_names(kinds)}, got {type(value).__name__}")
        return value


def _names(kinds: type | tuple[type, ...]) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(k.__name__ for k in kinds)


def _tensor(value: object, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | None, what: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise StateError(f"`state_dict` {what} must be a tensor, got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise StateError(f"`state_dict` {what} has shape {list(value.shape)}, expected {list(shape)}")
    if value.dtype != dtype:
        raise StateError(f"`state_dict` {what} has dtype {value.dtype}, expected {dtype}")
    if device is not None and value.device != device:
        raise StateError(
            f"`state_dict` {what} is on {value.device}, but this manager's state lives on {device}; load it with "
            f"torch.load(..., map_location={str(device)!r})"
        )


def _model_device(manager: _Manager) -> torch.device:
    for tensor in (*manager.model.parameters(), *manager.model.buffers()):
        return tensor.device
    return torch.device("cpu")


def load_state(manager: _Manager, state: object, *, strict: bool) -> None:
    """Check ``state`` against ``manager`` and load it (see the module docstring)."""
    check = _Check(state)
    sd = check.state
    get = check.get
    if get(sd, "format", str, "") != STATE_FORMAT:
        raise StateError(f"`state_dict` is not a hookscope state (its 'format' is {sd['format']!r})")
    version = get(sd, "version", int, "")
    if version != STATE_VERSION:
        raise StateError(
            f"`state_dict` has state layout version {version}; this hookscope reads version {STATE_VERSION} only"
        )
    rec = manager.recorder
    if rec.sites or len(rec.history) or rec.last_closed is not None or rec.latest()[1]:
        raise StateError(
            "load_state_dict() needs a manager that has recorded nothing yet: call it on a new HookManager before "
            "the first forward pass and step() (this one has "
            f"{'closed steps' if rec.last_closed is not None or len(rec.history) else 'seen sites'})"
        )
    step = get(sd, "step", int, "")
    if step < 0:
        raise StateError(f"`state_dict` 'step' must be >= 0, got {step}")
    get(sd, "trained", bool, "")
    every = get(sd, "every", int, "")
    if every != manager.every:
        raise StateError(
            f"`state_dict` was saved by a manager with `every`={every}; this one has `every`={manager.every}: give "
            "it the same `every`"
        )
    # collectors: the same classes, columns, states and configuration, in order
    saved = get(sd, "collectors", list, "")
    now = [_collector_entry(c) for c in rec.collectors]
    described = [
        {k: e.get(k) for k in ("name", "columns", "states", "config")} if isinstance(e, Mapping) else e for e in saved
    ]
    if described != [{k: e[k] for k in ("name", "columns", "states", "config")} for e in now]:
        raise StateError(
            f"`state_dict` was saved with other collectors: {_collectors_text(saved)}; this manager has "
            f"{_collectors_text(now)}. Build it with the collectors of the saved run"
        )
    for e, c in zip(saved, rec.collectors):
        extra = get(e, "extra", dict, f"collectors[{type(c).__name__}].")
        if set(extra) != set(c.extra_state()):
            raise StateError(f"`state_dict` extra state of {type(c).__name__} has keys {sorted(extra)}")
    device = _model_device(manager)
    # sites: matched by name against the model's modules and the patterns
    entries = get(sd, "sites", list, "")
    modules = {name for name, _ in iter_named_modules(manager.model)}
    descriptions: list[tuple[SiteDescription, Mapping[str, Any]]] = []
    unknown: list[str] = []
    seen: set[str] = set()
    for i, e in enumerate(entries):
        if not isinstance(e, Mapping):
            raise StateError(f"`state_dict` sites[{i}] must be a dict, got {type(e).__name__}")
        path = f"sites[{i}]."
        layer = get(e, "layer", str, path)
        if layer in seen:
            raise StateError(f"`state_dict` holds site {layer!r} twice")
        seen.add(layer)
        d = _description(e, path, get)
        base = layer.split("#")[0]
        left_out = (rec.include is not None and not matches(rec.include, layer, base)) or (
            rec.exclude is not None and matches(rec.exclude, layer, base)
        )
        if d.module not in modules or left_out:
            unknown.append(layer)
            continue
        _check_site_state(e, d, rec.collectors, device, path, get)
        descriptions.append((d, e))
    if unknown:
        text = ", ".join(map(repr, unknown[:10])) + (", ..." if len(unknown) > 10 else "")
        if strict:
            raise StateError(
                f"`state_dict` holds sites that this manager cannot have: {text} (their modules are not in "
                f"{type(manager.model).__name__}, or `include`/`exclude` leave them out): a state of another model? "
                "load_state_dict(sd, strict=False) loads the matching sites only"
            )
        warn_once(f"hookscope: load_state_dict(strict=False): sites {text} of the saved state are not loaded")
    missing = (
        _unsaved_activation_modules(manager, {d.module for d, _ in descriptions} | set(unknown)) if entries else []
    )
    if missing:
        text = ", ".join(map(repr, missing[:10])) + (", ..." if len(missing) > 10 else "")
        if strict:
            raise StateError(
                f"{type(manager.model).__name__} has activation modules that the saved state does not hold: {text} "
                "(a state of another model?); load_state_dict(sd, strict=False) loads the saved sites, and these "
                "start fresh"
            )
        warn_once(f"hookscope: load_state_dict(strict=False): sites {text} are not in the saved state")
    layout = sd.get("layout")
    if layout is not None and (
        not isinstance(layout, list)
        or len(layout) != len(rec.collectors)
        or not all(isinstance(f, list) for f in layout)
    ):
        raise StateError("`state_dict` 'layout' must be a list of field lists, one per collector")
    history = get(sd, "history", (dict, type(None)), "")
    if history is not None:
        _check_history(history, len(entries), sum(len(f) for f in layout or []), "history.")
    alerts = get(sd, "alerts", (dict, type(None)), "")
    if alerts is not None and manager.alerts is not None:
        _check_alerts(alerts, manager.alerts.rules, get)
    get(sd, "series", dict, "")
    params = get(sd, "params", (dict, type(None)), "")
    if params is not None and manager.param_stats is not None:
        _check_params(params, manager, get)
    sinks = get(sd, "sinks", list, "")
    for i, e in enumerate(sinks):
        if not isinstance(e, Mapping):
            raise StateError(f"`state_dict` sinks[{i}] must be a dict")
        get(e, "type", str, f"sinks[{i}].")
        get(e, "due", int, f"sinks[{i}].")
        get(e, "state", dict, f"sinks[{i}].")
    # ---- everything checked: load (nothing below raises on a state that passed the checks)
    _load(manager, sd, descriptions, [str(e["layer"]) for e in entries], step, device)


def _unsaved_activation_modules(manager: _Manager, saved: set[str]) -> list[str]:
    """Activation modules of the model that ``include``/``exclude`` keep and no saved site names (an activation
    module inside another one is not a site of its own). Functional calls cannot be known before they run."""
    from hookscope.activations import activation_for_module

    rec = manager.recorder
    out: list[str] = []
    inside: list[str] = []
    for name, module in iter_named_modules(manager.model):
        if activation_for_module(module) is None or any(name.startswith(f"{p}.") for p in inside):
            continue
        inside.append(name)
        layer = name or ROOT_NAME
        left_out = (rec.include is not None and not matches(rec.include, layer, layer)) or (
            rec.exclude is not None and matches(rec.exclude, layer, layer)
        )
        if not left_out and name not in saved:
            out.append(layer)
    return out


def _collectors_text(entries: Sequence[object]) -> str:
    parts = []
    for e in entries:
        if isinstance(e, Mapping):
            config = ", ".join(f"{k}={v!r}" for k, v in dict(e.get("config") or {}).items())
            parts.append(f"{e.get('name')}({config})")
        else:
            parts.append(repr(e))
    return "[" + ", ".join(parts) + "]"


def _description(e: Mapping[str, Any], path: str, get: Any) -> SiteDescription:
    key = get(e, "key", list, path)
    if len(key) != 2 or not isinstance(key[0], str) or not isinstance(key[1], int):
        raise StateError(f"`state_dict` {path}'key' must be [name, call], got {key!r}")
    bounds = get(e, "bounds", (list, type(None)), path)
    shape = get(e, "shape", list, path)
    if not all(isinstance(x, int) and x >= 0 for x in shape):
        raise StateError(f"`state_dict` {path}'shape' must be a list of sizes, got {shape!r}")
    from hookscope.activations import get_activation

    kind = get(e, "kind", str, path)
    try:
        get_activation(kind)
    except KeyError:
        raise StateError(f"`state_dict` {path}'kind' {kind!r} is not a registered activation") from None
    get(e, "first_step", (int, type(None)), path)
    get(e, "problem", (str, type(None)), path)
    return SiteDescription(
        get(e, "layer", str, path),
        (key[0], key[1]),
        get(e, "module", str, path),
        get(e, "call", int, path),
        kind,
        get(e, "function", (str, type(None)), path),
        None if bounds is None else (float(bounds[0]), float(bounds[1])),
        get(e, "unit_dim", (int, type(None)), path),
        get(e, "units", int, path),
        tuple(shape),
    )


def _check_site_state(
    e: Mapping[str, Any], d: SiteDescription, collectors: Sequence[Collector], device: torch.device, path: str, get: Any
) -> None:
    state = get(e, "state", list, path)
    if len(state) != len(collectors):
        raise StateError(f"`state_dict` {path}'state' has {len(state)} entries, expected one per collector")
    for c, entry in zip(collectors, state):
        if entry is None:
            continue
        if not isinstance(entry, Mapping) or d.units < 0:
            raise StateError(f"`state_dict` {path}'state' of {type(c).__name__} must be a dict of tensors")
        wanted = {n: s for n, s in c.state_specs.items() if s.persistent}
        if set(entry) != set(wanted):
            raise StateError(
                f"`state_dict` site {d.name!r}: {type(c).__name__} state holds {sorted(entry)}, "
                f"expected {sorted(wanted)}"
            )
        for name, spec in wanted.items():
            shape = (d.units,) if spec.per_unit else ()
            _tensor(entry[name], shape, spec.dtype, device, f"site {d.name!r} {type(c).__name__}.{name}")


def _check_history(h: Mapping[str, Any], n_sites: int, n_fields: int, path: str) -> None:
    get = _Check.get
    steps = get(h, "steps", torch.Tensor, path)
    n_steps = steps.numel()
    row_start = get(h, "row_start", torch.Tensor, path)
    row_shape = get(h, "row_shape", torch.Tensor, path)
    n_rows = row_shape.numel()
    for key in ("steps", "row_start", "row_shape", "site", "calls", "elements", "backward", "units"):
        t = get(h, key, torch.Tensor, path)
        if t.dtype != torch.int64 or t.dim() != 1:
            raise StateError(f"`state_dict` {path}{key!r} must be a 1-D int64 tensor")
        expected = n_steps if key in ("steps", "row_start") else n_rows
        if t.numel() != expected:
            raise StateError(f"`state_dict` {path}{key!r} has {t.numel()} values, expected {expected}")
    shapes = get(h, "shapes", list, path)
    if n_rows and (int(row_shape.min()) < 0 or int(row_shape.max()) >= len(shapes)):
        raise StateError(f"`state_dict` {path}'row_shape' points outside 'shapes'")
    site = h["site"]
    if n_rows and (int(site.min()) < 0 or int(site.max()) >= n_sites):
        raise StateError(f"`state_dict` {path}'site' points outside the saved sites")
    if n_steps and (int(row_start[0]) != 0 or bool((row_start.diff() < 0).any()) or int(row_start[-1]) > n_rows):
        raise StateError(f"`state_dict` {path}'row_start' is not an increasing row index")
    values = get(h, "values", torch.Tensor, path)
    if n_steps and (values.dim() != 3 or values.shape[0] != n_steps or values.shape[1] > n_sites):
        raise StateError(
            f"`state_dict` {path}'values' has shape {list(values.shape)}, expected [{n_steps}, sites, fields]"
        )
    if n_steps and values.shape[2] != n_fields:
        raise StateError(f"`state_dict` {path}'values' has {values.shape[2]} fields, the layout {n_fields}")
    if values.dtype != torch.float64 or values.device.type != "cpu":
        raise StateError(f"`state_dict` {path}'values' must be a float64 CPU tensor")


def _check_alerts(a: Mapping[str, Any], rule_objects: Sequence[AlertRule], get: Any) -> None:
    rules = [r.name for r in rule_objects]
    saved = get(a, "rules", list, "alerts.")
    if saved != rules:
        raise StateError(f"`state_dict` was saved with alert rules {saved}; this manager has {rules}")
    for key in get(a, "seen", list, "alerts."):
        if not isinstance(key, list) or not all(isinstance(k, str) for k in key):
            raise StateError("`state_dict` 'alerts.seen' must hold lists of str")
    get(a, "next_due", int, "alerts.")
    fields = {"rule", "layer", "step", "value", "threshold", "message"}
    for f in get(a, "fired", list, "alerts."):
        if not isinstance(f, Mapping) or set(f) != fields:
            raise StateError("`state_dict` 'alerts.fired' must hold alerts")
    rule_states = get(a, "rule_states", list, "alerts.")
    if len(rule_states) != len(rules):
        raise StateError("`state_dict` 'alerts.rule_states' must hold one entry per rule")
    for rule, rule_state in zip(rule_objects, rule_states):  # each rule checks its own state, on a copy
        if rule_state is not None and hasattr(rule, "load_state_dict"):
            if not isinstance(rule_state, Mapping):
                raise StateError(f"`state_dict` 'alerts.rule_states' of {rule.name!r} must be a dict")
            deepcopy(rule).load_state_dict(rule_state)


def _check_params(p: Mapping[str, Any], manager: _Manager, get: Any) -> None:
    stats = manager.param_stats
    assert stats is not None
    modules = get(p, "modules", list, "params.")
    owners = {name or ROOT_NAME for name in stats.owner_names()}
    missing = [m for m in modules if m not in owners]
    if missing:
        raise StateError(
            f"`state_dict` holds parameter statistics of modules that {type(manager.model).__name__} does not have: "
            f"{', '.join(map(repr, missing[:10]))} (a state of another model?)"
        )
    if len(get(p, "kinds", list, "params.")) != len(modules) or len(get(p, "sizes", list, "params.")) != len(modules):
        raise StateError("`state_dict` 'params' kinds and sizes must have one entry per module")
    get(p, "first", bool, "params.")
    _check_history(get(p, "history", dict, "params."), len(modules), 3, "params.history.")
    copies = get(p, "copies", dict, "params.")
    weights = get(p, "weights", dict, "params.")
    if set(copies) != set(weights):
        raise StateError("`state_dict` 'params.copies' and 'params.weights' must name the same parameters")
    params = stats.named_parameters()
    for name, copy in copies.items():
        param = params.get(name)
        if param is None:
            raise StateError(f"`state_dict` holds a copy of parameter {name!r}, which the model does not have")
        if isinstance(param, torch.nn.parameter.UninitializedParameter):
            continue
        _tensor(copy, tuple(param.shape), param.dtype, param.device, f"copy of parameter {name!r}")
        _tensor(weights[name], (), torch.float64, None, f"squared norm of parameter {name!r}")


# ----------------------------------------------------------------------------------------------------------------
# loading


def _load(
    manager: _Manager,
    sd: Mapping[str, Any],
    descriptions: list[tuple[SiteDescription, Mapping[str, Any]]],
    saved_layers: list[str],
    step: int,
    device: torch.device,
) -> None:
    rec = manager.recorder
    for c, e in zip(rec.collectors, sd["collectors"]):
        c.load_extra_state(e["extra"])
    new_index: dict[str, int] = {}
    for d, e in descriptions:
        site = _restore_site(rec, d, e["first_step"], e["problem"], device)
        new_index[d.name] = site.index
        with torch.no_grad():
            for c, entry in zip(rec.collectors, e["state"]):
                views = _state_views(c, site.index)
                if entry is not None and views is not None:
                    for name, view in views.items():
                        view.copy_(entry[name])
    if sd.get("layout") is not None:
        from hookscope.history import FieldLayout

        rec.layout = FieldLayout(collectors=tuple(tuple(f) for f in sd["layout"]))
    history = sd.get("history")
    if history is not None:
        remap = [new_index.get(layer, -1) for layer in saved_layers]
        rec.history.load_state_dict(_remapped(history, remap, len(rec.sites)))
        _restore_last_closed(rec)
    alerts = sd.get("alerts")
    if alerts is not None and manager.alerts is not None:
        manager.alerts.load_state_dict(alerts)
    manager.spikes.series.load_state_dict(sd["series"])
    params = sd.get("params")
    if params is not None and manager.param_stats is not None:
        manager.param_stats.load_state_dict(params)
    rec.step = step
    manager.tracer.evaluation.trained = bool(sd["trained"])  # evaluation passes after a resume stay out, as before
    saved = list(sd["sinks"])
    for i, sink in enumerate(manager.sinks):  # matched by type, in order
        match = next((k for k, e in enumerate(saved) if e["type"] == type(sink).__name__), None)
        if match is None:
            manager._feed.due[i] = step + sink.every - 1
        else:
            entry = saved.pop(match)
            manager._feed.due[i] = entry["due"]
            sink.load_state_dict(entry["state"])
        sink.resume_from(step)  # what it kept of this step and later is the interrupted run's future


def _restore_site(
    rec: Recorder, d: SiteDescription, first_step: int | None, problem: str | None, device: torch.device
) -> Site:
    """Enter a saved site into the site table as it was described, with fresh state (the caller copies the saved
    state in); its forward calls find it by its key, as if discovered (as a site of another rank is entered)."""
    from hookscope.activations import get_activation

    site = rec.new_site(d.key, d.name, d.module, d.call, get_activation(d.kind), d.function, d.bounds)
    assert site is not None  # the patterns were checked
    site.first_step, site.problem = first_step, problem
    if problem is None and d.units >= 0:
        site.unit_dim, site.units, site.shape, site.units_fixed = d.unit_dim, d.units, d.shape, True
        site.reduce_dims = tuple(i for i in range(len(d.shape)) if i != d.unit_dim)
        if rec._device is None:
            rec._bind_device(device)
        rec._bind_state(site)
    return site


def _restore_last_closed(rec: Recorder) -> None:
    """After a history was loaded: its latest step is the last closed one (``last_step_frame``)."""
    rows = rec.history.records()
    if not len(rows.step):
        return
    mine = rows.step == rows.step[-1]
    sites = [int(i) for i in rows.site[mine]]
    values = np.full((len(rec.sites), rows.values.shape[1]), np.nan)
    values[sites] = rows.values[mine]
    shapes = [tuple(int(x) for x in s.split("x")) if s != "scalar" else () for s in np.asarray(rows.shape)[mine]]
    calls, elements, backward, units = (
        [int(x) for x in c[mine]] for c in (rows.calls, rows.elements, rows.backward, rows.units)
    )
    rec.last_closed = rec._last_kept = StepRecord(
        int(rows.step[-1]), sites, calls, elements, backward, units, shapes, values
    )


def _remapped(h: Mapping[str, Any], remap: list[int], n_sites: int) -> dict[str, Any]:
    """A history state with its site indices renumbered (``-1``: a site not loaded, whose rows are dropped)."""
    if all(i == k for k, i in enumerate(remap)):
        return dict(h)
    index = torch.tensor(remap, dtype=torch.int64)
    site = index[h["site"]] if len(remap) else h["site"]
    keep = site >= 0
    row_of_step = torch.repeat_interleave(
        torch.arange(len(h["steps"])), torch.diff(torch.cat([h["row_start"], torch.tensor([len(site)])]))
    )
    kept_rows = torch.bincount(row_of_step[keep], minlength=len(h["steps"]))
    out = {k: h[k][keep] for k in ("calls", "elements", "backward", "units", "row_shape")}
    out["site"] = site[keep]
    out["steps"] = h["steps"]
    out["row_start"] = torch.cat([torch.zeros(1, dtype=torch.int64), kept_rows.cumsum(0)[:-1]])
    out["shapes"] = h["shapes"]
    values = h["values"]
    moved = torch.full((values.shape[0], max(n_sites, 1), values.shape[2]), math.nan, dtype=torch.float64)
    for old, new in enumerate(remap):
        if new >= 0 and old < values.shape[1]:
            moved[:, new] = values[:, old]
    out["values"] = moved
    return out
