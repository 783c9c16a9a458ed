"""ksplice_py: replace functions inside a running x86-64 Linux process."""
from .editions import Edition, FunctionSwitch
from .errors import (AccessDenied, AmbiguousSymbol, BadInput, BadPatchFile, BuildIdMismatch,
                     HotpatchError, NoSuchProcess, NotQuiescent, PatchMismatch, RemoteError,
                     SymbolNotFound, TargetGone, TrampolineError, UnknownObject, UnsupportedPatch)
from .process import CheckReport, Process, attach
from .discovery import Selector
from .fleet_runner import Action, FleetResult, Outcome, ProcessEditions, ProcessResult, fleet, fleet_list

__version__ = "0.1.0"
__all__ = [
    "attach", "Process", "CheckReport", "Edition", "FunctionSwitch", "HotpatchError", "BadInput",
    "NoSuchProcess", "AccessDenied", "BadPatchFile", "NotQuiescent", "PatchMismatch",
    "SymbolNotFound", "AmbiguousSymbol", "UnknownObject", "BuildIdMismatch", "TrampolineError",
    "UnsupportedPatch", "TargetGone", "RemoteError",
    "fleet", "fleet_list", "Selector", "Action", "Outcome", "ProcessResult", "FleetResult",
    "ProcessEditions",
]
