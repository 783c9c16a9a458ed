"""One exception hierarchy. Every error a user can meet carries a one-line,
user-facing message and the CLI exit code it maps to (docs/design.md):

    0 done, 2 bad usage/input, 3 no safe moment, 4 patch does not fit, 1 other.

What a caller may want to act on travels as typed attributes (psutil's
_exceptions.py is the model); ``to_dict()`` is what ``--json`` adds to the
error line.
"""
from __future__ import annotations

from typing import Protocol, Sequence


class Reportable(Protocol):
    """What NotQuiescent needs of a blocker (quiescence.Blocker): errors.py
    stays the bottom layer."""

    def to_dict(self) -> dict: ...


class HotpatchError(Exception):
    """Base class. ``str(err)`` is the one line the CLI prints."""

    exit_code = 1
    facts: tuple[str, ...] = ()  # the attributes to_dict() reports

    def to_dict(self) -> dict:
        """The structured facts of this error, for machine-readable output."""
        values = ((k, getattr(self, k)) for k in self.facts)
        return {k: v for k, v in values if v not in (None, "")}


# --- exit 2: bad usage or bad input -------------------------------------
class BadInput(HotpatchError):
    exit_code = 2


class UsageError(BadInput):
    """The command line is wrong (unknown option, a pid that is no number...)."""


class NoSuchProcess(BadInput):
    """The pid does not exist (or is a kernel thread we cannot patch)."""


class AccessDenied(BadInput):
    """Not allowed to trace the target (permissions, already traced)."""


class UnsupportedTarget(BadInput):
    """The target runs a program this tool cannot patch (not x86-64)."""


class BadPatchFile(BadInput):
    """The patch file is missing, not ELF, empty or malformed."""


class UntrustedPatch(BadInput):
    """The patch file could have been written by someone other than root
    (or the invoking user), or its content is not the pinned one."""


# --- exit 3: no safe moment ---------------------------------------------
class NotQuiescent(HotpatchError):
    """No safe moment within the timeout; the target was left untouched."""

    exit_code = 3

    def __init__(self, message: str, blockers: Sequence[Reportable] = (), attempts: int = 0) -> None:
        super().__init__(message)
        self.blockers = list(blockers)  # the threads that blocked the last attempt
        self.attempts = attempts

    def to_dict(self) -> dict:
        return {"blockers": [b.to_dict() for b in self.blockers], "attempts": self.attempts}


# --- exit 4: the patch does not fit this target -------------------------
class PatchMismatch(HotpatchError):
    exit_code = 4


class SymbolNotFound(PatchMismatch):
    facts = ("symbol", "object", "version")

    def __init__(self, message: str, symbol: str | None = None, object: str | None = None,
                 version: str | None = None) -> None:
        super().__init__(message)
        self.symbol, self.object, self.version = symbol, object, version


class AmbiguousSymbol(PatchMismatch):
    facts = ("symbol", "candidates")

    def __init__(self, message: str, symbol: str, candidates: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.symbol, self.candidates = symbol, list(candidates)


class UnknownObject(PatchMismatch):
    """No object of that name is mapped; ``available`` lists those that are."""

    facts = ("object", "available")

    def __init__(self, message: str, object: str, available: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.object, self.available = object, list(available)


class BuildIdMismatch(PatchMismatch):
    pass


class TrampolineError(PatchMismatch):
    """A function cannot be redirected safely (too short, branch into window...).

    ``func`` names the function; ``insn_addr``/``text``/``reason`` the
    instruction that could not be relocated, when one is to blame."""

    facts = ("func", "insn_addr", "text", "reason")

    def __init__(self, message: str, func: str | None = None, insn_addr: int | None = None,
                 text: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.func, self.insn_addr, self.text, self.reason = func, insn_addr, text, reason


class UnsupportedPatch(PatchMismatch):
    """The patch uses something the loader refuses (TLS, constructors, reloc type)."""

    facts = ("symbol",)

    def __init__(self, message: str, symbol: str | None = None) -> None:
        super().__init__(message)
        self.symbol = symbol


# --- exit 1: anything else ----------------------------------------------
class TargetGone(HotpatchError):
    """The target exited while we worked on it."""


class PidReused(TargetGone):
    """The process we attached to is gone and its pid names another one."""


class RemoteError(HotpatchError):
    """A syscall injected into the target or a remote memory access failed."""


# --- not an Exception: SIGINT/SIGTERM ------------------------------------
class Interrupted(BaseException):
    """SIGINT/SIGTERM before the switch: unwinds through every cleanup path
    (the target ends as it was); exit 128 + the signal's number, as a shell
    reports a command killed by it. After the switch the command completes
    instead (interrupts.py)."""

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}; "
                         "the target was left running and unchanged")


__all__ = [
    "HotpatchError", "BadInput", "UsageError", "NoSuchProcess", "AccessDenied", "UnsupportedTarget",
    "BadPatchFile", "UntrustedPatch", "NotQuiescent", "PatchMismatch", "SymbolNotFound",
    "AmbiguousSymbol", "UnknownObject", "BuildIdMismatch", "TrampolineError", "UnsupportedPatch",
    "TargetGone", "PidReused", "RemoteError", "Interrupted",
]
