"""Compare this checkout's hookscope with the one of another git revision, side by side in one process.

Separate runs of ``overhead.py`` on these shared machines move by a few points from run to run (the same code has
measured 1.048× and 1.065× on the MLP an hour apart), far more than one change to the hot path buys. Two versions
timed in one process, step by step, share every drift of the machine; their ratio is what a change is judged by.

Method: ``overhead.py``'s (one copy of the model per configuration with identical weights, rotating order, garbage
collection off, the contention guard), with four configurations: ``plain``, ``plain (A/A)``, ``hookscope @REV``
(the package as it is at ``--against``, exported with ``git archive`` into a temporary folder, imported under
another name and its kernels built there) and ``hookscope`` (this checkout). Each run builds fresh copies; the
headline is ``B/A`` = total time of this checkout's copy over that of the revision's, per run, and its median
over ``--runs`` runs.

    python benchmarks/compare.py --against HEAD~1 --models mlp,mobilenet_v2 --runs 3 --budget 20
    python benchmarks/compare.py --against HEAD~1 --models mlp,resnet18 --compile inductor   # the compiled path
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
# this checkout's package (not another one that happens to be installed) and overhead.py beside this script
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
import overhead  # noqa: E402

_IMPORTS = re.compile(r"\bhookscope\b(?=[.\s]|$)", re.MULTILINE)
_LEFT = re.compile(r"^\s*(?:from|import)\s[^#\n]*\bhookscope\b(?!_rev)", re.MULTILINE)  # an import not renamed


def export(rev: str, into: Path) -> ModuleType:
    """The package of revision ``rev``, importable as ``hookscope_rev`` from ``into``, with its kernels built
    (when a compiler is there; else it runs ATen, and the script says so)."""
    package = into / "hookscope_rev"
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "hookscope"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    (into / "hookscope").rename(package)
    for path in package.rglob("*.py"):  # its own imports and names: `hookscope.x` -> `hookscope_rev.x`
        text = _IMPORTS.sub("hookscope_rev", path.read_text())
        left = _LEFT.search(text)
        if left is not None:  # it would import this checkout's modules into the revision's: two versions mixed
            raise SystemExit(f"compare.py: cannot rename {left.group().strip()!r} in {path.name} of {rev}")
        path.write_text(text)
    sys.path.insert(0, str(into))
    build = importlib.import_module("hookscope_rev.kernels.build")
    build.build(package / "kernels")
    module = importlib.import_module("hookscope_rev")
    kernels = importlib.import_module("hookscope_rev.kernels")
    if not kernels.available():
        print(f"# hookscope @{rev}: native kernels not available ({kernels.info()['reason']})")
    return module


def unload(into: Path) -> None:
    """Forget the exported package (its folder goes away)."""
    for module in [m for m in sys.modules if m == "hookscope_rev" or m.startswith("hookscope_rev.")]:
        del sys.modules[module]
    if str(into) in sys.path:
        sys.path.remove(str(into))


def configs(
    name: str, device: torch.device, rev: ModuleType, label: str, backend: str | None = None
) -> list[overhead.Config]:
    """plain, plain (A/A), hookscope @REV, hookscope: fresh copies of one model with identical weights. With a
    ``backend``, each copy is of a class of its own (dynamo shares compiled code between instances of a class and
    does not guard on hooks) and runs compiled (``torch.compile(model, backend=...)``, after attaching)."""
    import hookscope

    torch.manual_seed(0)
    base, _ = overhead.build(name)
    base = base.to(device)
    out = []
    for k, (cfg_name, package) in enumerate(
        (("plain", None), ("plain (A/A)", None), (label, rev), ("hookscope", hookscope))
    ):
        model = copy.deepcopy(base)
        if backend is not None:
            model.__class__ = type(f"{type(model).__name__}Copy{k}", (type(model),), {})
        cfg = overhead.Config(cfg_name, model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9))
        if package is not None:
            cfg.manager = package.HookManager(model).attach()
            cfg.backend = package.kernels.backend()
            cfg.close = cfg.manager.step
        if backend is not None:
            cfg.model = torch.compile(model, backend=backend)
        out.append(cfg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default="HEAD", help="the git revision to compare with (default: HEAD)")
    parser.add_argument("--models", default="mlp,mobilenet_v2")
    parser.add_argument("--runs", type=int, default=3, help="runs per model, each with fresh copies")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timed rounds per run")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default: fill --budget)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-other-cores", type=float, default=0.15)
    parser.add_argument("--no-malloc-env", action="store_true")
    parser.add_argument(
        "--compile", default=None, metavar="BACKEND", help="run every copy compiled with this torch.compile backend"
    )
    args = parser.parse_args(argv)
    if not args.no_malloc_env and any(os.environ.get(k) != v for k, v in overhead.MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **overhead.MALLOC_ENV})

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    label = f"hookscope @{args.against}"
    import hookscope

    if not Path(hookscope.__file__).resolve().is_relative_to(ROOT):
        raise SystemExit(f"compare.py: `import hookscope` found {hookscope.__file__}, not this checkout ({ROOT})")
    compiled = f", compiled ({args.compile})" if args.compile else ""
    print(
        f"# cpu ({overhead.cpu_model()}), {args.threads} threads{compiled}; A = {label}, B = this checkout", flush=True
    )
    with tempfile.TemporaryDirectory(prefix="hookscope-compare-") as tmp:
        try:
            rev = export(args.against, Path(tmp))
            compare(args, device, rev, label)
        finally:
            unload(Path(tmp))
    return 0


def compare(args: argparse.Namespace, device: torch.device, rev: ModuleType, label: str) -> None:
    """The runs of every model, a table row each, then each model's median."""
    print("| model | run | A/A | A | B | B/A | rounds kept |\n|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for name in args.models.split(","):
        b_over_a: list[float] = []
        for run in range(args.runs):
            cfgs = configs(name, device, rev, label, args.compile)
            res: dict[str, Any] = overhead.bench_model(
                name, device, args.rounds, args.budget, 1, 1, None,
                max_other_cores=args.max_other_cores, configs=cfgs,
            )  # fmt: skip
            c = res["configs"]
            a, b = sum(cfgs[2].times), sum(cfgs[3].times)
            b_over_a.append(b / a)
            print(
                f"| {name} | {run + 1} | {c['plain (A/A)']['ratio']:.3f} | {c[label]['ratio']:.3f} | "
                f"{c['hookscope']['ratio']:.3f} | {b / a:.4f} | {res['rounds']} |",
                flush=True,
            )
        print(f"| {name} | median | | | | {statistics.median(b_over_a):.4f} | |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
