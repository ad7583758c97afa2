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

Sharded parameters (``DTensor``: FSDP2's ``fully_shard``, tensor parallelism) are measured on each rank's local
shard (its ``to_local()``, and its gradient's), and with global statistics the five sums of each module are added
up over the ranks (the squared norms of the shards add up to the squared norm of the whole parameter; a
placement replicated over a mesh dimension is counted once): every rank reports the norms of the whole
parameters. The sums are posted at the recorded ``step()`` without waiting, in a process group of hookscope's
own, and read at the next record or report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn

from hookscope import distributed
from hookscope.history import History, Rows, StepRecord
from hookscope.sites import ROOT_NAME, iter_named_modules
from hookscope.warn import warn_once

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
        self.params: list[torch.Tensor] = []  # what is measured: the parameter, or its local shard
        self.sources: list[torch.Tensor] = []  # the module's parameter (its `.grad` is read)
        self.owner: list[int] = []  # module index of each parameter; + n for a sharded one (summed over ranks)
        self.share: list[float] = []  # 1 / the ranks that hold the same shard (a replicated mesh dimension)
        self._owner_tensor: torch.Tensor | None = None
        self.previous: list[torch.Tensor] | None = None  # copies at the last recorded step
        self.previous_weight: torch.Tensor | None = None  # their ‖θ‖², per parameter

    def owners(self) -> torch.Tensor:
        if self._owner_tensor is None:
            self._owner_tensor = torch.tensor(self.owner, dtype=torch.long, device=self.device)
        return self._owner_tensor

    def grads(self) -> list[torch.Tensor | None]:
        """The gradient of each parameter (its local shard for a sharded one), as it is now."""
        return [_local(p.grad) if p.grad is not None else None for p in self.sources]


class ParamStats:
    """Records the parameter statistics of a model's modules (see the module docstring).

    Args:
        model: The model (wrappers are unwrapped as for layer names).
        updates: Keep a copy of the parameters to report ``update_ratio``.
        max_history: Steps kept for reports (``None``: all).
        kernels: The statistics implementation of the manager: with the native kernels, the parameters of a CPU
            device group are read once per step (norms, update and copy in one pass); else ``torch._foreach_*``.
        global_stats: Add the sums of sharded parameters (``DTensor``) over the ranks: whole-parameter norms.
    """

    def __init__(
        self,
        model: nn.Module,
        updates: bool = True,
        max_history: int | None = None,
        kernels: Backend | None = None,
        global_stats: bool = False,
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
        kinds = {name: _kind(m) for name, m in iter_named_modules(model)}
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
        #: Add the sums of sharded parameters over the ranks (``global_stats``); else local shards are reported.
        self.global_stats = global_stats
        self._sum: distributed.RankSum | None = None
        self._sharded = False  # some parameter's sums are added up over the ranks
        self._local_shards = False  # some parameter is measured on its local shard
        # a recorded step whose sharded sums are being added up over the ranks: (record, local sums, the sum)
        self._pending: tuple[StepRecord, torch.Tensor, Callable[[], torch.Tensor]] | None = None
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
        """Record the statistics of this step (tensor work only; with sharded parameters and global statistics,
        their sums are posted to the other ranks without waiting)."""
        self._finish()
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
            local, sharded = sums[:n], sums[n:]
            post = self._sharded
        index = list(range(n))
        zeros = [0] * n
        record = StepRecord(step, index, zeros, zeros, zeros, list(self.sizes), [()] * n, None)
        if post:
            if self._sum is None:
                self._sum = distributed.RankSum()
            self._pending = (record, local, self._sum.post(sharded.contiguous()))
        else:
            self._store(record, local + sharded)

    def _finish(self) -> None:
        """Store the pending record once the other ranks' sums of its sharded parameters arrived."""
        if self._pending is not None:
            record, local, total = self._pending
            self._pending = None
            self._store(record, local + total())

    def release(self) -> None:
        """Finish the pending record and drop the process groups (at ``detach()``: a gloo group freed while the
        interpreter shuts down, after ``destroy_process_group()``, aborts the process; see ``_Combiner.release``).
        A later record makes new groups."""
        try:
            self._finish()
        finally:
            self._sum = None

    def _store(self, record: StepRecord, sums: torch.Tensor) -> None:
        """Turn a record's ``(n, 5)`` sums into its values and keep it."""
        with torch.no_grad(), torch._C.DisableTorchFunction():
            weight, grad, has_grad, update, previous = sums.unbind(1)
            nan = torch.full_like(weight, float("nan"))
            grad_norm = torch.where(has_grad > 0, grad.sqrt(), nan)
            update_ratio = update.sqrt() / previous.sqrt() if self.updates and not self._first else nan
            record.values = torch.stack([weight.sqrt(), grad_norm, update_ratio], dim=1)
        self._first = False
        self.last = record
        self.history.append(record)

    def _grouped(self) -> list[_DeviceGroup]:
        """The parameters as they are now, by device (none while a lazy module has not run).

        They are read from their modules at each record and grouped again when one of them moved or was made anew
        after the manager was built (``model.to(device)``; ``to_empty()`` after building on the meta device). A
        group whose parameters stayed keeps its copies; the others start again (``update_ratio`` is NaN at their
        first record).
        """
        seen: set[int] = set()
        params: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (row, parameter, what is measured)
        for name, kind, module in self._owners:  # what `parameters(recurse=False)` yields, shared ones once
            for param in module._parameters.values():
                if param is not None and id(param) not in seen:
                    seen.add(id(param))
                    params.append((self._row(name, kind), param, _local(param)))
        now = [(id(p), t.device) for _, p, t in params]
        if now != self._grouped_as:
            if any(isinstance(p, nn.parameter.UninitializedParameter) for _, p, _ in params):
                return []
            kept = {(g.device, tuple(map(id, g.sources))): g for g in self._groups}
            groups: dict[torch.device, _DeviceGroup] = {}
            n = len(self.modules)
            self.sizes = [0] * n  # (a module no longer owning anything alone: 0, NaN norms)
            for index, p, t in params:
                group = groups.setdefault(t.device, _DeviceGroup(t.device))
                share = _share(p) if t is not p and self.global_stats else None
                group.params.append(t)
                group.sources.append(p)
                group.owner.append(index if share is None else index + n)
                group.share.append(1.0 if share is None else share)
                self.sizes[index] += p.numel()  # the whole parameter's elements
            self._sharded = any(o >= n for g in groups.values() for o in g.owner)
            self._local_shards = any(t is not p for _, p, t in params)
            self._groups = [kept.get((g.device, tuple(map(id, g.sources))), g) for g in groups.values()]
            self._grouped_as = now
            if self._loaded:
                self._take_loaded()
        elif self._local_shards:  # a DTensor's to_local() is a new view of its shard at each call
            for group in self._groups:
                group.params = [_local(p) for p in group.sources]
        return self._groups

    def _group_sums(self, group: _DeviceGroup, n: int) -> torch.Tensor:
        """``(n, 5)`` float64 on the group's device: per module Σ‖θ‖², Σ‖g‖², parameters with a gradient,
        Σ‖θ − θ_prev‖², Σ‖θ_prev‖²."""
        params = group.params
        owners = group.owners()
        columns = torch.zeros(len(params), 5, dtype=torch.float64, device=group.device)
        grads = group.grads()
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
        if any(share != 1.0 for share in group.share):  # a shard held by several ranks is counted once
            columns *= torch.tensor(group.share, dtype=torch.float64).to(group.device, non_blocking=True)[:, None]
        out = torch.zeros(2 * n, 5, dtype=torch.float64, device=group.device)  # local rows, then sharded ones
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
                for k, (param, copy) in enumerate(zip(group.sources, group.previous)):
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
            keys = [names.get(id(p), "") for p in group.sources]
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
        self._finish()
        return None if self.last is None else self.frame_of(Rows.of(self.last))

    def rows(self) -> Rows:
        """The recorded (step, module) rows."""
        self._finish()
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


def _kind(module: nn.Module) -> str:
    """The lower-case class name of the layer: a parametrized layer's class is ParametrizedConv1d..., and FSDP2's
    ``fully_shard`` makes a class ``FSDPLinear(FSDPModule, Linear)``: its kind is that of the layer."""
    cls = type(module)
    if len(cls.__bases__) == 2 and cls.__bases__[0].__name__ == "FSDPModule":
        cls = cls.__bases__[1]
    return cls.__name__.lower().removeprefix("parametrized")


def _is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (FSDP2's parameters and gradients, tensor parallelism)."""
    return hasattr(t, "to_local") and hasattr(t, "placements") and hasattr(t, "device_mesh")


def _local(t: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``t``: its local shard for a ``DTensor``, else ``t``."""
    return t.to_local() if _is_sharded(t) else t  # type: ignore[attr-defined,no-any-return]


def _share(p: torch.Tensor) -> float | None:
    """For a sharded parameter whose mesh spans every rank: 1 / the ranks that hold each shard (its replicated mesh
    dimensions), so that a sum over the ranks counts each element once. ``None`` (local-shard norms, with one
    warning) for a mesh of some ranks only, whose sums cannot be added up over every rank."""
    mesh = p.device_mesh  # type: ignore[attr-defined]
    if mesh.size() != distributed.world_size():
        warn_once(
            f"hookscope: parameter statistics: a sharded parameter lives on a device mesh of {mesh.size()} of the "
            f"{distributed.world_size()} ranks; its norms are those of each rank's local shard"
        )
        return None
    copies = 1
    for dim, placement in enumerate(p.placements):  # type: ignore[attr-defined]
        if placement.is_replicate():
            copies *= mesh.size(dim)
    return 1.0 / copies


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
