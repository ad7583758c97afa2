"""Peak memory of reading a stats CSV back: ``read_stats`` and ``hookscope show`` against ``pandas.read_csv``.

Method. A CSV like the ones hookscope writes (``--rows`` rows: ``--layers`` layers per step, the default columns,
NaN where a statistic does not apply) is written once; then each reader runs in a fresh Python process. The
process imports what it needs, resets its peak resident set size (``/proc/self/clear_refs``, Linux) or reads it,
runs the reader once and reports how far the peak rose above the resident size before the call: the memory the
call itself needed, without the interpreter and the libraries. A 1 GiB file of binary data (sparse: it costs no
disk) is refused by ``show``; its row says how much memory and time the refusal took.

    python benchmarks/read_memory.py                   # 300,000 rows
    python benchmarks/read_memory.py --rows 1000000 --layers 250
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Run in a fresh process: imports, the peak reset, one call, the peak's rise in KiB and the seconds it took.
PROBE = r"""
import os, resource, sys, time
sys.path.insert(0, {root!r})
{imports}

def rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))

try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) restarts from the current size
    before, peak = rss_kib("VmRSS:"), lambda: rss_kib("VmHWM:")
except OSError:  # no reset: the peak so far is the baseline
    before, peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, lambda: resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
{call}
print(peak() - before, time.perf_counter() - start)
"""

READERS = {
    "pandas.read_csv": ("import pandas as pd", "frame = pd.read_csv(PATH)"),
    "pandas.read_csv (layer as str)": (
        "import pandas as pd",
        "frame = pd.read_csv(PATH, dtype={'layer': str, 'kind': str, 'shape': str})",
    ),
    "hookscope read_stats": ("from hookscope.stats_file import read_stats", "frame = read_stats(PATH)"),
    "hookscope show": (
        "import contextlib, io\nfrom hookscope.cli import main\nimport hookscope.reporters.table, rich.table",
        "with contextlib.redirect_stdout(io.StringIO()):\n    assert main(['show', PATH, '--ascii']) == 0",
    ),
}

#: ``show`` refusing a file that is not a hookscope CSV.
REFUSAL = (
    "import contextlib, io\nfrom hookscope.cli import main",
    "with contextlib.redirect_stderr(io.StringIO()):\n    assert main(['show', PATH]) == 2",
)


def write_csv(path: Path, rows: int, layers: int) -> None:
    import numpy as np
    import pandas as pd

    steps = -(-rows // layers)
    rng = np.random.default_rng(0)
    n = steps * layers
    relu = np.arange(n) % 3 != 2
    frame = pd.DataFrame(
        {
            "step": np.repeat(np.arange(steps), layers),
            "layer": np.tile([f"blocks.{i // 2}.{'act' if i % 2 else 'mlp.gelu'}" for i in range(layers)], steps),
            "kind": np.where(relu, "relu", "sigmoid"),
            "shape": "64x512",
            "units": 512,
            "calls": 1,
            "dead_ratio": np.where(relu, rng.random(n), np.nan),
            "inactive_fraction": np.where(relu, rng.random(n), np.nan),
            "saturation_rate": np.where(relu, np.nan, rng.random(n)),
            "grad_norm": rng.random(n) * 1e-2,
            "confirmed_dead_ratio": np.where(relu, rng.random(n), np.nan),
        }
    ).iloc[:rows]
    frame.to_csv(path, index=False)


def measure(name: str, path: Path) -> tuple[float, float]:
    imports, call = READERS.get(name, REFUSAL)
    code = PROBE.format(root=str(ROOT), imports=imports, call=call.replace("PATH", repr(str(path))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return int(out[-2]) / 1024, float(out[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--layers", type=int, default=100)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stats.csv"
        write_csv(path, args.rows, args.layers)
        size = path.stat().st_size
        results = {name: measure(name, path) for name in READERS}
        binary = Path(tmp) / "binary.csv"
        with open(binary, "wb") as f:
            f.truncate(1 << 30)
        results["show refusing a 1 GiB binary file"] = measure("refusal", binary)
    base = results["pandas.read_csv"][0]
    print(f"{args.rows:,} rows, {args.layers} layers per step, {size / 2**20:.1f} MiB; peak RSS rise of one call:\n")
    print("| reader | peak RSS rise (MiB) | vs pandas.read_csv | seconds |")
    print("|---|---:|---:|---:|")
    for name, (mib, seconds) in results.items():
        print(f"| {name} | {mib:.1f} | {mib / base:.2f}x | {seconds:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": args.rows, "bytes": size, "results": results}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
