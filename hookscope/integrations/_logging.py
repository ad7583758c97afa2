"""The scalars that the logging integrations write, built in one place so that Lightning, the Hugging Face
callback and the TensorBoard sink use the same tags and skip the same values.

Tags:

- ``hookscope/{layer}/{stat}``: the activation statistics of a step (:func:`hookscope.report.scalars`);
- ``hookscope/params/{module}/{stat}``: the parameter statistics of a manager built with ``params=True``
  (``weight_norm``, ``grad_norm``, ``update_ratio`` from ``HookManager.param_frame()``).

Layer names hold no ``/``, so the two families never collide: parameter tags have one more part. NaN values are
never written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hookscope.checks import check_int
from hookscope.report import STAT_COLUMNS, check_stat_names, scalars, stat_names

if TYPE_CHECKING:
    import pandas as pd

    from hookscope.manager import HookManager

__all__ = ["PARAM_STATS", "last_step_scalars", "param_scalars", "records_params"]

#: The parameter statistics that are logged, in order (columns of ``HookManager.param_frame()``).
PARAM_STATS: tuple[str, ...] = ("weight_norm", "grad_norm", "update_ratio")


def records_params(source: object) -> bool:
    """Whether ``source`` (a manager, or a sink's source) records parameter statistics (``params=True``).

    Managers without the option (or before it existed) answer ``False``: nothing asks them for ``param_frame()``.
    """
    return getattr(source, "params", False) is True


def param_scalars(frame: pd.DataFrame, stats: Sequence[str] = PARAM_STATS) -> list[tuple[str, int, float]]:
    """``(tag, step, value)`` for each finite statistic of each row of a ``param_frame()``, tagged
    ``hookscope/params/{module}/{stat}``."""
    return scalars(frame, stats, key="module", prefix="hookscope/params")


def last_step_scalars(manager: HookManager, stats: Sequence[str] = STAT_COLUMNS) -> tuple[int | None, dict[str, float]]:
    """The number of the last closed step and its scalars as ``{tag: value}``, ready for a logger.

    The activation statistics come from ``manager.last_step_frame()``; with ``params=True`` the parameter
    statistics of the latest closed step of ``manager.param_frame()`` are added. Reads one step's values to the
    host (a synchronisation): call it every few steps, not every step.

    Args:
        manager: The manager to read.
        stats: Activation statistic columns to include.

    Returns:
        The step the values belong to (``None`` when no step was recorded yet; a caller may skip a step it
        already logged, as happens when the manager records one step in ``every``) and the scalars.
    """
    if manager.recorder.last_closed is None:  # no step closed yet: nothing to log
        return None, {}
    frame = manager.last_step_frame()
    step = int(frame["step"].iloc[0]) if len(frame) else None
    out = {tag: value for tag, _, value in scalars(frame, stats)}
    if records_params(manager):
        params = manager.param_frame()  # type: ignore[attr-defined]
        closed = params[params["step"] < manager.current_step]  # the open step's values are not final
        if len(closed):
            last = int(closed["step"].max())
            out.update((tag, value) for tag, _, value in param_scalars(closed[closed["step"] == last]))
            step = last if step is None else max(step, last)
    return step, out


def logging_arguments(log_every_n_steps: object, stats: object) -> tuple[int, tuple[str, ...]]:
    """Check the ``log_every_n_steps`` and ``stats`` of a trainer callback (house messages)."""
    every = check_int("log_every_n_steps", log_every_n_steps, meaning="steps between logs")
    names = stat_names(stats)
    check_stat_names(names, STAT_COLUMNS, final=False)
    return every, names
