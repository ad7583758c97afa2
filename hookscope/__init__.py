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

from hookscope.activations import ActivationSpec, get_activation, list_activations, register_activation
from hookscope.alerts import Alert, AlertRule, Alerts, HookscopeAlert
from hookscope.audit import audit
from hookscope.collectors import Collector, DeadReLU, GradientNorm, NonFinite, Saturation
from hookscope.errors import ConfigError, HookscopeError
from hookscope.manager import HookManager
from hookscope.sites import Site
from hookscope.warn import HookscopeWarning

__version__ = "0.1.0"

__all__ = [
    "ActivationSpec",
    "Alert",
    "AlertRule",
    "Alerts",
    "Collector",
    "ConfigError",
    "DeadReLU",
    "GradientNorm",
    "HookManager",
    "HookscopeAlert",
    "HookscopeError",
    "HookscopeWarning",
    "NonFinite",
    "Saturation",
    "Site",
    "__version__",
    "audit",
    "get_activation",
    "list_activations",
    "register_activation",
]
