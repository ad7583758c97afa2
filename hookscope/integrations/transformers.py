"""Hugging Face ``Trainer``: a callback that instruments the model for the whole of ``trainer.train()``.

How it maps onto the Trainer's events (transformers 4.40 and later):

- ``on_train_begin`` attaches a :class:`~hookscope.HookManager` to ``kwargs["model"]`` (the Trainer's unwrapped
  model), paused; ``on_train_end`` detaches it.
- ``on_step_begin`` (before the first micro-batch of an optimizer step) resumes recording, and
  ``on_pre_optimizer_step`` (after the gradients are clipped, before ``optimizer.step()``; transformers >= 4.45)
  closes the hookscope step and pauses again. The micro-batches of gradient accumulation are one hookscope step and
  the parameter gradients are those the optimizer uses. Older versions lack that event: the step is then closed
  at ``on_optimizer_step`` (4.42 to 4.44, after the update) or ``on_step_end`` (after ``zero_grad()``), which
  changes nothing for the activation statistics.
- Evaluation, prediction, checkpointing and logging run between ``on_step_end`` and the next ``on_step_begin``
  (``eval_on_start`` before the first one): the manager is paused then, so their forwards are never recorded.
  The Trainer has no event before ``evaluate()``: ``on_evaluate`` and ``on_prediction_step`` come after the
  forwards, which is why recording is a window opened by the training step itself.
- Every ``log_every_n_steps`` optimizer steps (``state.global_step`` a multiple of it, like ``logging_steps``), at
  ``on_step_end``, rank zero passes the scalars of the last closed step to ``Trainer.log``, so that they reach
  ``trainer.state.log_history`` and every ``report_to`` integration. A callback cannot do this through ``on_log``:
  the Trainer appends the entry to ``log_history`` before ``on_log`` runs, and user callbacks come after the
  reporting ones. The Trainer passes callbacks no reference to itself, so the callback finds the ``Trainer``
  that runs ``on_train_begin`` on the call stack (it warns and logs nothing if none is there). ``Trainer.log``
  clears ``control.should_log``; the callback sets it back, so the Trainer's own log of that step still happens.
  Like every log, these entries are also printed by the progress bar (``ProgressCallback``, or
  ``PrinterCallback`` with ``disable_tqdm``): choose ``log_every_n_steps``, ``stats`` and ``include`` with that
  in mind, or remove that callback.
- Checkpoints: ``on_save`` writes hookscope's state (``HookManager.state_dict()``) into the checkpoint folder just
  written, as ``hookscope_state.pt`` (world process zero writes; every rank computes it, a collective under DDP);
  ``train(resume_from_checkpoint=...)`` loads it back at ``on_train_begin``: the folder is read from the arguments
  of the Trainer's ``_inner_training_loop`` on the call stack, where the Trainer has resolved it.
- The values of an optimizer step are logged at the ``global_step`` it ends (the step of the Trainer's own
  ``grad_norm`` for it): hookscope step ``s`` of a run that starts at 0 appears at ``global_step`` ``s + 1``.

When training raises, the Trainer calls no callback event (there is no ``on_exception``): the hooks stay on the
model until ``callback.manager.detach()``, the next ``trainer.train()`` (its ``on_train_begin`` closes the
interrupted step as a step of its own and goes on recording), or until the callback is dropped (a manager that is
garbage-collected takes its hooks off). Wrap ``trainer.train()`` in ``try``/``finally`` to detach at once.
"""

from __future__ import annotations

import inspect
import os
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from hookscope.errors import StateError
from hookscope.files import atomic_path
from hookscope.integrations._logging import last_step_scalars, logging_arguments
from hookscope.manager import HookManager
from hookscope.report import ROW_COLUMNS, STAT_COLUMNS, check_stat_names
from hookscope.warn import warn_once

if TYPE_CHECKING:
    import torch.nn as nn

__all__ = ["STATE_FILE", "HookscopeTrainerCallback"]

INSTALL_HINT = "pip install 'hookscope[transformers]'"

try:
    from transformers import TrainerCallback
except ModuleNotFoundError as e:
    raise ModuleNotFoundError(
        f"the Hugging Face Trainer callback needs transformers and accelerate: {INSTALL_HINT} "
        "(or pip install transformers accelerate)"
    ) from e

#: How many frames above ``on_train_begin`` the Trainer is looked for (it is 3 in transformers 4.40 to 5.x).
_TRAINER_SEARCH_DEPTH = 12


class HookscopeTrainerCallback(TrainerCallback):  # type: ignore[misc]
    """Attach a :class:`~hookscope.HookManager` to the Trainer's model at train begin, close one hookscope step
    per optimizer step, log scalars, and detach at train end (see the module documentation for the events used).

    - Gradient accumulation: the micro-batches of one optimizer step are one hookscope step, closed just before
      ``optimizer.step()``.
    - Evaluation and prediction forwards are not recorded.
    - Every ``log_every_n_steps`` optimizer steps the statistics of the last step are logged with
      ``Trainer.log`` as ``hookscope/{layer}/{stat}``, and with ``params=True`` the parameter statistics as
      ``hookscope/params/{module}/{stat}``; they appear in ``trainer.state.log_history`` and in what the Trainer
      reports to (``report_to``). Rank zero only logs; under DDP every rank takes part in ``step()``'s reductions.
    - Hookscope steps are numbered from ``state.global_step`` at the first ``train()`` (0, or the step a
      checkpoint resumes from), unless ``start_step`` is given: step ``s`` is the optimizer step after which
      ``global_step`` is ``s + 1``, and its values are logged at that ``global_step``.

    Args:
        log_every_n_steps: Optimizer steps between logged values (each reads one step's values to the host).
        stats: Activation statistic columns to log.
        **manager_kwargs: Arguments of :class:`~hookscope.HookManager` (``collectors``, ``include``,
            ``params``...).

    Attributes:
        manager: The manager (``None`` before training begins). It stays readable after training, and a later
            ``train()`` of the same model goes on recording in it. A new one is built when ``train()`` runs on
            another model (``model_init``, hyperparameter search); sinks among the manager arguments belong to
            the first manager, so give none in that case.

    Raises:
        ConfigTypeError: ``log_every_n_steps`` or ``stats`` has the wrong type.
        ConfigError: ``log_every_n_steps`` is below 1, or ``stats`` names a column that is not a statistic (at
            train begin: not one of the manager's).

    Example:
        >>> from hookscope.integrations.transformers import HookscopeTrainerCallback
        >>> callback = HookscopeTrainerCallback(log_every_n_steps=10, alerts=False)
        >>> callback.manager is None  # built by trainer.train(): Trainer(..., callbacks=[callback])
        True
    """

    def __init__(
        self, log_every_n_steps: int = 50, stats: str | tuple[str, ...] = STAT_COLUMNS, **manager_kwargs: Any
    ) -> None:
        super().__init__()
        self.log_every_n_steps, self.stats = logging_arguments(log_every_n_steps, stats)
        self.manager_kwargs = manager_kwargs
        self.manager: HookManager | None = None
        self._trainer: Callable[[], Any] = lambda: None  # the Trainer that runs train(), by weak reference
        self._in_step = False  # an optimizer step's micro-batches are running: their forwards are recorded
        self._logged_step: int | None = None

    # ----------------------------------------------------------------------------------------------------------
    # train begin / end

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        trainer = _calling_trainer(inspect.currentframe())
        if trainer is None:
            self._trainer = lambda: None
            warn_once(
                "hookscope: HookscopeTrainerCallback did not find the transformers Trainer that runs it, so it logs "
                "no scalars; the statistics stay available through callback.manager (to_dataframe(), to_csv())"
            )
        else:
            self._trainer = weakref.ref(trainer)
        if model is None:
            return
        resumed = _resumed_checkpoint(inspect.currentframe())
        manager = self.manager
        if manager is not None and manager.model is not model:  # model_init: a new model for this train()
            manager.detach()
            manager = None
        if manager is None:
            manager_kwargs = {"start_step": state.global_step, **self.manager_kwargs}
            manager = HookManager(model, **manager_kwargs)
            check_stat_names(self.stats, tuple(c for c in manager.columns if c not in ROW_COLUMNS), final=True)
            if resumed is not None:
                saved = _read_state(os.path.join(resumed, STATE_FILE), model)
                if saved is not None:
                    manager.load_state_dict(saved)
            self.manager = manager
            self._logged_step = None
        elif self._in_step and manager.attached:  # the last train() raised inside a step: close what it recorded
            manager.step()
        if not manager.attached:
            manager.attach()
        manager.pause()  # until on_step_begin (eval_on_start runs before it)
        self._in_step = False

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Save hookscope's state into the checkpoint folder just written (``checkpoint-<global_step>``), as
        :data:`STATE_FILE`; every rank computes it (a collective under DDP), the world's process zero writes it."""
        manager = self.manager
        if manager is None:
            return
        saved = manager.state_dict()
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not state.is_world_process_zero or not os.path.isdir(folder):
            return
        try:
            with atomic_path(os.path.join(folder, STATE_FILE)) as tmp:
                torch.save(saved, tmp)
        except OSError as e:
            warn_once(f"hookscope: could not save its state into {folder!r}: {e}; a resume from it starts fresh")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._in_step = False
        if self.manager is not None and self.manager.attached:
            self.manager.detach()

    # ----------------------------------------------------------------------------------------------------------
    # steps

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.manager is not None and self.manager.attached:
            self._in_step = True
            self.manager.resume()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close_step()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close_step()  # transformers 4.42 to 4.44 have no on_pre_optimizer_step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close_step()  # transformers < 4.42: neither optimizer event exists
        if state.is_world_process_zero and state.global_step % self.log_every_n_steps == 0:
            self._log(control)

    def _close_step(self) -> None:
        """Close the open step (once per optimizer step: the first of the events above that runs) and pause."""
        manager = self.manager
        if not self._in_step or manager is None or not manager.attached:
            return
        self._in_step = False
        manager.pause()
        manager.step()

    def _log(self, control: Any) -> None:
        manager = self.manager
        trainer = self._trainer()
        if manager is None or not manager.attached or trainer is None:
            return
        step, metrics = last_step_scalars(manager, self.stats)
        if step is None or step == self._logged_step or not metrics:  # nothing new (`every` > 1)
            return
        self._logged_step = step
        should_log = control.should_log
        try:
            trainer.log(metrics)
        finally:  # Trainer.log's on_log clears should_log: the Trainer's own log of this step must still happen
            control.should_log = should_log
            trainer.control.should_log = should_log


#: hookscope's state in a checkpoint folder of the Trainer.
STATE_FILE = "hookscope_state.pt"


def _resumed_checkpoint(frame: Any) -> str | None:
    """The checkpoint folder that the running ``Trainer.train(resume_from_checkpoint=...)`` resumes from (its
    ``_inner_training_loop`` has it, resolved to a folder, among its arguments), or ``None``."""
    for _ in range(_TRAINER_SEARCH_DEPTH):
        if frame is None:
            return None
        if frame.f_code.co_name == "_inner_training_loop":
            path = frame.f_locals.get("resume_from_checkpoint")
            return path if isinstance(path, str) else None
        frame = frame.f_back
    return None


def _read_state(path: str, model: nn.Module) -> dict[str, Any] | None:
    """hookscope's state saved in a checkpoint folder (``None`` when the folder has none: a checkpoint written
    without this callback)."""
    if not os.path.exists(path):
        warn_once(f"hookscope: the checkpoint has no {STATE_FILE}; hookscope's windows and timelines start afresh")
        return None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise StateError(f"hookscope: cannot read its state {path!r} (truncated or not hookscope's?): {e}") from e
    return state  # type: ignore[no-any-return]


def _calling_trainer(frame: Any) -> Any:
    """The ``transformers.Trainer`` (or subclass) whose method is on the call stack above ``frame``, or ``None``."""
    from transformers import Trainer

    for _ in range(_TRAINER_SEARCH_DEPTH):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None
