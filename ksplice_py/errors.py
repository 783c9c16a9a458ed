"""One exception hierarchy. Every error a user can meet carries a one-line,
user-facing message and the CLI exit code it maps to (design.md contract):

    0 done, 2 bad usage/input, 3 no safe moment, 4 patch does not fit, 1 other.
"""
from __future__ import annotations


class HotpatchError(Exception):
    """Base class. ``str(err)`` is the one line the CLI prints."""

    exit_code = 1

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.details = details


# --- exit 2: bad usage or bad input -------------------------------------
class BadInput(HotpatchError):
    exit_code = 2


class NoSuchProcess(BadInput):
    """The pid does not exist (or is a kernel thread we cannot patch)."""


class AccessDenied(BadInput):
    """Not allowed to trace the target (permissions, already traced)."""


class BadPatchFile(BadInput):
    """The patch file is missing, not ELF, empty or malformed."""


# --- exit 3: no safe moment ---------------------------------------------
class NotQuiescent(HotpatchError):
    """No safe moment within the timeout; the target was left untouched."""

    exit_code = 3


# --- exit 4: the patch does not fit this target -------------------------
class PatchMismatch(HotpatchError):
    exit_code = 4


class SymbolNotFound(PatchMismatch):
    pass


class AmbiguousSymbol(PatchMismatch):
    pass


class UnknownObject(PatchMismatch):
    pass


class AmbiguousObject(PatchMismatch):
    """A SONAME that more than one mapped file carries; ``candidates`` names them."""

    def __init__(self, message: str, object: str, candidates: list[str]) -> None:
        super().__init__(message)
        self.object, self.candidates = object, list(candidates)


class BuildIdMismatch(PatchMismatch):
    pass


class TrampolineError(PatchMismatch):
    """A function cannot be redirected safely (too short, branch into window...)."""


class CloneAbiMismatch(PatchMismatch):
    """A gcc clone (.constprop/.isra/.part) targeted by a patch that did not
    declare it was written for the clone's ABI."""

    def __init__(self, message: str, symbol: str) -> None:
        super().__init__(message)
        self.symbol = symbol


class UnsupportedPatch(PatchMismatch):
    """The patch uses something the loader refuses (TLS, constructors, reloc type)."""


# --- exit 1: anything else ----------------------------------------------
class TargetGone(HotpatchError):
    """The target exited while we worked on it."""


class RemoteError(HotpatchError):
    """A syscall injected into the target or a remote memory access failed."""
