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
          "Process": "process", "CheckReport": "process", "Selector": "discovery",
          "Action": "fleet_results", "FleetResult": "fleet_results", "Outcome": "fleet_results",
          "ProcessResult": "fleet_results", "ProcessEditions": "fleet_runner", "fleet": "fleet_runner",
          "fleet_list": "fleet_runner"}

__all__ = ["attach", "Process", "CheckReport", "Edition", "FunctionSwitch", *_ERRORS,
           "fleet", "fleet_list", "Selector", "Action", "Outcome", "ProcessResult", "FleetResult",
           "ProcessEditions"]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'ksplice_py' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .editions import Edition, FunctionSwitch
    from .discovery import Selector
    from .fleet_results import Action, FleetResult, Outcome, ProcessResult
    from .fleet_runner import ProcessEditions, fleet, fleet_list
    from .process import CheckReport, Process, attach
