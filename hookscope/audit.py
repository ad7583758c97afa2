"""One ``no_grad`` pass over a set of batches: which units never fire on the whole data set."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd
import torch
import torch.nn as nn

from hookscope.checks import check_int
from hookscope.collectors.base import Collector
from hookscope.collectors.dead_relu import DeadReLU
from hookscope.errors import ConfigError, ConfigTypeError
from hookscope.manager import HookManager

__all__ = ["audit"]


def _run(model: nn.Module, batch: Any, device: torch.device | None) -> None:
    def move(x: Any) -> Any:
        return x.to(device) if device is not None and isinstance(x, torch.Tensor) else x

    if isinstance(batch, torch.Tensor):
        model(move(batch))
    elif isinstance(batch, Mapping):
        model(**{k: move(v) for k, v in batch.items()})
    elif isinstance(batch, (tuple, list)) and batch:
        model(move(batch[0]))
    else:
        raise ConfigTypeError(
            f"`batches` must yield tensors, (inputs, targets) tuples or dicts of keyword inputs; got {type(batch)}"
        )


def audit(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    collectors: Iterable[Collector] | None = None,
    max_batches: int | None = None,
    **manager_kwargs: Any,
) -> pd.DataFrame:
    """Run the model once over ``batches`` under ``torch.no_grad()`` in eval mode and report every layer.

    The whole pass is one step, so a unit is *dead* when it is never positive over all the batches: the classic
    whole-data-set definition. The model is left exactly as found: every module's train/eval mode is restored
    and no hook remains, also when a batch raises.

    Args:
        model: The model (an ``nn.Module``).
        batches: An iterable (a DataLoader, a list) of tensors, ``(inputs, targets)`` tuples (the first element is
            the input) or dicts of keyword inputs; a single tensor or dict is one batch. Tensors are moved to the
            device of the model's first parameter.
        collectors: As for :class:`~hookscope.HookManager` (default ``DeadReLU``, ``Saturation``,
            ``GradientNorm``; gradient norms are NaN in a ``no_grad`` pass).
        max_batches: Stop after this many batches.
        **manager_kwargs: Further :class:`~hookscope.HookManager` arguments (``include``, ``unit_dim``...).

    Returns:
        The report frame (the columns of ``HookManager.to_dataframe()``, step 0). ``frame.attrs["dead_units"]``
        maps each rectifier layer to the indices of its dead units.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or a batch has an unsupported type.
        ValueError: ``max_batches`` < 1, or ``batches`` is empty.

    Example:
        >>> import torch, torch.nn as nn
        >>> lin = nn.Linear(2, 3)
        >>> with torch.no_grad():
        ...     _ = lin.bias.copy_(torch.tensor([0.0, 0.0, -100.0]))
        >>> report = audit(nn.Sequential(lin, nn.ReLU()), [torch.randn(8, 2) for _ in range(4)])
        >>> report.attrs["dead_units"]
        {'1': [2]}
    """
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"`model` must be a torch nn.Module, got {type(model).__name__}")
    max_batches = check_int("max_batches", max_batches, optional=True, meaning="None runs every batch")
    if isinstance(batches, (torch.Tensor, Mapping)):
        batches = [batches]  # one batch, not an iterable of samples (iterating a tensor would split its batch)
    elif isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise ConfigTypeError(
            f"`batches` must be a tensor (one batch) or an iterable of batches (tensors, (inputs, targets) tuples "
            f"or dicts of keyword inputs, e.g. a DataLoader); got {type(batches).__name__}"
        )
    manager_kwargs.setdefault("alerts", False)
    hm = HookManager(model, collectors, **manager_kwargs)
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    modes = [(m, m.training) for m in model.modules()]
    seen = 0
    try:
        model.eval()
        with torch.no_grad(), hm:
            for batch in batches:
                if max_batches is not None and seen >= max_batches:
                    break
                _run(model, batch, device)
                seen += 1
    finally:
        for module, training in modes:
            module.training = training
    if seen == 0:
        raise ConfigError("`batches` yielded no batch: the audit needs at least one")
    frame = hm.to_dataframe()
    dead = {}
    if any(isinstance(c, DeadReLU) for c in hm.collectors):
        for layer in frame["layer"]:
            if hm.site(layer).spec.rectifier:
                dead[layer] = hm.dead_units(layer)
    frame.attrs["dead_units"] = dead
    return frame
