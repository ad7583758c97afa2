"""Lightning: a callback that instruments the LightningModule for the whole fit."""

from __future__ import annotations

from typing import Any

from hookscope.integrations._logging import last_step_scalars, logging_arguments
from hookscope.manager import HookManager
from hookscope.report import ROW_COLUMNS, STAT_COLUMNS, check_stat_names
from hookscope.warn import warn_once

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
    """Attach a :class:`~hookscope.HookManager` to the LightningModule when training starts, close one hookscope
    step per training step, log scalars, and detach on teardown (or when fit raises).

    - Resuming: hookscope steps are numbered from the trainer's ``global_step`` when training starts (0, or the
      step a checkpoint resumes from). The callback's ``state_dict`` is hookscope's state, which Lightning saves in
      its checkpoints; ``fit(ckpt_path=...)`` restores it, so windows, timelines, alerts and sinks go on as if the
      run had not stopped (a ``CSVSink`` drops the rows the interrupted run wrote after the checkpoint).

    - Automatic optimisation: ``step()`` runs just before each optimizer step, so the gradient-accumulation
      micro-batches of one optimizer step are one hookscope step.
    - Manual optimisation (``automatic_optimization = False``, e.g. a GAN with two optimizers): ``step()`` runs at
      the end of each training batch, so the forwards and backwards of all the optimizers of a batch are one
      hookscope step (stepping on each ``optimizer.step()`` would split a generator's forward from its backward).
    - Validation (and the sanity check) runs while the manager is paused: its forwards are not training steps.
    - Every ``log_every_n_steps`` hookscope steps the last step's statistics are logged through the trainer's
      loggers as ``hookscope/{layer}/{stat}`` (loggers write on rank zero), and with ``params=True`` the parameter
      statistics as ``hookscope/params/{module}/{stat}``; under DDP every rank takes part in ``step()``'s
      reductions.

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
        self.log_every_n_steps, self.stats = logging_arguments(log_every_n_steps, stats)
        self.manager_kwargs = manager_kwargs
        self.manager: HookManager | None = None
        self._logged_step: int | None = None
        self._loaded: dict[str, Any] | None = None  # a checkpoint's state, until the manager is built

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.manager is not None and not self.manager.attached:  # a later fit() of the same callback
            self.manager.attach()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # built here, not at fit start: a checkpoint (`fit(ckpt_path=...)`) restores the global step after
        # on_fit_start, and this callback's state (load_state_dict) before it
        if self.manager is None:
            manager_kwargs = {"start_step": trainer.global_step, **self.manager_kwargs}
            manager = HookManager(pl_module, **manager_kwargs)
            check_stat_names(self.stats, tuple(c for c in manager.columns if c not in ROW_COLUMNS), final=True)
            if self._loaded is not None:
                manager.load_state_dict(self._loaded)
                self._loaded = None
            self.manager = manager
        if not self.manager.attached:
            self.manager.attach()

    def state_dict(self) -> dict[str, Any]:
        """hookscope's state (``HookManager.state_dict``), which Lightning stores in its checkpoints; under DDP
        every rank computes it (a collective) and Lightning's rank zero writes it."""
        if self.manager is None:
            return {} if self._loaded is None else dict(self._loaded)
        return {"manager": self.manager.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the state of a checkpoint (``fit(ckpt_path=...)``); the manager loads it when training starts."""
        state = state_dict.get("manager")
        if state is not None and self.manager is not None:
            self.manager.load_state_dict(state)
        else:
            self._loaded = state

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self.manager is not None:
            self.manager.pause()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.manager is not None:
            self.manager.resume()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if pl_module.automatic_optimization:
            self._close_step(trainer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not pl_module.automatic_optimization:
            self._close_step(trainer)

    def _close_step(self, trainer: Any) -> None:
        manager = self.manager
        if manager is None or not manager.attached:
            return
        manager.step()
        if manager.current_step % self.log_every_n_steps == 0:
            step, metrics = last_step_scalars(manager, self.stats)
            if step is None or step == self._logged_step:  # nothing new was recorded (`every` > 1)
                return
            self._logged_step = step
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # Lightning calls on_exception, not teardown, when fit raises: take the hooks off the model here
        if self.manager is not None and self.manager.attached:
            try:
                self.manager.detach()
            except Exception as e:  # the training error is the one to raise
                warn_once(f"hookscope: detaching after the training error failed: {e!r}")

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.manager is not None and self.manager.attached:
            self.manager.detach()
