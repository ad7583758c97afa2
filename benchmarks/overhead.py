"""Overhead of hookscope on full training steps, measured side by side with the plain step.

Method. Each configuration gets its own copy of the model, with identical weights, and its own optimiser. A round
runs one step of every configuration (forward, cross-entropy, backward, SGD step, ``hm.step()``), in an order that
rotates by one configuration per round, with garbage collection off, so that a drift of the machine hits them all
alike. The headline ratio is a configuration's total time over ``plain``'s total time (work done once in many
steps included); the quartiles of the per-round ratios show the noise, and ``plain (A/A)``, a second plain copy,
shows the noise floor. A contention guard reads the machine's busy CPU time (``/proc/stat``) minus this process's
own (``/proc/self/stat``) over windows of rounds (about ``--window`` seconds each) and discards every window in
which other processes used more than ``--max-other-cores`` cores (0.15 by default), running more rounds until
enough are kept; after three times the planned time (at least 30 s) it gives up and reports the contended rounds,
flagged. The table says how many rounds were kept and discarded.

Configurations:

- ``plain``: no hooks; ``plain (A/A)``: a second plain copy;
- ``empty hooks``: a forward hook on every activation module and a tensor hook on its output, both doing nothing:
  the cost of being hooked at all;
- ``ATen floor``: the same hooks doing exactly one ``torch.sum(out=)`` per activation output into a preallocated
  buffer and one ``torch.dot(out=)`` per gradient: about the least any ATen-based statistic can cost;
- ``kernel floor`` (when the native kernels are built; CPU): the same hooks calling hookscope's kernels directly,
  one prepared pass per output and per gradient with exactly what the default collectors compute, no framework:
  the gap between ``hookscope`` and this is what hookscope's own Python costs;
- ``hookscope``: ``HookManager`` with the default collectors, every step, created inside
  ``hookscope.kernels.forced("native")`` (the native kernels; ATen when they are not built, as the JSON says);
- ``hookscope (ATen)``: the same inside ``forced("aten")``;
- ``every=K``: recording one step in K (default backend);
- ``naive``: blog-style hooks, ``(out <= 0).float().mean().item()`` and ``grad.norm().item()`` per layer and step;
- ``params`` (with ``--params``): ``HookManager(model, params=True)``; ``params (no updates)`` the same with
  ``param_updates=False`` (no copy of the parameters, no ``update_ratio``).

Run on this machine kind (2 CPU threads):

    python benchmarks/overhead.py                     # all models, markdown table and JSON
    python benchmarks/overhead.py --models mlp --budget 60
    python benchmarks/overhead.py --device cuda --models resnet18,resnet50 --amp bf16
    python benchmarks/overhead.py --memory-steps 10000  # RSS growth over a long MLP run

glibc returns freed activations to the OS and faults them back, which makes plain steps swing between processes;
the script re-executes itself with ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_``
set (``--no-malloc-env`` keeps the environment as it is).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "17179869184",
    "MALLOC_TOP_PAD_": "268435456",
}


# ----------------------------------------------------------------------------------------------------------------
# models


class TinyTransformer(nn.Module):
    """Two encoder layers with GELU (d_model 128, 4 heads, feed-forward 512) on 64 tokens, mean-pooled."""

    def __init__(self, d_model: int = 128, classes: int = 10) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=4 * d_model, activation=nn.GELU(), batch_first=True, dropout=0.0
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


class GPTBlock(nn.Module):
    """A pre-LayerNorm GPT block: causal self-attention (``scaled_dot_product_attention``) and a GELU MLP."""

    def __init__(self, d_model: int = 128, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(self.ln_1(x)).split(d, dim=2))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(attended)
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """Four GPT blocks (d_model 128, 4 heads, MLP 512) on 64 embedded tokens, a final LayerNorm, mean-pooled."""

    def __init__(self, d_model: int = 128, classes: int = 10, layers: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([GPTBlock(d_model) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x).mean(dim=1))  # type: ignore[no-any-return]


#: What ``--modules`` selects in each model (``HookManager(modules=...)``): the block outputs.
MODULE_SITES: dict[str, Any] = {
    "gpt": GPTBlock,
    "transformer": nn.TransformerEncoderLayer,
    "resnet18": "layer[1-4]",
    "resnet50": "layer[1-4]",
    "mobilenet_v2": ["features.?", "features.??"],
    "mlp": nn.Linear,
}


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    import torchvision

    if name == "resnet18":
        return torchvision.models.resnet18(num_classes=10), (16, 3, 64, 64)
    if name == "resnet50":
        return torchvision.models.resnet50(num_classes=10), (64, 3, 64, 64)
    if name == "mobilenet_v2":
        return torchvision.models.mobilenet_v2(num_classes=10), (16, 3, 64, 64)
    if name == "mlp":
        layers: list[nn.Module] = []
        for a, b in [(784, 512), (512, 512), (512, 512)]:
            layers += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(512, 10)), (128, 784)
    if name == "transformer":
        return TinyTransformer(), (16, 64, 128)
    if name == "gpt":
        return TinyGPT(), (16, 64, 128)
    raise SystemExit(f"unknown model {name!r}; choose from resnet18, resnet50, mobilenet_v2, mlp, transformer, gpt")


# ----------------------------------------------------------------------------------------------------------------
# configurations


def activation_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The activation modules of a model: the sites hookscope hooks in these models (none calls a functional
    activation)."""
    from hookscope.activations import activation_for_module

    return [(name, m) for name, m in model.named_modules() if activation_for_module(m) is not None]


def naive_hooks(model: nn.Module) -> list[Any]:
    """What blog posts do: a float per layer per step, read on the host in the hook."""
    stats: dict[str, list[float]] = {}
    handles = []
    for name, module in activation_modules(model):

        def fwd(m: nn.Module, inp: Any, out: torch.Tensor, name: str = name) -> None:
            stats.setdefault(name, []).append((out <= 0).float().mean().item())
            if out.requires_grad:
                out.register_hook(lambda g: stats.setdefault(name + ".grad", []).append(g.norm().item()))

        handles.append(module.register_forward_hook(fwd))
    return handles


def empty_hooks(model: nn.Module) -> list[Any]:
    """A forward hook on each activation module and a tensor hook on its output, both doing nothing."""

    def grad_hook(g: torch.Tensor) -> None:
        return None

    def fwd(m: nn.Module, inp: Any, out: torch.Tensor) -> None:
        if out.requires_grad:
            out.register_hook(grad_hook)

    return [module.register_forward_hook(fwd) for _, module in activation_modules(model)]


_ALL_DIMS = [tuple(range(n)) for n in range(8)]


def aten_floor_hooks(model: nn.Module) -> list[Any]:
    """The same hooks doing one ``torch.sum(out=)`` per output and one ``torch.dot(out=)`` per gradient, into
    buffers allocated at the first call of each site (the flat view of the gradient is a metadata operation)."""
    handles = []
    for _, module in activation_modules(model):
        buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

        def buffer(kind: str, t: torch.Tensor, buffers: dict[tuple[str, torch.dtype], torch.Tensor] = buffers) -> Any:
            key = (kind, t.dtype)
            if key not in buffers:
                buffers[key] = torch.zeros((), dtype=t.dtype, device=t.device)
            return buffers[key]

        def grad_hook(g: torch.Tensor, buffer: Any = buffer) -> None:
            flat = g.reshape(-1)
            torch.dot(flat, flat, out=buffer("grad", g))

        def fwd(m: nn.Module, inp: Any, out: torch.Tensor, buffer: Any = buffer, grad_hook: Any = grad_hook) -> None:
            with torch.no_grad():  # the full reduction has an out= form only with the dims spelled out
                torch.sum(out, dim=_ALL_DIMS[out.dim()], out=buffer("out", out))
            if out.requires_grad:
                out.register_hook(grad_hook)

        handles.append(module.register_forward_hook(fwd))
    return handles


def kernel_floor_hooks(model: nn.Module, states: list[dict[str, torch.Tensor]] | None = None) -> list[Any]:
    """The same hooks calling hookscope's native kernels directly, as its default collectors use them, with no
    framework around them: per output one prepared pass counting the positive elements of each unit (rectifiers)
    and the saturation band (bounded activations; the thresholds of Saturation's default 1% band), per gradient one
    prepared pass summing its squares, into buffers made at a site's first call. What the framework around the
    kernels costs is the gap between ``hookscope`` and this. ``states`` receives each site's buffers (for tests)."""
    from hookscope import kernels
    from hookscope.activations import activation_for_module
    from hookscope.sites import default_unit_dim

    handles = []
    for _, module in activation_modules(model):
        spec = activation_for_module(module)
        assert spec is not None
        calls: dict[tuple[Any, ...], Any] = {}
        state: dict[str, torch.Tensor] = {}
        if states is not None:
            states.append(state)

        def grad_hook(g: torch.Tensor, calls: dict[tuple[Any, ...], Any] = calls, state: Any = state) -> None:
            key = ("grad", g.dtype, g.shape, g.stride())
            if key not in calls:
                state["sumsq"] = torch.zeros((), dtype=torch.float64)
                calls[key] = kernels.prepare_grad(g, sumsq=state["sumsq"])
            call = calls[key]
            call.fn(g.data_ptr(), call.address)

        def fwd(
            m: nn.Module, inp: Any, out: torch.Tensor, spec: Any = spec, calls: Any = calls, state: Any = state
        ) -> None:
            key = (out.dtype, out.shape, out.stride())
            if key not in calls:
                dim = default_unit_dim(out.dim())  # what hookscope infers for these models' activations
                units = 1 if dim is None else out.shape[dim]
                kwargs: dict[str, Any] = {"unit_dim": dim, "units": units}
                if spec.rectifier:
                    kwargs["positive"] = state["positive"] = torch.zeros(units, dtype=torch.float64)
                bounds = spec.resolve_bounds(m)
                if bounds is not None:
                    lo, hi = bounds
                    width = 0.01 * (hi - lo)
                    kwargs["saturated"] = state["saturated"] = torch.zeros((), dtype=torch.float64)
                    kwargs["upper"] = hi - width if spec.saturate != "lower" else None
                    kwargs["lower"] = lo + width if spec.saturate != "upper" else None
                wanted = "positive" in kwargs or "saturated" in kwargs  # (GELU: no output statistic by default)
                calls[key] = kernels.prepare_output(out, **kwargs) if wanted else None
            call = calls[key]
            if call is not None:
                call.fn(out.data_ptr(), call.address)
            if out.requires_grad:
                out.register_hook(grad_hook)

        handles.append(module.register_forward_hook(fwd))
    return handles


@dataclass
class Config:
    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    close: Callable[[], None] = lambda: None
    times: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    manager: Any = None
    backend: str | None = None  # the statistics implementation of a manager


def _manager(model: nn.Module, backend: str | None, **kwargs: Any) -> tuple[Any, str]:
    """A HookManager created inside ``kernels.forced(backend)`` (``None``: the default); the backend it got."""
    import hookscope as hs
    from hookscope import kernels

    if backend == "native" and not kernels.available():
        print(f"# hookscope: native kernels not available ({kernels.info()['reason']}); `hookscope` runs ATen")
        backend = "aten"
    scope = kernels.forced(backend) if backend is not None else nullcontext()
    with scope:
        return hs.HookManager(model, **kwargs).attach(), kernels.backend()


def make_configs(
    name: str, device: torch.device, every: int, params: bool = False, modules: bool = False
) -> list[Config]:
    torch.manual_seed(0)
    base, _ = build(name)
    base = base.to(device)
    from hookscope import kernels

    labels = ["plain", "plain (A/A)", "empty hooks", "ATen floor", "hookscope", "hookscope (ATen)", f"every={every}"]
    labels += ["kernel floor"] if kernels.available() and device.type == "cpu" else []
    labels += ["naive", *(["params", "params (no updates)"] if params else [])]
    labels += ["hookscope + modules", "hookscope + modules (ATen)"] if modules else []
    configs = []
    for label in labels:
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        cfg = Config(label, model, opt)
        if label == "hookscope":
            cfg.manager, cfg.backend = _manager(model, "native")
        elif label == "hookscope (ATen)":
            cfg.manager, cfg.backend = _manager(model, "aten")
        elif label.startswith("every="):
            cfg.manager, cfg.backend = _manager(model, None, every=every)
        elif label == "params":
            cfg.manager, cfg.backend = _manager(model, None, params=True)
        elif label.startswith("hookscope + modules"):
            backend = "aten" if label.endswith("(ATen)") else "native"
            cfg.manager, cfg.backend = _manager(model, backend, modules=MODULE_SITES[name])
        elif label == "params (no updates)":
            cfg.manager, cfg.backend = _manager(model, None, params=True, param_updates=False)
        elif label == "empty hooks":
            empty_hooks(model)
        elif label == "ATen floor":
            aten_floor_hooks(model)
        elif label == "kernel floor":
            kernel_floor_hooks(model)
        elif label == "naive":
            naive_hooks(model)
        if cfg.manager is not None:
            cfg.close = cfg.manager.step
        configs.append(cfg)
    return configs


def run_steps(cfg: Config, x: torch.Tensor, y: torch.Tensor, steps: int, amp: torch.dtype | None) -> float:
    device = x.device
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        with autocast:
            loss = F.cross_entropy(cfg.model(x), y)
        cfg.opt.zero_grad(set_to_none=True)
        loss.backward()
        cfg.opt.step()
        cfg.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


class ContentionGuard:
    """CPU time used by other processes over a window: busy jiffies of the machine (``/proc/stat``) minus this
    process's own (``/proc/self/stat``, all its threads), in cores. Unavailable (``None``) off Linux."""

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.available = self.sample() is not None

    @staticmethod
    def read() -> tuple[int, int] | None:
        """(busy jiffies of all CPUs, jiffies of this process), or ``None``."""
        try:
            with open("/proc/stat") as f:
                cpu = [int(v) for v in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                own = f.read()
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal (guest time is already in user and nice)
        busy = sum(cpu[:8]) - cpu[3] - cpu[4]
        fields = own[own.rindex(")") + 2 :].split()  # after "pid (comm) ": state is field 3, utime 14, stime 15
        return busy, int(fields[11]) + int(fields[12])

    def sample(self) -> tuple[float, int, int] | None:
        jiffies = self.read()
        return None if jiffies is None else (time.perf_counter(), *jiffies)

    def other_cores(self, start: tuple[float, int, int] | None, end: tuple[float, int, int] | None) -> float | None:
        """Cores used by other processes between two samples."""
        if start is None or end is None or end[0] <= start[0]:
            return None
        other = (end[1] - start[1]) - (end[2] - start[2])
        return max(other, 0) / self.hz / (end[0] - start[0])


def bench_model(
    name: str,
    device: torch.device,
    rounds: int | None,
    budget_s: float,
    steps_per_round: int,
    every: int,
    amp: torch.dtype | None,
    params: bool = False,
    max_other_cores: float = 0.15,
    window_s: float = 1.0,
    guard: ContentionGuard | None = None,
    configs: list[Config] | None = None,
    modules: bool = False,
) -> dict[str, Any]:
    """Time the configurations of one model side by side (``configs``: these instead of :func:`make_configs`'s;
    the first one is the plain step the ratios divide by)."""
    configs = configs if configs is not None else make_configs(name, device, every, params, modules)
    _, shape = build(name)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen).to(device)
    y = torch.randint(0, 10, (shape[0],), generator=gen).to(device)
    for cfg in configs:  # warm-up: allocator, sites, lazy state, the first ring of closed steps
        run_steps(cfg, x, y, 20 if name == "mlp" else 3, amp)
    per_step = statistics.median(run_steps(configs[0], x, y, 1, amp) for _ in range(3))
    round_ms = per_step * steps_per_round * len(configs)
    if rounds is None:  # fill the time budget: every round runs each configuration once
        rounds = max(15, int(budget_s * 1e3 / round_ms))
    guard = guard or ContentionGuard()
    # when contention never ends: give up after three times the planned time (at least 30 s)
    deadline = time.perf_counter() + 3 * max(rounds * round_ms / 1e3, 10.0, window_s)
    kept: list[dict[str, float]] = []
    dropped: list[dict[str, float]] = []
    windows: list[dict[str, Any]] = []
    done = 0
    gc.collect()
    gc.disable()  # a collection inside one configuration's timing would bias its ratio
    try:
        while len(kept) < rounds and (done < rounds or time.perf_counter() < deadline):
            start = guard.sample()
            window: list[dict[str, float]] = []
            while True:
                # rotating order: each configuration runs first, second, ... equally often
                k = done % len(configs)
                times: dict[str, float] = {}
                for cfg in configs[k:] + configs[:k]:
                    times[cfg.name] = run_steps(cfg, x, y, steps_per_round, amp)
                window.append(times)
                done += 1
                elapsed = time.perf_counter() - (start[0] if start else 0.0)
                if len(kept) + len(window) >= rounds or start is None or elapsed >= window_s:
                    break
            other = guard.other_cores(start, guard.sample())
            ok = other is None or other <= max_other_cores
            windows.append({"rounds": len(window), "other_cores": other, "kept": ok})
            (kept if ok else dropped).extend(window)
    finally:
        gc.enable()
    contended = not kept  # every window was contended: report them all, flagged
    used = kept or dropped
    for times in used:
        for cfg in configs:
            cfg.times.append(times[cfg.name])
            cfg.ratios.append(times[cfg.name] / times[configs[0].name])
    result: dict[str, Any] = {
        "model": name,
        "steps_per_round": steps_per_round,
        "rounds": len(used),
        "order": "rotating",
        "discarded_rounds": len(dropped),  # all of them when `contended`: then the table shows them
        "contended": contended,
        "guard": {
            "available": guard.available,
            "max_other_cores": max_other_cores,
            "window_s": window_s,
            "windows": windows,
        },
        "configs": {},
    }
    plain_total = sum(configs[0].times)
    for cfg in configs:
        entry: dict[str, Any] = {
            "ms": statistics.mean(cfg.times),
            # total time over total plain time: includes the work done once in many steps (the ring of closed
            # steps every 16 steps, alert checks every 100), which a median of per-round ratios would hide
            "ratio": sum(cfg.times) / plain_total,
            "median_ratio": statistics.median(cfg.ratios),
            "ratio_iqr": quartiles(cfg.ratios),
            "ratios": cfg.ratios,
            "aten_ops_per_step": count_ops(cfg, x, y, amp),
        }
        if cfg.manager is not None:
            entry["backend"] = cfg.backend
            entry["state_bytes"] = cfg.manager.state_bytes()
            kinds = [s.kind for s in cfg.manager.sites]
            entry["module_sites"] = kinds.count("output")
            entry["activation_sites"] = len(kinds) - kinds.count("output")
            cfg.manager.detach()
        result["configs"][cfg.name] = entry
    return result


def quartiles(values: list[float]) -> list[float]:
    """First and third quartiles (the spread of per-round ratios)."""
    if len(values) < 2:
        return [values[0], values[0]] if values else [math.nan, math.nan]
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def count_ops(cfg: Config, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None) -> float:
    """ATen operations dispatched per training step, averaged over one ring of closed steps for a manager
    (hookscope processes them 16 at a time), over one step otherwise: a deterministic proxy for the fixed per-op
    cost."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from hookscope.collectors.base import RING_STEPS

    class Counter(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            Counter.n += 1
            return func(*args, **(kwargs or {}))

    steps = RING_STEPS if cfg.manager is not None else 1
    with Counter():
        run_steps(cfg, x, y, steps, amp)
    return Counter.n / steps


def sync_check(name: str, device: torch.device, amp: torch.dtype | None) -> str:
    """Instrumented CUDA steps under ``torch.cuda.set_sync_debug_mode('error')``: raises on any host sync."""
    import hookscope as hs

    model, shape = build(name)
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(*shape, device=device)
    y = torch.randint(0, 10, (shape[0],), device=device)
    cfg = Config("check", model, opt)
    with hs.HookManager(model) as hm:
        cfg.close = hm.step
        run_steps(cfg, x, y, 2, amp)  # first steps create state
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run_steps(cfg, x, y, 3, amp)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return "ok: no synchronising call in 3 instrumented steps"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_run(steps: int, device: torch.device, max_history: int | None) -> dict[str, Any]:
    """RSS of an instrumented MLP over a long run, sampled every 10% of the steps."""
    import hookscope as hs

    torch.manual_seed(0)
    model, shape = build("mlp")
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(*shape, device=device)
    y = torch.randint(0, 10, (shape[0],), device=device)
    hm = hs.HookManager(model, max_history=max_history).attach()
    cfg = Config("memory", model, opt, close=hm.step)
    run_steps(cfg, x, y, steps // 10, None)
    samples = [rss_bytes()]
    for _ in range(9):
        run_steps(cfg, x, y, steps // 10, None)
        samples.append(rss_bytes())
    hm.detach()
    return {
        "steps": steps,
        "max_history": max_history,
        "rss_mib": [round(s / 2**20, 1) for s in samples],
        "growth_mib": round((samples[-1] - samples[0]) / 2**20, 2),
        "state_bytes": hm.state_bytes(),
        "history_bytes": hm.history_bytes(),
    }


def quartile_text(config: dict[str, Any]) -> str:
    lo, hi = config["ratio_iqr"]
    return f"{lo:.2f}–{hi:.2f}"  # per-round quartiles: the noise


def markdown(results: list[dict[str, Any]], every: int) -> str:
    """The table: the columns issue 4 pins (model ... + hookscope, in that order), then the new ones."""
    params = any("params" in r["configs"] for r in results)
    lines = [
        f"| model | plain ms | hookscope ms | ratio | every={every} ratio | naive ratio | A/A ratio | "
        "ratio quartiles | A/A quartiles | ATen ops/step plain | + hookscope | "
        "empty hooks ratio | ATen floor ratio | kernel floor ratio | "
        "hookscope (ATen) ratio | hookscope (ATen) quartiles | "
        f"+ hookscope (ATen) | + ATen floor | {'params ratio | params (no updates) ratio | ' if params else ''}"
        "backend | rounds kept | discarded |",
        "|---|" + "---:|" * (20 + 2 * params),
    ]
    for r in results:
        c = r["configs"]
        plain_ops = c["plain"]["aten_ops_per_step"]
        hs, aten = c["hookscope"], c["hookscope (ATen)"]
        kernel_floor = f"{c['kernel floor']['ratio']:.3f}×" if "kernel floor" in c else "—"
        extra = "".join(
            f"{c[k]['ratio']:.3f}× | " if k in c else "— | " for k in ("params", "params (no updates)") if params
        )
        lines.append(
            f"| {r['model']} | {c['plain']['ms']:.2f} | {hs['ms']:.2f} | {hs['ratio']:.3f}× | "
            f"{c[f'every={every}']['ratio']:.3f}× | {c['naive']['ratio']:.3f}× | {c['plain (A/A)']['ratio']:.3f}× | "
            f"{quartile_text(hs)} | {quartile_text(c['plain (A/A)'])} | {plain_ops:.0f} | "
            f"{hs['aten_ops_per_step'] - plain_ops:.1f} | "
            f"{c['empty hooks']['ratio']:.3f}× | {c['ATen floor']['ratio']:.3f}× | {kernel_floor} | "
            f"{aten['ratio']:.3f}× | "
            f"{quartile_text(aten)} | {aten['aten_ops_per_step'] - plain_ops:.1f} | "
            f"{c['ATen floor']['aten_ops_per_step'] - plain_ops:.1f} | {extra}{hs.get('backend')} | "
            f"{r['rounds']}{' (contended)' if r['contended'] else ''} | {r['discarded_rounds']} |"
        )
    return "\n".join(lines)


def modules_markdown(results: list[dict[str, Any]]) -> str:
    """The ``--modules`` table: hookscope with module sites on every block output (the default collectors and
    ``Magnitude``) against hookscope without them, and the cost of one site of each kind."""
    lines = [
        "| model | plain ms | hookscope ratio | + modules ratio | + modules (ATen) ratio | A/A ratio | "
        "+ modules quartiles | activation sites | module sites | µs per activation site | µs per module site | "
        "µs per module site (ATen) | + ATen ops (modules) | rounds kept |",
        "|---|" + "---:|" * 13,
    ]
    for r in results:
        c = r["configs"]
        if "hookscope + modules" not in c:
            continue
        plain, hs, mod, aten = c["plain"], c["hookscope"], c["hookscope + modules"], c["hookscope + modules (ATen)"]
        n_act, n_mod = max(hs["activation_sites"], 1), max(mod["module_sites"], 1)
        # per site: the extra time over what it is added to (per step, µs)
        per_act = (hs["ms"] - plain["ms"]) * 1e3 / n_act
        per_mod = (mod["ms"] - hs["ms"]) * 1e3 / n_mod
        per_mod_aten = (aten["ms"] - c["hookscope (ATen)"]["ms"]) * 1e3 / n_mod
        lines.append(
            f"| {r['model']} | {plain['ms']:.2f} | {hs['ratio']:.3f}× | {mod['ratio']:.3f}× | {aten['ratio']:.3f}× | "
            f"{c['plain (A/A)']['ratio']:.3f}× | {quartile_text(mod)} | {hs['activation_sites']} | "
            f"{mod['module_sites']} | {per_act:.0f} | {per_mod:.0f} | {per_mod_aten:.0f} | "
            f"{mod['aten_ops_per_step'] - plain['aten_ops_per_step']:.1f} | {r['rounds']} |"
        )
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name (ratios differ between CPU kinds: compare runs on the same one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,mobilenet_v2,mlp,transformer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per model (default: fill --budget)")
    parser.add_argument("--budget", type=float, default=45.0, help="seconds of timed rounds per model")
    parser.add_argument("--steps-per-round", type=int, default=1, help="steps of each configuration per round")
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--params", action="store_true", help="also time HookManager(model, params=True)")
    parser.add_argument(
        "--modules", action="store_true", help="also time HookManager(model, modules=<the block outputs>)"
    )
    parser.add_argument(
        "--max-other-cores",
        type=float,
        default=0.15,
        help="discard windows of rounds in which other processes used more CPU than this (cores; inf: keep all)",
    )
    parser.add_argument("--window", type=float, default=1.0, help="seconds per window of the contention guard")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None)
    parser.add_argument("--sync-check", action="store_true", help="CUDA only: set_sync_debug_mode('error')")
    parser.add_argument("--memory-steps", type=int, default=0, help="also measure RSS over this many MLP steps")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--no-malloc-env", action="store_true")
    args = parser.parse_args(argv)

    if not args.no_malloc_env and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.amp]
    env = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({cpu_model()}), {args.threads} threads",
        "amp": args.amp,
    }
    print(f"# {env}", flush=True)
    results = []
    for name in args.models.split(","):
        res = bench_model(
            name,
            device,
            args.rounds,
            args.budget,
            args.steps_per_round,
            args.every,
            amp,
            params=args.params,
            max_other_cores=args.max_other_cores,
            window_s=args.window,
            modules=args.modules,
        )
        if args.sync_check and device.type == "cuda":
            res["sync_check"] = sync_check(name, device, amp)
        results.append(res)
        print(markdown([res], args.every).splitlines()[-1], flush=True)
    print()
    print(markdown(results, args.every))
    if args.modules:
        print()
        print(modules_markdown(results))
    out: dict[str, Any] = {"env": env, "results": results}
    if args.memory_steps:
        out["memory"] = [
            memory_run(args.memory_steps, device, None),
            memory_run(args.memory_steps, device, 1000),
        ]
        for m in out["memory"]:
            print(
                f"\nRSS over {m['steps']} MLP steps (max_history={m['max_history']}): {m['rss_mib']} MiB, "
                f"growth {m['growth_mib']} MiB; collector state {m['state_bytes']} B, history {m['history_bytes']} B"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
