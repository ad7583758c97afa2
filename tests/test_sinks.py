"""Sinks under the reliability policy: configuration mistakes raise when the manager is built, failures of the
environment (full disk, vanished directory, lost permission) warn once and never stop training, and a reader
never sees a torn line. CSV, TensorBoard, CallbackSink and the top-level exports."""

from __future__ import annotations

import contextlib
import copy
import errno
import gc
import os
import shutil
import subprocess
import sys
import threading
import time
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn as nn
from conftest import ActivationCalls, ParamsManager, SharedReLU, definition_rows, train_steps

import hookscope as hs
from hookscope import DeadReLU, HookManager, HookscopeWarning, Saturation
from hookscope.errors import ConfigError, ConfigPathError, ConfigTypeError, StateError
from hookscope.files import last_record_end
from hookscope.report import scalars
from hookscope.sinks import Sink

# ---------------------------------------------------------------------------------------------------------------
# helpers


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"layer": str})


def steps(model: nn.Module, n: int, hm: HookManager) -> None:
    for _ in range(n):
        model(torch.randn(2, 4))
        hm.step()


def open_fds(target: Path | str) -> list[int]:
    """Descriptors of this process open on ``target`` (a removed file reads ``target (deleted)``)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}").startswith(str(target)):
                found.append(int(name))
    return found


@contextlib.contextmanager
def hookscope_warnings() -> Iterator[list[str]]:
    """The messages of the HookscopeWarnings raised inside the block."""
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield messages
    messages += [str(w.message) for w in caught if issubclass(w.category, HookscopeWarning)]


def one_stop_warning(messages: list[str], path: Path | str, error: str) -> None:
    assert len(messages) == 1, messages
    assert str(path) in messages[0] and error in messages[0], messages[0]
    assert "stay available in memory" in messages[0]


# ---------------------------------------------------------------------------------------------------------------
# CSV: streaming and resuming


def test_csv_sink_streams_flushes_every_n_steps_and_resumes(tmp_path: Path) -> None:
    path = tmp_path / "stats.csv"
    model = SharedReLU()
    hm = HookManager(model, sinks=[hs.CSVSink(path, every=3)], max_history=2, alerts=False).attach()
    for step in range(5):
        model(torch.randn(2, 4))
        hm.step()
        if step == 3:  # 3 steps written and flushed, the 4th still buffered
            assert sorted(read(path)["step"].unique()) == [0, 1, 2]
    hm.detach()  # writes what is left, fsyncs
    first = read(path)
    assert sorted(first["step"].unique()) == [0, 1, 2, 3, 4]
    assert list(first.columns) == list(hm.to_dataframe().columns)
    # resuming: a new manager continues the numbering and appends without a second header
    with HookManager(model, sinks=[hs.CSVSink(path, every=10)], start_step=5, alerts=False) as hm2:
        model(torch.randn(2, 4))
        hm2.step()
    both = read(path)
    assert list(both["step"]) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert path.read_text().count("step,layer") == 1


def test_csv_holds_exactly_the_managers_rows(tmp_path: Path) -> None:
    path = tmp_path / "stats.csv"
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2), nn.Tanh())
    reference = copy.deepcopy(model)
    with HookManager(model, sinks=[hs.CSVSink(path, every=2)], alerts=False) as hm:
        train_steps(model, 5, hm)
    written = read(path)
    pd.testing.assert_frame_equal(written, hm.to_dataframe())
    # and they are the definitions' values, from the activations of an uninstrumented copy trained the same way
    with ActivationCalls() as seen:
        train_steps(reference, 5)
    want = definition_rows(seen.calls, per_forward=2)
    assert list(written["layer"]) == ["1", "3"] * 5 and list(written["kind"]) == [r["kind"] for r in want]
    for stat in ("dead_ratio", "inactive_fraction", "saturation_rate", "grad_norm"):
        assert written[stat].tolist() == pytest.approx([r[stat] for r in want], rel=1e-6, abs=1e-12, nan_ok=True)


def test_streaming_keeps_memory_bounded(tmp_path: Path) -> None:
    model = SharedReLU()
    with HookManager(model, sinks=[hs.CSVSink(tmp_path / "s.csv", every=50)], max_history=10, alerts=False) as hm:
        sizes = []
        for _ in range(600):
            model(torch.randn(2, 4))
            hm.step()
            sizes.append(hm.history_bytes())
        assert max(sizes[200:]) <= max(sizes[130:200])  # a saw tooth that stops growing
    assert len(read(tmp_path / "s.csv")) == 600 * 2


def test_close_fsyncs_the_file_and_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.csv"
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    model = SharedReLU()
    sink = hs.CSVSink(path, every=10)
    with HookManager(model, sinks=[sink], alerts=False) as hm:
        steps(model, 3, hm)
    assert synced == [str(path)] and open_fds(path) == []
    sink.close()
    sink.close()
    assert synced == [str(path)]
    assert len(read(path)) == 3 * 2


# ---------------------------------------------------------------------------------------------------------------
# CSV: configuration mistakes raise up front


def test_csv_sink_rejects_a_file_with_other_columns_when_bound(tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    model = SharedReLU()
    sink = hs.CSVSink(path, every=1)
    with pytest.raises(RuntimeError, match="other columns"):  # a StateError, raised by HookManager(...)
        HookManager(model, sinks=[sink])
    assert path.read_text() == "a,b\n1,2\n"
    notes = tmp_path / "notes.csv"
    notes.write_text("hello")  # no complete line, and not the start of a header: left alone
    with pytest.raises(StateError, match="does not start with a CSV header line"):
        HookManager(model, sinks=[hs.CSVSink(notes)])
    assert notes.read_text() == "hello"
    # a file written with other collectors is refused too, before any step
    with HookManager(model, [DeadReLU(), Saturation()], sinks=[hs.CSVSink(tmp_path / "ok.csv")]) as hm:
        steps(model, 1, hm)

    class Extra(hs.Collector):
        columns = ("extra",)

        def update(self, state, output, site):  # type: ignore[no-untyped-def]
            pass

        def compute(self, record):  # type: ignore[no-untyped-def]
            return {"extra": record["calls"] * 0.0}

    with pytest.raises(StateError, match=r"holds other columns .*extra"):
        HookManager(model, [DeadReLU(), Extra()], sinks=[hs.CSVSink(tmp_path / "ok.csv")])


def test_csv_sink_checks_its_path_at_construction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(OSError, match="does not exist"):  # also an OSError, as the failed open would have been
        hs.CSVSink(tmp_path / "missing" / "x.csv")
    with pytest.raises(ConfigPathError, match=r"`path` must be a writable file .*missing.*create it first"):
        hs.CSVSink(tmp_path / "missing" / "x.csv")
    with pytest.raises(ConfigTypeError, match=r"`path` must be a file path .*got 123"):
        hs.CSVSink(123)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="`path` must be a file path, got an empty string"):
        hs.CSVSink("")
    with pytest.raises(ValueError, match="`every`"):
        hs.CSVSink(tmp_path / "x.csv", every=0)
    with pytest.raises(ConfigPathError, match="it is a directory"):
        hs.CSVSink(tmp_path)
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    with pytest.raises(ConfigPathError, match="not a regular file"):
        hs.CSVSink(fifo)
    # root may write anywhere: the permission checks are seen through os.access
    readonly = {str(tmp_path / "ro"), str(tmp_path / "locked.csv")}
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: str(p) not in readonly and real_access(p, mode))
    (tmp_path / "ro").mkdir()
    with pytest.raises(ConfigPathError, match=r"directory .*ro' is not writable"):
        hs.CSVSink(tmp_path / "ro" / "x.csv")
    (tmp_path / "locked.csv").write_text("")
    with pytest.raises(ConfigPathError, match="the file is not writable"):
        hs.CSVSink(tmp_path / "locked.csv")
    with pytest.raises(TypeError, match="`sinks`"):
        HookManager(SharedReLU(), sinks=["stats.csv"])  # type: ignore[list-item]


UNCREATABLE = [p for p in ("/proc/stats.csv", "/sys/stats.csv") if os.path.isdir(os.path.dirname(p))]


@pytest.mark.skipif(not UNCREATABLE, reason="no /proc or /sys")
@pytest.mark.parametrize("path", UNCREATABLE)
def test_a_file_that_cannot_be_created_is_refused_when_the_sink_is_built(path: str) -> None:
    # os.access says yes to root everywhere and to /proc's owner; only trying to create the file tells
    assert not os.path.exists(path)
    with pytest.raises(ConfigPathError, match=rf"got '{path}': creating it fails: .*writable file system"):
        hs.CSVSink(path)
    assert not os.path.exists(path)


def test_the_creation_probe_leaves_no_file_and_touches_no_existing_one(tmp_path: Path) -> None:
    new, old = tmp_path / "new.csv", tmp_path / "old.csv"
    old.write_bytes(b"step,layer\n0,a\n")
    before = old.stat()
    hs.CSVSink(new)
    hs.CSVSink(old)
    assert not new.exists() and sorted(os.listdir(tmp_path)) == ["old.csv"]  # the probe is removed
    after = old.stat()
    assert old.read_bytes() == b"step,layer\n0,a\n" and (after.st_size, after.st_mtime_ns) == (
        before.st_size,
        before.st_mtime_ns,
    )


def test_two_sinks_on_one_file_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    first = hs.CSVSink(path)
    with pytest.raises(ConfigError, match="already written by another open CSVSink"):
        hs.CSVSink(path)
    (tmp_path / "alias.csv").symlink_to(path)
    with pytest.raises(ConfigError, match="already written"):
        hs.CSVSink(tmp_path / "alias.csv")  # the same file under another name
    with pytest.raises(ConfigError, match="already written"):  # in one manager, or two
        HookManager(SharedReLU(), sinks=[first, hs.CSVSink(path)])
    first.close()  # releases the path
    second = hs.CSVSink(path)
    del second
    gc.collect()  # so does garbage collection
    hs.CSVSink(path)


def test_a_sink_belongs_to_one_manager(tmp_path: Path) -> None:
    model = SharedReLU()
    sink = hs.CallbackSink(lambda frame: None)
    with pytest.raises(ConfigError, match=r"`sinks` must hold each sink once, .* at positions 0 and 1"):
        HookManager(model, sinks=[sink, sink])
    owner = HookManager(model, sinks=[sink])
    with pytest.raises(StateError, match="already feeds another HookManager"):
        HookManager(model, sinks=[sink])
    assert sink.source is owner
    del owner
    gc.collect()
    assert sink.source is None  # a sink does not keep its manager alive
    HookManager(model, sinks=[sink])


# ---------------------------------------------------------------------------------------------------------------
# CSV: failures of the environment warn once and never stop training


def test_full_disk_warns_once_releases_the_file_and_training_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    sink = hs.CSVSink(path, every=2)
    path.symlink_to("/dev/full")  # every write now fails with ENOSPC
    model = SharedReLU()
    with hookscope_warnings() as messages:
        hm = HookManager(model, sinks=[sink], alerts=False).attach()
        steps(model, 7, hm)
        assert open_fds("/dev/full") == []
        hm.detach()  # writes the last step (dropped, silently), closes: no second error
    one_stop_warning(messages, path, "No space left on device")
    assert sorted(hm.to_dataframe()["step"].unique()) == list(range(7))  # the statistics stay in memory


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_a_write_failing_half_way_leaves_no_torn_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    path = tmp_path / "s.csv"
    model = SharedReLU()
    hm = HookManager(model, sinks=[hs.CSVSink(path, every=3)], alerts=False).attach()
    steps(model, 4, hm)  # steps 0-2 written
    before = path.read_bytes()
    target = open_fds(path)
    assert len(target) == 1
    real_write = os.write
    calls = []

    def half_then_fail(fd: int, data: bytes) -> int:
        if fd not in target:
            return real_write(fd, data)
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))  # the disk fills up in the middle of a row
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "write", half_then_fail)
    with hookscope_warnings() as messages:
        steps(model, 6, hm)  # steps 3-5 fail half-way, 6-8 and 9 (at detach) are dropped without a word
        hm.detach()
    one_stop_warning(messages, path, os.strerror(code))
    assert len(calls) == 2 and path.read_bytes() == before and open_fds(path) == []
    full = hm.to_dataframe()
    pd.testing.assert_frame_equal(read(path), full[full["step"] <= 2].reset_index(drop=True))
    assert sorted(full["step"].unique()) == list(range(10))
    monkeypatch.undo()
    with HookManager(model, sinks=[hs.CSVSink(path, every=5)], start_step=10, alerts=False) as resumed:
        steps(model, 2, resumed)
    assert list(read(path)["step"].unique()) == [0, 1, 2, 10, 11]


def test_directory_removed_mid_run(tmp_path: Path) -> None:
    path = tmp_path / "run" / "s.csv"
    path.parent.mkdir()
    model = SharedReLU()
    with hookscope_warnings() as messages:
        hm = HookManager(model, sinks=[hs.CSVSink(path, every=2)], alerts=False).attach()
        steps(model, 3, hm)
        shutil.rmtree(path.parent)  # the open file lives on, unlinked: writing there would reach no reader
        steps(model, 4, hm)
        hm.detach()
    one_stop_warning(messages, path, "No such file or directory")
    assert open_fds(path) == []
    assert len(hm.to_dataframe()) == 7 * 2


def test_directory_removed_before_the_first_write(tmp_path: Path) -> None:
    path = tmp_path / "run" / "s.csv"
    path.parent.mkdir()
    model = SharedReLU()
    with hookscope_warnings() as messages:
        hm = HookManager(model, sinks=[hs.CSVSink(path, every=2)], alerts=False).attach()
        path.parent.rmdir()
        steps(model, 3, hm)
        hm.detach()
    one_stop_warning(messages, path, "No such file or directory")


def test_file_replaced_by_a_directory_mid_run(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    model = SharedReLU()
    with hookscope_warnings() as messages:
        hm = HookManager(model, sinks=[hs.CSVSink(path, every=2)], alerts=False).attach()
        steps(model, 2, hm)
        path.unlink()
        path.mkdir()
        steps(model, 4, hm)
        hm.detach()
    one_stop_warning(messages, path, "was replaced")
    assert path.is_dir() and open_fds(path) == []


def test_permission_denied_when_opening(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    path = tmp_path / "s.csv"
    real_open, real_os_open = builtins.open, os.open

    def deny(file: object, *args: object, real: object = None, **kwargs: object) -> object:
        if str(file) == str(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real(file, *args, **kwargs)  # type: ignore[operator]

    model = SharedReLU()
    sink = hs.CSVSink(path, every=2)
    monkeypatch.setattr(os, "open", lambda f, *a, **k: deny(f, *a, real=real_os_open, **k))
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: deny(f, *a, real=real_open, **k))
    with hookscope_warnings() as messages:
        hm = HookManager(model, sinks=[sink], alerts=False).attach()
        steps(model, 5, hm)
        hm.detach()
    one_stop_warning(messages, path, "Permission denied")
    assert len(hm.to_dataframe()) == 5 * 2


def test_fsync_failing_at_close_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.csv"

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    model = SharedReLU()
    monkeypatch.setattr(os, "fsync", broken)
    with hookscope_warnings() as messages:
        with HookManager(model, sinks=[hs.CSVSink(path, every=2)], alerts=False) as hm:
            steps(model, 3, hm)
        hm.detach()
    one_stop_warning(messages, path, "Input/output error")
    assert open_fds(path) == [] and len(read(path)) == 3 * 2


def test_resuming_onto_a_torn_line_repairs_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    model = SharedReLU()
    with HookManager(model, sinks=[hs.CSVSink(path, every=2)], alerts=False) as hm:
        steps(model, 3, hm)
    first = hm.to_dataframe()
    with path.open("ab") as f:
        f.write(b"448,1,re")  # a run killed in the middle of a write
    with hookscope_warnings() as messages, HookManager(model, sinks=[hs.CSVSink(path)], start_step=3) as hm2:
        steps(model, 2, hm2)
    assert len(messages) == 1 and "dropped its last 8 bytes" in messages[0] and str(path) in messages[0]
    expected = pd.concat([first, hm2.to_dataframe()], ignore_index=True)
    pd.testing.assert_frame_equal(read(path), expected)


def test_the_last_complete_record_is_found_as_a_csv_parser_reads_it(tmp_path: Path) -> None:
    # records written one at a time, so each record's end is known; names with newlines, quotes and commas
    names = ["fc.relu", "multi\nline", 'say "hi"', "a,b", 'x"\n"y\n', "plain", "\n"]
    frames = [pd.DataFrame({"step": [i], "layer": [name], "v": [0.5]}) for i, name in enumerate(names)]
    text = frames[0].to_csv(index=False, lineterminator="\n")
    ends = [len(text.encode())]  # the header and the first row
    for frame in frames[1:]:
        text += frame.to_csv(index=False, header=False, lineterminator="\n")
        ends.append(len(text.encode()))
    data = text.encode()
    path = tmp_path / "records.csv"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        for cut in range(len(data) + 1):
            expected = max([0] + [e for e in ends if e <= cut]) if cut >= ends[0] else data.rfind(b"\n", 0, cut) + 1
            for chunk in (3, 1 << 20):  # chunk boundaries anywhere
                assert last_record_end(fd, cut, chunk) == expected, (cut, chunk)
    finally:
        os.close(fd)
    assert list(pd.read_csv(path, dtype={"layer": str})["layer"]) == names  # the reference parser agrees


def test_resuming_onto_a_record_torn_inside_a_quoted_multi_line_name(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    model = nn.Sequential()
    model.add_module("two\nlines", nn.ReLU())  # a module name may hold a newline: the CSV quotes it
    with HookManager(model, sinks=[hs.CSVSink(path, every=2)], alerts=False) as hm:
        steps(model, 3, hm)
    first = hm.to_dataframe()
    assert path.read_bytes().count(b'"two\nlines"') == 3
    with path.open("ab") as f:
        f.write(b'3,"two\n')  # killed just after the newline inside the quoted name: the last byte is a newline
    with hookscope_warnings() as messages, HookManager(model, sinks=[hs.CSVSink(path)], start_step=3) as hm2:
        steps(model, 2, hm2)
    assert len(messages) == 1 and "dropped its last 7 bytes" in messages[0]
    expected = pd.concat([first, hm2.to_dataframe()], ignore_index=True)
    pd.testing.assert_frame_equal(read(path), expected)
    assert list(read(path)["step"]) == [0, 1, 2, 3, 4]


def test_a_torn_header_is_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_bytes(b"step,layer,ki")
    model = SharedReLU()
    with hookscope_warnings() as messages, HookManager(model, sinks=[hs.CSVSink(path, every=2)]) as hm:
        steps(model, 2, hm)
    assert len(messages) == 1 and "dropped its last 13 bytes" in messages[0]
    pd.testing.assert_frame_equal(read(path), hm.to_dataframe())


# ---------------------------------------------------------------------------------------------------------------
# TensorBoard


class RecordingWriter:
    """A duck-typed SummaryWriter."""

    def __init__(self, fail_with: int | None = None) -> None:
        self.scalars: list[tuple[str, float, int]] = []
        self.fail_with = fail_with
        self.calls = 0

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self.calls += 1
        if self.fail_with is not None:
            raise OSError(self.fail_with, os.strerror(self.fail_with))
        self.scalars.append((tag, value, global_step))


def test_tensorboard_sink_writes_scalars_and_histograms(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2), nn.Tanh())
    with HookManager(model, sinks=[hs.TensorBoardSink(tmp_path, every=2, histograms=True)], alerts=False) as hm:
        train_steps(model, 3, hm)
    expected = hm.to_dataframe()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "hookscope/1/dead_ratio" in tags["scalars"] and "hookscope/3/saturation_rate" in tags["scalars"]
    assert "hookscope/3/dead_ratio" not in tags["scalars"]  # NaN for tanh: not written
    events = acc.Scalars("hookscope/1/grad_norm")
    assert [e.step for e in events] == [0, 1, 2]
    got = [e.value for e in events]
    assert got == pytest.approx(expected[expected["layer"] == "1"]["grad_norm"].tolist(), rel=1e-6)
    assert "hookscope/1/steps_since_fired" in tags["histograms"]


def test_tensorboard_stats_may_be_one_name() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    writer = RecordingWriter()
    with HookManager(model, sinks=[hs.TensorBoardSink(writer, every=2, stats="dead_ratio")], alerts=False) as hm:
        train_steps(model, 3, hm)
    expected = hm.to_dataframe()["dead_ratio"].tolist()
    assert writer.scalars == [("hookscope/1/dead_ratio", v, s) for s, v in enumerate(expected)]


def test_tensorboard_writes_parameter_statistics_of_each_closed_step_once() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    writer = RecordingWriter()
    with ParamsManager(model, sinks=[hs.TensorBoardSink(writer, every=2, stats="dead_ratio")], alerts=False) as hm:
        train_steps(model, 5, hm)  # writes after steps 1 and 3, and the last one at detach
    params = [(tag, value, step) for tag, value, step in writer.scalars if tag.startswith("hookscope/params/")]
    weight_norms = [(step, value) for tag, value, step in params if tag == "hookscope/params/head/weight_norm"]
    assert weight_norms == [(s, s + 0.5) for s in range(5)]  # every closed step once; the open one never
    assert {tag for tag, _, _ in params} == {
        "hookscope/params/head/weight_norm", "hookscope/params/head/grad_norm", "hookscope/params/head/update_ratio",
        "hookscope/params/body/weight_norm", "hookscope/params/body/update_ratio",
    }  # fmt: skip
    assert [step for tag, _, step in writer.scalars if tag == "hookscope/1/dead_ratio"] == list(range(5))


def test_tensorboard_without_parameter_statistics_never_asks_for_them() -> None:
    class NoParams(ParamsManager):
        params = property(lambda self: False, lambda self, value: None)

        def param_frame(self) -> pd.DataFrame:
            raise AssertionError("param_frame() called on a manager without params")

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    writer = RecordingWriter()
    with NoParams(model, sinks=[hs.TensorBoardSink(writer, every=2)], alerts=False) as hm:
        train_steps(model, 3, hm)
    assert writer.scalars and not any(tag.startswith("hookscope/params/") for tag, _, _ in writer.scalars)


def test_tensorboard_arguments_are_checked_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    with pytest.raises(ConfigTypeError, match=r"`writer` must be a log directory .*got 123 \(it has no add_scalar"):
        hs.TensorBoardSink(123)
    with pytest.raises(ConfigTypeError, match="it has no add_histogram"):
        hs.TensorBoardSink(RecordingWriter(), histograms=True)
    with pytest.raises(ConfigTypeError, match=r"`histograms` must be True or False \(.*\), got 'yes'"):
        hs.TensorBoardSink(RecordingWriter(), histograms="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigTypeError, match="`stats` must be a statistic column name or a sequence"):
        hs.TensorBoardSink(RecordingWriter(), stats=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigTypeError, match=r"`stats` .*got 1 in \['dead_ratio', 1\]"):
        hs.TensorBoardSink(RecordingWriter(), stats=["dead_ratio", 1])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="`stats` must name statistic columns, got 'layer'"):
        hs.TensorBoardSink(RecordingWriter(), stats="layer")
    typo = hs.TensorBoardSink(RecordingWriter(), stats=("dead_ration",))  # perhaps a custom collector's column
    with pytest.raises(ConfigError, match=r"got 'dead_ration' .*this manager's statistic columns: dead_ratio, "):
        HookManager(model, sinks=[typo])
    with pytest.raises(ConfigError, match=r"`histograms=True` needs .*DeadReLU"):
        writer = types.SimpleNamespace(add_scalar=print, add_histogram=print)
        HookManager(model, [Saturation()], sinks=[hs.TensorBoardSink(writer, histograms=True)])

    class Mean(hs.Collector):
        columns = ("mean",)

        def update(self, state, output, site):  # type: ignore[no-untyped-def]
            pass

        def compute(self, record):  # type: ignore[no-untyped-def]
            return {"mean": 1.0}

    HookManager(model, [Mean()], sinks=[hs.TensorBoardSink(RecordingWriter(), stats=["mean", "grad_norm"])])


def test_tensorboard_log_directory_that_cannot_be_created(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigPathError, match="`writer` must be a log directory that can be created"):
        hs.TensorBoardSink(tmp_path / "file" / "logs")


def test_tensorboard_without_tensorboard_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'hookscope\[tensorboard\]'"):
        hs.TensorBoardSink(tmp_path)
    hs.TensorBoardSink(RecordingWriter())  # a writer of your own needs no tensorboard


def test_tensorboard_writer_failing_warns_once_and_stops() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    writer = RecordingWriter(fail_with=errno.ENOSPC)
    with hookscope_warnings() as messages, HookManager(model, sinks=[hs.TensorBoardSink(writer, every=2)]) as hm:
        train_steps(model, 5, hm)
    one_stop_warning(messages, "RecordingWriter", "No space left on device")
    assert writer.calls == 1 and len(hm.to_dataframe()) == 5


def test_tensorboard_log_directory_removed_mid_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboard")
    thread_errors: list[type[BaseException]] = []  # tensorboard's writer thread dies with the error it hands on
    monkeypatch.setattr(threading, "excepthook", lambda args: thread_errors.append(args.exc_type))
    logs = tmp_path / "logs"
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    with hookscope_warnings() as messages:
        hm = HookManager(model, sinks=[hs.TensorBoardSink(logs, every=2)], alerts=False).attach()
        train_steps(model, 2, hm)
        shutil.rmtree(logs)
        train_steps(model, 4, hm)
        hm.detach()
    one_stop_warning(messages, logs, "No such file or directory")
    deadline = time.monotonic() + 10
    while not thread_errors and time.monotonic() < deadline:
        time.sleep(0.01)
    assert thread_errors == [FileNotFoundError]


# ---------------------------------------------------------------------------------------------------------------
# CallbackSink


def test_callback_sink_hands_each_closed_step_once() -> None:
    model = SharedReLU()
    frames: list[pd.DataFrame] = []
    calls_after_each_step = []
    with HookManager(model, sinks=[hs.CallbackSink(frames.append, every=3)], alerts=False) as hm:
        for _ in range(10):
            model(torch.randn(2, 4))
            hm.step()
            calls_after_each_step.append(len(frames))
    assert calls_after_each_step == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3]
    assert len(frames) == 4  # and one at detach, with the last step
    assert [sorted(f["step"].unique()) for f in frames] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert [len(f) for f in frames] == [2 * 3, 2 * 3, 2 * 3, 2 * 1]  # layers x steps
    assert all(tuple(f.columns) == hm.columns for f in frames)
    pd.testing.assert_frame_equal(pd.concat(frames, ignore_index=True), hm.to_dataframe())


def _flaky_logger() -> tuple[list[list[int]], Callable[[pd.DataFrame], None]]:
    """A tracker's log function that fails on its first call; ``seen`` gets the steps of every call."""
    seen: list[list[int]] = []

    def flaky(frame: pd.DataFrame) -> None:
        seen.append(sorted(frame["step"].unique()))
        if len(seen) == 1:
            raise ConnectionError("logger unreachable")

    return seen, flaky


def test_callback_sink_checks_fn_and_lets_its_errors_through() -> None:
    with pytest.raises(ConfigTypeError, match=r"`fn` must be a callable taking one DataFrame .*got 'log'"):
        hs.CallbackSink("log")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`every`"):
        hs.CallbackSink(print, every=0)
    seen, flaky = _flaky_logger()
    model = SharedReLU()
    with HookManager(model, sinks=[hs.CallbackSink(flaky, every=2)], alerts=False) as hm:
        steps(model, 1, hm)
        with pytest.raises(ConnectionError):
            steps(model, 1, hm)
        steps(model, 2, hm)  # the next write works (its rows: test_rows_handed_to_a_callback_that_raised_come_again)
    assert seen[0] == [0, 1] and seen[-1][-1] == 3
    assert repr(hs.CallbackSink(flaky)).endswith("<locals>.flaky, every=100)")


def test_rows_handed_to_a_callback_that_raised_come_again() -> None:
    seen, flaky = _flaky_logger()
    model = SharedReLU()
    with HookManager(model, sinks=[hs.CallbackSink(flaky, every=2)], alerts=False) as hm:
        with contextlib.suppress(ConnectionError):
            steps(model, 2, hm)
        steps(model, 2, hm)
    # the rows of the failed call come again with the next write, `every` training steps later
    assert seen == [[0, 1], [0, 1, 2, 3]]


def _by_step(frame: pd.DataFrame) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for tag, step, value in scalars(frame):
        out.setdefault(step, {})[tag] = value
    return out


def test_logger_recipes_of_the_readme() -> None:
    # the README's Weights & Biases and MLflow recipes, against stand-ins with the same calls
    logged: list[tuple[str, dict[str, float], int | None]] = []
    wandb = types.SimpleNamespace(log=lambda metrics: logged.append(("wandb", metrics, None)))
    mlflow = types.SimpleNamespace(log_metrics=lambda metrics, step: logged.append(("mlflow", metrics, step)))
    import re

    def to_wandb(frame: pd.DataFrame) -> None:
        for step, metrics in _by_step(frame).items():
            wandb.log({"hookscope/step": step, **metrics})

    def to_mlflow(frame: pd.DataFrame) -> None:
        for step, metrics in _by_step(frame).items():
            mlflow.log_metrics({re.sub(r"[^\w./ -]", "_", k): v for k, v in metrics.items()}, step=step)

    model = SharedReLU()
    sinks = [hs.CallbackSink(to_wandb, every=2), hs.CallbackSink(to_mlflow, every=2)]
    with HookManager(model, sinks=sinks, alerts=False) as hm:
        train_steps(model, 3, hm)
    wandb_rows = [m for who, m, _ in logged if who == "wandb"]
    mlflow_rows = [(m, s) for who, m, s in logged if who == "mlflow"]
    assert [m["hookscope/step"] for m in wandb_rows] == [0, 1, 2]
    assert [s for _, s in mlflow_rows] == [0, 1, 2]
    df = hm.to_dataframe()
    second_call = df[(df["step"] == 1) & (df["layer"] == "act#1")]["grad_norm"].item()
    assert wandb_rows[1]["hookscope/act#1/grad_norm"] == second_call
    assert mlflow_rows[1][0]["hookscope/act_1/grad_norm"] == second_call


# ---------------------------------------------------------------------------------------------------------------
# exports


def test_sinks_are_exported_and_tensorboard_loads_lazily() -> None:
    from hookscope.integrations.tensorboard import TensorBoardSink
    from hookscope.reporters.callback import CallbackSink
    from hookscope.reporters.csv import CSVSink

    assert (hs.CSVSink, hs.CallbackSink, hs.TensorBoardSink) == (CSVSink, CallbackSink, TensorBoardSink)
    assert {"CSVSink", "CallbackSink", "TensorBoardSink"} <= set(hs.__all__) and "TensorBoardSink" in dir(hs)
    assert all(issubclass(s, Sink) for s in (CSVSink, CallbackSink, TensorBoardSink))
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        hs.Nothing  # type: ignore[attr-defined]  # noqa: B018
    code = (
        "import sys, hookscope; loaded = [m for m in ('tensorboard', 'torch.utils.tensorboard') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_manager_that_fails_to_build_leaves_its_sinks_free(tmp_path) -> None:  # type: ignore[no-untyped-def]
    good = hs.CSVSink(tmp_path / "good.csv")
    bad = hs.TensorBoardSink(types.SimpleNamespace(add_scalar=lambda *a, **k: None), stats=("no_such_column",))
    model = SharedReLU()
    with pytest.raises(ValueError, match="no_such_column"):
        HookManager(model, sinks=[good, bad])
    with HookManager(model, sinks=[good], alerts=False) as hm:  # `good` is not held by the failed manager
        model(torch.randn(2, 4))
        hm.step()
    assert pd.read_csv(tmp_path / "good.csv")["step"].tolist() == [0, 0]


def test_tensorboard_writes_real_parameter_statistics() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    writer = RecordingWriter()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with HookManager(model, params=True, alerts=False, sinks=[hs.TensorBoardSink(writer, every=2)]) as hm:
        for _ in range(5):
            model(torch.randn(3, 4)).sum().backward()
            hm.step()
            opt.step()
            opt.zero_grad()
    params = hm.param_frame()
    written = {(tag, step): value for tag, value, step in writer.scalars if tag.startswith("hookscope/params/")}
    want = {
        (f"hookscope/params/{r.module}/{stat}", r.step): getattr(r, stat)
        for r in params.itertuples()
        for stat in ("weight_norm", "grad_norm", "update_ratio")
        if getattr(r, stat) == getattr(r, stat)  # NaN is not written
    }
    assert written.keys() == want.keys() and len(want) == 2 * 5 * 3 - 2  # update_ratio is NaN at step 0
    assert all(written[k] == pytest.approx(v) for k, v in want.items())
