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
from . import runout, trust
from .cycle import HarnessChoice, PatchCycle
from .errors import AccessDenied, BadInput, HotpatchError, RemoteError, TargetGone
from .identity import TargetHandle, check_architecture
from .maps import exe_path, read_maps
from .memory import RemoteMemory
from .patchfile import PatchFile
from .quiescence import Blocker
from .symbols import TargetSymbols
from .tracer import Injector, check_target
from .transition import APPLY, REVERT, Transition, unmap_regions


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


class _GuardedCycle(PatchCycle):
    """The patch cycle, with the target's identity re-checked before each
    phase that writes into it (identity.py), and no abort into a process
    that is no longer ours."""

    def prepare(self) -> None:
        self.proc.verify("preparing the patch")
        super().prepare()

    def apply(self) -> None:
        self.proc.verify("loading the patch")
        super().apply()

    def finalize(self) -> None:
        self.proc.verify("finalizing the patch")
        super().finalize()

    def cutover(self, timeout: float) -> ed.Edition:
        self.proc.verify("switching")
        return super().cutover(timeout)

    def abort(self) -> None:
        if self.proc.same_process():
            super().abort()
        else:  # its memory went with it; never unmap in whoever has the pid now
            self._mapped = False


class Process:
    """A running target. Holds no ptrace attachment between operations, but
    holds the process itself (a pidfd) from attach to close."""

    def __init__(self, pid: int) -> None:
        self.handle = TargetHandle(pid)  # first: from here on it is *this* process
        try:
            check_target(pid)
            check_architecture(pid)
            self.pid = pid
            self.exe = exe_path(pid)
            self.mem = RemoteMemory(pid)
            try:  # bound to this address space: writes never reach another process
                self.mem.mem_fd()
            except HotpatchError:
                pass  # not writable (read-only use): opened, and refused, when needed
            self.handle.verify()
        except BaseException:
            self.handle.close()
            raise
        self._symbols: TargetSymbols | None = None

    @property
    def start_time(self) -> int:
        """Field 22 of /proc/PID/stat at attach: with the pid, names this process."""
        return self.handle.start_time

    def verify(self, doing: str = "") -> None:
        """Raise TargetGone (PidReused) unless the pid still names the process
        attached to, running the same program."""
        self.handle.verify(doing)

    def same_process(self) -> bool:
        try:
            self.handle.verify()
        except HotpatchError:
            return False
        return True

    @property
    def symbols(self) -> TargetSymbols:
        if self._symbols is None:
            self._symbols = TargetSymbols(self.pid, self.mem)
        return self._symbols

    # -- operations -----------------------------------------------------------
    def apply(self, patch: str | PatchFile, timeout: float = 5.0,
              harnesses: HarnessChoice | None = None) -> ed.Edition:
        """Run the whole cycle; raises NotQuiescent (target untouched) when
        no safe moment came within ``timeout`` seconds."""
        patch = _load(patch)
        with self._locked("applying the patch"):
            self._recover(timeout)
            cycle = _GuardedCycle(self, patch, harnesses=harnesses)
            edition = cycle.run(timeout)
            edition.attempts = cycle.attempts
        self.verify("applying")
        return edition

    def check(self, patch: str | PatchFile, harnesses: HarnessChoice | None = None) -> CheckReport:
        """prepare + apply + finalize + one quiescence probe, then abort."""
        patch = _load(patch)
        with self._locked("checking the patch"):
            self._recover()
            cycle = _GuardedCycle(self, patch, harnesses=harnesses)
            try:
                cycle.prepare()
                cycle.apply()
                cycle.finalize()
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
            self._recover()
            cycle = _GuardedCycle(self, patch, staged=True, harnesses=harnesses)
            try:
                cycle.prepare()
                cycle.apply()
                cycle.finalize()
            except BaseException:
                cycle.abort()
                raise
        self.verify("preparing")
        return cycle.edition

    def cutover(self, edition_id: int | None = None, timeout: float = 5.0) -> ed.Edition:
        """Switch a prepared edition (the newest prepared one by default)."""
        with self._locked("switching"):
            self._recover()
            e = self._pick(edition_id, "prepared")
            t = Transition(self, e, APPLY)
            self.verify("switching")
            t.start(timeout)
        self.verify("switching")
        return e

    def abort(self, edition_id: int | None = None) -> ed.Edition:
        """Discard a prepared edition; its memory leaves the target."""
        with self._locked("aborting"):
            self._recover()
            e = self._pick(edition_id, "prepared")
            self.verify("aborting")
            unmap_regions(self, e.regions)
        self.verify("aborting")
        return e

    def revert(self, edition_id: int | None = None, timeout: float = 5.0) -> ed.Edition:
        """Undo an applied edition (the newest by default): a cutover in
        reverse, quiescence checked against the new code, then its memory
        is freed. Refused while a newer edition replaces the same functions."""
        with self._locked("reverting"):
            self._recover()
            e = self._pick(edition_id, "applied")
            t = Transition(self, e, REVERT)
            self.verify("reverting")
            t.start(timeout)
        self.verify("reverting")
        return e

    def recover(self, timeout: float = 5.0) -> list[str]:
        """Finish or undo whatever an interrupted tool left behind."""
        with self._locked("recovering"):
            done = self._recover(timeout)
        self.verify("recovering")
        return done

    def editions(self) -> list[ed.Edition]:
        """Editions applied or prepared in the target, newest first."""
        self.verify()
        eds = ed.list_editions(self.mem, read_maps(self.pid))[0]
        self.verify("reading its editions")  # what we read was this process's
        return eds

    def symbolize(self, addr: int) -> str:
        """``object:function+0xoff`` for an address in the target."""
        try:
            sym = self.symbols.function_at(addr)
        except HotpatchError:
            sym = None
        return f"{sym.qualified}+{addr - sym.addr:#x}" if sym else hex(addr)

    # -- recovery -------------------------------------------------------------
    def _pick(self, edition_id: int | None, state: str) -> ed.Edition:
        eds = self.editions()
        if edition_id is None:
            cands = [e for e in eds if e.state == state]
            if not cands:
                raise BadInput(f"process {self.pid} has no {state} edition")
            return cands[0]
        for e in eds:
            if e.id == edition_id:
                if e.state != state:
                    raise BadInput(f"edition {edition_id} of process {self.pid} is {e.state}, not {state}")
                return e
        raise BadInput(f"process {self.pid} has no edition {edition_id} (see hotpatch list)")

    def _recover(self, timeout: float = 5.0) -> list[str]:
        """Called under the lock, so no other live tool is mid-operation:
        anything unstable was left by a tool that died."""
        self.verify()
        maps = read_maps(self.pid)
        eds, orphans = ed.list_editions(self.mem, maps)
        done: list[str] = []
        regions = ed.regions_in(maps)
        leaked = ed.leaked_descriptors(self.pid)
        if leaked:
            with Injector(self.pid, self.mem) as inj:
                for fd in leaked:
                    inj("close", fd)
            done.append(f"closed {len(leaked)} descriptor(s) an interrupted tool left open")
        if runout.remove_leftovers(self.pid, self.mem, timeout):
            done.append("removed the run-out copy of an interrupted hot-function switch")
        for eid in orphans:  # killed before its record was complete
            unmap_regions(self, [(m.start, m.end - m.start) for m in regions[eid]])
            done.append(f"removed the memory of edition {eid}, interrupted while preparing")
        for e in eds:
            if e.state == "preparing" or (e.state == "prepared" and not e.staged):
                unmap_regions(self, e.regions)
                done.append(f"removed edition {e.id} ({e.patch}), left {e.state} by an interrupted tool")
            elif e.state in ("switching", "reverting"):
                done.append(self._finish_transition(e, timeout))
        return done

    def _finish_transition(self, e: ed.Edition, timeout: float) -> str:
        """A switch interrupted between its writes: look at which trampolines
        are in, then complete the interrupted direction."""
        current = {f.addr: self.mem.read(f.addr, len(bytes.fromhex(f.new_bytes))) for f in e.functions}
        still_old = [f for f in e.functions if current[f.addr] == bytes.fromhex(f.old_bytes)]
        still_new = [f for f in e.functions if current[f.addr] == bytes.fromhex(f.new_bytes)]
        if len(still_old) + len(still_new) != len(e.functions):
            raise RemoteError(f"edition {e.id}: code of process {self.pid} matches neither old nor new bytes; "
                              "not touching it")
        if e.state == "switching":
            if still_old:
                Transition(self, e, APPLY, functions=still_old).start(timeout)
            else:
                e.state = "applied"
                self.mem.write(*e.state_bytes("applied"))
            return f"completed the interrupted switch of edition {e.id} ({e.patch})"
        if still_new:
            Transition(self, e, REVERT, functions=still_new).start(timeout)
        else:
            unmap_regions(self, e.regions)
        return f"completed the interrupted revert of edition {e.id} ({e.patch})"

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
            self.handle.verify(doing)
        except TargetGone as gone:
            return gone
        return None

    def close(self) -> None:
        self.mem.close()
        self.handle.close()

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
