"""``hotpatch watch``: keep installed patches applied to processes that start later.

Event-driven, so it costs nothing while nothing starts:

* the process-events connector reports every ``execve`` at once, with the
  process id (procevents.ExecEvents). A new process's libraries are mapped
  by ld.so within milliseconds of its exec, so each one is looked at on a
  short, bounded schedule after its event (0, 3, 10, 30 ... 10000 ms:
  reading its maps, nothing more) until every installed patch that fits it is
  applied, then forgotten. We chose the connector over inotify alone
  (openEuler's syscare watches the target files' ``IN_OPEN`` and then
  searches /proc for who mapped them) because it names the process: no
  search of every process per event, and a flood of starts costs a few
  reads per process;
* inotify on the store (a patch installed or removed: re-read, and apply a
  new one everywhere) and on the files installed patches target (an
  ``IN_OPEN`` is a process loading one: the new processes are looked at at
  once, and one machine-wide pass, at most once a second, finds a ``dlopen``
  in an older process; it attaches only to processes not yet handled).

On start, and after the kernel reports lost events, it reconciles: the
fleet runner applies every installed patch to every matching process
(idempotent by the patch's sha256, so a restart after SIGKILL patches
exactly the processes that started meanwhile, and no process twice).

A process where a patch fails (no safe moment, or anything else) is tried
again with exponential back-off (1 s, 2 s, 4 s ... 60 s; given up after
MAX_ATTEMPTS), each failure reported; a process that exits is forgotten.
What is pending is written to the store's ``watch-status.json`` for
``hotpatch installed``.
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

from . import audit
from .discovery import ProcInfo, Selector, Wants, candidates, match, proc_info, read_maps_of
from .errors import HotpatchError
from .fleet_job import Job
from .fleet_results import Action, Outcome
from .fleet_runner import fleet
from .patchfile import PatchFile
from .procevents import IN_CLOSE_WRITE, IN_CREATE, IN_DELETE, IN_MOVED_TO, IN_OPEN, ExecEvents, Inotify, Overrun
from .store import Entry, Store
from .symbols import keep_parsed

# After an exec event, look (read its maps) again at these times: ld.so maps
# the libraries within milliseconds, or seconds on an overloaded machine.
SCHEDULE_MS = (0, 3, 10, 30, 100, 300, 1000, 3000, 10000)
ATTEMPT_TIMEOUT_S = 0.5  # one try at a safe moment; back-off does the rest
MAX_ATTEMPTS = 12
RESCAN_EVERY_S = 1.0  # dlopen-triggered passes, at most this often


@dataclass
class _Installed:
    entry: Entry
    patch: PatchFile
    wants: Wants
    job: Job


@dataclass
class _New:
    """A process seen in an exec event, looked at on SCHEDULE_MS."""

    pid: int
    seen: float  # monotonic time of the exec event
    step: int = 0

    @property
    def due(self) -> float:
        return self.seen + SCHEDULE_MS[self.step] / 1000


@dataclass
class _Retry:
    info: ProcInfo
    sha256: str
    attempts: int
    due: float
    reason: str


Emit = Callable[[dict], None]


@dataclass
class Watcher:
    store: Store
    emit: Emit
    jobs: int | None = None
    audit_log: audit.AuditLog | None = None
    installed: dict[str, _Installed] = field(default_factory=dict)
    new: dict[int, _New] = field(default_factory=dict)
    retries: dict[tuple[int, str], _Retry] = field(default_factory=dict)
    done: set[tuple[int, int, str]] = field(default_factory=set)  # (pid, start time, sha256)
    objects: set[str] = field(default_factory=set)  # target files watched for IN_OPEN
    stopping: bool = False
    inotify: Inotify | None = None
    _rescan_at: float | None = None
    _last_rescan: float = 0.0

    # -- the store -------------------------------------------------------------------
    def load_store(self) -> list[str]:
        """Re-read the store; the sha256 of every patch new to us."""
        entries = {e.sha256: e for e in self.store.entries()}
        for sha in set(self.installed) - set(entries):
            del self.installed[sha]
            self.emit({"event": "removed", "sha256": sha})
            self.retries = {k: r for k, r in self.retries.items() if k[1] != sha}
        added = []
        for sha, entry in entries.items():
            if sha in self.installed:
                continue
            try:
                patch = self.store.load(entry)
            except HotpatchError as e:
                self.emit({"event": "error", "sha256": sha, "reason": f"cannot load installed patch: {e}"})
                continue
            job = Job(Action.APPLY, patch, sha, ATTEMPT_TIMEOUT_S, None, Wants.of(patch), self.audit_log)
            self.installed[sha] = _Installed(entry, patch, Wants.of(patch), job)
            added.append(sha)
        return added

    # -- reconcile: every matching process, in parallel ------------------------------
    def reconcile(self, shas: list[str] | None = None) -> None:
        for sha in shas if shas is not None else list(self.installed):
            inst = self.installed[sha]
            result = fleet(Action.APPLY, inst.patch, timeout=ATTEMPT_TIMEOUT_S, jobs=self.jobs,
                           audit_log=self.audit_log)
            for r in result.processes:
                info = proc_info(r.pid)
                if info is None:
                    continue
                if r.result is Outcome.FAILED:
                    self._failed(info, sha, r.reason or "", 0)
                else:
                    self.done.add((info.pid, info.start_time, sha))
                    if r.result is Outcome.APPLIED:
                        self._emit_applied(info, inst, r.edition, r.pause_us, None)
            self.emit({"event": "reconciled", "patch": inst.entry.name, "sha256": sha,
                       "applied": result.applied, "skipped": result.skipped, "failed": result.failed})
            if result.interrupted:
                self.stopping = True
                return
        self._prune()
        self._write_status()

    def rescan(self) -> None:
        """Every matching process not yet handled (lost events, dlopen): only
        those are attached to; the ones already done are known."""
        for info in candidates(Selector()):
            if info.unpatchable is None and info.pid not in self.new and any(
                    (info.pid, info.start_time, sha) not in self.done for sha in self.installed):
                self.look(_New(info.pid, time.monotonic()))

    # -- one new process -------------------------------------------------------------
    def look(self, n: _New) -> bool:
        """Apply every fitting patch not yet in it; True when nothing is left to wait for."""
        maps = read_maps_of(n.pid)
        if not maps:
            return True  # gone (or a zombie): forget it
        names = {os.path.basename(m.path) for m in maps if m.is_file}
        if not any(inst.wants.objects <= names | {"main"} for inst in self.installed.values()):
            return False  # the cheap test, for the many processes no patch concerns
        info = proc_info(n.pid)
        if info is None or info.unpatchable is not None:
            return True
        waiting = False
        for sha, inst in self.installed.items():
            key = (info.pid, info.start_time, sha)
            if key in self.done or (info.pid, sha) in self.retries:
                continue
            m = match(info, inst.wants, maps)
            if not m.fits:
                waiting = waiting or m.reason is None  # its objects may still be mapped
                if m.reason is not None:
                    self.done.add(key)
                continue
            self._watch_objects(info.pid, inst.wants, maps)
            self._attempt(info, inst, 1, n.seen)
        return not waiting

    def _attempt(self, info: ProcInfo, inst: _Installed, attempt: int, seen: float | None) -> None:
        sha = inst.entry.sha256
        try:
            r = inst.job.run(info)
        except HotpatchError as e:  # Job.run reports errors as results; belt and braces
            r = None
            self._failed(info, sha, str(e), attempt)
            return
        if r is None or r.result is Outcome.SKIPPED:
            self.done.add((info.pid, info.start_time, sha))
            self.retries.pop((info.pid, sha), None)
            return
        if r.result is Outcome.APPLIED:
            self.done.add((info.pid, info.start_time, sha))
            self.retries.pop((info.pid, sha), None)
            self._emit_applied(info, inst, r.edition, r.pause_us, seen)
            return
        self._failed(info, sha, r.reason or "", attempt)

    def _failed(self, info: ProcInfo, sha: str, reason: str, attempt: int) -> None:
        attempt += 1
        if attempt > MAX_ATTEMPTS:
            self.retries.pop((info.pid, sha), None)
            self.done.add((info.pid, info.start_time, sha))
            self.emit({"event": "gave_up", "pid": info.pid, "name": info.name, "sha256": sha,
                       "attempts": attempt - 1, "reason": reason})
            self._write_status()
            return
        delay = min(60.0, 2.0 ** (attempt - 2))
        self.retries[(info.pid, sha)] = _Retry(info, sha, attempt, time.monotonic() + delay, reason)
        self.emit({"event": "failed", "pid": info.pid, "name": info.name, "sha256": sha,
                   "attempt": attempt - 1, "retry_in_s": delay, "reason": reason})
        self._write_status()

    def _emit_applied(self, info: ProcInfo, inst: _Installed, edition, pause_us, seen) -> None:
        ev = {"event": "applied", "pid": info.pid, "name": info.name, "patch": inst.entry.name,
              "sha256": inst.entry.sha256, "edition": edition,
              "pause_us": None if pause_us is None else round(pause_us, 1)}
        if seen is not None:
            ev["after_exec_ms"] = round((time.monotonic() - seen) * 1000, 1)
        self.emit(ev)

    def _watch_objects(self, pid: int, wants: Wants, maps) -> None:
        if self.inotify is None:
            return
        for m in maps:
            path = m.path.removesuffix(" (deleted)")
            if m.is_file and os.path.basename(path) in wants.objects and path not in self.objects:
                self.objects.add(path)
                self.inotify.watch(path, IN_OPEN)

    def _prune(self) -> None:
        """Forget processes that are gone (bounded memory under churn)."""
        alive = {}
        for pid, start, sha in self.done:
            if pid not in alive:
                info = proc_info(pid)
                alive[pid] = info.start_time if info else None
        self.done = {k for k in self.done if alive.get(k[0]) == k[1]}

    def _write_status(self) -> None:
        pending: dict[str, dict] = {}
        for (pid, sha), r in self.retries.items():
            pending.setdefault(sha, {})[str(pid)] = {
                "name": r.info.name, "attempts": r.attempts - 1, "reason": r.reason,
                "retry_in_s": round(max(0.0, r.due - time.monotonic()), 1)}
        self.store.write_status({"pid": os.getpid(), "updated": time.time(), "failing": pending})

    # -- the loop ------------------------------------------------------------------
    def run(self) -> int:
        keep_parsed()
        try:
            events = ExecEvents()
        except OSError as e:
            self.emit({"event": "error", "reason": f"cannot listen to process events "
                                                   f"(needs root: CAP_NET_ADMIN): {e.strerror}"})
            return 1
        self.inotify = Inotify()
        self.store._ensure()
        self.inotify.watch(str(self.store.patches), IN_CLOSE_WRITE | IN_MOVED_TO | IN_DELETE | IN_CREATE)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        old_fd = signal.set_wakeup_fd(wake_w)
        sel = selectors.DefaultSelector()
        sel.register(events, selectors.EVENT_READ, "exec")
        sel.register(self.inotify, selectors.EVENT_READ, "file")
        sel.register(wake_r, selectors.EVENT_READ, "signal")
        try:
            self.emit({"event": "started", "pid": os.getpid(), "store": str(self.store.root)})
            self.load_store()
            self.reconcile()
            while not self.stopping:
                for key, _ in sel.select(self._timeout()):
                    if key.data == "exec":
                        self._on_exec(events)
                    elif key.data == "file":
                        self._on_files()
                    else:
                        _drain(wake_r)
                self._due()
        finally:
            signal.set_wakeup_fd(old_fd)
            for s, h in old.items():
                signal.signal(s, h)
            sel.close()
            events.close()
            self.inotify.close()
            os.close(wake_r)
            os.close(wake_w)
            self.emit({"event": "stopped"})
        return 0

    def _on_signal(self, signum, frame) -> None:
        self.stopping = True

    def _on_exec(self, events: ExecEvents) -> None:
        now = time.monotonic()
        try:
            pids = events.read()
        except Overrun:
            self.emit({"event": "overrun", "reason": "the kernel dropped process events; rescanning"})
            self._rescan_at = now
            return
        if not self.installed:
            return
        me = os.getpid()
        for pid in pids:
            if pid != me:
                self.new[pid] = _New(pid, now)  # a second exec restarts its schedule

    def _on_files(self) -> None:
        store_changed = opened = False
        for path, mask, _name in self.inotify.read():
            if path == str(self.store.patches):
                store_changed = True
            elif mask & IN_OPEN:
                opened = True
        if store_changed:
            added = self.load_store()
            for sha in added:
                self.emit({"event": "installed", "patch": self.installed[sha].entry.name, "sha256": sha})
            if added:
                self.reconcile(added)
        if opened:
            if self.new:
                for n in self.new.values():  # a new process is loading it: look now
                    n.step = 0
                    n.seen = min(n.seen, time.monotonic())
            if self._rescan_at is None:  # or a dlopen in an older process
                self._rescan_at = max(time.monotonic(), self._last_rescan + RESCAN_EVERY_S)

    def _timeout(self) -> float | None:
        dues = [n.due for n in self.new.values()] + [r.due for r in self.retries.values()]
        if self._rescan_at is not None:
            dues.append(self._rescan_at)
        if not dues:
            return None  # nothing to do until an event: no CPU at all
        return max(0.0, min(dues) - time.monotonic())

    def _due(self) -> None:
        now = time.monotonic()
        if self._rescan_at is not None and self._rescan_at <= now:
            self._rescan_at, self._last_rescan = None, now
            self.rescan()
        for pid, n in list(self.new.items()):
            if n.due > now:
                continue
            if self.look(n) or n.step + 1 >= len(SCHEDULE_MS):
                del self.new[pid]
            else:
                n.step += 1
        for key, r in list(self.retries.items()):
            if r.due <= time.monotonic() and key in self.retries:
                del self.retries[key]
                info = proc_info(r.info.pid)
                inst = self.installed.get(r.sha256)
                if info is None or info.start_time != r.info.start_time or inst is None:
                    self._write_status()
                    continue  # exited (or uninstalled): forget it
                self._attempt(info, inst, r.attempts, None)
        if len(self.done) > 4096:
            self._prune()


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def text_line(ev: dict) -> str:
    """One line per action for a human (journal) reader."""
    kind = ev["event"]
    who = f"pid {ev['pid']} ({ev.get('name', '?')})" if "pid" in ev and kind != "started" else ""
    sha = ev.get("sha256", "")[:12]
    if kind == "applied":
        after = f", {ev['after_exec_ms']:.0f} ms after its exec" if ev.get("after_exec_ms") is not None else ""
        return f"{who}: applied {ev['patch']} ({sha}) as edition {ev['edition']}{after}"
    if kind == "failed":
        return f"{who}: {sha} failed (attempt {ev['attempt']}), retrying in {ev['retry_in_s']:g} s: {ev['reason']}"
    if kind == "gave_up":
        return f"{who}: {sha} gave up after {ev['attempts']} attempts: {ev['reason']}"
    if kind == "reconciled":
        return (f"reconciled {ev['patch']} ({sha}): {ev['applied']} applied, {ev['skipped']} skipped, "
                f"{ev['failed']} failed")
    if kind == "started":
        return f"watching process starts (pid {ev['pid']}, store {ev['store']})"
    if kind in ("installed", "removed"):
        return f"store: {kind} {ev.get('patch', '')} ({sha})".replace(" ()", "")
    return f"{kind}: {ev.get('reason', '')}".rstrip(": ")


def printer(as_json: bool) -> Emit:
    def emit(ev: dict) -> None:
        line = json.dumps(ev) if as_json else f"hotpatch watch: {text_line(ev)}"
        print(line, flush=True)
    return emit


__all__ = ["Watcher", "printer", "text_line"]
