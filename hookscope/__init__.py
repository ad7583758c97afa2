"""hookscope: see what the activation layers of a PyTorch model are doing while it trains.

Example:
    >>> import torch, torch.nn as nn
    >>> import hookscope as hs
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1), nn.Sigmoid())
    >>> with hs.HookManager(model) as hm:
    ...     model(torch.randn(32, 4)).mean().backward()
    ...     hm.step()
    >>> list(hm.to_dataframe()["kind"])
    ['relu', 'sigmoid']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hookscope.activations import ActivationSpec, get_activation, list_activations, register_activation
from hookscope.alerts import Alert, AlertRule, Alerts, HookscopeAlert
from hookscope.audit import audit
from hookscope.collectors import Collector, DeadReLU, Entropy, GradientNorm, Magnitude, NonFinite, Saturation
from hookscope.errors import ConfigError, HookscopeError
from hookscope.manager import HookManager
from hookscope.reporters.callback import CallbackSink
from hookscope.reporters.csv import CSVSink
from hookscope.reporters.flight import FlightRecorder
from hookscope.sites import Site
from hookscope.spikes import SpikeRule
from hookscope.warn import HookscopeWarning

if TYPE_CHECKING:
    from hookscope.integrations.tensorboard import TensorBoardSink

__version__ = "0.1.0"

__all__ = [
    "ActivationSpec",
    "Alert",
    "AlertRule",
    "Alerts",
    "CSVSink",
    "CallbackSink",
    "Collector",
    "ConfigError",
    "DeadReLU",
    "Entropy",
    "FlightRecorder",
    "GradientNorm",
    "HookManager",
    "HookscopeAlert",
    "HookscopeError",
    "HookscopeWarning",
    "Magnitude",
    "NonFinite",
    "Saturation",
    "Site",
    "SpikeRule",
    "TensorBoardSink",
    "__version__",
    "audit",
    "get_activation",
    "list_activations",
    "register_activation",
]


def __getattr__(name: str) -> Any:
    # optional integrations load on first use, so that ``import hookscope`` needs none of their dependencies
    if name == "TensorBoardSink":
        from hookscope.integrations.tensorboard import TensorBoardSink

        return TensorBoardSink
    raise AttributeError(f"module 'hookscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
