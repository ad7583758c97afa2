"""Collectors: device-side statistics recorded at every hook site."""

from __future__ import annotations

from hookscope.collectors.base import Collector, SiteState, StateBank, StateSpec
from hookscope.collectors.dead_relu import DeadReLU
from hookscope.collectors.entropy import Entropy
from hookscope.collectors.gradient_norm import GradientNorm
from hookscope.collectors.magnitude import Magnitude
from hookscope.collectors.nonfinite import NonFinite
from hookscope.collectors.saturation import Saturation

__all__ = [
    "Collector",
    "DeadReLU",
    "Entropy",
    "GradientNorm",
    "Magnitude",
    "NonFinite",
    "Saturation",
    "SiteState",
    "StateBank",
    "StateSpec",
]
