"""Building the native statistics kernels: one C file compiled into a plain shared library.

The library has no torch or Python header (it is loaded with ctypes), so one binary serves every torch and Python
version. The build is optional: :func:`build` never raises; when no C compiler works it warns and returns
``None``, and hookscope then computes the statistics with ATen operations.

``setup.py`` runs it while the package is installed (``pip install .`` or ``pip install -e .``), loading this file
by path: it imports only the standard library. After editing the C sources, rebuild in place with::

    python -m hookscope.kernels

Environment: ``CC`` names the compiler (default: the one Python was built with, else ``cc``, ``gcc``, ``clang``);
``CFLAGS`` and ``LDFLAGS`` are appended to the command line; ``HOOKSCOPE_NO_KERNELS=1`` skips the build.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

__all__ = ["ABI_VERSION", "LIBRARY_NAME", "SOURCE_DIR", "BuildWarning", "build", "main", "source_hash"]

#: Must match HS_ABI_VERSION in src/hookscope_kernels.h.
ABI_VERSION = 3

#: The library's file name: a plain shared library, not a CPython extension module.
LIBRARY_NAME = {"darwin": "libhookscope_kernels.dylib", "win32": "hookscope_kernels.dll"}.get(
    sys.platform, "libhookscope_kernels.so"
)

#: The C sources.
SOURCE_DIR = Path(__file__).resolve().parent / "src"
_MAIN_SOURCE = "hookscope_kernels.c"
_SOURCE_SUFFIXES = (".c", ".h", ".inc")

#: Portable optimisation flags (no -march=native: the AVX2 code is compiled with target attributes and chosen at
#: run time).
_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-fvisibility=hidden", "-fno-trapping-math", "-fno-math-errno"]
_OPENMP = ["-fopenmp"]
_TIMEOUT_S = 300


class BuildWarning(UserWarning):
    """The native kernels could not be built; hookscope will use ATen operations."""


def source_hash(directory: Path = SOURCE_DIR) -> str | None:
    """A short hash of the C sources in ``directory`` (``None`` when there are none), embedded in the library so
    that the loader can tell a library built from other sources."""
    files = sorted(p for p in directory.glob("*") if p.suffix in _SOURCE_SUFFIXES) if directory.is_dir() else []
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(b"\0")
        h.update(p.read_bytes().replace(b"\r\n", b"\n"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def _compilers() -> list[list[str]]:
    """Compiler commands to try, best first (only ``CC`` when it is set)."""
    cc = os.environ.get("CC")
    if cc:
        return [shlex.split(cc)]
    found: list[list[str]] = []
    configured = sysconfig.get_config_var("CC")
    for cmd in [*([shlex.split(configured)] if configured else []), ["cc"], ["gcc"], ["clang"]]:
        if cmd and shutil.which(cmd[0]) and cmd not in found:
            found.append(cmd)
    return found


def _warn(message: str) -> None:
    warnings.warn(f"hookscope: {message}; statistics of CPU tensors will use ATen operations", BuildWarning, 3)


def _check(path: Path) -> str | None:
    """Why the library at ``path`` cannot be used here (``None``: it loads and has the expected ABI)."""
    try:
        lib = ctypes.CDLL(str(path))
        lib.hs_abi_version.restype = ctypes.c_int32
        version = int(lib.hs_abi_version())
    except (OSError, AttributeError) as e:
        return f"the built library does not load here ({e})"
    if version != ABI_VERSION:
        return f"the built library has ABI version {version}, expected {ABI_VERSION}"
    return None


def build(out_dir: Path | str, *, verbose: bool = False) -> Path | None:
    """Compile the kernels into ``out_dir/LIBRARY_NAME``; never raises.

    Tries each available compiler, with OpenMP first and then without (single-threaded kernels). The library is
    written under a temporary name and renamed into place, so a process that has the old one loaded keeps it.

    Args:
        out_dir: Directory that receives the library (the package directory ``hookscope/kernels``).
        verbose: Print the compiler commands and their time.

    Returns:
        The library's path, or ``None`` (with a :class:`BuildWarning`) when it could not be built.
    """
    try:
        return _build(Path(out_dir), verbose)
    except Exception as e:  # an optional step: whatever goes wrong, the install goes on
        _warn(f"building the native kernels failed unexpectedly ({type(e).__name__}: {e})")
        return None


def _build(out_dir: Path, verbose: bool) -> Path | None:
    if os.environ.get("HOOKSCOPE_NO_KERNELS", "") not in ("", "0"):
        _warn("HOOKSCOPE_NO_KERNELS is set: the native kernels are not built")
        return None
    if sys.platform == "win32":
        _warn("the native kernels build with gcc or clang, not on Windows yet")
        return None
    digest = source_hash()
    if digest is None:
        _warn(f"the kernels' C sources are missing from {SOURCE_DIR}")
        return None
    compilers = _compilers()
    if not compilers:
        _warn("no C compiler found (set CC, or install gcc or clang, then reinstall hookscope)")
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / LIBRARY_NAME
    fd, tmp_name = tempfile.mkstemp(prefix=".hookscope_kernels.", suffix=".tmp", dir=out_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    extra = shlex.split(os.environ.get("CFLAGS", "")) + shlex.split(os.environ.get("LDFLAGS", ""))
    errors: list[str] = []
    try:
        for cc in compilers:
            for openmp in (_OPENMP, []):
                cmd = [
                    *cc,
                    *_FLAGS,
                    *openmp,
                    f'-DHS_SOURCE_HASH="{digest}"',
                    f"-I{SOURCE_DIR}",
                    str(SOURCE_DIR / _MAIN_SOURCE),
                    "-o",
                    str(tmp),
                    *extra,
                    "-lm",
                ]
                t0 = time.perf_counter()
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT_S)
                except (OSError, subprocess.SubprocessError) as e:
                    errors.append(f"{shlex.join(cmd[:1])}: {e}")
                    break  # this compiler cannot run at all
                if verbose:
                    print(f"{shlex.join(cmd)}  ({time.perf_counter() - t0:.1f} s, exit {proc.returncode})")
                if proc.returncode != 0:
                    errors.append(f"{shlex.join(cmd[:1])}{' -fopenmp' if openmp else ''}: {proc.stderr.strip()[-500:]}")
                    continue
                problem = _check(tmp)
                if problem is not None:
                    errors.append(problem)
                    continue
                if not openmp:
                    warnings.warn(
                        "hookscope: the native kernels were built without OpenMP (single-threaded): "
                        + "; ".join(errors[-1:]),
                        BuildWarning,
                        2,
                    )
                umask = os.umask(0)
                os.umask(umask)
                tmp.chmod(0o755 & ~umask)  # mkstemp made it private
                os.replace(tmp, target)
                return target
        _warn("the native kernels could not be compiled:\n  " + "\n  ".join(errors))
        return None
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """Rebuild the kernels (by default in the package): ``python -m hookscope.kernels [--out DIR]``."""
    parser = argparse.ArgumentParser(description="Build hookscope's native statistics kernels.")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output directory")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    path = build(args.out, verbose=True)
    if path is None:
        return 1
    print(f"built {path} ({path.stat().st_size / 1024:.0f} KiB) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
