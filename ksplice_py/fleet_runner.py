"""One patch, every matching process on the machine (``hotpatch ... --all``).

    result = ksplice_py.fleet("apply", "fix.so", selector=Selector.parse(exes=["/usr/sbin/named"]))
    for p in result.processes:
        print(p.pid, p.result.value, p.edition, p.reason)
    print(result.summary())     # processes: A applied, S skipped, F failed

How the work is split (records: fleet_results.py; what an action does in
one process: fleet_job.py; this module: finding the processes, the workers):

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
from dataclasses import dataclass

from . import audit, interrupts
from . import editions as ed
from .cycle import HarnessChoice
from .discovery import (Match, ProcInfo, Selector, Unpatchable, Wants, candidates, carries_patch,
                        editions_of, match, proc_info)
from .errors import BadInput, PatchMismatch
from .fleet_job import FIRST_TRY_S, RETRY, Job, Stop, warm
from .fleet_results import Action, FleetResult, OnResult, Outcome, Progress, ProcessResult
from .patchfile import PatchFile
from .symbols import keep_parsed


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
    return _Runner(action, Job(action, patch, sha, timeout, harnesses,
                                Wants.of(patch) if patch is not None else None, audit_log),
                   selector, jobs or default_jobs(), on_result).run()


@dataclass(frozen=True)
class _Task:
    info: ProcInfo
    budget: float  # seconds this attempt may wait for a safe moment
    final: bool  # False: give up early with RETRY


class _Worker:
    def __init__(self, pid: int, task_w: int, result_r: int) -> None:
        self.pid, self.task_w, self.result_r = pid, task_w, result_r
        self.buf = b""
        self.task: _Task | None = None


class _Runner:
    POLL_S = 0.1

    def __init__(self, action: Action, job: Job, selector: Selector, jobs: int,
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
        found = candidates(self.selector)
        for pid in sorted(self.selector.pids - {i.pid for i in found}):  # named, but not there
            if proc_info(pid) is None:
                self.result.processes.append(ProcessResult(pid, "?", Outcome.SKIPPED, reason="no such process"))
        for info in found:
            named = info.pid in self.selector.pids
            if self.action.loads_patch:
                m = match(info, self.job.wants) if info.unpatchable is not Unpatchable.KERNEL_THREAD \
                    else Match(False)
                if m.fits and not self.job.unqualified:
                    self.result.fitting += 1
                concerned = m.fits or m.reason is not None or (self.job.unqualified and info.unpatchable not in (
                    Unpatchable.KERNEL_THREAD, Unpatchable.ZOMBIE))
            else:
                m = None
                concerned = carries_patch(info.pid, self.job.sha256)
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
                warm(self.job.patch, pid)
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
            self.result.discovery_s = time.monotonic() - self.t0
            self.total = len(self.result.processes) + len(tasks)
            for r in list(self.result.processes):
                self._report(r)
            if tasks:
                self._dispatch_all(deque(self._first_try(i) for i in tasks))
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

    def _first_try(self, info: ProcInfo) -> _Task:
        timeout = self.job.timeout
        first = float(os.environ.get("KSPLICE_PY_FLEET_FIRST_TRY") or FIRST_TRY_S)
        if self.action in (Action.APPLY, Action.CUTOVER, Action.REVERT) and timeout > 2 * first:
            return _Task(info, first, False)
        return _Task(info, timeout, True)

    def _dispatch_all(self, pending: deque[_Task]) -> None:
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
                for task in pending:
                    self._record(ProcessResult(task.info.pid, task.info.name, Outcome.SKIPPED,
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
                        self._record(ProcessResult(
                            w.task.info.pid, w.task.info.name, Outcome.FAILED, exit_code=1,
                            reason="internal error: the worker handling it died; run hotpatch recover on it"))
                        w.task = None
                    poller.unregister(fd)
                    os.close(fd)
                    _close(w.task_w)
                    w.task_w = -1
                    del live[fd]
                    _reap(w.pid)

    def _on_line(self, w: _Worker, line: bytes, pending: deque[_Task]) -> None:
        task, w.task = w.task, None
        info = task.info
        d = json.loads(line)
        if d == "retry":  # no safe moment yet: again after the others, with the rest of its time
            pending.append(_Task(info, self.job.timeout - task.budget, True))
        elif d is not None:
            res = ProcessResult.from_dict(d)
            if self.job.unqualified and res.exit_code != PatchMismatch.exit_code:
                self.result.fitting += 1  # it defines what the patch names
            self._record(res)
        elif info.pid in self.selector.pids:
            self._record(ProcessResult(info.pid, info.name, Outcome.SKIPPED,
                                             reason=self._not_concerned()))
        else:
            self.total -= 1
        self._give(w, pending)

    def _give(self, w: _Worker, pending: deque[_Task]) -> None:
        if pending and not self.stops:
            w.task = t = pending.popleft()
            i = t.info
            os.write(w.task_w, json.dumps([i.pid, i.start_time, i.name, i.uid, i.exe, t.budget, t.final]
                                          ).encode() + b"\n")
        elif w.task_w >= 0:
            _close(w.task_w)  # EOF: the worker exits
            w.task_w = -1

    def _record(self, res: ProcessResult) -> None:
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


def _worker_loop(job: Job, task_r: int, result_w: int) -> None:
    """Read a task line, do it, write a result line; until EOF or Stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C is for the runner

    def on_term(signum, frame):  # as cli.py's handler: undo before the switch, complete after it
        if not interrupts.committed():
            raise Stop()
    signal.signal(signal.SIGTERM, on_term)
    with os.fdopen(task_r, "rb", buffering=0) as tasks:
        buf = b""
        while True:
            try:
                chunk = tasks.read(4096)
            except Stop:
                return
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                pid, start, name, uid, exe, budget, final = json.loads(line)
                try:
                    res = job.run(ProcInfo(pid, start, name, uid, exe), budget, final)
                except Stop:
                    res = ProcessResult(pid, name, Outcome.FAILED, exit_code=1,
                                        reason="interrupted; the process was left as it was")
                except Exception as e:  # a bug: still one line for this process only
                    res = ProcessResult(pid, name, Outcome.FAILED, exit_code=1,
                                        reason=f"internal error: {type(e).__name__}: {e}")
                wire = "retry" if res is RETRY else None if res is None else res.to_dict()
                _write_all(result_w, json.dumps(wire).encode() + b"\n")


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
    read from each target's own memory, without ptrace."""
    out = []
    for info in candidates(selector):
        if info.unpatchable in (Unpatchable.KERNEL_THREAD, Unpatchable.ZOMBIE):
            continue
        eds = editions_of(info.pid)
        if eds:
            out.append(ProcessEditions(info.pid, info.name, info.exe, eds))
    return out
