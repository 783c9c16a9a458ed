"""One patch, every matching process on the machine (``hotpatch ... --all``).

    result = ksplice_py.fleet("apply", "fix.so", selector=Selector.parse(exes=["/usr/sbin/named"]))
    for p in result.processes:
        print(p.pid, p.result.value, p.edition, p.reason)
    print(result.summary())     # processes: A applied, S skipped, F failed

How the work is split:

* **Discovery** (discovery.py) reads /proc only: who the filters allow, who
  maps the patch's objects, of which build. Nothing else is touched, ever.
* **Per-build work, once**: before any worker starts, one process of each
  distinct build is read (never attached) to resolve the patch's symbols and
  imports and parse the objects' headers and symbol tables; those results are
  kept in memory by file identity and build-id (symbols.py), so every process
  mapping the same build only differs by its load addresses.
* **Per-process work in parallel, in forked worker processes** (``jobs``,
  default the CPUs we may run on). Processes rather than threads because the
  per-process work is mostly Python (the GIL would serialise threads) and
  because ptrace ties a tracee to the *thread* that attached it: each worker
  is single-threaded and takes one target from attach to detach, so no
  tracee ever changes hands. Forked workers inherit the per-build results.
* **Isolation**: a worker reports one line per process; an error in one
  process is that process's result, and a worker that dies loses only the
  process it was on (the kernel detaches it; the edition machinery leaves it
  recoverable, see cycle.py).
* **Interruption** (SIGINT/SIGTERM to the runner): no new process is
  started; processes under way finish (their own ``timeout`` bounds that);
  a second signal makes the workers undo what is under way (the cycle's
  abort path). Processes not reached are reported as skipped.
* **Idempotence**: an edition records its patch's sha256; a process that
  already carries an applied edition of the same content is skipped.
"""
from __future__ import annotations

import json
import os
import select
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

from . import audit, trampoline, x86writer
from . import editions as ed
from .cycle import HarnessChoice
from .discovery import (Match, ProcInfo, Selector, Unpatchable, Wants, candidates, carries_editions,
                        match, proc_info)
from .errors import (BadInput, HotpatchError, NoSuchProcess, NotQuiescent, PatchMismatch,
                     SymbolNotFound, TargetGone, UnknownObject)
from .memory import RemoteMemory
from .patchfile import PatchFile
from .process import Process, attach
from .symbols import TargetSymbols, keep_parsed


class Action(str, Enum):
    APPLY = "apply"
    CHECK = "check"
    PREPARE = "prepare"
    CUTOVER = "cutover"
    ABORT = "abort"
    REVERT = "revert"

    @property
    def loads_patch(self) -> bool:
        """Needs the patch's code and a process that maps its objects; the
        others act on editions a process already carries (by sha256)."""
        return self in (Action.APPLY, Action.CHECK, Action.PREPARE)

    @property
    def audited(self) -> bool:
        return self is not Action.CHECK


class Outcome(str, Enum):
    APPLIED = "applied"  # the action was done in this process
    SKIPPED = "skipped"  # nothing to do, or cannot be done; reason says why
    FAILED = "failed"  # tried and failed; the process is left as it was


@dataclass
class ProcessResult:
    pid: int
    name: str
    result: Outcome
    edition: int | None = None
    pause_us: float | None = None
    reason: str | None = None
    exit_code: int = 0

    def to_dict(self) -> dict:
        return {"pid": self.pid, "name": self.name, "result": self.result.value,
                "edition": self.edition,
                "pause_us": None if self.pause_us is None else round(self.pause_us, 1),
                "reason": self.reason, "exit_code": self.exit_code}

    @classmethod
    def from_dict(cls, d: dict) -> "ProcessResult":
        return cls(d["pid"], d["name"], Outcome(d["result"]), d.get("edition"), d.get("pause_us"),
                   d.get("reason"), d.get("exit_code", 0))


@dataclass
class FleetResult:
    action: Action
    sha256: str
    processes: list[ProcessResult] = field(default_factory=list)
    fitting: int = 0  # processes that map the patch's objects, of its build
    interrupted: bool = False
    elapsed_s: float = 0.0

    def count(self, outcome: Outcome) -> int:
        return sum(1 for p in self.processes if p.result is outcome)

    @property
    def applied(self) -> int:
        return self.count(Outcome.APPLIED)

    @property
    def skipped(self) -> int:
        return self.count(Outcome.SKIPPED)

    @property
    def failed(self) -> int:
        return self.count(Outcome.FAILED)

    def summary(self) -> str:
        return f"processes: {self.applied} applied, {self.skipped} skipped, {self.failed} failed"

    @property
    def exit_code(self) -> int:
        """0 nothing failed; 3 only "no safe moment"; 4 the patch fits no
        process; 1 otherwise (an interrupted run included)."""
        codes = {p.exit_code for p in self.processes if p.result is Outcome.FAILED}
        if self.interrupted:
            return 1
        if self.action.loads_patch and not self.fitting and not codes - {PatchMismatch.exit_code}:
            return PatchMismatch.exit_code
        if not codes:
            return 0
        if codes == {NotQuiescent.exit_code}:
            return NotQuiescent.exit_code
        if codes == {PatchMismatch.exit_code} and not self.applied and not self._already():
            return PatchMismatch.exit_code
        return 1

    def _already(self) -> bool:
        return any(p.result is Outcome.SKIPPED and p.edition is not None for p in self.processes)

    def to_dict(self) -> dict:
        return {"action": self.action.value, "sha256": self.sha256,
                "processes": [p.to_dict() for p in sorted(self.processes, key=lambda p: p.pid)],
                "applied": self.applied, "skipped": self.skipped, "failed": self.failed,
                "interrupted": self.interrupted, "elapsed_s": round(self.elapsed_s, 3),
                "exit_code": self.exit_code}


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    applied: int
    skipped: int
    failed: int
    elapsed_s: float


OnResult = Callable[[ProcessResult, Progress], None]


class _Stop(BaseException):
    """In a worker: the runner asked to undo what is under way."""


# --- the per-process work (runs in a worker) ---------------------------------

class _Job:
    """What every worker needs: the action, the patch, the options."""

    def __init__(self, action: Action, patch: PatchFile | None, sha256: str, timeout: float,
                 harnesses: HarnessChoice | None, wants: Wants | None,
                 audit_log: audit.AuditLog | None) -> None:
        self.action, self.patch, self.sha256 = action, patch, sha256
        self.timeout, self.harnesses, self.wants = timeout, harnesses, wants
        self.audit_log = audit_log
        # A target named without its object ("compute") may live anywhere:
        # a process that does not define it is simply not concerned.
        self.unqualified = patch is not None and any(
            ":" not in t for t in [r.target for r in patch.replacements]
            + [s.target for s in patch.symbol_refs])

    def run(self, info: ProcInfo) -> ProcessResult | None:
        """One process: its result, or None when it is not concerned."""
        res = self._run(info)
        if res is not None and self.audit_log is not None and self.action.audited \
                and res.result is not Outcome.SKIPPED:
            self._audit(info, res)
        return res

    def _run(self, info: ProcInfo) -> ProcessResult | None:
        def result(outcome: Outcome, **kw) -> ProcessResult:
            return ProcessResult(info.pid, info.name, outcome, **kw)

        try:
            with attach(info.pid) as proc:
                if proc.start_time != info.start_time:
                    return result(Outcome.SKIPPED, reason=Unpatchable.GONE.value)
                return _ACTIONS[self.action](self, proc, result)
        except (NoSuchProcess, TargetGone) as e:
            if isinstance(e, NoSuchProcess) and not _gone(info):
                return result(Outcome.FAILED, reason=str(e), exit_code=e.exit_code)
            return result(Outcome.SKIPPED, reason=f"exited during the run; nothing was done to it")
        except (UnknownObject, SymbolNotFound) as e:
            if self.unqualified:
                return None
            return result(Outcome.FAILED, reason=str(e), exit_code=e.exit_code)
        except HotpatchError as e:
            return result(Outcome.FAILED, reason=" ".join(str(e).split()), exit_code=e.exit_code)
        except _Stop:
            return result(Outcome.FAILED, reason="interrupted; the process was left as it was",
                          exit_code=1)

    # -- actions ------------------------------------------------------------
    def _mine(self, proc: Process) -> tuple[list[ed.Edition], list[ed.Edition]]:
        """(applied, prepared) editions of this patch's content, newest first."""
        eds = [e for e in proc.editions() if e.sha256 == self.sha256]
        return ([e for e in eds if e.state == "applied"], [e for e in eds if e.state == "prepared"])

    def apply(self, proc: Process, result) -> ProcessResult:
        applied, prepared = self._mine(proc)
        if applied:
            return result(Outcome.SKIPPED, edition=applied[0].id,
                          reason=f"already applied as edition {applied[0].id}")
        if prepared:
            return result(Outcome.SKIPPED, edition=prepared[0].id,
                          reason=f"prepared as edition {prepared[0].id}; cut it over or abort it")
        e = proc.apply(self.patch, timeout=self.timeout, harnesses=self.harnesses)
        return result(Outcome.APPLIED, edition=e.id, pause_us=e.pause_us)

    def check(self, proc: Process, result) -> ProcessResult:
        applied, _ = self._mine(proc)
        if applied:
            return result(Outcome.SKIPPED, edition=applied[0].id,
                          reason=f"already applied as edition {applied[0].id}")
        r = proc.check(self.patch, harnesses=self.harnesses)
        if r.safe_now:
            return result(Outcome.APPLIED, pause_us=r.pause_us, reason="fits and could be switched now")
        why = "; ".join(b.describe() for b in r.blockers)
        return result(Outcome.FAILED, pause_us=r.pause_us, reason=f"fits but would wait now: {why}",
                      exit_code=NotQuiescent.exit_code)

    def prepare(self, proc: Process, result) -> ProcessResult:
        applied, prepared = self._mine(proc)
        if applied or prepared:
            e = (applied or prepared)[0]
            return result(Outcome.SKIPPED, edition=e.id, reason=f"already {e.state} as edition {e.id}")
        e = proc.prepare(self.patch, harnesses=self.harnesses)
        return result(Outcome.APPLIED, edition=e.id)

    def cutover(self, proc: Process, result) -> ProcessResult | None:
        applied, prepared = self._mine(proc)
        if not prepared:
            return result(Outcome.SKIPPED, edition=applied[0].id,
                          reason=f"already applied as edition {applied[0].id}") if applied else None
        e = proc.cutover(prepared[0].id, timeout=self.timeout)
        return result(Outcome.APPLIED, edition=e.id, pause_us=e.pause_us)

    def abort(self, proc: Process, result) -> ProcessResult | None:
        applied, prepared = self._mine(proc)
        if not prepared:
            return result(Outcome.SKIPPED, edition=applied[0].id,
                          reason=f"applied as edition {applied[0].id}, not prepared; revert it instead"
                          ) if applied else None
        e = proc.abort(prepared[0].id)
        return result(Outcome.APPLIED, edition=e.id)

    def revert(self, proc: Process, result) -> ProcessResult | None:
        applied, prepared = self._mine(proc)
        if not applied:
            return result(Outcome.SKIPPED, edition=prepared[0].id,
                          reason=f"only prepared as edition {prepared[0].id}; abort it instead"
                          ) if prepared else None
        done = [proc.revert(e.id, timeout=self.timeout) for e in applied]  # newest first
        return result(Outcome.APPLIED, edition=done[0].id, pause_us=max(e.pause_us or 0 for e in done))

    def _audit(self, info: ProcInfo, res: ProcessResult) -> None:
        rec = audit.AuditRecord(action=self.action.value, pid=info.pid, target_start_time=info.start_time,
                                exe=info.exe, sha256=self.sha256, edition=res.edition,
                                pause_us=res.pause_us, fleet={"member": True})
        if self.patch is not None:
            rec.patch_file(self.patch)
        rec.finish(res.exit_code, res.reason if res.result is Outcome.FAILED else None)
        try:
            self.audit_log.write(rec)
        except _Stop:
            pass


_ACTIONS = {Action.APPLY: _Job.apply, Action.CHECK: _Job.check, Action.PREPARE: _Job.prepare,
            Action.CUTOVER: _Job.cutover, Action.ABORT: _Job.abort, Action.REVERT: _Job.revert}


def _gone(info: ProcInfo) -> bool:
    """Has the process we discovered exited (or become a zombie) since?"""
    now = proc_info(info.pid)
    return now is None or now.start_time != info.start_time or now.unpatchable is Unpatchable.ZOMBIE


# --- per-build work (in the runner, before the workers fork) ----------------

def _warm(patch: PatchFile, pid: int) -> None:
    """Resolve the patch's symbols and imports in one process of a build,
    reading it only (no ptrace): the parsed objects stay in memory
    (symbols.py) for every worker forked afterwards."""
    try:
        with RemoteMemory(pid) as mem:
            syms = TargetSymbols(pid, mem)
            for rep in patch.replacements:
                sym = syms.resolve(rep.target)
                code = mem.read(sym.addr, min(sym.size, 1 << 20)) if sym.size else b""
                trampoline.check_window(trampoline.FunctionCode(sym.qualified, sym.addr, sym.size, code),
                                        x86writer.JMP_REL32_LEN)
            for ref in patch.symbol_refs:
                syms.resolve(ref.target)
            for imp in patch.imports:
                syms.bind_import(imp.name, imp.version, imp.weak)
    except HotpatchError:
        pass  # the worker meets it again, in that process, and reports it


# --- the runner ---------------------------------------------------------------

def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except OSError:
        return os.cpu_count() or 1


def fleet(action: Action | str, patch: PatchFile | None, *, sha256: str | None = None,
          selector: Selector = Selector(), timeout: float = 5.0, jobs: int | None = None,
          harnesses: HarnessChoice | None = None, audit_log: audit.AuditLog | None = None,
          on_result: OnResult | None = None) -> FleetResult:
    """Run ``action`` with one patch on every process the selector allows
    and the patch concerns. ``patch`` is a loaded PatchFile (trust.py); the
    edition actions (cutover, abort, revert) need only its ``sha256``."""
    action = Action(action)
    keep_parsed()
    if patch is None and (action.loads_patch or not sha256):
        raise BadInput(f"{action.value} --all needs the patch file")
    sha = patch.sha256 if patch is not None else sha256
    return _Runner(action, _Job(action, patch, sha, timeout, harnesses,
                                Wants.of(patch) if patch is not None else None, audit_log),
                   selector, jobs or default_jobs(), on_result).run()


class _Worker:
    def __init__(self, pid: int, task_w: int, result_r: int) -> None:
        self.pid, self.task_w, self.result_r = pid, task_w, result_r
        self.buf = b""
        self.task: ProcInfo | None = None


class _Runner:
    POLL_S = 0.1

    def __init__(self, action: Action, job: _Job, selector: Selector, jobs: int,
                 on_result: OnResult | None) -> None:
        self.action, self.job, self.selector = action, job, selector
        self.jobs, self.on_result = jobs, on_result
        self.result = FleetResult(action, job.sha256)
        self.t0 = time.monotonic()
        self.total = 0
        self.stops = 0  # SIGINT/SIGTERM seen while running

    # -- plan ------------------------------------------------------------------
    def plan(self) -> list[ProcInfo]:
        """Decide who is concerned; report the skips that need no worker."""
        tasks: list[ProcInfo] = []
        builds: dict[tuple, int] = {}
        for info in candidates(self.selector):
            named = info.pid in self.selector.pids
            if self.action.loads_patch:
                m = match(info, self.job.wants) if info.unpatchable is not Unpatchable.KERNEL_THREAD \
                    else Match(False)
                if m.fits and not self.job.unqualified:
                    self.result.fitting += 1
                concerned = m.fits or m.reason is not None or self.job.unqualified
            else:
                m = None
                concerned = carries_editions(info.pid)
            if info.unpatchable is not None and (concerned or named):
                self._decided(info, info.unpatchable.value)
            elif m is not None and not m.fits and m.reason is not None:
                self._decided(info, m.reason)
            elif concerned:
                tasks.append(info)
                if m is not None and m.fits:
                    builds.setdefault(m.builds, info.pid)
            elif named:
                self._decided(info, self._not_concerned())
        if self.action.loads_patch:
            for pid in builds.values():
                _warm(self.job.patch, pid)
        return tasks

    def _not_concerned(self) -> str:
        if self.action.loads_patch:
            objs = ", ".join(sorted(self.job.wants.objects)) or "what the patch needs"
            return f"does not map {objs}"
        return "carries no edition of this patch"

    def _decided(self, info: ProcInfo, reason: str) -> None:
        self.result.processes.append(ProcessResult(info.pid, info.name, Outcome.SKIPPED, reason=reason))

    # -- run -------------------------------------------------------------------
    def run(self) -> FleetResult:
        old = self._catch_signals()
        try:
            tasks = self.plan()
            self.total = len(self.result.processes) + len(tasks)
            for r in list(self.result.processes):
                self._report(r)
            if tasks:
                self._dispatch_all(deque(tasks))
        finally:
            self._restore_signals(old)
        self.result.interrupted = self.stops > 0
        self.result.elapsed_s = time.monotonic() - self.t0
        return self.result

    def _catch_signals(self):
        """While workers run, SIGINT/SIGTERM only ask us to stop (counted):
        an exception in the middle of bookkeeping would lose results."""
        if threading.current_thread() is not threading.main_thread():
            return None
        def on_signal(signum, frame):
            self.stops += 1
        return {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def _restore_signals(old) -> None:
        for s, h in (old or {}).items():
            signal.signal(s, h)

    def _dispatch_all(self, pending: deque[ProcInfo]) -> None:
        workers = [self._spawn() for _ in range(min(self.jobs, len(pending)))]
        live = {w.result_r: w for w in workers}
        for w in workers:
            self._give(w, pending)
        poller = select.poll()
        for fd in live:
            poller.register(fd, select.POLLIN | select.POLLHUP)
        terminated = False
        while live:
            if self.stops and pending:
                for info in pending:
                    self._record(info, ProcessResult(info.pid, info.name, Outcome.SKIPPED,
                                                     reason="not reached: interrupted"))
                pending.clear()
            if self.stops > 1 and not terminated:
                terminated = True
                for w in live.values():
                    _kill(w.pid, signal.SIGTERM)
            for fd, _ev in poller.poll(int(self.POLL_S * 1000)):
                w = live[fd]
                chunk = _read(fd)
                w.buf += chunk
                while b"\n" in w.buf:
                    line, w.buf = w.buf.split(b"\n", 1)
                    self._on_line(w, line, pending)
                if not chunk:  # the worker exited
                    if w.task is not None:
                        self._record(w.task, ProcessResult(
                            w.task.pid, w.task.name, Outcome.FAILED, exit_code=1,
                            reason="internal error: the worker handling it died; run hotpatch recover on it"))
                        w.task = None
                    poller.unregister(fd)
                    os.close(fd)
                    _close(w.task_w)
                    w.task_w = -1
                    del live[fd]
                    _reap(w.pid)

    def _on_line(self, w: _Worker, line: bytes, pending: deque[ProcInfo]) -> None:
        info, w.task = w.task, None
        d = json.loads(line)
        if d is not None:
            res = ProcessResult.from_dict(d)
            if self.job.unqualified and res.exit_code != PatchMismatch.exit_code:
                self.result.fitting += 1  # it defines what the patch names
            self._record(info, res)
        elif info.pid in self.selector.pids:
            self._record(info, ProcessResult(info.pid, info.name, Outcome.SKIPPED,
                                             reason=self._not_concerned()))
        else:
            self.total -= 1
        self._give(w, pending)

    def _give(self, w: _Worker, pending: deque[ProcInfo]) -> None:
        if pending and not self.stops:
            w.task = pending.popleft()
            i = w.task
            os.write(w.task_w, json.dumps([i.pid, i.start_time, i.name, i.uid, i.exe]).encode() + b"\n")
        elif w.task_w >= 0:
            _close(w.task_w)  # EOF: the worker exits
            w.task_w = -1

    def _record(self, info: ProcInfo, res: ProcessResult) -> None:
        self.result.processes.append(res)
        self._report(res)

    def _report(self, res: ProcessResult) -> None:
        if self.on_result is not None:
            r = self.result
            self.on_result(res, Progress(len(r.processes), self.total, r.applied, r.skipped, r.failed,
                                         time.monotonic() - self.t0))

    # -- workers -------------------------------------------------------------------
    def _spawn(self) -> _Worker:
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(task_w)
                os.close(result_r)
                for fd in getattr(self, "_parent_fds", ()):
                    _close(fd)
                _worker_loop(self.job, task_r, result_w)
                code = 0
            finally:
                os._exit(code)
        os.close(task_r)
        os.close(result_w)
        self._parent_fds = [*getattr(self, "_parent_fds", ()), task_w, result_r]
        return _Worker(pid, task_w, result_r)


def _worker_loop(job: _Job, task_r: int, result_w: int) -> None:
    """Read a task line, do it, write a result line; until EOF or _Stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C is for the runner

    def on_term(signum, frame):
        raise _Stop()
    signal.signal(signal.SIGTERM, on_term)
    with os.fdopen(task_r, "rb", buffering=0) as tasks:
        buf = b""
        while True:
            try:
                chunk = tasks.read(4096)
            except _Stop:
                return
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                pid, start, name, uid, exe = json.loads(line)
                try:
                    res = job.run(ProcInfo(pid, start, name, uid, exe))
                except _Stop:
                    res = ProcessResult(pid, name, Outcome.FAILED, exit_code=1,
                                        reason="interrupted; the process was left as it was")
                except Exception as e:  # a bug: still one line for this process only
                    res = ProcessResult(pid, name, Outcome.FAILED, exit_code=1,
                                        reason=f"internal error: {type(e).__name__}: {e}")
                _write_all(result_w, json.dumps(None if res is None else res.to_dict()).encode() + b"\n")


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""


def _write_all(fd: int, data: bytes) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


# --- list --all -----------------------------------------------------------------

@dataclass
class ProcessEditions:
    pid: int
    name: str
    exe: str
    editions: list[ed.Edition]

    def to_dict(self) -> dict:
        return {"pid": self.pid, "name": self.name, "exe": self.exe,
                "editions": [e.to_dict() for e in self.editions]}


def fleet_list(selector: Selector = Selector()) -> list[ProcessEditions]:
    """Every process (the selector allows) that carries editions, with them:
    read from each target's own memory, no ptrace."""
    out = []
    for info in candidates(selector):
        if info.unpatchable in (Unpatchable.KERNEL_THREAD, Unpatchable.ZOMBIE) \
                or not carries_editions(info.pid):
            continue
        try:
            with attach(info.pid) as proc:
                eds = proc.editions()
        except HotpatchError:
            continue  # exited, or not ours to read
        if eds:
            out.append(ProcessEditions(info.pid, info.name, info.exe, eds))
    return out
