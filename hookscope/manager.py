"""``HookManager``: the one object users hold. It validates its arguments, attaches and detaches, closes steps,
and answers reports.

The manager computes nothing and walks no module itself. It owns a :class:`~hookscope.tracing.Tracer` (module
hooks and the function mode: where activations run) and a :class:`~hookscope.recording.Recorder` (the site
table, the open step, the closed steps and their history), and ``step()`` orchestrates them: close the step,
then check the alerts that are due, feed the sinks, and let the tracer end its discovery. Reports are thin
delegates to the recorder and to :mod:`hookscope.report`.

Hooks are global state of a model: every forward pass runs them until they are removed. ``detach()`` removes
exactly the hooks the manager added; the context manager calls it in ``finally``, so an exception in the
training loop never leaves hooks behind, and a manager dropped without ``detach()`` takes them off too.
"""

from __future__ import annotations

import atexit
import functools
import os
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from hookscope import distributed
from hookscope.alerts import Alert, Alerts, alerts_of
from hookscope.checks import check_bool, check_int, describe
from hookscope.collectors.base import Collector, validate_collectors
from hookscope.collectors.dead_relu import DeadReLU
from hookscope.collectors.gradient_norm import GradientNorm
from hookscope.collectors.magnitude import Magnitude
from hookscope.collectors.saturation import Saturation
from hookscope.errors import ConfigTypeError, StateError, UnknownLayerError
from hookscope.feeding import SinkFeed
from hookscope.history import Rows, StepRecord
from hookscope.params import ParamStats
from hookscope.recording import Recorder, note_unfinished
from hookscope.report import ROW_COLUMNS, report_columns
from hookscope.sinks import Sink, sinks_of
from hookscope.sites import ModuleSelection, Site, validate_patterns, validate_unit_dim
from hookscope.spikes import SpikeFeed
from hookscope.state import Resumable
from hookscope.tracing import Tracer
from hookscope.unit_reports import UnitReports
from hookscope.warn import HookscopeWarning, warn_once

if TYPE_CHECKING:
    import pandas as pd
    from rich.table import Table

__all__ = ["DETACH_TIMEOUT", "HookManager"]

#: Seconds ``detach()`` waits for the other ranks to combine the last step under ``torch.distributed``.
DETACH_TIMEOUT = 60.0


class HookManager(UnitReports, Resumable):
    """Instrument the activation layers of a model.

    Args:
        model: The torch ``nn.Module`` to instrument (DDP / DataParallel / ``torch.compile`` wrappers are
            unwrapped for naming).
        collectors: Collector instances; ``None`` means ``[DeadReLU(), Saturation(), GradientNorm()]``, and
            ``Magnitude()`` too when ``modules`` is given.
        include: ``fnmatch`` pattern(s) of layer names to instrument (a pattern matching ``name`` also matches
            its further calls ``name#k``); ``None`` means every site.
        exclude: Pattern(s) of layer names to leave out.
        functional: Capture functional activations (``F.relu``, ``torch.tanh``, ``x.relu_()``...) with a
            ``TorchFunctionMode`` during forward passes.
        modules: Modules whose outputs are *module sites* (kind ``"output"``), beside the activation sites:
            ``fnmatch`` pattern(s) over qualified module names and/or module classes. The output of each call is
            recorded: a tensor, or the first floating-point tensor of a tuple, list or ``ModelOutput`` (Hugging
            Face decoder layers return tuples). A pattern or class that selects no module raises here.
        unit_dim: Override the dimension that holds units: one int for every site, or a mapping from layer-name
            patterns to ints (first match wins); ``None`` uses the default rule
            (see :func:`hookscope.sites.default_unit_dim`).
        every: Record one step in ``every`` (steps 0, every, 2*every, ...); the hooks do nothing in the others.
        max_history: Keep only the latest ``max_history`` steps for reports (memory stays bounded).
        alerts: ``True`` (the default rules, checked every 100 steps), ``False``/``None`` (off), or an
            :class:`~hookscope.alerts.Alerts`.
        sinks: Destinations that receive closed steps while training runs (``CSVSink``, ``TensorBoardSink``).
        start_step: Number of the first step (to continue the numbering of a resumed run).
        params: Also record per-module parameter statistics (weight norm, weight-gradient norm, update ratio) at
            each recorded ``step()``: see :mod:`hookscope.params` and :meth:`param_frame`.
        param_updates: With ``params``, keep a copy of the parameters (the model's size again, on its devices) to
            report ``update_ratio``; ``False`` reports it as NaN and keeps no copy.
        global_stats: Combine statistics across ``torch.distributed`` ranks at every ``step()`` (see
            :mod:`hookscope.distributed`); ``None`` does so when a process group with more than one rank is
            initialised, ``False`` keeps rank-local statistics.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or another argument has the wrong type.
        ValueError: A collector is given twice, or two collectors report the same column.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> with HookManager(model) as hm:
        ...     model(torch.randn(16, 4)).sum().backward()
        ...     hm.step()
        >>> hm.to_dataframe()[["step", "layer", "kind"]].values.tolist()
        [[0, '1', 'relu']]
    """

    def __init__(
        self,
        model: nn.Module,
        collectors: Iterable[Collector] | None = None,
        *,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        functional: bool = True,
        modules: str | type[nn.Module] | Iterable[str | type[nn.Module]] | None = None,
        unit_dim: int | Mapping[str, int] | None = None,
        every: int = 1,
        max_history: int | None = None,
        alerts: Alerts | bool | None = True,
        global_stats: bool | None = None,
        sinks: Iterable[Sink] = (),
        start_step: int = 0,
        params: bool = False,
        param_updates: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigTypeError(
                f"`model` must be a torch nn.Module (torch.nn.Module), got {type(model).__module__}."
                f"{type(model).__qualname__}: {describe(model)}"
            )
        self.model = model
        selection = None if modules is None else ModuleSelection(modules)
        self.collectors: list[Collector] = (
            [DeadReLU(), Saturation(), GradientNorm(), *([Magnitude()] if selection is not None else [])]
            if collectors is None
            else validate_collectors(collectors, reserved=ROW_COLUMNS)
        )
        #: The recording cadence: a step is recorded when its number is a multiple of ``every``. (``Alerts.every``
        #: is the cadence of alert checks and ``Sink.every`` that of writes, each documented there.)
        self.every = check_int("every", every, minimum=1, meaning="record one step in `every`")
        self.max_history = check_int("max_history", max_history, optional=True, meaning="None keeps every step")
        self.alerts = alerts_of(alerts)
        self.global_stats = distributed.global_stats_of(global_stats)
        self.sinks = sinks_of(sinks)
        self._recorder = Recorder(
            self.collectors,
            include=validate_patterns("include", include),
            exclude=validate_patterns("exclude", exclude),
            unit_dim=validate_unit_dim(unit_dim),
            global_stats=self.global_stats,
            max_history=self.max_history,
            start_step=check_int("start_step", start_step, minimum=0, meaning="the number of the first step"),
        )
        self._tracer = Tracer(model, self._recorder, check_bool("functional", functional), selection)
        self.params = check_bool("params", params)
        updates = check_bool("param_updates", param_updates)
        self._params = (
            ParamStats(model, updates, self.max_history, self._recorder.kernels, global_stats=self.global_stats)
            if self.params
            else None
        )
        #: The series that spike rules follow (the loss of ``step(loss=...)``, the total gradient norm, columns).
        self.spikes = SpikeFeed(self.alerts, tuple(c for c in self.columns if c not in ROW_COLUMNS), self.params)
        self._feed = SinkFeed(self.sinks, self._recorder)
        self._paused = False
        self._at_exit: Callable[[], None] | None = None
        self._update_recording()
        bound: list[Sink] = []
        try:
            for sink in self.sinks:
                sink.bind(self)
                bound.append(sink)
        except BaseException:  # a manager that failed to build leaves its sinks free for the next one
            for sink in bound:
                sink.source = None
            raise
        if start_step > 0:  # a resumed run: what the sinks kept of this step and later ones is dropped
            for sink in self.sinks:
                sink.resume_from(start_step)

    # ----------------------------------------------------------------------------------------------------------
    # attach / detach

    def attach(self) -> HookManager:
        """Attach hooks to every module of the model.

        Returns:
            The manager itself.

        Raises:
            RuntimeError: The manager is already attached.
        """
        if self._tracer.attached:
            raise StateError("this HookManager is already attached; call detach() first")
        self._tracer.attach()
        self._recorder.enabled = True
        if self.sinks:  # a script that never detaches still writes its last steps when the interpreter exits
            self._at_exit = functools.partial(_detach_at_exit, weakref.ref(self))
            atexit.register(self._at_exit)
        return self

    def detach(self) -> None:
        """Remove every hook this manager added, then flush and close the sinks. Idempotent; recorded results
        stay readable.

        Raises:
            Exception: What a sink or custom collector raised, once every hook is removed and every sink closed.
        """
        was_attached = self._tracer.attached
        self._tracer.detach()
        self._recorder.enabled = False
        if self._at_exit is not None:
            atexit.unregister(self._at_exit)
            self._at_exit = None
        if not was_attached:
            return
        errors: list[Exception] = []
        if self._params is not None:  # FSDP2: the last record's sums over the ranks
            _collect_error(self._params.release, errors)
        try:  # distributed: the last step is combined here, if every rank gets here in time
            self._deliver(self._recorder.finish(timeout=DETACH_TIMEOUT), errors)
        except Exception as e:
            errors.append(e)
        self._flush_into(errors)
        for i, sink in enumerate(self.sinks):
            self._feed.write(i, errors)
            try:
                sink.close()
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def pause(self) -> None:
        """Stop recording without removing hooks (evaluation passes inside training, for example)."""
        self._paused = True
        self._update_recording()

    def resume(self) -> None:
        """Record again after :meth:`pause`."""
        self._paused = False
        self._update_recording()

    def _update_recording(self) -> None:
        # a flag, not a property: the hooks read it on every module call
        self._tracer.recording = not self._paused and self._recorder.step % self.every == 0

    @property
    def attached(self) -> bool:
        """Whether the hooks are in place."""
        return self._tracer.attached

    def __enter__(self) -> HookManager:
        return self.attach()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.detach()

    # ----------------------------------------------------------------------------------------------------------
    # steps

    @property
    def current_step(self) -> int:
        """Number of the open step (steps are numbered from 0)."""
        return self._recorder.step

    @property
    def sites(self) -> list[Site]:
        """Sites found so far, in order of discovery."""
        return list(self._recorder.sites)

    @property
    def layers(self) -> list[str]:
        """Layer names of the sites found so far."""
        return [s.layer for s in self._recorder.sites]

    @property
    def tracer(self) -> Tracer:
        """The module hooks and function mode (internal, documented for tests and debugging)."""
        return self._tracer

    @property
    def recorder(self) -> Recorder:
        """The site table and recorded steps (internal, documented for tests and debugging)."""
        return self._recorder

    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """Close the current training step: its statistics are recorded and the next step begins.

        Does tensor work only (no host synchronisation); values reach the host when a report is asked for.
        Under ``torch.distributed`` (``global_stats``) this is a collective: every rank must call it.

        Args:
            loss: The step's loss, for :class:`~hookscope.spikes.SpikeRule` ``(stat="loss")``: a one-element tensor
                (kept on its device, detached; it reaches the host with the next alert check) or a number. Ignored
                when no spike rule follows the loss.

        Raises:
            Exception: What user code that hookscope calls raised (a custom collector, an alert callback or rule, a
                sink). The step is closed and numbered all the same, no closed step is lost, every alert due is
                delivered and every other sink is fed; the first such error is raised at the end.
        """
        recorder = self._recorder
        if self._params is not None and self._tracer.attached and recorder.step % self.every == 0:
            self._params.record(recorder.step)  # the parameters as they are now, before the optimizer's step
        self.spikes.add(recorder.step, loss, self._params)
        # the step is closed and numbered here, exactly once; distributed, the previous step is combined
        records = recorder.close_step(passes=self._tracer.passes)
        if self._tracer.passes and not recorder.site_by_key:
            _warn_no_site(self.model, self._tracer.compiled_without_hookscope())
        elif self._tracer.unseen_compiled_calls():
            _warn_compiled_unseen()
        errors = recorder.take_failures()
        try:
            self._deliver(records, errors)
        finally:
            self._tracer.end_step()
            self._update_recording()
            recorder.check_include()
        if errors:
            raise errors[0]

    def _deliver(self, records: list[StepRecord], errors: list[Exception]) -> None:
        """Check the alerts due at these final records and feed them to the sinks; user errors go to ``errors``."""
        recorder = self._recorder
        for record in records:
            fired: list[Alert] = []
            self.spikes.closed(record)
            if self.alerts is not None and self.alerts.due(record.step):
                self._flush_into(errors)
                params = self._params.last_frame() if self._params is not None else None
                before = len(self.alerts.fired)
                try:
                    rows = Rows.of(record)
                    frame = recorder.frame_of_rows(rows)
                    series = self.spikes.drain(recorder.frame)
                    wanted = self.alerts.unit_set_names()
                    units = self._unit_sets_of(rows, wanted) if wanted else None
                    self.alerts.check(
                        frame, record.step, primary=distributed.rank() == 0, param_rows=params, series=series,
                        unit_sets=units,
                    )  # fmt: skip
                except Exception as e:
                    errors.append(e)
                fired = self.alerts.fired[before:]
            self._feed.add(record, fired, errors)

    def _flush_into(self, errors: list[Exception]) -> None:
        """Flush the ring; a collector's error goes to ``errors`` (the values are stored all the same)."""
        try:
            self._recorder.flush()
        except Exception as e:
            errors.append(e)

    def state_bytes(self) -> int:
        """Bytes of collector state on the device (independent of the number of steps)."""
        return self._recorder.state_bytes()

    def history_bytes(self) -> int:
        """Bytes of the recorded history (device values and host counts)."""
        self._recorder.flush()
        return self._recorder.history.nbytes()

    def param_bytes(self) -> int:
        """Bytes of the parameter copies kept for ``update_ratio`` (0 without ``params=True`` or with
        ``param_updates=False``; the model's parameter size once the first step is recorded)."""
        return self._params.nbytes() if self._params is not None else 0

    # ----------------------------------------------------------------------------------------------------------
    # reports

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns of :meth:`to_dataframe`, in order (fixed when the manager is built)."""
        return report_columns(self.collectors)

    def rows(self) -> Rows:
        """Recorded (step, site) rows with their raw counts, the open step included when it has data."""
        return self._recorder.rows()

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (step, layer) in which the layer ran, in forward execution order within each step.

        Columns: ``step, layer, kind, shape, units, calls, dead_ratio, inactive_fraction, saturation_rate,
        grad_norm`` and the columns of custom collectors. A statistic that does not apply to a layer, or whose
        collector is not attached, is NaN. The open step (no ``step()`` since its data) is included.
        """
        note_unfinished(self._recorder)
        return self._recorder.frame_of_rows(self._recorder.rows())

    def last_step_frame(self) -> pd.DataFrame:
        """The rows of the last closed step only (cheap, whatever the length of the history)."""
        self._recorder.flush()
        note_unfinished(self._recorder)
        last = self._recorder.last_closed
        return self._recorder.frame([last] if last is not None else [])

    def param_frame(self) -> pd.DataFrame:
        """One row per (recorded step, module that owns parameters), in ``named_modules()`` order, columns
        ``step, module, kind, params, weight_norm, grad_norm, update_ratio`` (see :mod:`hookscope.params`).

        Raises:
            RuntimeError: The manager was built without ``params=True``.
        """
        stats = self._param_stats()
        return stats.frame_of(stats.rows())

    def last_param_frame(self) -> pd.DataFrame:
        """The rows of :meth:`param_frame` of the last recorded step only."""
        frame = self.param_frame()
        return frame[frame["step"] == frame["step"].max()] if len(frame) else frame

    def param_to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`param_frame` to ``path`` as CSV, atomically (no partial file on error)."""
        from hookscope.reporters.csv import write_csv

        if not isinstance(path, (str, os.PathLike)):
            raise ConfigTypeError(f"`path` must be a str or os.PathLike, got {describe(path)}")
        write_csv(self.param_frame(), path)

    def param_table(self, *, ascii: bool = False, max_rows: int | None = 50) -> Table:
        """A rich table of the parameter statistics of the last recorded step, one row per module (at most
        ``max_rows``: see ``table``)."""
        from hookscope.reporters.table import build_param_table

        check_bool("ascii", ascii)
        return build_param_table(self.last_param_frame(), ascii=ascii, max_rows=max_rows)

    def _param_stats(self) -> ParamStats:
        if self._params is None:
            raise StateError("parameter statistics need HookManager(model, params=True)")
        return self._params

    def site(self, layer: str) -> Site:
        """The site called ``layer``.

        Raises:
            KeyError: No such layer; the message lists the known ones.
        """
        sites = self._recorder.sites
        for site in reversed(sites):  # the latest: a module replaced by another kind has a newer site
            if site.layer == layer:
                return site
        known = ", ".join(s.layer for s in sites[:20]) + (", ..." if len(sites) > 20 else "")
        raise UnknownLayerError(f"unknown `layer` {layer!r}; known layers: {known or '(none recorded yet)'}")

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dataframe` to ``path`` as CSV, atomically (no partial file on error).

        Raises:
            OSError: The directory does not exist or is not writable.
        """
        from hookscope.reporters.csv import write_csv

        if not isinstance(path, (str, os.PathLike)):
            raise ConfigTypeError(f"`path` must be a str or os.PathLike, got {describe(path)}")
        write_csv(self.to_dataframe(), path)

    def table(self, step: int | None = None, *, ascii: bool = False, max_rows: int | None = 50) -> Table:
        """A rich table with one row per layer for the latest step (or ``step``).

        The latest step is built from that step's record alone, so a live view stays cheap however long the run.
        More than ``max_rows`` layers: the worst, worst first, and how many more (``None``: all; see ``build_table``).
        """
        from hookscope.reporters.table import build_table

        check_int("step", step, minimum=0, optional=True, meaning="None shows the latest")
        check_bool("ascii", ascii)
        recorder = self._recorder
        recorder.flush()
        note_unfinished(recorder)
        if step is None:
            latest = recorder.snapshot()
            if latest is None:
                latest = recorder.last_closed
            if latest is not None:
                return build_table(recorder.frame([latest]), ascii=ascii, max_rows=max_rows)
        return build_table(self.to_dataframe(), step=step, ascii=ascii, max_rows=max_rows)

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return (
            f"HookManager({type(self.model).__name__}, collectors={self.collectors}, "
            f"{state}, sites={len(self._recorder.sites)}, step={self._recorder.step})"
        )


def _detach_at_exit(ref: weakref.ReferenceType[HookManager]) -> None:
    """At interpreter exit: write what the sinks of a manager that was never detached have not received yet."""
    manager = ref()
    if manager is None:
        return
    try:
        manager.detach()
    except Exception as e:  # the interpreter is exiting: say it, do not raise
        warnings.warn(f"hookscope: writing the sinks at interpreter exit failed: {e!r}", HookscopeWarning, stacklevel=1)


#: Modules whose activations run inside fused kernels, invisible to any hook.
_FUSED = (nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention)


def _collect_error(fn: Callable[[], None], errors: list[Exception]) -> None:
    """Call ``fn``; what it raises goes to ``errors``."""
    try:
        fn()
    except Exception as e:
        errors.append(e)


def _warn_compiled_unseen() -> None:
    warn_once(
        "hookscope: the torch.compile'd model ran without running hookscope's hooks: torch.compile ignores hooks "
        "added after the compiled model first ran (pytorch/pytorch#117758) until it compiles again (a new input "
        "shape, for example), so those forward passes are not recorded. Attach the HookManager to the model "
        "before calling torch.compile on it."
    )


def _warn_no_site(model: nn.Module, stale_compiled_code: bool) -> None:
    if stale_compiled_code:
        warn_once(
            f"hookscope: the compiled forward of {type(model).__name__} runs code that torch.compile made without "
            "hookscope's hooks: the model was compiled and ran before attaching, or an instance of its class "
            "without hookscope was compiled first (dynamo shares compiled code between instances and does not "
            "guard on hooks); nothing inside it is recorded. Attach before the first compiled call, give an "
            "uninstrumented copy a class of its own, or call torch._dynamo.reset() after attaching"
        )
        return
    fused = sorted({type(m).__name__ for m in model.modules() if isinstance(m, _FUSED)})
    why = (
        f"its {', '.join(fused)} compute their gates and activations inside fused kernels, which no hook sees"
        if fused
        else "it calls no registered activation (see hookscope.list_activations(); register others with "
        "hookscope.register_activation)"
    )
    warn_once(
        f"hookscope: no activation site found in {type(model).__name__} after a forward pass: {why}; nothing is "
        "recorded (parameter statistics, HookManager(params=True), still work)"
    )
