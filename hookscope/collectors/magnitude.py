"""Magnitude and outlier statistics of module outputs: element statistics (RMS, mean, std, abs-max, kurtosis, zero
fraction) and the neuron-level ones of the papers (massive units, dormant units, kurtosis of neuron RMS)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import torch

from hookscope.checks import check_bool, check_number
from hookscope.collectors.base import Collector, SiteState
from hookscope.collectors.units import keep_latest, latest_host, per_unit
from hookscope.sites import Site

__all__ = ["MASSIVE_SLOTS", "Magnitude"]

_F64 = torch.float64
#: Massive units recorded by index per (step, site), the largest first (``HookManager.massive_units``).
MASSIVE_SLOTS = 8
#: The per-step per-unit states and the persistent copies of the latest step in which each unit had data.
_UNIT_STATES = (("count", "last_count"), ("abs_sum", "last_abs_sum"), ("sq_sum", "last_sq_sum"),
                ("abs_max", "last_abs_max"))  # fmt: skip


class Magnitude(Collector):
    """Magnitude and outlier statistics of every element of a site's outputs, and of its units.

    Over all finite elements x of all calls (and micro-batches) of the site in the step, n of them (NaN and ±inf
    are left out of everything here and counted by ``NonFinite``):

    - ``rms`` = sqrt(Σx²/n); ``mean`` = Σx/n; ``std`` = sqrt(max(Σx²/n − mean², 0)) (population);
      ``abs_max`` = max |x|; ``kurtosis`` = (Σx⁴/n) / (Σx²/n)² (non-central, as torchtitan's: 3 for a centred
      Gaussian); ``zero_fraction`` = #(x == 0) / n.
    - Per unit u (its finite elements; units without any are left out): m_u = mean |x_u|, a_u = max |x_u|, r_u =
      sqrt(mean x_u²). ``massive_units`` = #{u : a_u ≥ massive_abs and a_u ≥ massive_ratio · median_u(m_u)}
      (Sun et al. 2024; the median averages the two middle values of an even count); ``dormant_ratio`` = #{u :
      m_u ≤ dormant_tau · mean_u(m_u)} / units (Sokar et al. 2023's τ-dormant score m_u / mean_u(m_u) ≤ τ, written
      without a division: a site whose outputs are all 0 has every unit dormant); ``neuron_kurtosis`` =
      mean_u(r_u⁴) / (mean_u(r_u²))² (He et al. 2024's kurtosis of the neurons' RMS).

    Everything comes from sums and maxima that merge exactly over calls, micro-batches and ranks (counts and power
    sums per unit and per site, abs-max per unit); the per-unit rules are applied when steps are closed, to the
    merged (under ``torch.distributed``, global) values. Sums are accumulated in float64; squares and fourth powers
    of float32 (and half-precision) outputs are taken in float32, so an element above about 4e9 in magnitude makes
    the kurtosis infinite.

    Args:
        activations: Also record activation sites (by default, only module sites: ``HookManager(modules=...)``).
        massive_abs: The absolute part of the massive-unit rule (Sun et al.: 100).
        massive_ratio: The relative part: times the median unit's mean magnitude (Sun et al.: about 1000).
        dormant_tau: The τ of the dormant-unit score (Sokar et al. use 0.025 and 0.1; 0 counts units that are
            exactly 0 everywhere).

    Raises:
        ConfigError: ``massive_abs`` or ``massive_ratio`` not > 0 and finite, ``dormant_tau`` outside [0, 1).
        ConfigTypeError: An argument of the wrong type.

    Example:
        >>> Magnitude().columns[:3]
        ('rms', 'mean', 'std')
    """

    columns = (
        "rms", "mean", "std", "abs_max", "kurtosis", "zero_fraction", "massive_units", "dormant_ratio",
        "neuron_kurtosis",
    )  # fmt: skip
    unit_columns: ClassVar[tuple[str, ...]] = ("mean_abs", "abs_max", "rms")
    unit_sets: ClassVar[tuple[str, ...]] = ("massive_units",)

    def __init__(
        self,
        activations: bool = False,
        massive_abs: float = 100.0,
        massive_ratio: float = 1000.0,
        dormant_tau: float = 0.025,
    ) -> None:
        super().__init__()
        self.activations = check_bool("activations", activations, meaning="also record activation sites")
        self.massive_abs = check_number("massive_abs", massive_abs, low=0.0, high=math.inf, high_open=True)
        self.massive_ratio = check_number("massive_ratio", massive_ratio, low=0.0, high=math.inf, high_open=True)
        self.dormant_tau = check_number(
            "dormant_tau", dormant_tau, low=0.0, high=1.0, low_open=False, high_open=True, meaning="τ of m_u/mean(m)"
        )
        self._slots = MASSIVE_SLOTS
        # per unit, per step: finite elements, Σ|x|, Σx², max|x|
        self.add_state("count", per_unit=True)
        self.add_state("abs_sum", per_unit=True)
        self.add_state("sq_sum", per_unit=True)
        self.add_state("abs_max", reduce="max", per_unit=True)
        # per site, per step: Σx, Σx⁴, #(x == 0)
        self.add_state("sum")
        self.add_state("quad_sum")
        self.add_state("zeros")
        # per unit: the values of the latest step in which it had data (HookManager.unit_frame)
        for _, kept in _UNIT_STATES:
            self.add_state(kept, per_unit=True, persistent=True)
        self.add_state("last_step", -math.inf, reduce="max", per_unit=True, persistent=True)

    def applies_to(self, site: Site) -> bool:
        return self.activations or site.spec.name == "output"

    def update(self, state: SiteState, output: torch.Tensor, site: Site) -> None:
        x = output
        if x.numel() == 0:
            return
        if x.dtype not in (torch.float32, _F64):
            x = x.float()
        finite = torch.isfinite(x)
        clean = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        magnitude = clean.abs()
        square = clean * clean
        u, units, dims = site.unit_dim, site.units, site.reduce_dims
        state["count"].add_(per_unit(finite, u, units, dims, "sum"))
        state["abs_sum"].add_(per_unit(magnitude, u, units, dims, "sum"))
        state["sq_sum"].add_(per_unit(square, u, units, dims, "sum"))
        top = state["abs_max"]
        torch.maximum(top, per_unit(magnitude, u, units, dims, "amax").to(_F64), out=top)
        state["sum"].add_(clean.sum(dtype=_F64))
        state["quad_sum"].add_(square.mul_(square).sum(dtype=_F64))
        state["zeros"].add_((x == 0).sum(dtype=_F64))

    def fused_output(self, site: Site) -> Mapping[str, str] | None:
        """The magnitude pass computes every state it updates (see ``hookscope.kernels.output_stats``)."""
        return {name: name for name in ("count", "abs_sum", "sq_sum", "abs_max", "sum", "quad_sum", "zeros")}

    def close_steps(self, steps: list[int], block: Mapping[str, torch.Tensor], commit: bool) -> dict[str, torch.Tensor]:
        bank = self.bank
        count, abs_sum, sq_sum, abs_max = (block[name] for name, _ in _UNIT_STATES)  # (T, U) each
        t, n_sites = count.shape[0], bank.n_sites
        device = count.device
        has = count > 0
        live = has.to(_F64)
        m = abs_sum / count  # NaN for units without data
        r2 = sq_sum / count
        owners = bank.owners()
        # per site: finite elements, Σx², units with data, Σ m_u, Σ r_u², Σ r_u⁴
        zero = torch.zeros((), dtype=_F64, device=device)
        m0, r20 = torch.where(has, m, zero), torch.where(has, r2, zero)
        stacked = torch.stack([count.T, sq_sum.T, live.T, m0.T, r20.T, (r20 * r20).T], dim=-1)
        sums = bank.per_site_sum(stacked).transpose(0, 1)  # (T, S, 6)
        site_max = torch.zeros(n_sites, t, dtype=_F64, device=device)
        site_max.scatter_reduce_(0, owners[:, None].expand(-1, t), abs_max.T, reduce="amax", include_self=True)
        mean_m = sums[..., 3] / sums[..., 2]  # (T, S): mean over units with data of m_u
        dormant_units = has & (m0 <= self.dormant_tau * mean_m[:, owners])
        median = torch.full((t, n_sites), math.nan, dtype=_F64, device=device)
        slots = torch.full((t, n_sites, self._slots), math.nan, dtype=_F64, device=device)
        for i in range(n_sites if t else 0):  # the median and the largest massive units need each site's units
            span = bank.unit_range(i)
            if span is None or span[1] == 0:
                continue
            off, n = span
            median[:, i] = torch.nanquantile(m[:, off : off + n], 0.5, dim=1)
        massive = has & (abs_max >= self.massive_abs) & (abs_max >= self.massive_ratio * median[:, owners])
        for i in range(n_sites if t else 0):
            span = bank.unit_range(i)
            if span is None or span[1] == 0:
                continue
            off, n = span
            k = min(self._slots, n)
            score = torch.where(massive[:, off : off + n], abs_max[:, off : off + n], -math.inf)
            top, index = score.topk(k, dim=1)
            slots[:, i, :k] = torch.where(top > -math.inf, index.to(_F64), math.nan)
        counts = bank.per_site_sum(torch.stack([dormant_units.T, massive.T], dim=-1).to(_F64)).transpose(0, 1)
        if commit:
            keep_latest(bank, block, _UNIT_STATES, has, steps, "last_step")
        out = {
            "n": sums[..., 0],
            "sum": block["sum"],
            "sq_sum": sums[..., 1],
            "quad_sum": block["quad_sum"],
            "abs_max": site_max.T,
            "zeros": block["zeros"],
            "live_units": sums[..., 2],
            "r2_sum": sums[..., 4],
            "r4_sum": sums[..., 5],
            "dormant_units": counts[..., 0],
            "massive_units": counts[..., 1],
        }
        for j in range(self._slots):
            out[f"massive_{j}"] = slots[..., j]
        return out

    def compute(self, record: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = np.asarray(record["n"], dtype=np.float64)
        live = np.asarray(record["live_units"], dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            mean = record["sum"] / n
            m2 = record["sq_sum"] / n
            r2 = record["r2_sum"] / live
            return {
                "rms": np.sqrt(m2),
                "mean": mean,
                "std": np.sqrt(np.maximum(m2 - mean * mean, 0.0)),
                "abs_max": np.where(n > 0, record["abs_max"], np.nan),
                "kurtosis": (record["quad_sum"] / n) / (m2 * m2),
                "zero_fraction": record["zeros"] / n,
                "massive_units": np.where(live > 0, record["massive_units"], np.nan),
                "dormant_ratio": record["dormant_units"] / live,
                "neuron_kurtosis": (record["r4_sum"] / live) / (r2 * r2),
            }

    def massive_indices(self, record: Mapping[str, float]) -> list[int]:
        """The massive units recorded in one (step, site) row (the :data:`MASSIVE_SLOTS` largest), ascending."""
        found = [record[f"massive_{j}"] for j in range(self._slots)]
        return sorted(int(v) for v in found if not math.isnan(float(v)))

    def unit_set(self, name: str, record: Mapping[str, float]) -> tuple[int, ...] | None:
        """``"massive_units"``: the massive units of a (step, site) record, or ``None`` when it had none with data
        or more than :data:`MASSIVE_SLOTS` (only the largest are recorded)."""
        if name != "massive_units":
            raise KeyError(name)
        found = self.massive_indices(record)
        if not float(record["live_units"]) > 0 or float(record["massive_units"]) != len(found):
            return None
        return tuple(found)

    def unit_values(self, site: Site, step: int, include_open: bool) -> tuple[int | None, dict[str, np.ndarray]]:
        """Per unit: ``mean_abs`` (m_u), ``abs_max`` (a_u) and ``rms`` (r_u) at the latest step the site ran in."""
        found, raw = latest_host(
            self.bank, site, include_open, "count", [name for name, _ in _UNIT_STATES],
            [kept for _, kept in _UNIT_STATES], "last_step", step,
        )  # fmt: skip
        with np.errstate(divide="ignore", invalid="ignore"):
            count = raw["count"]
            return found, {
                "mean_abs": raw["abs_sum"] / count,
                "abs_max": np.where(count > 0, raw["abs_max"], np.nan),
                "rms": np.sqrt(raw["sq_sum"] / count),
            }

    def __repr__(self) -> str:
        return (
            f"Magnitude(activations={self.activations}, massive_abs={self.massive_abs:g}, "
            f"massive_ratio={self.massive_ratio:g}, dormant_tau={self.dormant_tau:g})"
        )
