"""Reading a stats CSV back (``read_stats``, ``hookscope show`` and ``plot``) without holding the file in memory:
the header is sniffed from the first bytes, what is not a hookscope CSV is refused at once, the rows are parsed a
chunk at a time, and the result and the messages are those of reading the whole file."""

from __future__ import annotations

import importlib
import io
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hookscope import stats_file
from hookscope.errors import InputError
from hookscope.stats_file import HEAD_BYTES, read_stats

HEADER = "step,layer,kind,shape,units,calls,dead_ratio,inactive_fraction,saturation_rate,grad_norm"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def bytes_read() -> int | None:
    """Bytes this process has read with read(2) and friends so far (Linux), or None."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
    except (OSError, StopIteration):
        return None


def refused_reading_little(path: Path, fragment: str) -> None:
    """``read_stats`` refuses ``path`` with ``fragment``, having read at most a few heads of it."""
    before = bytes_read()
    with pytest.raises(InputError, match=fragment):
        read_stats(str(path))
    after = bytes_read()
    if before is not None and after is not None:
        assert after - before < 4 * HEAD_BYTES, f"read {after - before} bytes of {path.stat().st_size}"


@pytest.mark.skipif(bytes_read() is None, reason="no /proc/self/io to count the bytes read")
def test_a_big_file_that_is_not_a_hookscope_csv_is_refused_from_its_first_bytes(tmp_path: Path) -> None:
    binary = tmp_path / "binary.csv"
    with open(binary, "wb") as f:
        f.truncate(1 << 30)  # 1 GiB of NUL bytes, sparse: no disk, and reading it all would take a while
    refused_reading_little(binary, "it holds binary data")
    text = tmp_path / "log.csv"  # valid UTF-8 lines, not a hookscope CSV
    text.write_bytes(b"time,message\n" + b"12:00,all good\n" * (1 << 20))
    refused_reading_little(text, "missing columns step, layer")
    one_line = tmp_path / "one_line.csv"
    one_line.write_bytes(b"x" * (4 << 20))
    refused_reading_little(one_line, f"its first {HEAD_BYTES} bytes hold no complete header line")
    latin = tmp_path / "latin.csv"
    latin.write_bytes(HEADER.encode() + b"\n0,b\xe4r" + b"," * (8 << 20))
    refused_reading_little(latin, f"byte {len(HEADER) + 4} is not UTF-8 text")


def test_binary_data_or_bad_utf8_after_a_good_head_is_refused_naming_the_byte(tmp_path: Path) -> None:
    # names with two-byte characters, so that some are cut by the reader's block boundaries
    rows = [f"{i},l\u00e4yer.{i % 7},relu,8x4,4,1,0.25,0.5,,0.1\n" for i in range(60_000)]
    good = (HEADER + "\n" + "".join(rows)).encode()
    assert len(good) > 2 * (1 << 20) and len(read_stats(str(_write(tmp_path / "good.csv", good)))) == 60_000
    at = good.index(b"\n", 1_600_000) + 3  # inside a row far beyond the head
    bad_byte = _write(tmp_path / "bad.csv", good[:at] + b"\xff" + good[at + 1 :])
    with pytest.raises(InputError, match=rf"bad.csv is not a hookscope CSV: byte {at} is not UTF-8 text"):
        read_stats(bad_byte)
    nul = _write(tmp_path / "nul.csv", good[:at] + b"\0" + good[at + 1 :])
    with pytest.raises(InputError, match=r"nul\.csv is not a hookscope CSV: it holds binary data"):
        read_stats(nul)


def _write(path: Path, data: bytes | str) -> str:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def test_reading_a_chunk_at_a_time_gives_what_reading_the_whole_file_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stats_file, "CHUNK_ROWS", 3)  # every structure crosses a chunk boundary
    frame = pd.DataFrame(
        {
            "step": np.repeat(np.arange(4), 5),
            "layer": ["a", "two\nlines", "  spaced", "c,comma", 'q"uote'] * 4,
            "kind": "relu",
            "shape": "8x4",
            "units": 4,
            "calls": 1,
            "dead_ratio": np.linspace(0, 1, 20),
            "inactive_fraction": np.nan,
            "saturation_rate": np.nan,
            "grad_norm": np.logspace(-3, 3, 20),
            "note": ["n"] * 19 + ["text"],  # a custom column found to be text in the last chunk
            "score": np.arange(20) / 8,
        }
    )
    text = frame.to_csv(index=False)
    path = _write(tmp_path / "s.csv", "\n" + text.replace("\n1,a,", "\n\n , ,,,,,,,,,,\n1,a,", 1))
    got = read_stats(path)
    expected = frame.assign(layer=frame["layer"].str.strip())  # spaces around fields are dropped
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)
    assert got["note"].tolist() == expected["note"].tolist() and got["score"].dtype == np.float64
    # a mistake in a late chunk is reported on its line, with the count of lines like it in every chunk
    lines = text.splitlines()  # each step takes 6 lines: the layer with a quoted newline takes two
    assert lines[13].startswith("2,a,relu,") and lines[22].startswith("3,  spaced,relu,")
    lines[13], lines[22] = lines[13].replace(",relu,", ",,"), lines[22].replace(",relu,", ", ,")
    with pytest.raises(InputError, match=r"s2.csv line 14: `kind` is empty; expected the kind name \(1 more lines"):
        read_stats(_write(tmp_path / "s2.csv", "\n".join(lines) + "\n"))
    repeated = "\n".join([*text.splitlines(), text.splitlines()[4]]) + "\n"
    with pytest.raises(InputError, match=r"s3.csv line 26: step 0, layer 'spaced' is also on line 5"):
        read_stats(_write(tmp_path / "s3.csv", repeated))


def _memory_script() -> object:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("read_memory")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak memory is read from /proc (Linux)")
def test_peak_memory_of_reading_stays_within_one_and_a_half_times_pandas(tmp_path: Path) -> None:
    bench = _memory_script()
    path = tmp_path / "stats.csv"
    bench.write_csv(path, 100_000, 100)  # type: ignore[attr-defined]
    pandas_mib, _ = bench.measure("pandas.read_csv", path)  # type: ignore[attr-defined]
    ours_mib, _ = bench.measure("hookscope read_stats", path)  # type: ignore[attr-defined]
    assert pandas_mib > 10  # the measure sees the frame being built
    assert ours_mib <= 1.5 * pandas_mib, (ours_mib, pandas_mib)  # reading it all as text took 5x


def test_a_header_after_blank_lines_and_a_byte_order_mark(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.csv", b"\xef\xbb\xbf\n\r\n" + (HEADER + "\n0,a,relu,8x4,4,1,0.25,0.5,,0.1\n").encode())
    frame = read_stats(path)
    assert frame["layer"].tolist() == ["a"] and frame["dead_ratio"].tolist() == [0.25]
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    assert buffer.getvalue().startswith(HEADER)


# ------------------------------------------------------------------------------------------------------------------
# names that a spreadsheet would run as formulas (CSV injection), and that must read back exactly

HOSTILE = [
    '=HYPERLINK("http://x","y")',
    "+1",
    "-2+3",
    "@SUM(A1)",
    "\tcmd",
    "'quoted",  # a legitimate name that starts with the prefix itself
    "'=both",
    "''",
    "'",
    " lead",
    "trail ",
    "plain",
    "mid=dle",
]


def test_neutralised_cells_never_start_a_formula_and_restore_exactly() -> None:
    import csv as csv_module
    import itertools

    from hookscope.csv_cells import FORMULA_STARTS, QUOTE, neutralise, restore

    alphabet = ["=", "+", "-", "@", "\t", "\r", "\n", QUOTE, " ", "a", '"', ","]
    cells = ["".join(p) for n in range(4) for p in itertools.product(alphabet, repeat=n)] + HOSTILE
    buffer = io.StringIO()
    csv_module.writer(buffer).writerows([[neutralise(c)] for c in cells])  # through a real CSV file
    read_back = [row[0] if row else "" for row in csv_module.reader(io.StringIO(buffer.getvalue(), newline=""))]
    assert len(read_back) == len(cells)
    for cell, field in zip(cells, read_back):
        assert restore(field) == cell, (cell, field)
        assert not field.startswith(FORMULA_STARTS), (cell, field)
    assert neutralise("plain") == "plain" and neutralise("-1") == "'-1" and neutralise("'q") == "''q"


def hostile_model() -> object:
    import torch.nn as nn

    model = nn.Sequential()
    model.add_module("linear", nn.Linear(4, 4))
    for name in HOSTILE:
        model.add_module(name, nn.ReLU())
    return model


def test_hostile_layer_names_are_inert_in_every_csv_and_read_back_exactly(tmp_path: Path) -> None:
    import csv as csv_module

    import torch

    import hookscope as hs
    from hookscope.cli import main

    model = hostile_model()
    sink_path, whole_path = tmp_path / "sink.csv", tmp_path / "whole.csv"
    with hs.HookManager(model, sinks=[hs.CSVSink(sink_path, every=2)], alerts=False) as hm:  # type: ignore[arg-type]
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()  # type: ignore[operator]
            hm.step()
    hm.to_csv(whole_path)
    expected = hm.to_dataframe()
    assert set(expected["layer"]) == set(HOSTILE)  # the names really are the sites' names
    for path in (sink_path, whole_path):
        with open(path, newline="") as f:
            rows = list(csv_module.reader(f))
        layer_at = rows[0].index("layer")
        cells = [row[layer_at] for row in rows[1:]]
        assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")], cells
        assert '\'=HYPERLINK("http://x","y")' in cells and "''quoted" in cells and "' lead" in cells
        assert "plain" in cells and "mid=dle" in cells  # other names are written as they are
        frame = read_stats(str(path))
        assert frame["layer"].tolist() == expected["layer"].tolist()  # exactly, spaces and quotes included
        pd.testing.assert_frame_equal(frame, expected, check_dtype=False)
        assert main(["show", str(path), "--ascii"]) == 0


def test_numbers_are_not_prefixed_and_text_columns_of_any_frame_are(tmp_path: Path) -> None:
    from hookscope.reporters.csv import write_csv

    frame = pd.DataFrame({"step": [0, 1], "module": ["-neg", "ok"], "delta": [-0.5, 2.0], "=col": ["a", "b"]})
    write_csv(frame, tmp_path / "p.csv")
    assert (tmp_path / "p.csv").read_text().splitlines() == ["step,module,delta,'=col", "0,'-neg,-0.5,a", "1,ok,2.0,b"]
