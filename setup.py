"""Setuptools hook that compiles hookscope's native statistics kernels (optional: never fails the install).

Everything else about the package is in pyproject.toml. The kernels are a plain shared library
(``hookscope/kernels/libhookscope_kernels.so``, not a CPython extension), built by hookscope/kernels/build.py,
which this file loads by path (the package itself, and torch, need not be importable at build time).
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent
BUILD_SCRIPT = ROOT / "hookscope" / "kernels" / "build.py"


def _kernels_builder() -> Any:
    spec = importlib.util.spec_from_file_location("_hookscope_kernels_build", BUILD_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and warnings look the module up
    spec.loader.exec_module(module)
    return module


class BuildPyWithKernels(build_py):
    """``build_py`` that also compiles the kernels: into the source tree for an editable install, into
    ``build_lib`` (hence the wheel) otherwise. Any failure is a warning."""

    def run(self) -> None:
        super().run()
        self.kernels_library: Path | None = None
        try:
            builder = _kernels_builder()
            package = "hookscope.kernels"
            if getattr(self, "editable_mode", False):
                target = Path(self.get_package_dir(package)).resolve()
            else:
                target = Path(self.build_lib, *package.split("."))
            self.kernels_library = builder.build(target)
        except Exception as e:  # the kernels are optional: the install goes on without them
            warnings.warn(f"hookscope: the native kernels were not built ({type(e).__name__}: {e})", stacklevel=1)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        lib = getattr(self, "kernels_library", None)
        if lib is not None and not getattr(self, "editable_mode", False):
            outputs.append(str(lib))
        return outputs


class PlatformWheel(bdist_wheel):
    """A wheel that holds the compiled kernels is tagged for the platform (``py3-none-<platform>``: the library
    depends on neither the Python version nor its ABI); without them it stays ``py3-none-any``."""

    def get_tag(self) -> tuple[str, str, str]:
        built = Path(self.bdist_dir or "", "hookscope", "kernels").glob("libhookscope_kernels.*")
        lib = next(iter(built), None)
        if lib is None:
            return super().get_tag()
        self.root_is_pure = False
        _, _, plat = super().get_tag()
        return "py3", "none", plat


setup(cmdclass={"build_py": BuildPyWithKernels, "bdist_wheel": PlatformWheel})
