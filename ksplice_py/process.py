"""The library's front door: a target process and what can be done to it.

    with ksplice_py.attach(pid) as proc:
        edition = proc.apply("fix.so", timeout=5.0)
        print(edition.id, edition.pause_us)
"""
from __future__ import annotations

import fcntl
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field

from . import editions as ed
from .cycle import PatchCycle
from .errors import AccessDenied, HotpatchError
from .maps import exe_path, read_maps
from .memory import RemoteMemory
from .patchfile import PatchFile
from .quiescence import Blocker
from .symbols import TargetSymbols
from .tracer import check_target


@dataclass
class CheckReport:
    """What ``check`` found: would the patch apply now?"""

    pid: int
    patch: str
    functions: list[dict]
    safe_now: bool
    blockers: list[Blocker] = field(default_factory=list)
    pause_us: float = 0.0

    def to_dict(self) -> dict:
        return {"pid": self.pid, "patch": self.patch, "functions": self.functions,
                "safe_now": self.safe_now, "blockers": [b.to_dict() for b in self.blockers],
                "pause_us": round(self.pause_us, 1)}


def _lock_dir() -> str:
    for d in ("/run/lock", tempfile.gettempdir()):
        if os.access(d, os.W_OK):
            return d
    return tempfile.gettempdir()


class Process:
    """A running target. Holds no ptrace attachment between operations."""

    def __init__(self, pid: int) -> None:
        check_target(pid)
        self.pid = pid
        self.exe = exe_path(pid)
        self.mem = RemoteMemory(pid)
        self._symbols: TargetSymbols | None = None

    @property
    def symbols(self) -> TargetSymbols:
        if self._symbols is None:
            self._symbols = TargetSymbols(self.pid, self.mem)
        return self._symbols

    # -- operations -----------------------------------------------------------
    def apply(self, patch: str | PatchFile, timeout: float = 5.0) -> ed.Edition:
        """Run the whole cycle; raises NotQuiescent (target untouched) when
        no safe moment came within ``timeout`` seconds."""
        patch = _load(patch)
        with self._locked():
            cycle = PatchCycle(self, patch)
            edition = cycle.run(timeout)
            edition.attempts = cycle.attempts
            return edition

    def check(self, patch: str | PatchFile) -> CheckReport:
        """prepare + apply + finalize + one quiescence probe, then abort."""
        patch = _load(patch)
        with self._locked():
            cycle = PatchCycle(self, patch)
            try:
                cycle.prepare()
                cycle.apply()
                cycle.finalize()
                result = cycle.probe()
            finally:
                cycle.abort()
        funcs = [{"target": f.target, "symbol": f.symbol, "kind": f.kind, "addr": hex(f.addr)}
                 for f in cycle.edition.functions]
        return CheckReport(self.pid, patch.name, funcs, result.done, result.blockers, result.pause_us)

    def editions(self) -> list[ed.Edition]:
        """Editions applied or prepared in the target, newest first."""
        return ed.list_editions(self.mem, read_maps(self.pid))[0]

    # -- plumbing -------------------------------------------------------------
    @contextmanager
    def _locked(self):
        """One hotpatch at a time per target: two tools interleaving
        trampoline writes could leave a mix."""
        path = os.path.join(_lock_dir(), f"ksplice_py.{self.pid}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AccessDenied(
                    f"another hotpatch is working on process {self.pid}; wait for it to finish") from None
            yield
        finally:
            os.close(fd)

    def close(self) -> None:
        self.mem.close()

    def __enter__(self) -> "Process":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _load(patch: str | PatchFile) -> PatchFile:
    return patch if isinstance(patch, PatchFile) else PatchFile.load(patch)


def attach(pid: int) -> Process:
    """A Process for ``pid``; raises NoSuchProcess/AccessDenied up front."""
    return Process(pid)


__all__ = ["Process", "attach", "CheckReport", "HotpatchError"]
