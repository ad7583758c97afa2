"""Alerts: rules over the statistics of a step, checked every N steps, reported once per cause.

Checking a rule needs the values on the host, which is a synchronisation on a GPU; the manager therefore checks
only every ``every`` steps (at steps ``every - 1``, ``2 * every - 1``, ...), so the cost is amortised. Each
(rule, layer) pair is reported once, through ``warnings`` (category :class:`HookscopeAlert`), the ``hookscope``
logger and an optional callback, with a one-line hint naming likely causes and remedies.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from hookscope.checks import check_bool, check_int, check_number
from hookscope.errors import ConfigError, ConfigTypeError, StateError
from hookscope.warn import HookscopeWarning, user_stacklevel

__all__ = [
    "DEAD_RATIO_ALERT",
    "DORMANT_RATIO_ALERT",
    "ENTROPY_COLLAPSE",
    "GRADIENT_ORDERS",
    "KURTOSIS_ORDERS",
    "SATURATION_ALERT",
    "Alert",
    "AlertRule",
    "Alerts",
    "DeadRatioRule",
    "DormantRule",
    "EntropyCollapseRule",
    "ExplodingGradientRule",
    "HookscopeAlert",
    "KurtosisRule",
    "MassiveUnitsMovedRule",
    "MassiveUnitsRule",
    "NonFiniteRule",
    "SaturationRule",
    "VanishingGradientRule",
    "alerts_of",
    "default_rules",
    "gradient_median",
    "gradient_outliers",
    "hint",
]

#: Dead ratio at or above which a layer alerts (the threshold of keras-contrib's DeadReluDetector).
DEAD_RATIO_ALERT = 0.10
#: Saturation rate at or above which a layer alerts.
SATURATION_ALERT = 0.50
#: Orders of magnitude below (vanishing) or above (exploding) the median layer's gradient norm that alert.
GRADIENT_ORDERS = 3.0
#: Dormant ratio at or above which a layer alerts (``Magnitude``'s τ-dormant units, Sokar et al. 2023).
DORMANT_RATIO_ALERT = 0.10
#: Orders of magnitude a layer's kurtosis (or neuron kurtosis) must rise above its value at the first check to alert.
KURTOSIS_ORDERS = 2.0
#: Mean entropy (nats) of a layer's lowest-entropy unit (attention head) below which it counts as collapsed.
ENTROPY_COLLAPSE = 0.1

logger = logging.getLogger("hookscope")
logger.addHandler(logging.NullHandler())  # a library logs only where the application configured logging

HINTS = {
    "param_gradient": "likely causes: a module cut off from the loss (frozen by mistake, a detach), vanishing or "
    "exploding gradients; remedies: check requires_grad and the graph, normalisation, residual connections, "
    "gradient clipping",
    "update_ratio": "likely causes: learning rate too high (large ratios) or too low / a module that does not "
    "train (tiny ratios); remedies: tune the learning rate or its schedule, check weight decay and the optimizer's "
    "parameter groups",
    "dead_relu": "likely causes: learning rate too high, large negative biases, poor initialisation; remedies: "
    "lower the learning rate, He (kaiming) initialisation, LeakyReLU/PReLU/ELU, normalisation before the activation",
    "saturation": "likely causes: pre-activations too large (inputs not normalised, initialisation too wide, "
    "learning rate too high); remedies: normalise inputs, BatchNorm/LayerNorm, Xavier initialisation, lower the "
    "learning rate, a non-saturating activation",
    "vanishing_gradient": "likely causes: saturated or dead units upstream, deep plain stacks; remedies: residual "
    "connections, normalisation, ReLU-family activations, better initialisation",
    "exploding_gradient": "likely causes: learning rate too high, missing normalisation; remedies: lower the "
    "learning rate, clip gradients (torch.nn.utils.clip_grad_norm_), normalisation, check the loss scale",
    "spike": "likely causes: a bad batch, a learning rate too high for this point of the schedule, an optimizer "
    "state blown up (Adam's epsilon, fp16 overflow); remedies: skip or inspect the batch, lower the learning rate, "
    "clip gradients, check the flight recorder's dump of the steps before it",
    "nonfinite": "likely causes: learning rate too high, log(0) or division by zero, fp16 overflow; remedies: lower "
    "the learning rate, clip gradients, use a GradScaler or bf16, guard logs and divisions",
    "massive_units_moved": "the units that carry massive activations (Sun et al. 2024) changed mid-training: the "
    "attention sinks and implicit biases built on them are being rebuilt; likely causes: a learning rate too high for "
    "this point of the schedule, an instability (a loss spike, an optimizer state blown up); remedies: inspect the "
    "loss and gradient norms around this step, lower the learning rate or lengthen the warm-up, explicit attention "
    "biases or a sink token (Sun et al.) so that no unit has to carry them",
    "massive_units": "massive activations (Sun et al. 2024) act as fixed attention biases and make attention sinks; "
    "they break low-precision formats and quantisation; remedies: explicit attention biases or a sink token (Sun et "
    "al.), softmax with +1 in its denominator or gated attention, keep these units in higher precision",
    "kurtosis_rise": "outlier features are emerging (He et al. 2024): likely causes: a large learning rate or short "
    "warm-up, unnormalised residual streams, small Adam epsilon; remedies: lower the learning rate or lengthen the "
    "warm-up, QK-norm or an outlier-protected block (He et al.), weight decay",
    "dormant": "dormant units (Sokar et al. 2023) no longer contribute: likely causes: non-stationary targets, a high "
    "learning rate, upstream dead or saturated units; remedies: ReDo (re-initialise their incoming weights, zero "
    "their outgoing ones), a lower learning rate, weight decay, normalisation",
    "entropy_collapse": "an attention head attends to a single position (entropy collapse, Zhai et al. 2023, "
    "precedes loss spikes and divergence); remedies: QK-norm or σReparam (Zhai et al.), a lower learning rate or "
    "longer warm-up",
}


#: The dead-unit hint for rectifiers with a gradient on their negative side (it must not prescribe the family the
#: layer already uses).
NEGATIVE_SIDE_HINT = (
    "likely causes: large negative biases or pre-activations, learning rate too high, inputs not normalised; "
    "remedies: lower the learning rate, normalisation before the activation, check the initialisation and biases"
)


def hint(rule: str, kind: str = "") -> str:
    """The one-line hint of an alert of ``rule`` on a layer of ``kind``."""
    if rule == "dead_relu" and kind and kind not in ZERO_SLOPE_KINDS:
        return NEGATIVE_SIDE_HINT
    return HINTS.get(rule, "")


class HookscopeAlert(HookscopeWarning):
    """Category of the warnings issued for alerts."""


@dataclasses.dataclass(frozen=True)
class Alert:
    """One alert: a rule that a layer broke at a step.

    Attributes:
        rule: Rule name (``dead_relu``, ``saturation``, ``vanishing_gradient``, ``exploding_gradient``,
            ``nonfinite``, or a custom rule's name).
        layer: Layer name.
        step: Step at which it was detected.
        value: The offending value.
        threshold: The threshold it crossed.
        message: One line: what happened, likely causes and remedies.
    """

    rule: str
    layer: str
    step: int
    value: float
    threshold: float
    message: str

    def __str__(self) -> str:
        return self.message


class AlertRule:
    """Base class of rules: ``check`` looks at one step's rows and returns ``(layer, value, threshold, text)``.

    A rule with ``target = "params"`` looks at the step's rows of ``HookManager.param_frame()`` instead (and names
    modules, not layers); it is skipped when the manager records no parameter statistics. A rule with
    ``target = "units"`` names a set of units that a collector records per (step, layer) in ``stat`` (a
    ``Collector.unit_sets`` name, e.g. ``Magnitude``'s ``"massive_units"``), and :meth:`check_units` is given the
    check step's sets. Rules that compare a layer with its own past keep that past in ``state_dict()`` /
    ``load_state_dict()`` (plain values), so that a resumed run goes on comparing with it.
    """

    name = "rule"
    target = "sites"

    def check(self, rows: pd.DataFrame) -> list[Hit]:
        raise NotImplementedError

    def check_units(self, sets: Mapping[str, tuple[int, ...]]) -> list[Hit]:
        """A ``target = "units"`` rule: ``sets`` maps each layer whose whole set the collector recorded at the
        check step to its units, ascending."""
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


Hit = tuple[str, float, float, str]


def _hits(rows: pd.DataFrame, mask: np.ndarray, column: str, threshold: float, text: Callable[[Any], str]) -> list[Hit]:
    """``(layer, value, threshold, text)`` for each row of ``rows`` where ``mask`` (a numpy test: selecting rows
    from a frame costs a millisecond even when none match, and checks run while training)."""
    if not mask.any():
        return []
    hit = rows.iloc[np.flatnonzero(mask)]
    return [(str(r.layer), float(getattr(r, column)), float(threshold), text(r)) for r in hit.itertuples()]


class _AtLeastRule(AlertRule):
    """``column >= threshold`` for a ratio column."""

    column = ""

    def __init__(self, threshold: float) -> None:
        self.threshold = check_number("threshold", threshold, low=0.0, high=1.0, meaning="a ratio")

    def describe(self, row: Any) -> str:
        raise NotImplementedError

    def check(self, rows: pd.DataFrame) -> list[Hit]:
        return _hits(rows, rows[self.column].to_numpy(dtype=float) >= self.threshold, self.column, self.threshold,
                     self.describe)  # fmt: skip


#: Rectifiers whose negative side has no gradient: an inactive unit there is dead; elsewhere it sits on the
#: negative side and still learns.
ZERO_SLOPE_KINDS = frozenset({"relu", "relu6"})


class DeadRatioRule(_AtLeastRule):
    """``confirmed_dead_ratio >= threshold`` (default 10%): units inactive on each of their last ``evidence``
    outputs (see :class:`~hookscope.collectors.DeadReLU`), so that small batches do not make healthy units look
    dead. ``column="dead_ratio"`` judges each step's window alone instead. A row without the column (a custom
    collector set) falls back to ``dead_ratio``."""

    name = "dead_relu"

    def __init__(self, threshold: float = DEAD_RATIO_ALERT, column: str = "confirmed_dead_ratio") -> None:
        super().__init__(threshold)
        if column not in ("confirmed_dead_ratio", "dead_ratio"):
            raise ConfigError(f"`column` must be 'confirmed_dead_ratio' or 'dead_ratio', got {column!r}")
        self.column = column

    def check(self, rows: pd.DataFrame) -> list[Hit]:
        column = self.column if self.column in rows.columns else "dead_ratio"
        return _hits(rows, rows[column].to_numpy(dtype=float) >= self.threshold, column, self.threshold,
                     lambda row: self._describe(row, float(getattr(row, column))))  # fmt: skip

    def _describe(self, row: Any, value: float) -> str:
        if str(row.kind) in ZERO_SLOPE_KINDS:
            return f"{value:.0%} of its {row.units} units are dead (inactive on all their recent outputs)"
        return (
            f"{value:.0%} of its {row.units} units sit on their negative side (output <= 0 on all their recent "
            f"outputs; a {row.kind} still passes a gradient there)"
        )

    def describe(self, row: Any) -> str:
        return self._describe(row, float(row.dead_ratio))


class SaturationRule(_AtLeastRule):
    """``saturation_rate >= threshold`` (default 50%)."""

    name, column = "saturation", "saturation_rate"

    def __init__(self, threshold: float = SATURATION_ALERT) -> None:
        super().__init__(threshold)

    def describe(self, row: Any) -> str:
        return f"{row.saturation_rate:.0%} of its outputs are saturated"


def gradient_median(grad_norms: np.ndarray) -> float:
    """The median of a step's finite, non-zero gradient norms; NaN with fewer than two such layers."""
    g = np.asarray(grad_norms, dtype=float)
    g = g[np.isfinite(g) & (g > 0)]
    return float(np.median(g)) if len(g) >= 2 else math.nan


def gradient_outliers(grad_norms: np.ndarray, orders: float = GRADIENT_ORDERS) -> tuple[np.ndarray, np.ndarray]:
    """``(vanishing, exploding)`` masks of one step's gradient norms: more than ``orders`` orders of magnitude
    below, or above, the median layer's (:func:`gradient_median`); all false without a median."""
    g = np.asarray(grad_norms, dtype=float)
    median = gradient_median(g)
    if math.isnan(median):
        return np.zeros(len(g), dtype=bool), np.zeros(len(g), dtype=bool)
    return g < median * 10.0**-orders, g > median * 10.0**orders


class VanishingGradientRule(AlertRule):
    """``grad_norm < median layer's grad_norm * 10**-orders`` (needs at least two layers with gradients)."""

    name = "vanishing_gradient"

    def __init__(self, orders: float = GRADIENT_ORDERS) -> None:
        self.orders = check_number("orders", orders, low=0.0, high=300.0, meaning="orders of magnitude")

    def check(self, rows: pd.DataFrame) -> list[Hit]:
        median = gradient_median(rows["grad_norm"].to_numpy(dtype=float))
        if math.isnan(median):
            return []
        limit = median * 10.0**-self.orders
        return _hits(
            rows,
            rows["grad_norm"].to_numpy(dtype=float) < limit,
            "grad_norm",
            limit,
            lambda r: f"gradient norm {r.grad_norm:.3g} is below 1e-{self.orders:g} of the median layer's {median:.3g}",
        )


class ExplodingGradientRule(AlertRule):
    """``grad_norm > median layer's grad_norm * 10**orders``, or above ``absolute`` when given."""

    name = "exploding_gradient"

    def __init__(self, orders: float = GRADIENT_ORDERS, absolute: float | None = None) -> None:
        self.orders = check_number("orders", orders, low=0.0, high=300.0, meaning="orders of magnitude")
        self.absolute = (
            None if absolute is None else check_number("absolute", absolute, low=0.0, high=math.inf, high_open=True)
        )

    def check(self, rows: pd.DataFrame) -> list[Hit]:
        median = gradient_median(rows["grad_norm"].to_numpy(dtype=float))
        limits = [median * 10.0**self.orders] if not math.isnan(median) else []
        if self.absolute is not None:
            limits.append(self.absolute)
        if not limits:
            return []
        limit = min(limits)
        g = rows["grad_norm"].to_numpy(dtype=float)
        return _hits(rows, np.isfinite(g) & (g > limit), "grad_norm", limit,
                     lambda r: f"gradient norm {r.grad_norm:.3g} exceeds {limit:.3g}")  # fmt: skip


class NonFiniteRule(AlertRule):
    """NaN/Inf in outputs or gradients: the counts of ``NonFinite`` (``nonfinite``, ``grad_nonfinite``), or an
    infinite ``grad_norm`` (``GradientNorm``).

    A NaN anywhere else in a frame is not evidence: it is the placeholder of a statistic whose collector is not
    attached, does not apply to the layer's kind, or had nothing to judge. (``DeadReLU`` and ``Saturation`` count a
    NaN output as inactive and as unsaturated, so NaN outputs never make their columns NaN.) An infinite value is
    never a placeholder.
    """

    name = "nonfinite"

    def check(self, rows: pd.DataFrame) -> list[Hit]:
        # numpy over all rows, Python only for the rows that hit (iterating over every row cost ~0.6 ms per check)
        count = np.zeros(len(rows))
        for column in ("nonfinite", "grad_nonfinite"):
            values = _column(rows, column, 0.0)
            count += np.where(np.isnan(values), 0.0, values)  # NaN: no backward in the step, or not attached
        infinite_grad = np.isinf(_column(rows, "grad_norm", 0.0))
        layers = rows["layer"].to_numpy() if "layer" in rows.columns else np.full(len(rows), "")
        out: list[Hit] = []
        for i in np.flatnonzero((count > 0) | infinite_grad):
            if count[i] > 0:
                n = float(count[i])
                out.append((str(layers[i]), n, 0.0, f"{int(n)} non-finite values (NaN/Inf) in outputs or gradients"))
            else:
                text = "the gradient norm is infinite (Inf in the gradients, or squares past float32's range)"
                out.append((str(layers[i]), math.inf, 0.0, text))
        return out


def _column(rows: pd.DataFrame, name: str, missing: float) -> np.ndarray:
    if name not in rows.columns:
        return np.full(len(rows), missing)
    return rows[name].to_numpy(dtype=float)


class DormantRule(_AtLeastRule):
    """``dormant_ratio >= threshold`` (default 10%): units whose mean magnitude is at most ``dormant_tau`` times the
    layer's mean (``Magnitude``; Sokar et al. 2023's τ-dormant neurons)."""

    name, column = "dormant", "dormant_ratio"

    def __init__(self, threshold: float = DORMANT_RATIO_ALERT) -> None:
        super().__init__(threshold)

    def check(self, rows: pd.DataFrame) -> list[Hit]:
        return super().check(rows) if self.column in rows.columns else []

    def describe(self, row: Any) -> str:
        return f"{row.dormant_ratio:.0%} of its {row.units} units are dormant (mean magnitude <= τ x the layer's mean)"


class EntropyCollapseRule(AlertRule):
    """A layer whose lowest-entropy unit (attention head) has a mean entropy below ``threshold`` nats (default 0.1:
    a head that puts nearly all of each row's mass on one position). Needs ``Entropy``."""

    name = "entropy_collapse"

    def __init__(self, threshold: float = ENTROPY_COLLAPSE) -> None:
        self.threshold = check_number("threshold", threshold, low=0.0, high=math.inf, high_open=True, meaning="nats")

    def check(self, rows: pd.DataFrame) -> list[Hit]:
        values = _column(rows, "entropy_min", math.nan)
        return _hits(rows, values < self.threshold, "entropy_min", self.threshold,
                     lambda r: f"its lowest-entropy unit (head) has entropy {r.entropy_min:.3g} nats "
                               f"(below {self.threshold:g}; hm.unit_frame(layer, 'entropy') names it)")  # fmt: skip


class _RiseRule(AlertRule):
    """Compares each layer with itself at an earlier check: the first value seen for each (layer, column) is its
    baseline."""

    columns: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._baseline: dict[tuple[str, str], float] = {}

    def _baselines(self, rows: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
        """``(values, baselines)`` of a column (NaN baselines for layers seen the first time, which set theirs)."""
        values = _column(rows, column, math.nan)
        layers = rows["layer"].to_numpy() if "layer" in rows.columns else np.full(len(rows), "")
        base = np.full(len(rows), math.nan)
        for i, (layer, value) in enumerate(zip(layers, values)):
            key = (str(layer), column)
            if key in self._baseline:
                base[i] = self._baseline[key]
            elif np.isfinite(value):
                self._baseline[key] = float(value)
        return values, base

    def state_dict(self) -> dict[str, object]:
        """The baselines, as ``[layer, column, value]`` lists."""
        return {"baselines": [[layer, column, value] for (layer, column), value in self._baseline.items()]}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        entries = state.get("baselines")
        if not isinstance(entries, list) or not all(
            isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and isinstance(e[1], str)
            and isinstance(e[2], float) for e in entries
        ):  # fmt: skip
            raise StateError(f"{type(self).__name__} state `baselines` must hold [layer, column, float] lists, got "
                             f"{entries!r:.80}")  # fmt: skip
        self._baseline = {(e[0], e[1]): e[2] for e in entries}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class MassiveUnitsRule(_RiseRule):
    """Massive units appearing mid-training: a layer's ``massive_units`` (``Magnitude``) above its value at the first
    check that saw the layer."""

    name = "massive_units"

    def check(self, rows: pd.DataFrame) -> list[Hit]:
        values, base = self._baselines(rows, "massive_units")
        with np.errstate(invalid="ignore"):
            mask = values > base
        return _hits(rows, mask, "massive_units", 0.0,
                     lambda r: f"{int(r.massive_units)} massive units (|x| >= 100 and >= 1000x the median unit), "
                               f"up from {int(self._baseline[(str(r.layer), 'massive_units')])} at the first check "
                               "(hm.massive_units(layer) lists them)")  # fmt: skip


class KurtosisRule(_RiseRule):
    """A layer's ``kurtosis`` or ``neuron_kurtosis`` (``Magnitude``) at least ``orders`` orders of magnitude (default
    2) above its value at the first check that saw the layer: outlier features emerging (He et al. 2024)."""

    name = "kurtosis_rise"

    def __init__(self, orders: float = KURTOSIS_ORDERS) -> None:
        super().__init__()
        self.orders = check_number("orders", orders, low=0.0, high=300.0, meaning="orders of magnitude")

    def check(self, rows: pd.DataFrame) -> list[Hit]:
        out: list[Hit] = []
        seen: set[str] = set()
        factor = 10.0**self.orders
        for column in ("neuron_kurtosis", "kurtosis"):
            values, base = self._baselines(rows, column)
            with np.errstate(invalid="ignore"):
                mask = (base > 0) & (values >= base * factor)
            for i in np.flatnonzero(mask):
                layer = str(rows["layer"].iloc[i])
                if layer in seen:
                    continue
                seen.add(layer)
                text = (
                    f"{column} {values[i]:.3g} is {self.orders:g}+ orders of magnitude above its {base[i]:.3g} at "
                    "the first check"
                )
                out.append((layer, float(values[i]), float(base[i] * factor), text))
        return out


class MassiveUnitsMovedRule(AlertRule):
    """Massive units moving: the set of a layer's massive units (``Magnitude``, ``hm.massive_units(layer, step)``)
    at a check differs from its reference set, the set at the latest earlier check at which the layer had massive
    units, other than by units added only (those raise ``massive_units``, which :class:`MassiveUnitsRule` reports).

    Sun et al. (2024) find massive activations in a few fixed feature dimensions; the same count in other
    dimensions, or some of them gone, means that the mechanism they implement was rebuilt mid-training. A check at
    which the layer has no massive unit keeps the reference (all of them vanishing is not a move), and so does a
    check at which it has more than ``MASSIVE_SLOTS`` (8: only the largest are recorded, whose ranking may change).
    """

    name, target, stat = "massive_units_moved", "units", "massive_units"

    def __init__(self) -> None:
        self._reference: dict[str, tuple[int, ...]] = {}

    def check(self, rows: pd.DataFrame) -> list[Hit]:
        return []  # a units rule: see check_units()

    def check_units(self, sets: Mapping[str, tuple[int, ...]]) -> list[Hit]:
        out: list[Hit] = []
        for layer, units in sets.items():
            if not units:
                continue
            before = self._reference.get(layer)
            self._reference[layer] = units
            if before is None or units == before or set(units) > set(before):
                continue
            gone = sorted(set(before) - set(units))
            new = sorted(set(units) - set(before))
            moved = f"units {_listing(gone)} are no longer massive" if gone else ""
            if new:
                moved += f"{', ' if moved else ''}units {_listing(new)} are new"
            text = (
                f"its massive units moved from {_listing(before)} to {_listing(units)} ({moved}; hm.massive_units("
                "layer, step) lists them at each step)"
            )
            out.append((layer, float(len(gone) + len(new)), 0.0, text))
        return out

    def state_dict(self) -> dict[str, object]:
        """The reference set of each layer."""
        return {"reference": {layer: list(units) for layer, units in self._reference.items()}}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        reference = state.get("reference")
        if not isinstance(reference, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(u, int) for u in v)
            for k, v in reference.items()
        ):
            raise StateError(
                f"MassiveUnitsMovedRule state `reference` must map layers to lists of ints, got {reference!r:.80}"
            )
        self._reference = {k: tuple(v) for k, v in reference.items()}

    def __repr__(self) -> str:
        return "MassiveUnitsMovedRule()"


def _listing(units: Iterable[int]) -> str:
    return "[" + ", ".join(str(u) for u in units) + "]"


#: Orders of magnitude between a module's weight-gradient norm and the median module's that alert.
PARAM_GRADIENT_ORDERS = 4.0
#: Update ratios (‖Δθ‖ / ‖θ‖ per recorded step) outside this range alert; about 1e-3 is the usual healthy value.
UPDATE_RATIO_RANGE = (1e-6, 1e-1)


class ParamGradientRule(AlertRule):
    """A module whose weight-gradient norm is more than ``orders`` orders of magnitude below or above the median
    module's (default 4: parameter gradients spread more across modules than activation gradients)."""

    name, target = "param_gradient", "params"

    def __init__(self, orders: float = PARAM_GRADIENT_ORDERS) -> None:
        self.orders = check_number("orders", orders, low=0.0, high=300.0, meaning="orders of magnitude")

    def check(self, rows: pd.DataFrame) -> list[Hit]:
        g = rows["grad_norm"].to_numpy(dtype=float)
        low, high = gradient_outliers(g, self.orders)
        median = gradient_median(g)
        out: list[Hit] = []
        for i in np.flatnonzero(low | high):
            side = "below" if low[i] else "above"
            text = (
                f"weight-gradient norm {g[i]:.3g} is {self.orders:g} orders of magnitude {side} the median "
                f"module's {median:.3g}"
            )
            out.append((str(rows["module"].iloc[i]), float(g[i]), median, text))
        return out


class UpdateRatioRule(AlertRule):
    """A module whose update ratio ‖θ_s − θ_p‖ / ‖θ_p‖ is below ``low`` or above ``high`` (defaults 1e-6 and
    1e-1; the common heuristic for a healthy rate is about 1e-3 per step)."""

    name, target = "update_ratio", "params"

    def __init__(self, low: float = UPDATE_RATIO_RANGE[0], high: float = UPDATE_RATIO_RANGE[1]) -> None:
        self.low = check_number("low", low, low=0.0, high=math.inf, high_open=True)
        self.high = check_number("high", high, low=self.low, high=math.inf, high_open=True)

    def check(self, rows: pd.DataFrame) -> list[Hit]:
        r = rows["update_ratio"].to_numpy(dtype=float)
        trained = rows["grad_norm"].to_numpy(dtype=float) > 0  # frozen modules do not move, as they should
        out: list[Hit] = []
        for i in np.flatnonzero(np.isfinite(r) & trained & ((r < self.low) | (r > self.high))):
            big = r[i] > self.high
            text = (
                f"parameters change by {r[i]:.3g} of their norm per recorded step "
                f"({'above' if big else 'below'} {self.high if big else self.low:g})"
            )
            out.append((str(rows["module"].iloc[i]), float(r[i]), self.high if big else self.low, text))
        return out


def default_rules() -> list[AlertRule]:
    """Dead ReLU ≥ 10%, saturation ≥ 50%, vanishing and exploding gradients (3 orders of magnitude), NaN/Inf,
    with parameter statistics weight-gradient outliers (4 orders) and update ratios outside 1e-6…1e-1, and with
    ``Magnitude`` / ``Entropy`` massive units appearing or moving, a kurtosis rising 2 orders of magnitude, dormant
    units ≥ 10%, an attention head's entropy below 0.1 nats."""
    return [
        DeadRatioRule(),
        SaturationRule(),
        VanishingGradientRule(),
        ExplodingGradientRule(),
        NonFiniteRule(),
        ParamGradientRule(),
        UpdateRatioRule(),
        MassiveUnitsRule(),
        MassiveUnitsMovedRule(),
        KurtosisRule(),
        DormantRule(),
        EntropyCollapseRule(),
    ]


class Alerts:
    """Alert configuration for a :class:`~hookscope.HookManager`.

    Args:
        rules: Rules to check; ``None`` means :func:`default_rules`.
        every: Check every this many steps (each check reads one step's values to the host).
        callback: Called with each :class:`Alert`.
        warn: Issue a :class:`HookscopeAlert` warning for each alert.
        log: Log each alert on the ``hookscope`` logger at WARNING level.

    Raises:
        ValueError: ``every`` < 1.
        TypeError: A rule is not an :class:`AlertRule`, or ``callback`` is not callable.

    Example:
        >>> seen = []
        >>> alerts = Alerts(every=10, callback=seen.append, warn=False)
        >>> [r.name for r in alerts.rules]  # doctest: +NORMALIZE_WHITESPACE
        ['dead_relu', 'saturation', 'vanishing_gradient', 'exploding_gradient', 'nonfinite', 'param_gradient',
         'update_ratio', 'massive_units', 'massive_units_moved', 'kurtosis_rise', 'dormant', 'entropy_collapse']
    """

    def __init__(
        self,
        rules: Iterable[AlertRule] | None = None,
        *,
        every: int = 100,
        callback: Callable[[Alert], None] | None = None,
        warn: bool = True,
        log: bool = True,
    ) -> None:
        if isinstance(rules, AlertRule):
            rules = [rules]
        if rules is not None and (isinstance(rules, (str, bytes)) or not isinstance(rules, Iterable)):
            raise ConfigTypeError(f"`rules` must be None or a list of AlertRule instances, got {rules!r}")
        self.rules: list[AlertRule] = default_rules() if rules is None else list(rules)
        for rule in self.rules:
            if isinstance(rule, type) and issubclass(rule, AlertRule):
                raise ConfigTypeError(f"`rules` must hold AlertRule instances, got the class {rule.__name__}")
            if not isinstance(rule, AlertRule):
                raise ConfigTypeError(f"`rules` must hold AlertRule instances, got {rule!r}")
        self.every = check_int("every", every, minimum=1, meaning="check alerts every N steps")
        if callback is not None and not callable(callback):
            raise ConfigTypeError(f"`callback` must be callable, got {callback!r}")
        self.callback = callback
        self.warn = check_bool("warn", warn)
        self.log = check_bool("log", log)
        self.fired: list[Alert] = []
        self._seen: set[tuple[str, ...]] = set()
        self._next_due = self.every - 1  # the first step at which a check is due

    def due(self, step: int) -> bool:
        """Whether the rules are checked at this (recorded) step: checks fall due after steps ``every - 1``,
        ``2 * every - 1``, ..., and one that falls on a step that is not recorded (``HookManager(every=K)``)
        runs at the next recorded step."""
        return step >= self._next_due

    def check(
        self,
        rows: pd.DataFrame,
        step: int,
        primary: bool = True,
        param_rows: pd.DataFrame | None = None,
        series: Mapping[str, list[tuple[int, float]]] | None = None,
        unit_sets: Mapping[str, Mapping[str, tuple[int, ...]]] | None = None,
    ) -> list[Alert]:
        """Apply the rules to one step's rows; report and return the alerts not reported before.

        Series rules (``target = "series"``, :class:`~hookscope.spikes.SpikeRule`) are fed ``series[rule.stat]``:
        the ``(step, value)`` pairs since the previous check; each of their alerts carries the step whose value hit,
        and is reported once per (rule, series, step) — a non-finite value once per (``nonfinite``, series).
        Units rules (``target = "units"``) are given ``unit_sets[rule.stat]``: layer → units at this step.

        Only the ``primary`` process (rank zero under ``torch.distributed``) warns and logs; the callback is
        called on every rank. Every new alert is recorded and delivered even when a custom rule or a delivery
        (the callback, a warning filter that turns warnings into errors) raises; the first such error is raised
        once all are delivered.
        """
        self._next_due = ((step + 1) // self.every + 1) * self.every - 1
        kinds = dict(zip(rows["layer"], rows["kind"])) if {"layer", "kind"} <= set(rows.columns) else {}
        new: list[Alert] = []
        errors: list[Exception] = []  # raised by user code (a custom rule, the callback, warnings as errors)
        for rule in self.rules:
            target_name = getattr(rule, "target", "sites")
            if target_name == "series":
                observe = getattr(rule, "observe", None)
                pairs = (series or {}).get(getattr(rule, "stat", ""), [])
                try:
                    hits_at = observe([s for s, _ in pairs], [v for _, v in pairs]) if observe and pairs else []
                except Exception as e:
                    errors.append(e)
                    continue
                for at, layer, value, threshold, text in hits_at:
                    finite = math.isfinite(value)
                    name = rule.name if finite else "nonfinite"
                    key = (name, layer, str(at)) if finite else (name, layer)
                    if key in self._seen:
                        continue
                    self._seen.add(key)
                    message = f"hookscope: step {at}: {text} ({name}). {hint('spike' if finite else 'nonfinite')}"
                    new.append(Alert(name, layer, at, float(value), float(threshold), message.strip()))
                continue
            target = rows if target_name == "sites" else param_rows
            if target is None and target_name != "units":
                continue
            try:
                if target_name == "units":
                    hits = rule.check_units((unit_sets or {}).get(getattr(rule, "stat", ""), {}))
                else:
                    assert target is not None
                    hits = rule.check(target)
            except Exception as e:
                errors.append(e)
                continue
            for layer, value, threshold, text in hits:
                key = (rule.name, layer)
                if key in self._seen:
                    continue
                self._seen.add(key)
                kind = kinds.get(layer, "")
                message = f"hookscope: step {step}: layer {layer!r}: {text} ({rule.name}). {hint(rule.name, kind)}"
                new.append(Alert(rule.name, layer, step, float(value), float(threshold), message.strip()))
        for alert in new:  # every alert is delivered, whatever one delivery raised
            self.fired.append(alert)
            for deliver in self._deliveries(primary):
                try:
                    deliver(alert)
                except Exception as e:
                    errors.append(e)
        if errors:
            raise errors[0]
        return new

    def series_stats(self) -> set[str]:
        """The series that the rules follow (``SpikeRule.stat``)."""
        return {str(getattr(r, "stat", "")) for r in self.rules if getattr(r, "target", "sites") == "series"}

    def unit_set_names(self) -> set[str]:
        """The unit sets that the rules follow (``target = "units"`` rules' ``stat``)."""
        return {str(getattr(r, "stat", "")) for r in self.rules if getattr(r, "target", "sites") == "units"}

    def state_dict(self) -> dict[str, object]:
        """De-duplication, the next check due, the alerts fired and the rules' own state (plain values)."""
        return {
            "rules": [r.name for r in self.rules],
            "seen": sorted(list(k) for k in self._seen),
            "next_due": self._next_due,
            "fired": [dataclasses.asdict(a) for a in self.fired],
            "rule_states": [r.state_dict() if hasattr(r, "state_dict") else None for r in self.rules],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (checked by :func:`check_alerts_state`)."""
        self._seen = {tuple(k) for k in state["seen"]}
        self._next_due = int(state["next_due"])
        self.fired = [Alert(**a) for a in state["fired"]]
        for rule, rule_state in zip(self.rules, state["rule_states"]):
            if rule_state is not None and hasattr(rule, "load_state_dict"):
                rule.load_state_dict(rule_state)

    def _deliveries(self, primary: bool) -> list[Callable[[Alert], None]]:
        out: list[Callable[[Alert], None]] = []
        if self.warn and primary:
            out.append(lambda alert: warnings.warn(alert.message, HookscopeAlert, stacklevel=user_stacklevel()))
        if self.log and primary:
            out.append(lambda alert: logger.warning(alert.message))
        if self.callback is not None:
            out.append(self.callback)
        return out

    def __repr__(self) -> str:
        return f"Alerts(rules={self.rules}, every={self.every})"


def alerts_of(alerts: object) -> Alerts | None:
    """Check ``HookManager(alerts=...)``: ``True`` (default rules), ``False``/``None`` (off) or an :class:`Alerts`."""
    if alerts is None or alerts is False:
        return None
    if alerts is True:
        return Alerts()
    if isinstance(alerts, Alerts):
        return alerts
    raise ConfigTypeError(f"`alerts` must be True, False, None or a hookscope.Alerts, got {alerts!r}")
