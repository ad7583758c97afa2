"""Lightning: a callback that instruments the LightningModule for the whole fit."""

from __future__ import annotations

from typing import Any

from hookscope.checks import check_int
from hookscope.manager import HookManager
from hookscope.report import STAT_COLUMNS, check_stat_names, scalars, stat_names

__all__ = ["HookscopeCallback"]

try:
    from lightning.pytorch.callbacks import Callback
except ModuleNotFoundError:  # pragma: no cover - exercised only without lightning
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef,assignment]
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the Lightning callback needs lightning: pip install 'hookscope[lightning]' (or pip install lightning)"
        ) from e


class HookscopeCallback(Callback):  # type: ignore[misc]
    """Attach a :class:`~hookscope.HookManager` to the LightningModule on fit start, close one hookscope step per
    optimizer step, log scalars, and detach on teardown.

    - ``step()`` runs just before each optimizer step, so the gradient-accumulation micro-batches of one optimizer
      step are one hookscope step.
    - Validation (and the sanity check) runs while the manager is paused: its forwards are not training steps.
    - Every ``log_every_n_steps`` optimizer steps the last step's statistics are logged through the trainer's
      loggers as ``hookscope/{layer}/{stat}`` (loggers write on rank zero); under DDP every rank takes part in
      ``step()``'s reductions.

    Args:
        log_every_n_steps: Steps between logged values (each reads one step's values to the host).
        stats: Columns to log.
        **manager_kwargs: Arguments of :class:`~hookscope.HookManager` (``collectors``, ``include``, ...).

    Attributes:
        manager: The manager (``None`` before fit starts).
    """

    def __init__(
        self, log_every_n_steps: int = 50, stats: tuple[str, ...] = STAT_COLUMNS, **manager_kwargs: Any
    ) -> None:
        super().__init__()
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, meaning="steps between logs")
        self.stats = stat_names(stats)
        check_stat_names(self.stats, STAT_COLUMNS, final=False)
        self.manager_kwargs = manager_kwargs
        self.manager: HookManager | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.manager is None:
            self.manager = HookManager(pl_module, **self.manager_kwargs)
        if not self.manager.attached:
            self.manager.attach()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self.manager is not None:
            self.manager.pause()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.manager is not None:
            self.manager.resume()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.manager is None or not self.manager.attached:
            return
        self.manager.step()
        if self.manager.current_step % self.log_every_n_steps == 0:
            frame = self.manager.last_step_frame()
            metrics = {tag: value for tag, _, value in scalars(frame, self.stats)}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.manager is not None and self.manager.attached:
            self.manager.detach()
