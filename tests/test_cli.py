"""The command line: scan, show, plot, activations, demo; every user mistake is one line on stderr, exit code 2."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import torch.nn as nn

from hookscope.cli import main, read_stats

PNG = b"\x89PNG\r\n\x1a\n"
COMMANDS = ("scan", "show", "plot", "demo", "activations")
README = Path(__file__).resolve().parent.parent / "README.md"
HEADER = "step,layer,kind,shape,units,calls,dead_ratio,inactive_fraction,saturation_rate,grad_norm"
# two steps of a relu and a sigmoid, as HookManager.to_csv writes them (NaN is an empty field)
ROWS = [
    "0,fc.relu,relu,8x6,6,1,0.5,0.75,,0.25",
    "0,out,sigmoid,8x3,3,1,,,0.125,0.5",
    "1,fc.relu,relu,8x6,6,1,0.5,0.625,,0.125",
    "1,out,sigmoid,8x3,3,1,,,0.0,0.0625",
]


def tiny_model() -> nn.Module:  # a factory for `scan pkg.module:factory`
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.Sigmoid())


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def needs_width(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(4, width), nn.ReLU())


def returns_int() -> int:
    return 3


def raising_factory() -> nn.Module:
    raise RuntimeError("boom in the factory")


def no_parameters() -> nn.Module:
    return nn.Sequential(nn.ReLU())


an_instance = mlp()


class _Out(nn.Module):
    """An MLP whose forward returns ``wrap(logits)``."""

    def __init__(self, wrap: Callable[[torch.Tensor], Any]) -> None:
        super().__init__()
        self.fc, self.act, self.wrap = nn.Linear(4, 3), nn.ReLU(), wrap

    def forward(self, x: torch.Tensor) -> Any:
        return self.wrap(self.act(self.fc(x)))


def dict_output() -> nn.Module:
    return _Out(lambda y: {"aux": "text", "out": y})


def text_tuple_output() -> nn.Module:
    return _Out(lambda y: ("a", "b"))


def none_output() -> nn.Module:
    return _Out(lambda y: None)


def constant_output() -> nn.Module:  # a 0-d tensor that does not depend on the parameters
    return _Out(lambda y: torch.tensor(1.0))


def integer_output() -> nn.Module:
    return _Out(lambda y: y.argmax(dim=1))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + y


class FailsOnlyWhenHooked(nn.Module):
    """Runs plainly, raises while an activation module carries hooks: stands in for a bug in hookscope's hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(4, 3), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act._forward_hooks or self.act._forward_pre_hooks:
            raise RuntimeError("a hook misbehaved")
        return self.act(self.fc(x))


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]) -> str:
    """Exit code 2 and exactly one line on stderr, `hookscope <command>: error: ...`, holding ``fragment``."""
    code, _, err = run(argv, capsys)
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    command = argv[0] if argv and argv[0] in COMMANDS else ""
    assert lines[0].startswith(f"hookscope {command}: error: " if command else "hookscope: error: "), lines[0]
    assert fragment in lines[0], lines[0]
    return lines[0]


def write(path: Path, content: str | bytes) -> str:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def csv_text(rows: list[str] = ROWS, header: str = HEADER) -> str:
    return "\n".join([header, *rows]) + "\n"


@pytest.fixture()
def stats_csv(tmp_path: Path) -> Path:
    path = tmp_path / "stats.csv"
    assert main(["scan", "resnet18", "--input-shape", "2,3,32,32", "--steps", "2", "--csv", str(path), "--ascii"]) == 0
    return path


# ------------------------------------------------------------------------------------------------------------------
# commands that work


def test_scan_torchvision_model_prints_table_and_writes_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "stats.csv"
    assert main(["scan", "resnet18", "--input-shape", "2,3,32,32", "--steps", "2", "--csv", str(path)]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.relu#1" in out and "step 1" in out and "wrote 34 rows" in out
    frame = pd.read_csv(path)
    assert len(frame) == 34 and set(frame["step"]) == {0, 1}


def test_scan_params_shows_the_parameter_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scan", "test_cli:tiny_model", "--input-shape", "2,3,8,8", "--ascii", "--params"]) == 0
    out = capsys.readouterr().out
    assert "hookscope parameters - step 2" in out and "weight norm" in out and "update ratio" in out


def test_scan_factory(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scan", "test_cli:tiny_model", "--input-shape", "2,3,8,8", "--ascii"]) == 0
    out = capsys.readouterr().out
    assert "sigmoid" in out and "relu" in out


@pytest.mark.parametrize("spec", ["test_cli:dict_output", "test_cli:an_instance"])
def test_scan_takes_a_module_object_and_the_first_tensor_of_a_dict(spec: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "s.csv"
    assert main(["scan", spec, "--input-shape", "8,4", "--steps", "2", "--csv", str(path), "--ascii"]) == 0
    frame = read_stats(str(path))
    assert list(frame["step"]) == [0, 1] and set(frame["kind"]) == {"relu"}
    assert frame["grad_norm"].notna().all()  # it was trained: a backward pass reached the relu


def test_show_renders_a_csv(stats_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["show", str(stats_csv), "--step", "0", "--ascii"]) == 0
    out = capsys.readouterr().out
    assert "step 0" in out and "layer4.1.relu#1" in out


def test_plot_writes_png(stats_csv: Path, tmp_path: Path) -> None:
    for metric, kind in [("dead_ratio", "heatmap"), ("grad_norm", "heatmap"), ("inactive_fraction", "lines")]:
        out = tmp_path / f"{metric}.PNG"  # the suffix in any case
        assert main(["plot", str(stats_csv), "-o", str(out), "--metric", metric, "--kind", kind]) == 0
        assert out.read_bytes()[:8] == PNG


def test_plot_a_metric_without_values_is_a_user_error(stats_csv: Path, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    argv = ["plot", str(stats_csv), "-o", str(tmp_path / "s.png"), "--metric", "saturation_rate"]
    assert_user_error(argv, "has no values in this report", capsys)
    assert not (tmp_path / "s.png").exists()


def test_activations_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["activations", "--ascii"]) == 0
    out = capsys.readouterr().out
    for kind in ("relu", "relu6", "gelu", "sigmoid", "hardtanh", "softmax"):
        assert kind in out
    assert "from the layer" in out  # hardtanh's range


def test_python_dash_m_and_entry_point(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "hookscope", "activations", "--ascii"], capture_output=True, text=True)
    assert proc.returncode == 0 and "leaky_relu" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "hookscope", "show", str(tmp_path / "nope.csv")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr == f"hookscope show: error: no such file: {tmp_path / 'nope.csv'}\n"


# ------------------------------------------------------------------------------------------------------------------
# reading a CSV back: what is refused, what is accepted


def _replace(row: int, column: str, value: str) -> list[str]:
    """ROWS with one field changed (``row`` counts data rows from 0; it is on line ``row + 2``)."""
    rows = [r.split(",") for r in ROWS]
    rows[row][HEADER.split(",").index(column)] = value
    return [",".join(r) for r in rows]


BAD_CSVS: list[tuple[str, str | bytes, str]] = [
    ("text in a statistic", csv_text(_replace(1, "saturation_rate", "abc")),
     "line 3: `saturation_rate` is 'abc'; expected a number from 0 to 1"),
    ("text in step", csv_text(_replace(0, "step", "x")), "line 2: `step` is 'x'; expected an integer >= 0"),
    ("text in units", csv_text(_replace(2, "units", "six")), "line 4: `units` is 'six'; expected an integer >= 0"),
    ("header repeated in the middle", csv_text([*ROWS[:2], HEADER, *ROWS[2:]]), "line 4: the header line again"),
    ("empty step", csv_text(_replace(1, "step", "")), "line 3: `step` is empty; expected an integer >= 0"),
    ("empty layer", csv_text(_replace(0, "layer", "")), "line 2: `layer` is empty"),
    ("empty kind", csv_text(_replace(3, "kind", "")), "line 5: `kind` is empty"),
    ("empty calls", csv_text(_replace(3, "calls", "")), "line 5: `calls` is empty"),
    ("duplicate column", csv_text([r + ",0.5" for r in ROWS], HEADER + ",dead_ratio"),
     "column dead_ratio appears more than once in the header"),
    ("unnamed column", csv_text([r + ",1" for r in ROWS], HEADER + ","), "column 11 of the header has no name"),
    ("fractional step", csv_text(_replace(0, "step", "0.5")), "`step` is '0.5'; expected an integer >= 0"),
    ("negative step", csv_text(_replace(0, "step", "-1")), "`step` is '-1'; expected an integer >= 0"),
    ("huge step", csv_text(_replace(0, "step", "9" * 30)), "`step` is '999999999999999999999999999999'"),
    ("ratio above 1", csv_text(_replace(0, "dead_ratio", "1.5")), "`dead_ratio` is '1.5'; expected a number from 0"),
    ("negative gradient norm", csv_text(_replace(2, "grad_norm", "-0.1")), "`grad_norm` is '-0.1'; expected a number"),
    ("torn last line", csv_text([*ROWS, "2,fc.re"]), "line 6: 2 fields where the header has 10"),
    ("extra field", csv_text([ROWS[0] + ",7", *ROWS[1:]]), "line 2: 11 fields where the header has 10"),
    ("same step and layer twice", csv_text([*ROWS, ROWS[0]]), "line 6: step 0, layer 'fc.relu' is also on line 2"),
    ("missing column", csv_text([r.rsplit(",", 1)[0] for r in ROWS], HEADER.rsplit(",", 1)[0]),
     "not a hookscope CSV: missing columns grad_norm"),
    ("semicolons", csv_text().replace(",", ";"), "(its header is separated by ';'; hookscope writes commas)"),
    ("empty file", "", "is empty: a hookscope CSV starts with the header step,layer,"),
    ("blank lines only", "\n\n", "is empty"),
    ("binary", bytes(range(256)) * 4, "it holds binary data (NUL bytes)"),
    ("UTF-16", csv_text().encode("utf-16"), "it is UTF-16 text (hookscope writes UTF-8)"),
    ("Latin-1", csv_text(_replace(0, "layer", "b\xe4r")).encode("latin-1"), "is not UTF-8 text"),
]  # fmt: skip


@pytest.mark.parametrize(("content", "fragment"), [c[1:] for c in BAD_CSVS], ids=[c[0] for c in BAD_CSVS])
@pytest.mark.parametrize("command", ["show", "plot"])
def test_a_malformed_csv_is_one_line_naming_the_line(command, content, fragment, tmp_path: Path, capsys) -> None:
    path = write(tmp_path / "stats.csv", content)
    argv = [command, path] + (["-o", str(tmp_path / "out.png")] if command == "plot" else [])
    line = assert_user_error(argv, fragment, capsys)
    assert path in line  # the file is named
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: str(d), "is a directory, not a CSV file"),
        (lambda d: str(d / "missing.csv"), "no such file: "),
        (lambda d: "", "`STATS.csv` is empty: give the path of a CSV"),
        pytest.param(
            lambda d: "/dev/null",
            "/dev/null is not a regular file",
            marks=pytest.mark.skipif(not os.path.exists("/dev/null"), reason="no /dev/null"),
        ),
    ],
    ids=["directory", "missing", "empty path", "device"],
)
@pytest.mark.parametrize("command", ["show", "plot"])
def test_the_csv_path_must_be_a_file(command, make, fragment, tmp_path: Path, capsys) -> None:
    argv = [command, make(tmp_path)] + (["-o", str(tmp_path / "out.png")] if command == "plot" else [])
    assert_user_error(argv, fragment, capsys)


def test_read_stats_accepts_what_editors_and_spreadsheets_leave(tmp_path: Path) -> None:
    # a byte-order mark, CRLF line ends, a blank line, spaces around fields, quotes, "nan", a custom column
    rows = [f'"{r.split(",")[0]}", {r.replace(",,", ",nan,", 1)[2:]},{i / 4}' for i, r in enumerate(ROWS)]
    text = "\r\n".join([HEADER + ",mean_activation", rows[0], "", *rows[1:]]) + "\r\n"
    frame = read_stats(write(tmp_path / "edited.csv", text.encode("utf-8-sig")))
    expected = pd.read_csv(io.StringIO(csv_text()), dtype={"layer": str, "kind": str, "shape": str})
    pd.testing.assert_frame_equal(frame[expected.columns.tolist()], expected, check_dtype=False)
    assert frame["step"].dtype == "int64" and frame["units"].dtype == "int64" and frame["calls"].dtype == "int64"
    assert frame["saturation_rate"].dtype == "float64" and frame["mean_activation"].tolist() == [0, 0.25, 0.5, 0.75]


def test_read_stats_keeps_layer_names_as_text_and_allows_inf(tmp_path: Path) -> None:
    rows = [r.replace("fc.relu", "1").replace("out", "007") for r in _replace(2, "grad_norm", "inf")]
    frame = read_stats(write(tmp_path / "s.csv", csv_text(rows)))
    assert frame["layer"].tolist() == ["1", "007", "1", "007"] and frame["grad_norm"].iloc[2] == float("inf")


def test_a_header_only_csv_shows_an_empty_table_and_has_no_step(tmp_path: Path, capsys) -> None:
    path = write(tmp_path / "empty.csv", HEADER + "\n")
    code, out, _ = run(["show", path, "--ascii"], capsys)
    assert code == 0 and "no data recorded yet" in out
    assert_user_error(["show", path, "--step", "0"], f"`--step` 0 is not in {path} (it has no rows)", capsys)
    assert_user_error(["plot", path, "-o", str(tmp_path / "x.png")], "the report is empty", capsys)


# ------------------------------------------------------------------------------------------------------------------
# scan: the model, its output, the arguments


SCAN = ["--input-shape", "8,4", "--steps", "1"]
BAD_SCANS: list[tuple[str, list[str], str]] = [
    ("factory needs arguments", ["test_cli:needs_width"], "needs_width() needs arguments (width)"),
    ("factory returns a non-module", ["test_cli:returns_int"], "returned an object of type int, not a torch.nn.Module"),
    ("factory raises", ["test_cli:raising_factory"], "calling raising_factory() raised RuntimeError: boom"),
    ("empty module name", [":mlp"], "MODEL ':mlp': '' is not a module name; expected package.module:factory"),
    ("empty attribute", ["test_cli:"], "MODEL 'test_cli:': '' is not an attribute name"),
    ("file path", ["./test_cli.py:mlp"], "is not a module name (give the module's import name, not a file path)"),
    ("relative module", [".test_cli:mlp"], "'.test_cli' is not a module name"),
    ("unknown attribute", ["test_cli:nope"], "module 'test_cli' has no attribute 'nope'"),
    ("unknown module", ["nomodule_xyz:f"], "cannot import module 'nomodule_xyz'"),
    ("unknown torchvision name", ["no_such_net"], "unknown MODEL 'no_such_net'"),
    ("no trainable parameters", ["test_cli:no_parameters"], "has no trainable parameters"),
    ("tuple of text", ["test_cli:text_tuple_output"], "returned an object of type tuple of str; scan needs a tensor"),
    ("None", ["test_cli:none_output"], "returned None; scan needs a tensor"),
    ("0-d constant", ["test_cli:constant_output"], "tensor of dtype float32 and shape [] that does not require grad"),
    ("integer output", ["test_cli:integer_output"], "tensor of dtype int64 and shape [8] that does not require grad"),
    ("forward needs two inputs", ["test_cli:TwoInputs"], "fails on an input of shape [8, 4]: TypeError: "),
    ("wrong input shape", ["test_cli:mlp", "--input-shape", "8,5"], "fails on an input of shape [8, 5]: RuntimeError"),
    ("--classes on a factory", ["test_cli:mlp", "--classes", "3"], "`--classes` 3 applies to torchvision models only"),
    ("negative lr", ["test_cli:mlp", "--lr", "-1"], "argument --lr: expected a finite number > 0 like 0.01, got '-1'"),
    ("zero lr", ["test_cli:mlp", "--lr", "0"], "argument --lr: expected a finite number > 0 like 0.01, got '0'"),
    ("NaN lr", ["test_cli:mlp", "--lr", "nan"], "argument --lr: expected a finite number > 0 like 0.01, got 'nan'"),
    ("infinite lr", ["test_cli:mlp", "--lr", "inf"], "got 'inf'"),
    ("text lr", ["test_cli:mlp", "--lr", "fast"], "got 'fast'"),
    ("negative seed", ["test_cli:mlp", "--seed", "-1"], "argument --seed: expected an int from 0 to"),
    ("huge seed", ["test_cli:mlp", "--seed", "9" * 30], "argument --seed: expected an int from 0 to"),
    ("zero steps", ["test_cli:mlp", "--steps", "0"], "argument --steps: expected an int >= 1, got '0'"),
    ("zero classes", ["resnet18", "--classes", "0"], "argument --classes: expected an int >= 1, got '0'"),
    ("shape of text", ["test_cli:mlp", "--input-shape", "a,b"], "expected comma-separated positive ints"),
    ("empty shape", ["test_cli:mlp", "--input-shape", ""], "expected comma-separated positive ints"),
    ("zero dimension", ["test_cli:mlp", "--input-shape", "0,4"], "expected positive dimensions"),
    ("huge shape", ["test_cli:mlp", "--input-shape", "100000000000,4"], "cannot allocate a float32 tensor of 400,000,"),
    ("overflowing shape", ["test_cli:mlp", "--input-shape", "9" * 25 + ",4"], "cannot allocate a float32 tensor"),
    ("batch of one through batch norm", ["resnet18", "--input-shape", "1,3,32,32"],
     "fails on an input of shape [1, 3, 32, 32]: ValueError: Expected more than 1 value per channel"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "fragment"), [c[1:] for c in BAD_SCANS], ids=[c[0] for c in BAD_SCANS])
def test_scan_mistakes_are_one_line(args: list[str], fragment: str, capsys) -> None:
    assert_user_error(["scan", *args, *SCAN] if "--input-shape" not in args else ["scan", *args], fragment, capsys)


def test_scan_a_module_that_fails_on_import(tmp_path: Path, monkeypatch, capsys) -> None:
    write(tmp_path / "broken_models.py", "raise RuntimeError('the module body fails')\n")
    write(tmp_path / "bad_syntax_models.py", "def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert_user_error(
        ["scan", "broken_models:f", *SCAN], "importing module 'broken_models' raised RuntimeError: the module", capsys
    )
    assert_user_error(["scan", "bad_syntax_models:f", *SCAN], "raised SyntaxError: ", capsys)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: str(d / "missing" / "s.csv"), "directory '{d}/missing' does not exist"),
        (lambda d: str(d), "`--csv` '{d}' is a directory: give a file path"),
        (lambda d: "", "`--csv` is empty"),
        pytest.param(
            lambda d: "/proc/stats.csv",
            "`--csv` '/proc/stats.csv': creating it fails",
            marks=pytest.mark.skipif(not os.path.isdir("/proc"), reason="no /proc"),
        ),
    ],
    ids=["missing directory", "directory", "empty", "cannot be created"],
)
def test_scan_checks_csv_before_training(make, fragment: str, tmp_path: Path, capsys, monkeypatch) -> None:
    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was built before --csv was checked")

    monkeypatch.setattr("hookscope.cli.load_model", no_training)
    assert_user_error(["scan", "test_cli:mlp", *SCAN, "--csv", make(tmp_path)], fragment.format(d=tmp_path), capsys)


def test_a_failure_only_under_the_hooks_is_a_bug_with_its_traceback(capsys) -> None:
    with pytest.raises(RuntimeError, match="a hook misbehaved"):
        main(["scan", "test_cli:FailsOnlyWhenHooked", *SCAN])


# ------------------------------------------------------------------------------------------------------------------
# show, plot and demo arguments, and argparse's own errors


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--step", "-1"], "argument --step: expected an int >= 0, got '-1'"),
        (["--step", "1.5"], "argument --step: expected an int >= 0, got '1.5'"),
        (["--step", "7"], "`--step` 7 is not in {csv} (it has 2 steps, from 0 to 1)"),
    ],
)
def test_show_step(args: list[str], fragment: str, tmp_path: Path, capsys) -> None:
    path = write(tmp_path / "s.csv", csv_text())
    assert_user_error(["show", path, *args], fragment.format(csv=path), capsys)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: str(d / "missing" / "out.png"), "directory '{d}/missing' does not exist"),
        (lambda d: str(d / "s.csv" / "out.png"), "directory '{d}/s.csv' is a file, not a directory"),
        (lambda d: str(d / "out.pdf"), "`-o` must be a file name ending in .png (plots are written as PNG), got"),
        (lambda d: str(d / "out"), "`-o` must be a file name ending in .png"),
        (lambda d: str(d / "s.csv"), "`-o` must be a file name ending in .png"),  # the CSV itself
        (lambda d: "", "`-o` must be a file name ending in .png"),
        (lambda d: str(d / "dir.png"), "`-o` '{d}/dir.png' is a directory: give a file path"),
    ],
    ids=["missing directory", "parent is a file", "pdf", "no suffix", "the csv", "empty", "directory"],
)
def test_plot_output(make, fragment: str, tmp_path: Path, capsys) -> None:
    path = write(tmp_path / "s.csv", csv_text())
    (tmp_path / "dir.png").mkdir()
    assert_user_error(["plot", path, "-o", make(tmp_path)], fragment.format(d=tmp_path), capsys)
    assert (tmp_path / "s.csv").read_text() == csv_text()


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: str(d / "a_file"), "`--out` '{d}/a_file' exists and is not a directory"),
        (
            lambda d: str(d / "a_file" / "sub"),
            "`--out` '{d}/a_file/sub': cannot create the directory (Not a directory)",
        ),
        (lambda d: "", "`--out` is empty"),
    ],
    ids=["a file", "inside a file", "empty"],
)
def test_demo_out(make, fragment: str, tmp_path: Path, capsys) -> None:
    write(tmp_path / "a_file", "x")
    assert_user_error(
        ["demo", "--out", make(tmp_path), "--steps", "1", "--no-live"], fragment.format(d=tmp_path), capsys
    )


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only directories")
def test_demo_out_in_a_read_only_directory(tmp_path: Path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert_user_error(["demo", "--out", str(locked / "d"), "--no-live"], "cannot create the directory", capsys)
        assert_user_error(["demo", "--out", str(locked), "--no-live"], "the directory is not writable", capsys)
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        ([], "hookscope: error: the following arguments are required: COMMAND (see hookscope --help)"),
        (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
        (["scan", "resnet18"], "hookscope scan: error: the following arguments are required: --input-shape"),
        (["activations", "extra"], "hookscope activations: error: unrecognized arguments: extra"),
        (["show", "a.csv", "--bogus"], "hookscope show: error: unrecognized arguments: --bogus"),
        (["plot", "a.csv", "-o", "x.png", "--metric", "nope"], "argument --metric: invalid choice: 'nope'"),
    ],
)
def test_usage_errors_are_one_line(argv: list[str], fragment: str, capsys) -> None:
    assert_user_error(argv, fragment, capsys)


# ------------------------------------------------------------------------------------------------------------------
# the demo, and the README's copy of its output


class DemoRun:
    def __init__(self, out: Path, text: str) -> None:
        self.out, self.text = out, text


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """One run of ``hookscope demo --no-live`` with its defaults (400 steps per run, ~10 s), as the README shows."""
    out = tmp_path_factory.mktemp("demo") / "out"
    buffer = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a caller's setting (the benchmark's test leaves 1): the demo prints the same anyway
    try:
        with contextlib.redirect_stdout(buffer):
            assert main(["demo", "--out", str(out), "--no-live"]) == 0
        assert torch.get_num_threads() == 1  # and restores it
    finally:
        torch.set_num_threads(threads)
    return DemoRun(out, buffer.getvalue())


def test_demo_runs_and_writes_outputs(demo_run: DemoRun) -> None:
    assert "Diagnosis" in demo_run.text and "lower the learning rate" in demo_run.text
    names = sorted(p.name for p in demo_run.out.iterdir())
    assert names == sorted([
        "stats_dying.csv", "stats_remedy.csv", "units_dying.csv", "units_remedy.csv",
        "dead_ratio_heatmap_dying.png", "grad_norm_heatmap_dying.png", "dead_ratio_heatmap_remedy.png",
        "grad_norm_heatmap_remedy.png", "dead_ratio_lines.png",
    ])  # fmt: skip
    dying = read_stats(str(demo_run.out / "stats_dying.csv"))
    remedy = read_stats(str(demo_run.out / "stats_remedy.csv"))
    last = dying["step"].max()
    assert last == 399
    # the recipe kills well over 10% of a layer; the remedy keeps the first layer nearly intact
    assert dying[dying["step"] == last]["dead_ratio"].max() > 0.3
    assert remedy[remedy["step"] == last]["dead_ratio"].iloc[0] < 0.1
    for name in names:
        if name.endswith(".png"):
            assert (demo_run.out / name).read_bytes()[:8] == PNG


def test_demo_says_when_units_stopped_firing_and_when_death_was_confirmed(demo_run: DemoRun) -> None:
    units = pd.read_csv(demo_run.out / "units_dying.csv", dtype={"layer": str})
    dead = units[units["dead"] & (units["layer"] == "act1")]
    fired = dead["last_fired"].notna()
    # the window rule: a unit that last fired at step s is silent from s + 1 and counts as dead from s + 20
    assert ((dead["dead_since"] - dead["last_fired"])[fired] == 20).all()
    stopped = (dead["last_fired"] + 1).fillna(0)  # a unit that never fired is silent from the first step
    text = " ".join(demo_run.text.split())
    expected = (
        f"{len(dead)} dead at the last step (silent 20 steps): they stopped firing between steps"
        f" {stopped.min():.0f} and {stopped.max():.0f} (median {stopped.median():.0f}), {int((~fired).sum())} of"
        f" them never fired; death confirmed (dead by the window rule) between steps"
        f" {dead['dead_since'].min():.0f} and {dead['dead_since'].max():.0f} (median"
        f" {dead['dead_since'].median():.0f})"
    )
    assert expected in text


def readme_demo_fragments() -> list[str]:
    """The README's demo block, cut at its ``...`` lines, each piece with its whitespace collapsed."""
    blocks: list[list[str]] = []
    inside = False
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside = not inside
            if inside:
                blocks.append([])
        elif inside:
            blocks[-1].append(line)
    block = next(b for b in blocks if b and b[0].startswith("hookscope demo:"))
    pieces: list[list[str]] = [[]]
    for line in block:
        if line.strip() == "...":
            pieces.append([])
        else:
            pieces[-1].append(line)
    fragments = [" ".join(" ".join(p).split()) for p in pieces]
    return [f[:-3].rstrip() if f.endswith("...") else f for f in fragments if f]


def shape_of(text: str) -> str:
    """``text`` with what depends on the CPU's floating-point paths masked: every number becomes ``#``, with the
    wording that depends on a count (plurals, the "never fired" clause, which is there only when some unit never
    fired). Adam at a too-high learning rate is chaotic: another CPU prints other numbers, the same story."""
    text = " ".join(text.split())  # rich wraps at the console's width, the README at its own
    text = re.sub(r", \d+ of them never fired", "", text)
    text = re.sub(r"\d+(\.\d+)?", "#", text)
    return re.sub(r"\bunits\b", "unit", text)


def test_shape_of_masks_numbers_and_the_wording_that_follows_them() -> None:
    a = "act1: 118 of 128 units never fire (92%): between steps 0 and 171 (median 2), 2 of them never fired; 1 unit"
    b = "act1: 117 of 128 units never fire (91.4%): between steps 0 and 86 (median 2); 0 units"
    assert shape_of(a) == shape_of(b) == "act#: # of # unit never fire (#%): between steps # and # (median #); # unit"
    assert shape_of("act1 dead") != shape_of("act1 alive")  # words are compared


def test_the_readme_shows_what_the_demo_prints(demo_run: DemoRun) -> None:
    """The README's block has the demo's structure, line for line where it is not cut; its numbers are those of
    the machine named beside it, so only their places are compared (the story is checked below)."""
    printed = shape_of(demo_run.text)
    fragments = readme_demo_fragments()
    assert len(fragments) >= 4 and sum(map(len, fragments)) > 1200
    at = 0
    for fragment in fragments:
        found = printed.find(shape_of(fragment), at)
        assert found >= 0, (
            f"README.md's demo block is not what `hookscope demo --no-live` prints: {fragment!r} is not printed"
            f" (numbers aside, after character {at}); update the block from this output:\n{demo_run.text}"
        )
        at = found + len(shape_of(fragment))


def test_the_demo_tells_its_story(demo_run: DemoRun) -> None:
    """What holds on any CPU: the dying run loses most of act1 and raises dead-unit alerts there; the remedy
    keeps act1 and raises none there, and alerts on fewer layers."""
    dying = read_stats(str(demo_run.out / "stats_dying.csv"))
    remedy = read_stats(str(demo_run.out / "stats_remedy.csv"))

    def act1_last(frame: pd.DataFrame) -> float:
        rows = frame[(frame["step"] == frame["step"].max()) & (frame["layer"] == "act1")]
        return float(rows["dead_ratio"].iloc[0])

    assert act1_last(dying) > 0.5 > 0.1 > act1_last(remedy)
    text = " ".join(demo_run.text.split())
    alerts = re.findall(r"alerts: (.*?)(?: (?:remedy \(|What the evidence says))", text)
    assert len(alerts) == 2, text
    dying_alerts, remedy_alerts = alerts
    assert re.match(r"dead_relu on act1\b", dying_alerts), dying_alerts
    assert "act1" not in remedy_alerts
    assert remedy_alerts.count("act") < dying_alerts.count("act")
    assert "(first alert at step" in text


def test_info_says_which_path_computes_the_statistics() -> None:
    import subprocess
    import sys

    from hookscope import kernels

    out = subprocess.run([sys.executable, "-m", "hookscope", "info"], capture_output=True, text=True, check=True)
    expected = "native kernels" if kernels.available() else "ATen operations"
    assert f"statistics of CPU tensors: {expected}" in out.stdout
    env = {**__import__("os").environ, "HOOKSCOPE_KERNELS": "aten"}
    forced = subprocess.run(
        [sys.executable, "-m", "hookscope", "info"], capture_output=True, text=True, check=True, env=env
    )
    assert "statistics of CPU tensors: ATen operations (HOOKSCOPE_KERNELS=aten)" in forced.stdout
