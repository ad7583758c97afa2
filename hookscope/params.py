"""Per-layer parameter statistics: the norm of each module's weights, of their gradients, and the size of each
update relative to the weights.

"Gradient norms per layer" means, for most people who train networks, the norm of each layer's *weight* gradient
(what Lightning's ``grad_norm``, Composer, OLMo-core and torchtitan log). With ``HookManager(params=True)`` every
module that owns parameters directly (``named_parameters(recurse=False)``) is recorded at each recorded
``step()``:

- ``weight_norm`` = sqrt(Σ ‖θ‖²) over the module's own parameters as they are when ``step()`` is called;
- ``grad_norm`` = sqrt(Σ ‖∂L/∂θ‖²) over those parameters' ``.grad`` (the gradient accumulated over the step:
  call ``step()`` before ``zero_grad()``); parameters without a gradient are left out, NaN when none has one;
- ``update_ratio`` = ‖θ_s − θ_p‖ / ‖θ_p‖, θ_s the parameters at this recorded step and θ_p at the previous
  recorded one (NaN at the first). It keeps a copy of the parameters on their devices (the model's size again);
  ``HookManager(param_updates=False)`` turns it off.

A parameter shared by several modules (tied embeddings) counts once, under the first module that owns it in
``named_modules()`` order. Everything runs on the device in a few fused ops per device and step
(``torch._foreach_norm`` and friends), without a host synchronisation; values reach the host with the reports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn

from hookscope.history import History, Rows, StepRecord
from hookscope.sites import ROOT_NAME, iter_named_modules

if TYPE_CHECKING:
    import pandas as pd

    from hookscope.kernels import Backend

__all__ = ["PARAM_COLUMNS", "PARAM_STATS", "ParamStats"]

#: Columns of ``HookManager.param_frame()``, in order.
PARAM_COLUMNS: tuple[str, ...] = ("step", "module", "kind", "params", "weight_norm", "grad_norm", "update_ratio")
#: Its statistic columns.
PARAM_STATS: tuple[str, ...] = ("weight_norm", "grad_norm", "update_ratio")


class _DeviceGroup:
    """The parameters of one device, with the module each belongs to."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.params: list[torch.Tensor] = []
        self.owner: list[int] = []  # module index of each parameter
        self._owner_tensor: torch.Tensor | None = None
        self.previous: list[torch.Tensor] | None = None  # copies at the last recorded step
        self.previous_weight: torch.Tensor | None = None  # their ‖θ‖², per parameter

    def owners(self) -> torch.Tensor:
        if self._owner_tensor is None:
            self._owner_tensor = torch.tensor(self.owner, dtype=torch.long, device=self.device)
        return self._owner_tensor


class ParamStats:
    """Records the parameter statistics of a model's modules (see the module docstring).

    Args:
        model: The model (wrappers are unwrapped as for layer names).
        updates: Keep a copy of the parameters to report ``update_ratio``.
        max_history: Steps kept for reports (``None``: all).
        kernels: The statistics implementation of the manager: with the native kernels, the parameters of a CPU
            device group are read once per step (norms, update and copy in one pass); else ``torch._foreach_*``.
    """

    def __init__(
        self, model: nn.Module, updates: bool = True, max_history: int | None = None, kernels: Backend | None = None
    ) -> None:
        self.updates = updates
        self.kernels = kernels
        self.modules: list[str] = []
        self.kinds: list[str] = []
        self.sizes: list[int] = []
        #: (name, kind, module) of each module with parameters, in ``named_modules()`` order: its parameters are read
        #: from it at each record (see _grouped), so that they are followed where they go.
        self._owners: list[tuple[str, str, nn.Module]] = []
        self._index_of: dict[str, int] = {}  # row of each module name that owns a parameter (made in _grouped)
        # (a parametrized layer's class is ParametrizedConv1d...: its kind is that of the layer)
        kinds = {name: type(m).__name__.lower().removeprefix("parametrized") for name, m in iter_named_modules(model)}
        for name, module in iter_named_modules(model):
            if next(module.parameters(recurse=False), None) is None:
                continue
            # torch.nn.utils.parametrize keeps the original tensors in `layer.parametrizations.weight`: they are
            # the layer's parameters, reported under its name and kind
            name = name.split(".parametrizations.")[0] if ".parametrizations." in name else name
            kind = kinds[name]
            self._owners.append((name, kind, module))
        self._groups: list[_DeviceGroup] = []
        self._grouped_as: list[tuple[int, torch.device]] = []  # (id, device) of each parameter in the groups
        self.history = History(max_steps=max_history)
        self.last: StepRecord | None = None  # the latest recorded step
        self._first = True
        # copies loaded from a saved state (load_state_dict), by parameter name: taken by the first grouping
        self._loaded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.modules)

    def _row(self, name: str, kind: str) -> int:
        """The row of module ``name``, added at the first parameter it owns alone."""
        index = self._index_of.get(name)
        if index is None:
            index = self._index_of[name] = len(self.modules)
            self.modules.append(name or ROOT_NAME)
            self.kinds.append(kind)
            self.sizes.append(0)
        return index

    def record(self, step: int) -> None:
        """Record the statistics of this step (tensor work only)."""
        if not self._owners:
            return
        with torch.no_grad(), torch._C.DisableTorchFunction():
            groups = self._grouped()
            if not groups:
                return  # a lazy module that has not run yet: nothing to measure
            n = len(self.modules)
            parts = [self._group_sums(group, n) for group in groups]
            home = parts[0].device
            sums = parts[0]
            for part in parts[1:]:
                sums = sums + part.to(home, non_blocking=True)
            weight, grad, has_grad, update, previous = sums.unbind(1)
            nan = torch.full_like(weight, float("nan"))
            grad_norm = torch.where(has_grad > 0, grad.sqrt(), nan)
            update_ratio = update.sqrt() / previous.sqrt() if self.updates and not self._first else nan
            values = torch.stack([weight.sqrt(), grad_norm, update_ratio], dim=1)
        self._first = False
        index = list(range(n))
        zeros = [0] * n
        self.last = StepRecord(step, index, zeros, zeros, zeros, list(self.sizes), [()] * n, values)
        self.history.append(self.last)

    def _grouped(self) -> list[_DeviceGroup]:
        """The parameters as they are now, by device (none while a lazy module has not run).

        They are read from their modules at each record and grouped again when one of them moved or was made anew
        after the manager was built (``model.to(device)``; ``to_empty()`` after building on the meta device). A
        group whose parameters stayed keeps its copies; the others start again (``update_ratio`` is NaN at their
        first record).
        """
        seen: set[int] = set()
        params: list[tuple[int, torch.Tensor]] = []
        for name, kind, module in self._owners:  # what `parameters(recurse=False)` yields, shared ones once
            for param in module._parameters.values():
                if param is not None and id(param) not in seen:
                    seen.add(id(param))
                    params.append((self._row(name, kind), param))
        now = [(id(p), p.device) for _, p in params]
        if now != self._grouped_as:
            if any(isinstance(p, nn.parameter.UninitializedParameter) for _, p in params):
                return []
            kept = {(g.device, tuple(map(id, g.params))): g for g in self._groups}
            groups: dict[torch.device, _DeviceGroup] = {}
            self.sizes = [0] * len(self.modules)  # (a module no longer owning anything alone: 0, NaN norms)
            for index, p in params:
                group = groups.setdefault(p.device, _DeviceGroup(p.device))
                group.params.append(p)
                group.owner.append(index)
                self.sizes[index] += p.numel()
            self._groups = [kept.get((g.device, tuple(map(id, g.params))), g) for g in groups.values()]
            self._grouped_as = now
            if self._loaded:
                self._take_loaded()
        return self._groups

    def _group_sums(self, group: _DeviceGroup, n: int) -> torch.Tensor:
        """``(n, 5)`` float64 on the group's device: per module Σ‖θ‖², Σ‖g‖², parameters with a gradient,
        Σ‖θ − θ_prev‖², Σ‖θ_prev‖²."""
        params = group.params
        owners = group.owners()
        columns = torch.zeros(len(params), 5, dtype=torch.float64, device=group.device)
        grads = [p.grad for p in params]
        native = None
        if self.kernels is not None and group.device.type == "cpu":
            previous = group.previous if self.updates else None
            native = self.kernels.param_stats(params, previous, grads)
        if native is not None:  # one pass over each parameter (and its copy, and its gradient)
            columns[:, :2] = native[:, :2]
            columns[:, 2] = torch.tensor([g is not None for g in grads], dtype=torch.float64)
        else:
            columns[:, 0] = _squared_norms(params)
            with_grad = [i for i, g in enumerate(grads) if g is not None]
            if with_grad:
                norms = _squared_norms([grads[i] for i in with_grad])  # type: ignore[misc]
                rows = torch.tensor(with_grad, dtype=torch.long, device=group.device)
                columns[:, 1].index_copy_(0, rows, norms)
                columns[:, 2].index_fill_(0, rows, 1.0)
        if self.updates:
            if group.previous is not None and group.previous_weight is not None:
                if native is not None:
                    columns[:, 3] = native[:, 2]  # the kernel also copied θ into previous
                else:
                    # in place on the copy (no model-sized temporary): previous - θ, its norm, then θ itself
                    torch._foreach_sub_(group.previous, params)
                    columns[:, 3] = _squared_norms(group.previous)
                    torch._foreach_copy_(group.previous, params)
                columns[:, 4] = group.previous_weight  # ‖θ_p‖²: the previous recorded step's weight column
            else:
                group.previous = [p.detach().clone() for p in params]
            group.previous_weight = columns[:, 0].clone()
        out = torch.zeros(n, 5, dtype=torch.float64, device=group.device)
        return out.index_add_(0, owners, columns)

    def owner_names(self) -> list[str]:
        """Names of the modules that own parameters (``""`` for the root)."""
        return [name for name, _, _ in self._owners]

    def named_parameters(self) -> dict[str, torch.Tensor]:
        """Each parameter under its ``module.parameter`` name (as :meth:`parameter_names` names it)."""
        out: dict[str, torch.Tensor] = {}
        for name, _, module in self._owners:
            for pname, param in module._parameters.items():
                if param is not None:
                    out.setdefault(f"{name}.{pname}" if name else pname, param)
        return out

    def parameter_names(self) -> dict[int, str]:
        """``module.parameter`` name of each parameter, by ``id`` (the keys of saved parameter copies)."""
        names: dict[int, str] = {}
        for name, _, module in self._owners:
            for pname, param in module._parameters.items():
                if param is not None and id(param) not in names:
                    names[id(param)] = f"{name}.{pname}" if name else pname
        return names

    def state_dict(self, copies: bool, history: bool = True) -> dict[str, object]:
        """What a resumed run needs (``HookManager.state_dict``): the module rows, the recorded steps, and with
        ``copies`` the parameter copies (and their squared norms) that the next ``update_ratio`` is measured from;
        ``history=False`` leaves the recorded steps out."""
        saved: dict[str, torch.Tensor] = {}
        weights: dict[str, torch.Tensor] = {}
        if copies and self.updates:
            names = self.parameter_names()
            for group in self._groups:
                if group.previous is None or group.previous_weight is None:
                    continue
                for k, (param, copy) in enumerate(zip(group.params, group.previous)):
                    saved[names[id(param)]] = copy.detach().clone()
                    weights[names[id(param)]] = group.previous_weight[k].detach().clone()
        return {
            "modules": list(self.modules),
            "kinds": list(self.kinds),
            "sizes": list(self.sizes),
            "first": self._first,
            "history": (self.history if history else History()).state_dict(),
            "copies": saved,
            "weights": weights,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict` (checked by the caller). Without copies, the first resumed ``update_ratio`` is
        NaN."""
        self.modules = list(state["modules"])  # type: ignore[call-overload]
        self.kinds = list(state["kinds"])  # type: ignore[call-overload]
        self.sizes = list(state["sizes"])  # type: ignore[call-overload]
        self._index_of = {("" if m == ROOT_NAME else m): i for i, m in enumerate(self.modules)}
        self._first = bool(state["first"])
        self.history.load_state_dict(state["history"])  # type: ignore[arg-type]
        rows = self.history.records()
        if len(rows.step):
            last = rows.select(rows.step == rows.step[-1])
            n = len(last.step)
            self.last = StepRecord(
                int(rows.step[-1]), list(range(n)), [0] * n, [0] * n, [0] * n, list(self.sizes), [()] * n,
                torch.from_numpy(last.values.copy()),
            )  # fmt: skip
        copies, weights = state["copies"], state["weights"]
        assert isinstance(copies, dict) and isinstance(weights, dict)
        self._loaded = {name: (copy, weights[name]) for name, copy in copies.items()}
        self._grouped_as = []  # grouped again at the next record, which takes the loaded copies

    def _take_loaded(self) -> None:
        """Give the device groups the loaded parameter copies (all of a group's, or it starts again)."""
        names = self.parameter_names()
        for group in self._groups:
            keys = [names.get(id(p), "") for p in group.params]
            if all(k in self._loaded for k in keys):
                group.previous = [self._loaded[k][0].to(p.device, p.dtype) for k, p in zip(keys, group.params)]
                weight = [self._loaded[k][1].to(torch.float64) for k in keys]
                group.previous_weight = torch.stack(weight).to(group.device) if weight else None
        self._loaded = {}

    def total_grad_norm(self) -> torch.Tensor | None:
        """The model's parameter-gradient norm at the latest record, sqrt(Σ over modules of grad_norm²), on the
        device (``None`` before the first record)."""
        if self.last is None or not isinstance(self.last.values, torch.Tensor):
            return None
        with torch.no_grad(), torch._C.DisableTorchFunction():
            return torch.nan_to_num(self.last.values[:, 1], nan=0.0).square().sum().sqrt()

    def nbytes(self) -> int:
        """Bytes of the parameter copies kept for ``update_ratio``."""
        return sum(p.numel() * p.element_size() for g in self._groups for p in (g.previous or []))

    def last_frame(self) -> pd.DataFrame | None:
        """The rows of the latest recorded step (for alert checks), or ``None`` before the first."""
        return None if self.last is None else self.frame_of(Rows.of(self.last))

    def rows(self) -> Rows:
        """The recorded (step, module) rows."""
        return self.history.records()

    def frame_of(self, rows: Rows) -> pd.DataFrame:
        """The param frame of some rows: columns :data:`PARAM_COLUMNS`, modules in ``named_modules()`` order."""
        import pandas as pd

        values = rows.values if rows.values.ndim == 2 and rows.values.shape[1] == 3 else np.zeros((0, 3))
        out = {
            "step": rows.step.astype(np.int64),
            "module": [self.modules[i] for i in rows.site],
            "kind": [self.kinds[i] for i in rows.site],
            "params": rows.units.astype(np.int64),
        }
        for k, name in enumerate(PARAM_STATS):
            out[name] = values[:, k] if len(values) else np.zeros(0)
        return pd.DataFrame(out, columns=list(PARAM_COLUMNS))


def _squared_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """‖t‖² of each tensor, float64 (norms taken in float32, or float64 for float64 tensors: no fp16 overflow, and
    ``_foreach_norm`` refuses to narrow), in one fused op per precision. Sparse tensors (the gradients of
    ``Embedding(sparse=True)``) count by their stored values, coalesced first (a COO tensor may hold an index
    twice)."""
    tensors = [_stored_values(t) if t.layout != torch.strided else t for t in tensors]
    wide = [t.dtype == torch.float64 for t in tensors]
    if not any(wide):
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).double().square()
    norms: list[torch.Tensor] = list(tensors)
    for is_wide, dtype in ((True, torch.float64), (False, torch.float32)):
        index = [i for i, w in enumerate(wide) if w is is_wide]
        if index:
            for i, value in zip(index, torch._foreach_norm([tensors[i] for i in index], 2, dtype=dtype)):
                norms[i] = value.double()
    return torch.stack(norms).square()


def _stored_values(t: torch.Tensor) -> torch.Tensor:
    """The values of a sparse tensor, each element once."""
    return t.coalesce().values() if t.layout == torch.sparse_coo else t.values()
