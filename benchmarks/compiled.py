"""Overhead of hookscope on compiled training steps (``torch.compile``), side by side with the plain compiled step.

Method (as in ``overhead.py``): three copies of one model with identical weights, each of a class of its own
(dynamo shares compiled code between instances of one class and does not guard on hooks), each compiled on its
own and warmed up, then timed in rounds of one full training step each (forward, cross-entropy, backward, SGD
step, ``hm.step()``), in an order that rotates by one configuration per round, with garbage collection off, and
the contention guard of ``overhead.py`` (windows in which other processes used more than ``--max-other-cores``
cores are discarded). The ratio is a configuration's total time over ``plain``'s; ``plain (A/A)`` is a second
plain copy: the noise floor.

Configurations: ``plain`` and ``plain (A/A)``, compiled without hooks; ``hookscope``, ``HookManager`` with the
default collectors recording every step, attached before compiling; with ``--modules``, for ``gpt``,
``hookscope + modules`` (``modules=Block``: a module site on every block output, ``Magnitude`` added); with
``--floor``, ``in-graph floor``: no hookscope, but forward hooks written by hand on the same activation modules
that compute the default collectors' per-step numbers inside the compiled graph (per-unit counts of positive
outputs for rectifiers, saturated outputs for bounded kinds, calls and elements, and through ``register_hook`` the
squared gradient norm) and add them in place into accumulators allocated before compiling: what statistics computed
by the graph itself cost, without naming, cadence or reports (see :class:`InGraphFloor`). The table also gives the
graphs compiled and graph breaks of each copy (``torch._dynamo.utils.counters``).

Clocks: ``--clock wall`` (the default) times each step with ``time.perf_counter``; ``--clock thread`` with
``time.thread_time``, the CPU time of the main thread, which requires ``--threads 1`` (torch then computes on the
main thread only) and is not inflated by other processes taking the CPU away: on a shared machine it measures
what a step costs where wall time measures the neighbours (the contention guard is then off).

Models: ``mlp`` and ``resnet18`` of ``overhead.py``, and ``gpt``: a nanoGPT-like model (4 blocks, d=128, 4 heads,
SDPA, GELU, vocabulary 512) on batches of 16 x 64 tokens.

    python benchmarks/compiled.py                       # all models, inductor, 2 threads
    python benchmarks/compiled.py --models gpt --budget 20 --json out.json
    python benchmarks/compiled.py --threads 1 --clock thread --modules --floor
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
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import ContentionGuard, build, quartiles

VOCAB, CONTEXT = 512, 64
#: How a step is timed (``--clock``): ``time.perf_counter`` or ``time.thread_time``.
clock = time.perf_counter


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.gelu, self.mlp_proj = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, d))
        return x + self.mlp_proj(self.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT's layout: token and position embeddings, pre-norm blocks, a final LayerNorm, a tied head."""

    def __init__(self, blocks: int = 4, d: int = 128, heads: int = 4) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, d), nn.Embedding(CONTEXT, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(blocks))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def model_and_batch(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    if name == "gpt":
        torch.manual_seed(0)
        tokens = torch.randint(0, VOCAB, (16, CONTEXT + 1), generator=gen)
        return NanoGPT(), tokens[:, :-1], tokens[:, 1:]
    torch.manual_seed(0)
    model, shape = build(name)
    return model, torch.randn(*shape, generator=gen), torch.randint(0, 10, (shape[0],), generator=gen)


class InGraphFloor:
    """Hand-written in-graph statistics on a model's activation modules (the ``in-graph floor`` configuration).

    One accumulator per module and statistic, allocated from one eager forward before compiling (so that the
    compiled hooks only read attributes that exist: a hook that created them would make dynamo recompile), and
    updated in place by forward hooks that dynamo traces into the graph: the per-unit count of outputs > 0 (units:
    dim 1, or the last dim of a 3-D output) for rectifiers, the count of outputs outside the band of 1e-3 of the
    range's width inside the bounds for bounded kinds, the calls and elements, and, from a gradient hook on the
    output, the sum of squares of the gradient. A reused module adds all its calls into one accumulator.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        from hookscope.activations import activation_for_module

        self.modules = {}
        for module in model.modules():
            spec = activation_for_module(module)
            if spec is not None:
                bounds = spec.resolve_bounds(module)
                self.modules[module] = (spec.rectifier, bounds)
        shapes: dict[nn.Module, torch.Size] = {}

        def probe(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            shapes.setdefault(module, out.shape)

        probes = [m.register_forward_hook(probe) for m in self.modules]
        with torch.no_grad():
            model(x)
        for handle in probes:
            handle.remove()
        for module, (rectifier, bounds) in self.modules.items():
            shape = shapes[module]
            dim = len(shape) - 1 if len(shape) == 3 else min(1, len(shape) - 1)
            module._floor_dims = tuple(d for d in range(len(shape)) if d != dim)  # type: ignore[assignment]
            module._floor_positive = torch.zeros(shape[dim], dtype=torch.float64) if rectifier else None  # type: ignore[assignment]
            module._floor_band = (
                None
                if bounds is None
                else (bounds[0] + 1e-3 * (bounds[1] - bounds[0]), bounds[1] - 1e-3 * (bounds[1] - bounds[0]))
            )  # type: ignore[assignment]
            module._floor_counts = torch.zeros(4, dtype=torch.float64)  # type: ignore[assignment]  # calls, elements, saturated, grad sumsq
            module.register_forward_hook(self.hook)

    @staticmethod
    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        counts = module._floor_counts
        with torch.no_grad():
            if module._floor_positive is not None:
                module._floor_positive.add_((out > 0).sum(module._floor_dims, dtype=torch.float64))
            saturated = out.new_zeros((), dtype=torch.float64)
            if module._floor_band is not None:
                lo, hi = module._floor_band
                saturated = ((out < lo) | (out > hi)).sum(dtype=torch.float64)
            counts[:3].add_(torch.stack([saturated.new_ones(()), saturated.new_tensor(float(out.numel())), saturated]))
        if out.requires_grad:

            def grad_hook(grad: torch.Tensor) -> None:
                with torch.no_grad():
                    counts[3].add_(grad.double().square().sum())

            out.register_hook(grad_hook)

    def check(self) -> None:
        """Raise unless every activation module's accumulators saw calls and gradients (the hooks ran)."""
        for module in self.modules:
            calls, _, _, sumsq = module._floor_counts.tolist()
            if calls <= 0 or not sumsq > 0:
                raise RuntimeError(f"in-graph floor: {type(module).__name__} recorded calls={calls}, sumsq={sumsq}")


class Config:
    def __init__(self, name: str, base: nn.Module, backend: str, mode: str | None, x: torch.Tensor) -> None:
        self.name = name
        # a class of its own: compiled code is never shared with another copy
        self.model = copy.deepcopy(base)
        self.model.__class__ = type(f"{type(base).__name__}_{len(name)}_{id(self)}", (type(base),), {})
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.manager: Any = None
        if name.startswith("hookscope"):
            import hookscope as hs

            modules = [Block] if name == "hookscope + modules" else None
            self.manager = hs.HookManager(self.model, alerts=False, modules=modules).attach()
        self.floor = InGraphFloor(self.model, x) if name == "in-graph floor" else None
        self.run = torch.compile(self.model, backend=backend, mode=mode)
        self.times: list[float] = []
        self.ratios: list[float] = []
        self.graphs = self.breaks = 0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        t0 = clock()
        out = self.run(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.manager is not None:
            self.manager.step()
        return (clock() - t0) * 1e3

    def warm_up(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
        from torch._dynamo.utils import counters

        counters.clear()
        for _ in range(steps):
            self.step(x, y)
        self.graphs = counters["stats"]["unique_graphs"]
        self.breaks = sum(counters["graph_break"].values())


def bench(name: str, args: argparse.Namespace, guard: ContentionGuard) -> dict[str, Any]:
    base, x, y = model_and_batch(name)
    labels = ["plain", "plain (A/A)", "hookscope"] + ["hookscope + modules"] * (args.modules and name == "gpt")
    labels += ["in-graph floor"] * args.floor
    configs = [Config(label, base, args.backend, args.mode, x) for label in labels]
    t0 = time.perf_counter()
    for cfg in configs:
        cfg.warm_up(x, y, args.warmup)
    compile_s = time.perf_counter() - t0
    per_step = statistics.median(configs[0].step(x, y) for _ in range(3))
    rounds = args.rounds or max(15, int(args.budget * 1e3 / (per_step * len(configs))))
    kept: list[dict[str, float]] = []
    dropped: list[dict[str, float]] = []
    done = 0
    deadline = time.perf_counter() + 3 * max(rounds * per_step * len(configs) / 1e3, 10.0)
    gc.collect()
    gc.disable()
    try:
        while len(kept) < rounds and (done < rounds or time.perf_counter() < deadline):
            start = guard.sample()
            window: list[dict[str, float]] = []
            while True:
                k = done % len(configs)
                window.append({cfg.name: cfg.step(x, y) for cfg in configs[k:] + configs[:k]})
                done += 1
                if len(kept) + len(window) >= rounds or start is None or time.perf_counter() - start[0] >= 1.0:
                    break
            other = guard.other_cores(start, guard.sample())
            (kept if other is None or other <= args.max_other_cores else dropped).extend(window)
    finally:
        gc.enable()
    contended = not kept  # every window was contended: report them all, flagged
    used = kept or dropped
    for times in used:
        for cfg in configs:
            cfg.times.append(times[cfg.name])
            cfg.ratios.append(times[cfg.name] / times["plain"])
    plain_total = sum(configs[0].times)
    result: dict[str, Any] = {
        "model": name,
        "rounds": len(used),
        "discarded_rounds": len(dropped),
        "contended": contended,
        "configs": {},
    }
    result["compile_and_warmup_s"] = compile_s
    for cfg in configs:
        result["configs"][cfg.name] = {
            "ms": statistics.mean(cfg.times),
            "ratio": sum(cfg.times) / plain_total,
            "ratio_iqr": quartiles(cfg.ratios),
            "graphs": cfg.graphs,
            "graph_breaks": cfg.breaks,
        }
        if cfg.floor is not None:
            cfg.floor.check()
            result["configs"][cfg.name]["sites"] = len(cfg.floor.modules)
        if cfg.manager is not None:
            result["configs"][cfg.name]["sites"] = len(cfg.manager.to_dataframe()["layer"].unique())
            cfg.manager.detach()
    return result


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"torch {torch.__version__}, backend {args.backend}, mode {args.mode or 'default'}, "
        f"{torch.get_num_threads()} threads, clock {args.clock}",
        "",
        "| model | config | ms/step | ratio | IQR of ratios | graphs | breaks | rounds (discarded) |",
        "|---|---|---:|---:|---|---:|---:|---|",
    ]
    for r in results:
        for name, c in r["configs"].items():
            lo, hi = c["ratio_iqr"]
            lines.append(
                f"| {r['model']} | {name} | {c['ms']:.2f} | {c['ratio']:.3f} | {lo:.3f}–{hi:.3f} | {c['graphs']} | "
                f"{c['graph_breaks']} | {r['rounds']} ({r['discarded_rounds']}){' contended' * r['contended']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,gpt,resnet18")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--mode", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=30.0, help="seconds of timed rounds per model")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=5, help="steps per copy before timing (compilation)")
    parser.add_argument("--max-other-cores", type=float, default=0.15)
    parser.add_argument("--json", default=None)
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall")
    parser.add_argument("--modules", action="store_true", help="gpt: a configuration with module sites too")
    parser.add_argument("--floor", action="store_true", help="a configuration with hand-written in-graph statistics")
    args = parser.parse_args(argv)
    if args.clock == "thread":
        if args.threads != 1:
            parser.error(f"--clock thread needs --threads 1 (got --threads {args.threads}): it times the main thread")
        global clock
        clock = time.thread_time
        args.max_other_cores = float("inf")
    torch.set_num_threads(args.threads)
    guard = ContentionGuard()
    results = []
    for name in args.models.split(","):
        results.append(bench(name, args, guard))
        print(markdown(results[-1:], args), flush=True)
    print()
    print(markdown(results, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"results": results, "threads": args.threads, "backend": args.backend, "clock": args.clock}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
