"""The ``hookscope`` command line: scan, show, plot, demo, activations.

``main(argv)`` returns the exit code; user mistakes (a missing file, an unknown model, a bad shape) are printed
to stderr as one line, without a traceback, with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

from hookscope.errors import ConfigError, HookscopeError
from hookscope.report import STAT_COLUMNS

__all__ = ["main"]

REQUIRED_COLUMNS = ("step", "layer", "kind", *STAT_COLUMNS)


class UserError(HookscopeError, ValueError):
    """A mistake in the command line or its inputs."""


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive ints like 8,3,64,64; got {text!r}"
        ) from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"expected positive dimensions like 8,3,64,64; got {text!r}")
    return dims


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def load_model(spec: str, num_classes: int | None = None) -> Any:
    """A torchvision model name (built with ``weights=None``) or ``package.module:factory``."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UserError(f"cannot import module {module_name!r} of MODEL {spec!r}: {e}") from None
        factory = getattr(module, attr, None)
        if factory is None or not callable(factory):
            raise UserError(f"MODEL {spec!r}: {module_name!r} has no callable {attr!r}")
        return factory()
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if spec not in names:
        raise UserError(
            f"unknown MODEL {spec!r}: give a torchvision classification model ({', '.join(sorted(names)[:8])}, ...) "
            f"or package.module:factory"
        )
    kwargs: dict[str, Any] = {"weights": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if spec.startswith(("googlenet", "inception")):
        kwargs["init_weights"] = False
    return torchvision.models.get_model(spec, **kwargs)


def read_stats(path: str) -> pd.DataFrame:
    """A CSV written by hookscope, checked."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no such file: {path}")
    try:
        frame = pd.read_csv(p, dtype={"layer": str, "kind": str, "shape": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a hookscope CSV: {e}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(f"{path} is not a hookscope CSV: missing columns {', '.join(missing)}")
    return frame


def _console(ascii: bool) -> Console:
    from hookscope.reporters.table import make_console

    return make_console(ascii)


def cmd_scan(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    import hookscope as hs

    torch.manual_seed(args.seed)
    model = load_model(args.model, args.classes)
    shape = args.input_shape
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    x = torch.randn(*shape)
    with hs.HookManager(model, alerts=False) as hm:
        for _ in range(args.steps):
            try:
                out = model(x)
            except (RuntimeError, ValueError) as e:  # a shape the model does not take: the user's input
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"MODEL {args.model!r} fails on an input of shape {list(shape)}: {first}") from None
            logits = getattr(out, "logits", None)  # torchvision's GoogLeNetOutputs / InceptionOutputs
            if logits is None:
                logits = out[0] if isinstance(out, (tuple, list)) else out
            if logits.dim() == 2:
                y = torch.randint(0, logits.shape[1], (logits.shape[0],))
                loss = F.cross_entropy(logits, y)
            else:
                loss = logits.float().pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            hm.step()
    _console(args.ascii).print(hm.table(ascii=args.ascii))
    if args.csv:
        hm.to_csv(args.csv)
        print(f"wrote {len(hm.to_dataframe())} rows to {args.csv}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from hookscope.reporters.table import build_table

    frame = read_stats(args.csv)
    if args.step is not None and args.step not in set(frame["step"]):
        steps = sorted(set(frame["step"]))
        raise UserError(f"--step {args.step} is not in {args.csv} (steps {steps[0]}..{steps[-1]})")
    _console(args.ascii).print(build_table(frame, step=args.step, ascii=args.ascii))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from hookscope.reporters.plots import plot_heatmap, plot_lines, save_figure

    frame = read_stats(args.csv)
    fig = (plot_heatmap if args.kind == "heatmap" else plot_lines)(frame, args.metric)
    save_figure(fig, args.output)
    print(f"wrote {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from hookscope.demo import run_demo

    run_demo(args.out, steps=args.steps, live=not args.no_live)
    return 0


def cmd_activations(args: argparse.Namespace) -> int:
    from rich import box

    from hookscope.activations import list_activations

    table = Table(title="activation registry", box=box.ASCII if args.ascii else box.HEAVY_HEAD)
    for col in ("kind", "statistics", "range", "module classes", "functions"):
        table.add_column(col)
    for spec in list_activations():
        stats = (
            ", ".join(s for s, on in (("dead units", spec.rectifier), ("saturation", spec.bounded)) if on)
            or "gradient norm only"
        )
        rng = (
            "from the layer"
            if callable(spec.bounds)
            else (f"[{spec.bounds[0]:g}, {spec.bounds[1]:g}]" if spec.bounds else "")
        )
        if spec.saturate != "both" and spec.bounds:
            rng += f" ({spec.saturate} bound)"
        classes = ", ".join(sorted({*(m.__name__ for m in spec.modules), *spec.class_names}))
        table.add_row(spec.name, stats, rng, classes, str(len(spec.functions)))
    _console(args.ascii).print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from hookscope.reporters.plots import METRICS

    parser = argparse.ArgumentParser(
        prog="hookscope", description="See what the activation layers of a PyTorch model are doing."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    scan = sub.add_parser("scan", help="train a model for a few synthetic steps and show its activation table")
    scan.add_argument("model", metavar="MODEL", help="torchvision model name (weights=None) or package.module:factory")
    scan.add_argument("--input-shape", required=True, type=_shape, metavar="N,C,H,W", help="input batch shape")
    scan.add_argument("--steps", type=_positive, default=3, metavar="K", help="training steps on random data (3)")
    scan.add_argument("--csv", metavar="PATH", help="also write the statistics to this CSV")
    scan.add_argument("--classes", type=_positive, default=None, help="num_classes for torchvision models")
    scan.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (0.01)")
    scan.add_argument("--seed", type=int, default=0)
    scan.add_argument("--ascii", action="store_true", help="ASCII table without colour")
    scan.set_defaults(func=cmd_scan)

    show = sub.add_parser("show", help="render a CSV written by hookscope as the table")
    show.add_argument("csv", metavar="STATS.csv")
    show.add_argument("--step", type=int, default=None, help="the step to show (default: the latest)")
    show.add_argument("--ascii", action="store_true")
    show.set_defaults(func=cmd_show)

    plot = sub.add_parser("plot", help="plot a CSV written by hookscope to PNG")
    plot.add_argument("csv", metavar="STATS.csv")
    plot.add_argument("-o", "--output", required=True, metavar="OUT.png")
    plot.add_argument("--metric", default="dead_ratio", choices=sorted(METRICS))
    plot.add_argument("--kind", default="heatmap", choices=["heatmap", "lines"], help="layer x step heat map, or lines")
    plot.set_defaults(func=cmd_plot)

    demo = sub.add_parser("demo", help="diagnose dying ReLU on the digits data set, with the remedy")
    demo.add_argument("--out", default="hookscope-demo", metavar="DIR", help="where CSVs and plots go (hookscope-demo)")
    demo.add_argument("--steps", type=_positive, default=400, help="training steps per run (400)")
    demo.add_argument("--no-live", action="store_true", help="no live view while training")
    demo.set_defaults(func=cmd_demo)

    acts = sub.add_parser("activations", help="list the activation registry")
    acts.add_argument("--ascii", action="store_true")
    acts.set_defaults(func=cmd_activations)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse printed the usage error
        return int(e.code) if isinstance(e.code, int) else 2
    try:
        return int(args.func(args))
    except (
        HookscopeError,
        ConfigError,
        FileNotFoundError,
        IsADirectoryError,
        PermissionError,
        ModuleNotFoundError,
    ) as e:
        print(f"hookscope {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hookscope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
