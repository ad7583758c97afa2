"""Overhead of hookscope on full training steps, measured side by side with the plain step.

Each model is built once per configuration, with identical weights, and the configurations run interleaved step
by step (forward, cross-entropy, backward, SGD step, ``hm.step()``; one step of each configuration per round, in
alternating order), so that drifts of the machine hit them all alike. The table reports mean ms per step and the
ratio of total time to ``plain``'s (work done once in many steps included), with the quartiles of the per-round
ratios as a measure of the noise:

- ``plain``: no hooks; ``plain (A/A)``: a second plain copy, the noise floor of the ratios;
- ``hookscope``: ``HookManager`` with the default collectors, every step;
- ``every=K``: the same, recording one step in K;
- ``naive``: blog-style hooks, ``(out <= 0).float().mean().item()`` and ``grad.norm().item()`` per layer and step.

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
    raise SystemExit(f"unknown model {name!r}; choose from resnet18, resnet50, mobilenet_v2, mlp, transformer")


# ----------------------------------------------------------------------------------------------------------------
# configurations


def naive_hooks(model: nn.Module) -> list[Any]:
    """What blog posts do: a float per layer per step, read on the host in the hook."""
    from hookscope.activations import activation_for_module

    stats: dict[str, list[float]] = {}
    handles = []
    for name, module in model.named_modules():
        if activation_for_module(module) is None:
            continue

        def fwd(m: nn.Module, inp: Any, out: torch.Tensor, name: str = name) -> None:
            stats.setdefault(name, []).append((out <= 0).float().mean().item())
            if out.requires_grad:
                out.register_hook(lambda g: stats.setdefault(name + ".grad", []).append(g.norm().item()))

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


def make_configs(name: str, device: torch.device, every: int) -> list[Config]:
    import hookscope as hs

    torch.manual_seed(0)
    base, _ = build(name)
    base = base.to(device)
    configs = []
    for label in ("plain", "plain (A/A)", "hookscope", f"every={every}", "naive"):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        cfg = Config(label, model, opt)
        if label == "hookscope":
            cfg.manager = hs.HookManager(model).attach()
            cfg.close = cfg.manager.step
        elif label.startswith("every="):
            cfg.manager = hs.HookManager(model, every=every).attach()
            cfg.close = cfg.manager.step
        elif label == "naive":
            naive_hooks(model)
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


def bench_model(
    name: str,
    device: torch.device,
    rounds: int | None,
    budget_s: float,
    steps_per_round: int,
    every: int,
    amp: torch.dtype | None,
) -> dict[str, Any]:
    configs = make_configs(name, device, every)
    _, shape = build(name)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen).to(device)
    y = torch.randint(0, 10, (shape[0],), generator=gen).to(device)
    for cfg in configs:  # warm-up: allocator, sites, lazy state, the first ring of closed steps
        run_steps(cfg, x, y, 20 if name == "mlp" else 3, amp)
    per_step = statistics.median(run_steps(configs[0], x, y, 1, amp) for _ in range(3))
    if rounds is None:  # fill the time budget: every round runs each configuration once
        rounds = max(15, int(budget_s * 1e3 / (per_step * steps_per_round * len(configs))))
    gc.collect()
    gc.disable()  # a collection inside one configuration's timing would bias its ratio
    try:
        for r in range(rounds):
            # Steps interleave configuration by configuration, so a drift of the machine (a noisy neighbour, a
            # frequency change) hits all of them alike and each round's ratios compare like with like.
            order = configs if r % 2 == 0 else configs[::-1]
            for cfg in order:
                cfg.times.append(run_steps(cfg, x, y, steps_per_round, amp))
            plain = configs[0].times[-1]
            for cfg in configs:
                cfg.ratios.append(cfg.times[-1] / plain)
    finally:
        gc.enable()
    result: dict[str, Any] = {"model": name, "steps_per_round": steps_per_round, "rounds": rounds, "configs": {}}
    plain_total = sum(configs[0].times)
    for cfg in configs:
        result["configs"][cfg.name] = {
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
            result["configs"][cfg.name]["state_bytes"] = cfg.manager.state_bytes()
            cfg.manager.detach()
    return result


def quartiles(values: list[float]) -> list[float]:
    """First and third quartiles (the spread of per-round ratios)."""
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def count_ops(cfg: Config, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None) -> float:
    """ATen operations dispatched per training step, averaged over one ring of closed steps (hookscope
    processes them 16 at a time): a deterministic proxy for the fixed per-op cost."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from hookscope.collectors.base import RING_STEPS

    class Counter(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            Counter.n += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        run_steps(cfg, x, y, RING_STEPS, amp)
    return Counter.n / RING_STEPS


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
    lines = [
        f"| model | plain ms | hookscope ms | ratio | every={every} ratio | naive ratio | A/A ratio | "
        "ratio quartiles | A/A quartiles | ATen ops/step plain | + hookscope |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        c = r["configs"]
        plain_ops = c["plain"]["aten_ops_per_step"]
        lines.append(
            f"| {r['model']} | {c['plain']['ms']:.2f} | {c['hookscope']['ms']:.2f} | {c['hookscope']['ratio']:.3f}× | "
            f"{c[f'every={every}']['ratio']:.3f}× | {c['naive']['ratio']:.3f}× | {c['plain (A/A)']['ratio']:.3f}× | "
            f"{quartile_text(c['hookscope'])} | {quartile_text(c['plain (A/A)'])} | {plain_ops:.0f} | "
            f"{c['hookscope']['aten_ops_per_step'] - plain_ops:.1f} |"
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
        res = bench_model(name, device, args.rounds, args.budget, args.steps_per_round, args.every, amp)
        if args.sync_check and device.type == "cuda":
            res["sync_check"] = sync_check(name, device, amp)
        results.append(res)
        print(markdown([res], args.every).splitlines()[-1], flush=True)
    print()
    print(markdown(results, args.every))
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
