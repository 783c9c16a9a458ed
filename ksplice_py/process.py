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
from typing import Callable

from . import editions as ed
from . import operations, trust
from .cycle import HarnessChoice, PatchCycle
from .errors import AccessDenied, HotpatchError, TargetGone
from .identity import TargetHandle
from .lifecycle import State
from .memory import RemoteMemory
from .patchfile import PatchFile
from .quiescence import Blocker
from .symbols import TargetSymbols
from .target import Target


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
    """A running target: the public front door. Holds no ptrace attachment
    between operations, but holds the process itself (a pidfd) from attach
    to close. The engine below works on its ``target`` (target.py)."""

    def __init__(self, pid: int) -> None:
        self.target = Target(pid)
        self.pid = pid

    @property
    def exe(self) -> str:
        return self.target.exe

    @property
    def mem(self) -> RemoteMemory:
        return self.target.mem

    @property
    def handle(self) -> TargetHandle:
        return self.target.handle

    @property
    def start_time(self) -> int:
        """Field 22 of /proc/PID/stat at attach: with the pid, names this process."""
        return self.target.handle.start_time

    @property
    def symbols(self) -> TargetSymbols:
        return self.target.symbols

    def verify(self, doing: str = "") -> None:
        """Raise TargetGone (PidReused) unless the pid still names the process
        attached to, running the same program."""
        self.target.verify(doing)

    def same_process(self) -> bool:
        return self.target.same_process()

    # -- operations -----------------------------------------------------------
    def apply(self, patch: str | PatchFile, timeout: float = 5.0,
              harnesses: HarnessChoice | None = None) -> ed.Edition:
        """Run the whole cycle; raises NotQuiescent (target untouched) when
        no safe moment came within ``timeout`` seconds."""
        patch = _load(patch)
        with self._locked("applying the patch"):
            operations.recover(self.target, timeout)
            edition = PatchCycle(self.target, patch, harnesses=harnesses).run(timeout)
        self.verify("applying")
        return edition

    def check(self, patch: str | PatchFile, harnesses: HarnessChoice | None = None) -> CheckReport:
        """stage (prepare, link, finalize) + one quiescence probe, then abort."""
        patch = _load(patch)
        with self._locked("checking the patch"):
            operations.recover(self.target)
            cycle = PatchCycle(self.target, patch, harnesses=harnesses)
            try:
                cycle.stage()
                result = cycle.probe()
            finally:
                cycle.abort()
        self.verify("checking")
        funcs = [{"target": f.target, "symbol": f.symbol, "kind": f.kind, "addr": hex(f.addr)}
                 for f in cycle.edition.functions]
        return CheckReport(self.pid, patch.name, funcs, result.done, result.blockers, result.pause_us)

    def prepare(self, patch: str | PatchFile, harnesses: HarnessChoice | None = None) -> ed.Edition:
        """Stage a patch: mapped, linked, recorded as ``prepared``; the
        target keeps running the old code until ``cutover``."""
        patch = _load(patch)
        with self._locked("preparing the patch"):
            operations.recover(self.target)
            cycle = PatchCycle(self.target, patch, staged=True, harnesses=harnesses)
            try:
                edition = cycle.stage()
            except BaseException:
                cycle.abort()
                raise
        self.verify("preparing")
        return edition

    def cutover(self, edition_id: int | None = None, timeout: float = 5.0) -> ed.Edition:
        """Switch a prepared edition (the newest prepared one by default)."""
        return self._on_edition(edition_id, State.PREPARED, "switching",
                                lambda e: operations.cutover(self.target, e, timeout))

    def abort(self, edition_id: int | None = None) -> ed.Edition:
        """Discard a prepared edition; its memory leaves the target."""
        return self._on_edition(edition_id, State.PREPARED, "aborting",
                                lambda e: operations.abort(self.target, e.regions))

    def revert(self, edition_id: int | None = None, timeout: float = 5.0) -> ed.Edition:
        """Undo an applied edition (the newest by default): a cutover in
        reverse, quiescence checked against the new code, then its memory
        is freed. Refused while a newer edition replaces the same functions."""
        return self._on_edition(edition_id, State.APPLIED, "reverting",
                                lambda e: operations.revert(self.target, e, timeout))

    def _on_edition(self, edition_id: int | None, state: State, doing: str,
                    act: Callable[[ed.Edition], object]) -> ed.Edition:
        """Lock, recover, find the edition (which must be in ``state``), act."""
        with self._locked(doing):
            operations.recover(self.target)
            e = operations.find(self.target, edition_id, state)
            act(e)
        self.verify(doing)
        return e

    def recover(self, timeout: float = 5.0) -> list[str]:
        """Finish or undo whatever an interrupted tool left behind."""
        with self._locked("recovering"):
            done = operations.recover(self.target, timeout)
        self.verify("recovering")
        return done

    def editions(self) -> list[ed.Edition]:
        """Editions applied or prepared in the target, newest first."""
        return self.target.editions()

    def symbolize(self, addr: int, return_address: bool = False) -> str:
        """``object:function+0xoff`` for an address in the target (a return
        address is looked up at ``addr - 1``; see Target.symbolize)."""
        return self.target.symbolize(addr, return_address)

    # -- plumbing -------------------------------------------------------------
    @contextmanager
    def _locked(self, doing: str):
        """One hotpatch at a time per target: two tools interleaving
        trampoline writes could leave a mix. A failure caused by the target
        dying under us (a short write, a failed injection) is reported as
        what it is: TargetGone."""
        path = os.path.join(_lock_dir(), f"ksplice_py.{self.pid}.lock")
        # O_NOFOLLOW: the lock directory may be world-writable (sticky);
        # root must not be led through someone's symlink.
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise AccessDenied(f"cannot open the lock file {path}: {e.strerror}; remove it if stale") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AccessDenied(
                    f"another hotpatch is working on process {self.pid}; wait for it to finish") from None
            try:
                yield
            except HotpatchError as err:
                gone = None if isinstance(err, TargetGone) else self._gone(doing)
                if gone is None:
                    raise
                raise TargetGone(f"{gone} (the step in progress failed: {err})") from None
        finally:
            os.close(fd)

    def _gone(self, doing: str) -> TargetGone | None:
        try:
            self.target.verify(doing)
        except TargetGone as gone:
            return gone
        return None

    def close(self) -> None:
        self.target.close()

    def __enter__(self) -> "Process":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _load(patch: str | PatchFile) -> PatchFile:
    """A path is read once, with trust.py's checks (as root: owner and modes)."""
    return patch if isinstance(patch, PatchFile) else trust.load_patch(patch)


def attach(pid: int) -> Process:
    """A Process for ``pid``; raises NoSuchProcess/AccessDenied up front, and
    UnsupportedTarget (exit 2) for a process that is not x86-64."""
    return Process(pid)


__all__ = ["Process", "attach", "CheckReport", "HotpatchError"]
