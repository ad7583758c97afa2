"""A sink that hands the rows of closed steps to a function: the bridge to any logger hookscope does not know."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from hookscope.checks import describe
from hookscope.errors import ConfigTypeError
from hookscope.sinks import Sink

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["CallbackSink"]


class CallbackSink(Sink):
    """Calls ``fn(frame)`` every ``every`` closed steps, with the rows of the steps closed since the last call.

    ``frame`` has the columns of :meth:`HookManager.to_dataframe() <hookscope.HookManager.to_dataframe>`. The
    manager calls ``fn`` on rank zero only under ``torch.distributed`` (the values are global), and once more when
    it detaches, with the steps left. :func:`hookscope.report.scalars` turns a frame into
    ``(tag, step, value)`` triples, the names TensorBoard and Lightning get.

    ``fn`` is your code: an exception it raises propagates out of ``step()`` (or ``detach()``). The sink itself
    keeps no state between calls, so the next call is as good as the first.

    Args:
        fn: A callable taking one DataFrame; its return value is ignored.
        every: Steps between calls.

    Raises:
        ConfigTypeError: ``fn`` is not callable.

    Example:
        >>> import torch, torch.nn as nn
        >>> from hookscope import HookManager
        >>> calls = []
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> with HookManager(model, sinks=[CallbackSink(calls.append, every=2)], alerts=False) as hm:
        ...     for _ in range(3):
        ...         _ = model(torch.randn(4, 2))
        ...         hm.step()
        >>> [list(frame["step"]) for frame in calls]  # two steps, then the one left at detach
        [[0, 1], [2]]
    """

    def __init__(self, fn: Callable[[pd.DataFrame], object], every: int = 100) -> None:
        super().__init__(every)
        if not callable(fn):
            raise ConfigTypeError(
                f"`fn` must be a callable taking one DataFrame (e.g. a function or lambda frame: ...), "
                f"got {describe(fn)}"
            )
        self.fn = fn

    def write(self, frame: pd.DataFrame) -> None:
        self.fn(frame)

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", None) or describe(self.fn)
        return f"CallbackSink({name}, every={self.every})"
