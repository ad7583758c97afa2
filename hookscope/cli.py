"""The ``hookscope`` command line: scan, show, plot, demo, activations.

``main(argv)`` returns the exit code. A mistake in the command line or in its inputs (a bad argument, a missing
or malformed file, a model that cannot be built or trained) raises an :class:`~hookscope.errors.InputError`
(or another :class:`~hookscope.errors.HookscopeError`) where it is found, and ``main`` alone turns it, and any
:class:`OSError` of the environment (no such directory, no permission, a full disk), into one line on stderr,
``hookscope <command>: error: ...``, with exit code 2. Usage errors found by argparse are one line as well.
Anything else is a bug in hookscope and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from rich.console import Console
from rich.table import Table
from rich.text import Text

from hookscope.errors import HookscopeError, InputError
from hookscope.files import creation_problem
from hookscope.stats_file import read_stats

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from hookscope.manager import HookManager

__all__ = ["load_model", "main", "read_stats"]


def _brief(error: BaseException) -> str:
    """``Type: first line of the message``, for errors raised by the user's own code."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _kind_of(value: object) -> str:
    """``None``, or ``an object of type T``, for messages about what user code returned."""
    return "None" if value is None else f"an object of type {type(value).__name__}"


def _one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


# ------------------------------------------------------------------------------------------------------------------
# argument types (argparse prefixes their messages with "argument --name:")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr (the usage itself is in ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int(text: str, minimum: int, maximum: int | None = None) -> int:
    allowed = f"an int >= {minimum}" if maximum is None else f"an int from {minimum} to {maximum}"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
    return value


def _positive(text: str) -> int:
    return _int(text, 1)


def _non_negative(text: str) -> int:
    return _int(text, 0)


def _seed(text: str) -> int:
    return _int(text, 0, 2**64 - 1)  # the range torch.manual_seed takes


def _learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0 like 0.01, got {text!r}")
    return value


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


# ------------------------------------------------------------------------------------------------------------------
# files named on the command line


def _output_file(arg: str, path: str) -> Path:
    """``path`` as a file that can be written: not empty, not a directory, in a writable directory that exists,
    and writing it works (tried; see :func:`hookscope.files.creation_problem`)."""
    if not path:
        raise InputError(f"`{arg}` is empty: give the path of the file to write")
    target = Path(path)
    if target.is_dir():
        raise InputError(f"`{arg}` {path!r} is a directory: give a file path")
    parent = target.parent
    if not parent.is_dir():
        problem = "is a file, not a directory" if parent.exists() else "does not exist"
        raise InputError(f"`{arg}` {path!r}: directory {str(parent)!r} {problem}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"`{arg}` {path!r}: directory {str(parent)!r} is not writable")
    unwritable = creation_problem(target)  # what os.access misses: /proc, a read-only mount, root's bypass
    if unwritable is not None:
        raise InputError(f"`{arg}` {path!r}: {unwritable}")
    return target


def _output_dir(arg: str, path: str) -> Path:
    """``path`` as a writable directory, created with its parents if missing."""
    if not path:
        raise InputError(f"`{arg}` is empty: give a directory")
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise InputError(f"`{arg}` {path!r} exists and is not a directory")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"`{arg}` {path!r}: cannot create the directory ({e.strerror or e})") from None
    if not os.access(target, os.W_OK | os.X_OK):
        raise InputError(f"`{arg}` {path!r}: the directory is not writable")
    return target


# ------------------------------------------------------------------------------------------------------------------
# models

_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_FACTORY_FORM = "package.module:factory, e.g. mypkg.models:build"
_MISSING = object()


def _required_parameters(factory: Any) -> list[str]:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have none: call them and see
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in signature.parameters.values() if p.kind in kinds and p.default is inspect.Parameter.empty]


def _factory_model(spec: str) -> nn.Module:
    import torch.nn as nn

    module_name, _, attr = spec.partition(":")
    if not _DOTTED.fullmatch(module_name):
        path_like = module_name.endswith(".py") or "/" in module_name or "\\" in module_name
        hint = " (give the module's import name, not a file path)" if path_like else ""
        raise InputError(f"MODEL {spec!r}: {module_name!r} is not a module name{hint}; expected {_FACTORY_FORM}")
    if not _DOTTED.fullmatch(attr):
        raise InputError(f"MODEL {spec!r}: {attr!r} is not an attribute name; expected {_FACTORY_FORM}")
    if os.getcwd() not in sys.path and "" not in sys.path:  # the `hookscope` script, unlike python -m, lacks it
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError(
            f"cannot import module {module_name!r} of MODEL {spec!r} (from the current directory or PYTHONPATH): {e}"
        ) from None
    except Exception as e:  # the user's module failed while it was imported
        raise InputError(f"MODEL {spec!r}: importing module {module_name!r} raised {_brief(e)}") from None
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, _MISSING)
        if factory is _MISSING:
            raise InputError(f"MODEL {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if isinstance(factory, nn.Module):
        return factory
    if not callable(factory):
        raise InputError(
            f"MODEL {spec!r}: {attr!r} is a {type(factory).__name__}; expected a torch.nn.Module or a function or "
            f"class that builds one without arguments"
        )
    required = _required_parameters(factory)
    if required:
        raise InputError(
            f"MODEL {spec!r}: {attr}() needs arguments ({', '.join(required)}) and scan calls it with none; give a "
            f"function that builds the model without arguments"
        )
    try:
        model = factory()
    except Exception as e:  # the user's factory failed
        raise InputError(f"MODEL {spec!r}: calling {attr}() raised {_brief(e)}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"MODEL {spec!r}: {attr}() returned {_kind_of(model)}, not a torch.nn.Module")
    return model


def load_model(spec: str, num_classes: int | None = None) -> nn.Module:
    """A torchvision model name (built with ``weights=None``) or ``package.module:factory``.

    ``factory`` is a function or class called without arguments, or an ``nn.Module`` object; the module is
    imported from the current directory or ``PYTHONPATH``.

    Raises:
        InputError: The model cannot be found or built, or ``num_classes`` is given for a factory.
    """
    if ":" in spec:
        if num_classes is not None:
            raise InputError(
                f"`--classes` {num_classes} applies to torchvision models only; MODEL {spec!r} is a factory: set "
                f"the number of classes inside it"
            )
        return _factory_model(spec)
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if spec not in names:
        raise InputError(
            f"unknown MODEL {spec!r}: give a torchvision classification model ({', '.join(sorted(names)[:8])}, ...) "
            f"or {_FACTORY_FORM}"
        )
    kwargs: dict[str, Any] = {"weights": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if spec.startswith(("googlenet", "inception")):
        kwargs["init_weights"] = False
    model: nn.Module = torchvision.models.get_model(spec, **kwargs)
    return model


# ------------------------------------------------------------------------------------------------------------------
# scan


def _random_input(shape: tuple[int, ...]) -> torch.Tensor:
    import torch

    try:
        return torch.randn(*shape)
    except (RuntimeError, TypeError, OverflowError, MemoryError):
        elements = math.prod(shape)
        raise InputError(
            f"`--input-shape` {','.join(map(str, shape))}: cannot allocate a float32 tensor of {elements:,} elements "
            f"({4 * elements / 2**30:.3g} GiB)"
        ) from None


def _forward(model: nn.Module, x: torch.Tensor, hm: HookManager, spec: str) -> Any:
    """``model(x)``; a failure that the model shows without hookscope's hooks too is the user's (model or shape)."""
    try:
        return model(x)
    except Exception as error:
        hm.detach()
        try:
            model(x)
        except Exception as plain:
            raise InputError(f"MODEL {spec!r} fails on an input of shape {list(x.shape)}: {_brief(plain)}") from None
        raise error from None  # the model runs without the hooks: a bug in hookscope, with its traceback


def _prediction(out: Any, spec: str) -> torch.Tensor:
    """The tensor to train on: the output, its ``logits``, or the first tensor of a tuple, list or dict."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)  # torchvision's GoogLeNetOutputs / InceptionOutputs, Hugging Face outputs
    if isinstance(logits, torch.Tensor):
        return logits
    values = list(out.values()) if isinstance(out, Mapping) else list(out) if isinstance(out, (tuple, list)) else []
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    held = f" of {', '.join(sorted({type(v).__name__ for v in values}))}" if values else ""
    raise InputError(
        f"MODEL {spec!r} returned {_kind_of(out)}{held}; scan needs a tensor, or a tuple, list or dict "
        f"holding one (the first tensor is the prediction)"
    )


def _loss(prediction: torch.Tensor, spec: str) -> torch.Tensor:
    """Cross-entropy on random labels for ``(N, classes)`` outputs, else the mean square of the output."""
    import torch
    import torch.nn.functional as F

    if not prediction.is_floating_point() or not prediction.requires_grad:
        raise InputError(
            f"MODEL {spec!r} returned a tensor of dtype {str(prediction.dtype).replace('torch.', '')} and shape "
            f"{list(prediction.shape)} that does not require grad; scan trains the model, so the output must be a "
            f"floating-point tensor computed from its trainable parameters"
        )
    if prediction.dim() == 2 and prediction.shape[1] >= 2:
        labels = torch.randint(0, prediction.shape[1], (prediction.shape[0],))
        return F.cross_entropy(prediction, labels)
    return prediction.float().pow(2).mean()


def cmd_scan(args: argparse.Namespace) -> int:
    import torch

    import hookscope as hs

    csv_path = _output_file("--csv", args.csv) if args.csv is not None else None
    torch.manual_seed(args.seed)
    model = load_model(args.model, args.classes)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError(f"MODEL {args.model!r} has no trainable parameters; scan trains the model with SGD")
    opt = torch.optim.SGD(params, lr=args.lr)
    x = _random_input(args.input_shape)
    with hs.HookManager(model, alerts=False, params=args.params, modules=args.modules) as hm:
        for _ in range(args.steps):
            loss = _loss(_prediction(_forward(model, x, hm, args.model), args.model), args.model)
            opt.zero_grad()
            loss.backward()
            hm.step()  # before the optimizer's step: the parameter statistics see the gradients it uses
            opt.step()
    console = _console(args.ascii)
    rows = args.max_rows or None  # 0: every row
    console.print(hm.table(ascii=args.ascii, max_rows=rows))
    if args.params:
        console.print(hm.param_table(ascii=args.ascii, max_rows=rows))
    if csv_path is not None:
        hm.to_csv(csv_path)
        print(f"wrote {len(hm.to_dataframe())} rows to {args.csv}")
    return 0


# ------------------------------------------------------------------------------------------------------------------
# show, plot, demo, activations


def _console(ascii: bool) -> Console:
    from hookscope.reporters.table import make_console

    return make_console(ascii)


def cmd_show(args: argparse.Namespace) -> int:
    from hookscope.reporters.table import build_table

    frame = read_stats(args.csv)
    if args.step is not None and args.step not in set(frame["step"]):
        steps = sorted(set(frame["step"]))
        held = f"it has {len(steps)} steps, from {steps[0]} to {steps[-1]}" if steps else "it has no rows"
        raise InputError(f"`--step` {args.step} is not in {args.csv} ({held})")
    rows = args.max_rows or None  # 0: every layer
    _console(args.ascii).print(build_table(frame, step=args.step, ascii=args.ascii, max_rows=rows))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from hookscope.reporters.plots import check_png_path, plot_heatmap, plot_lines, save_figure

    check_png_path(args.output, arg="-o")
    target = _output_file("-o", args.output)
    frame = read_stats(args.csv)
    fig = (plot_heatmap if args.kind == "heatmap" else plot_lines)(frame, args.metric)
    save_figure(fig, target)
    print(f"wrote {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from hookscope.demo import run_demo

    run_demo(_output_dir("--out", args.out), steps=args.steps, live=not args.no_live)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import hookscope
    from hookscope import kernels

    k = kernels.info()
    path = "native kernels" if k["backend"] == "native" else f"ATen operations ({k['reason']})"
    lines = [
        f"hookscope {hookscope.__version__}, torch {torch.__version__}, Python {sys.version.split()[0]}",
        f"statistics of CPU tensors: {path}",
    ]
    if k["library"] is not None:
        lines.append(f"kernels library: {k['library']} ({k['isa']}, {k['threads']} threads)")
    lines.append("statistics of CUDA tensors: ATen operations")
    print("\n".join(lines))
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
        table.add_row(Text(spec.name), stats, rng, Text(classes), str(len(spec.functions)))  # names: no markup
    _console(args.ascii).print(table)
    return 0


def _max_rows_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-rows",
        type=_non_negative,
        default=50,
        metavar="N",
        help="with more layers (or modules), show the N worst, worst first (50; 0 shows all)",
    )


def build_parser() -> argparse.ArgumentParser:
    import hookscope
    from hookscope.reporters.plots import METRICS

    parser = _Parser(prog="hookscope", description="See what the activation layers of a PyTorch model are doing.")
    parser.add_argument("--version", action="version", version=f"hookscope {hookscope.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    scan = sub.add_parser("scan", help="train a model for a few synthetic steps and show its activation table")
    scan.add_argument(
        "model", metavar="MODEL", help="torchvision model name (weights=None) or package.module:factory (no arguments)"
    )
    scan.add_argument("--input-shape", required=True, type=_shape, metavar="N,C,H,W", help="input batch shape")
    scan.add_argument("--steps", type=_positive, default=3, metavar="K", help="training steps on random data (3)")
    scan.add_argument("--csv", metavar="PATH", help="also write the statistics to this CSV")
    scan.add_argument("--classes", type=_positive, default=None, help="num_classes (torchvision models only)")
    scan.add_argument("--lr", type=_learning_rate, default=0.01, help="SGD learning rate, > 0 (0.01)")
    scan.add_argument("--seed", type=_seed, default=0, help="random seed, 0 to 2**64-1 (0)")
    scan.add_argument("--ascii", action="store_true", help="ASCII table without colour")
    scan.add_argument(
        "--modules",
        action="append",
        metavar="PATTERN",
        help="also record the outputs of the modules whose names match this fnmatch pattern (module sites, with "
        "their magnitude statistics); repeat for several patterns",
    )
    scan.add_argument(
        "--params", action="store_true", help="also show per-module parameter statistics (weight and gradient norms)"
    )
    _max_rows_option(scan)
    scan.set_defaults(func=cmd_scan, parser=scan)

    show = sub.add_parser("show", help="render a CSV written by hookscope as the table")
    show.add_argument("csv", metavar="STATS.csv")
    show.add_argument("--step", type=_non_negative, default=None, help="the step to show (default: the latest)")
    show.add_argument("--ascii", action="store_true")
    _max_rows_option(show)
    show.set_defaults(func=cmd_show, parser=show)

    plot = sub.add_parser("plot", help="plot a CSV written by hookscope to PNG")
    plot.add_argument("csv", metavar="STATS.csv")
    plot.add_argument(
        "-o", "--output", required=True, metavar="OUT.png", help="the PNG to write (its directory must exist)"
    )
    plot.add_argument("--metric", default="dead_ratio", choices=sorted(METRICS))
    plot.add_argument("--kind", default="heatmap", choices=["heatmap", "lines"], help="layer x step heat map, or lines")
    plot.set_defaults(func=cmd_plot, parser=plot)

    demo = sub.add_parser("demo", help="diagnose dying ReLU on the digits data set, with the remedy")
    demo.add_argument(
        "--out",
        default="hookscope-demo",
        metavar="DIR",
        help="where CSVs and plots go, created if missing (hookscope-demo)",
    )
    demo.add_argument("--steps", type=_positive, default=400, help="training steps per run (400)")
    demo.add_argument("--no-live", action="store_true", help="no live view while training")
    demo.set_defaults(func=cmd_demo, parser=demo)

    info = sub.add_parser("info", help="versions, and whether the native kernels or ATen compute the statistics")
    info.set_defaults(func=cmd_info, parser=info)

    acts = sub.add_parser("activations", help="list the activation registry")
    acts.add_argument("--ascii", action="store_true")
    acts.set_defaults(func=cmd_activations, parser=acts)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for any mistake in the command line or its inputs)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # reported by the subcommand's parser, which names the subcommand
            args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # argparse printed the usage error, or the help
        return int(e.code) if isinstance(e.code, int) else 2
    try:
        return int(args.func(args))
    except (HookscopeError, OSError, ModuleNotFoundError) as e:  # user mistakes and the environment, never bugs
        print(f"hookscope {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hookscope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
