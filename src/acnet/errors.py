"""The errors acnet raises for bad input: what the CLI prints as one line (anything else is a bug
and keeps its traceback). Each subclasses the builtin a Python caller expects."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["ACNetError", "InputError", "InputTypeError", "MissingDependencyError", "NonFiniteError",
           "require"]


class ACNetError(Exception):
    """Base of the errors about the user's input, files or environment.

    ``params`` names the parameters at fault (e.g. ``("lr",)``), so a front end can say which
    of its own options set them.
    """

    def __init__(self, message: str = "", *, params: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.params = tuple(params)


class InputError(ACNetError, ValueError):
    """A value the user gave (argument, option, file content) that acnet cannot use."""


class InputTypeError(ACNetError, TypeError):
    """An argument of the wrong type."""


class NonFiniteError(ACNetError, FloatingPointError):
    """Weights, outputs or a loss that are NaN or infinite (a diverged run, damaged weights)."""


class MissingDependencyError(ACNetError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module``, or raise ``MissingDependencyError`` naming ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{what} needs {module.split('.')[0]}: pip install 'acnet[{extra}]'") from exc
