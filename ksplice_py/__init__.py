"""ksplice_py: replace functions inside a running x86-64 Linux process."""
from .editions import Edition, FunctionSwitch
from .errors import (AccessDenied, AmbiguousSymbol, BadInput, BadPatchFile, BuildIdMismatch,
                     HotpatchError, NoSuchProcess, NotQuiescent, PatchMismatch, PidReused, RemoteError,
                     SymbolNotFound, TargetGone, TrampolineError, UnknownObject, UnsupportedPatch,
                     UnsupportedTarget, UntrustedPatch, UsageError)
from .process import CheckReport, Process, attach

__version__ = "0.1.0"
__all__ = [
    "attach", "Process", "CheckReport", "Edition", "FunctionSwitch", "HotpatchError", "BadInput",
    "UsageError", "NoSuchProcess", "AccessDenied", "UnsupportedTarget", "BadPatchFile",
    "UntrustedPatch", "NotQuiescent", "PatchMismatch", "SymbolNotFound", "AmbiguousSymbol",
    "UnknownObject", "BuildIdMismatch", "TrampolineError", "UnsupportedPatch", "TargetGone",
    "PidReused", "RemoteError",
]
