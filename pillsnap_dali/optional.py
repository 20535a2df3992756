"""Optional packages (tensorboard, onnx, onnxruntime): imported where used, and when absent a one-line error
that names the package to install instead of an ImportError traceback."""
from __future__ import annotations

import importlib

from pillsnap_dali.errors import PillsnapError


class MissingPackageError(PillsnapError, ValueError):
    """A package a requested feature needs is not installed (the CLIs print it as one line, exit 2)."""


def require(module: str, package: str, purpose: str, alternative: str = ""):
    """``import module`` or a ``MissingPackageError`` saying ``pip install package`` (and ``alternative``)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackageError(f"{purpose} needs the {package} package, which is not installed: pip install "
                                  f"{package}" + (f" (or {alternative})" if alternative else "")) from None
