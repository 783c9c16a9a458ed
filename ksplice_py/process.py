"""The library's front door: a target process and what can be done to it.

    with ksplice_py.attach(pid) as proc:
        edition = proc.apply("fix.so", timeout=5.0)
        print(edition.id, edition.pause_us)
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from . import audit
from . import editions as ed
from . import operations, trust
from .cycle import HarnessChoice, PatchCycle
from .errors import HotpatchError, Interrupted, TargetGone
from .identity import TargetHandle
from .lifecycle import State
from .locking import TargetLock
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


class Process:
    """A running target: the public front door. Holds no ptrace attachment
    between operations, but holds the process itself (a pidfd) from attach
    to close. The engine below works on its ``target`` (target.py).

    Every operation that changes the target leaves one audit record
    (audit.py) in ``audit_log``: syslog plus the default persistent log
    unless another AuditLog is given."""

    def __init__(self, pid: int, audit_log: audit.AuditLog | None = None) -> None:
        self.target = Target(pid)
        self.pid = pid
        self._own_log = audit_log is None
        # opened before anything is changed
        self.audit_log = audit.AuditLog.default() if audit_log is None else audit_log

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
              harnesses: HarnessChoice | None = None, again: bool = False) -> ed.Edition:
        """Run the whole cycle; raises NotQuiescent (target untouched) when
        no safe moment came within ``timeout`` seconds.

        Idempotent by content: when an edition with the same sha256 is
        applied and still in force, nothing is done and that edition is
        returned with ``already_applied`` set; ``again=True`` stacks
        another copy deliberately."""
        patch = _load(patch)
        with self._audited("apply", patch) as record, self._locked("applying the patch"):
            operations.recover(self.target, timeout)
            edition = None if again else self.applied_edition(patch.sha256)
            if edition is not None:
                edition.already_applied = True
            else:
                edition = PatchCycle(self.target, patch, harnesses=harnesses).run(timeout)
            record.edition_done(edition)
            self.verify("applying")
        return edition

    def applied_edition(self, sha256: str) -> ed.Edition | None:
        """The applied edition with this content whose code is in force
        (every trampoline still in place: not overridden by a newer edition),
        or None."""
        e = ed.find_applied(self.editions(), sha256)
        if e is None:
            return None
        for f in e.functions:
            new = bytes.fromhex(f.new_bytes)
            if self.mem.read(f.addr, len(new)) != new:
                return None
        return e

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
        with self._audited("prepare", patch) as record, self._locked("preparing the patch"):
            operations.recover(self.target)
            cycle = PatchCycle(self.target, patch, staged=True, harnesses=harnesses)
            try:
                edition = cycle.stage()
            except BaseException:
                cycle.abort()
                raise
            record.edition_done(edition)
            self.verify("preparing")
        return edition

    def cutover(self, edition_id: int | None = None, timeout: float = 5.0) -> ed.Edition:
        """Switch a prepared edition (the newest prepared one by default)."""
        return self._on_edition(edition_id, State.PREPARED, "cutover", "switching",
                                lambda e: operations.cutover(self.target, e, timeout))

    def abort(self, edition_id: int | None = None) -> ed.Edition:
        """Discard a prepared edition; its memory leaves the target."""
        return self._on_edition(edition_id, State.PREPARED, "abort", "aborting",
                                lambda e: operations.abort(self.target, e.regions, e))

    def revert(self, edition_id: int | None = None, timeout: float = 5.0) -> ed.Edition:
        """Undo an applied edition (the newest by default): a cutover in
        reverse, quiescence checked against the new code, then its memory
        is freed. Refused while a newer edition replaces the same functions."""
        return self._on_edition(edition_id, State.APPLIED, "revert", "reverting",
                                lambda e: operations.revert(self.target, e, timeout))

    def _on_edition(self, edition_id: int | None, state: State, action: str, doing: str,
                    act: Callable[[ed.Edition], object]) -> ed.Edition:
        """Audit, lock, recover, find the edition (which must be in
        ``state``), act."""
        with self._audited(action) as record, self._locked(doing):
            operations.recover(self.target)
            e = operations.find(self.target, edition_id, state)
            record.edition_done(e)
            act(e)
            record.edition_done(e)
            self.verify(doing)
        return e

    def recover(self, timeout: float = 5.0) -> list[str]:
        """Finish or undo whatever an interrupted tool left behind."""
        with self._audited("recover"), self._locked("recovering"):
            done = operations.recover(self.target, timeout)
            self.verify("recovering")
        return done

    def editions(self) -> list[ed.Edition]:
        """Editions applied or prepared in the target, newest first. When
        no other tool is at work on it, those a killed tool left half-way
        are marked ``orphaned`` (``recover`` removes or finishes them)."""
        eds = self.target.editions()
        if any(ed.may_be_orphan(e) for e in eds) and not TargetLock(self.pid).busy():
            ed.mark_orphans(eds)
        return eds

    def symbolize(self, addr: int, return_address: bool = False) -> str:
        """``object:function+0xoff`` for an address in the target (a return
        address is looked up at ``addr - 1``; see Target.symbolize)."""
        return self.target.symbolize(addr, return_address)

    # -- plumbing -------------------------------------------------------------
    @contextmanager
    def _locked(self, doing: str):
        """One hotpatch at a time per target (locking.py). A failure caused
        by the target dying under us (a short write, a failed injection) is
        reported as what it is: TargetGone."""
        with TargetLock(self.pid):
            try:
                yield
            except HotpatchError as err:
                gone = None if isinstance(err, TargetGone) else self._gone(doing)
                if gone is None:
                    raise
                raise TargetGone(f"{gone} (the step in progress failed: {err})") from None

    @contextmanager
    def _audited(self, action: str, patch: PatchFile | None = None):
        """One audit record for the operation, whatever its outcome; the
        body fills in the edition (AuditRecord.edition_done)."""
        record = audit.AuditRecord(action=action)
        record.target(self.target)
        if patch is not None:
            record.patch_file(patch)
        try:
            yield record
        except BaseException as e:
            if isinstance(e, (HotpatchError, Interrupted)):
                code, message = e.exit_code, str(e)
            else:  # a bug, or a KeyboardInterrupt in a program using the library
                code, message = 1, f"{type(e).__name__}: {e}"
            record.finish(code, " ".join(message.split()))
            self.audit_log.write(record)
            raise
        record.finish(0)
        self.audit_log.write(record)

    def _gone(self, doing: str) -> TargetGone | None:
        try:
            self.target.verify(doing)
        except TargetGone as gone:
            return gone
        return None

    def close(self) -> None:
        self.target.close()
        if self._own_log:
            self.audit_log.close()

    def __enter__(self) -> "Process":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _load(patch: str | PatchFile) -> PatchFile:
    """A path is read once, with trust.py's checks (as root: owner and modes)."""
    return patch if isinstance(patch, PatchFile) else trust.load_patch(patch)


def attach(pid: int, audit_log: audit.AuditLog | None = None) -> Process:
    """A Process for ``pid``; raises NoSuchProcess/AccessDenied up front, and
    UnsupportedTarget (exit 2) for a process that is not x86-64. Changes are
    audited to ``audit_log`` (default: AuditLog.default())."""
    return Process(pid, audit_log)


__all__ = ["Process", "attach", "CheckReport", "HotpatchError"]
