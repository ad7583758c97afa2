"""Warnings issued once per cause, pointing at the user's line."""

from __future__ import annotations

import os
import sys
import sysconfig
import warnings
from types import FrameType

__all__ = ["HookscopeWarning", "user_stacklevel", "warn_once"]

_seen: set[str] = set()
_library_dirs: tuple[str, ...] | None = None


class HookscopeWarning(UserWarning):
    """A problem hookscope noticed while recording (a site skipped, a pattern that matched nothing...)."""


def _libraries() -> tuple[str, ...]:
    """Directories whose frames are never the user's line: hookscope's, torch's, the standard library and the
    installed packages (a Trainer's loop calls hookscope's callbacks: the user's line is their ``fit()``)."""
    global _library_dirs
    if _library_dirs is None:
        import torch

        dirs = {os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__))}
        paths = sysconfig.get_paths()
        keys = ("stdlib", "platstdlib", "purelib", "platlib")
        dirs.update(os.path.abspath(paths[key]) for key in keys if key in paths)
        _library_dirs = tuple(d.rstrip(os.sep) + os.sep for d in dirs)
    return _library_dirs


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in the caller of this function point at the first frame
    outside hookscope, torch and the installed libraries: the user's line (``model(x)`` for a warning raised in a
    hook however deeply the model nests its modules, ``hm.step()`` for one raised while closing a step)."""
    libraries = _libraries()
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None:
        name = frame.f_code.co_filename
        if not (name.startswith("<frozen ") or os.path.abspath(name).startswith(libraries)):
            return level
        frame, level = frame.f_back, level + 1
    return 1


def warn_once(message: str) -> None:
    """Warn with ``message`` the first time this process sees it (on rank zero only under torch.distributed),
    pointing at the user's line (:func:`user_stacklevel`)."""
    import torch.distributed as dist

    if message in _seen or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        return
    _seen.add(message)
    warnings.warn(message, HookscopeWarning, stacklevel=user_stacklevel())
