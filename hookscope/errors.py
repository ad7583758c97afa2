"""The small exception hierarchy of hookscope.

Every error that hookscope raises on purpose is a :class:`HookscopeError`, and also an instance of the builtin
exception a caller would expect (``ValueError``, ``TypeError``, ``RuntimeError``), so ``except ValueError`` keeps
working for code that does not know about hookscope.
"""

from __future__ import annotations


class HookscopeError(Exception):
    """Base class of every error raised by hookscope."""


class ConfigError(HookscopeError, ValueError):
    """An argument has a value that is not allowed."""


class ConfigTypeError(HookscopeError, TypeError):
    """An argument has a type that is not allowed."""


class ConfigPathError(ConfigError, OSError):
    """A path argument names a place that cannot be written (a missing directory, a directory where a file
    belongs, a file without write permission); also an ``OSError``, as the failed ``open`` would have been."""


class StateError(HookscopeError, RuntimeError):
    """An operation was called at the wrong time (for example ``attach()`` twice)."""


class UnknownActivationError(HookscopeError, KeyError):
    """An activation name is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class UnknownLayerError(HookscopeError, KeyError):
    """A layer name is not among the recorded sites."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class InputError(HookscopeError, ValueError):
    """A file or a command-line value given to hookscope is malformed (a CSV that is not hookscope's, a model
    that cannot be built). The command line prints these as one line with exit code 2."""
