"""ksplice_py: replace functions inside a running x86-64 Linux process.

The exception hierarchy is imported at once (it is small); the rest on first
use (PEP 562), so that importing a submodule (the `hotpatch` executable's
entry point first of all) does not load the whole library."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import *  # noqa: F401,F403
from .errors import __all__ as _ERRORS

__version__ = "0.1.0"

_WHERE = {"Edition": "editions", "FunctionSwitch": "editions", "attach": "process",
          "Process": "process", "CheckReport": "process"}

__all__ = ["attach", "Process", "CheckReport", "Edition", "FunctionSwitch", *_ERRORS]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'ksplice_py' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .editions import Edition, FunctionSwitch
    from .process import CheckReport, Process, attach
