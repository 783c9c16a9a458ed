"""Transitions: switching an edition's trampolines in (cutover) or out
(revert), in one stopped window, driven by the edition's record alone, so a
fresh invocation (or ``recover`` after a killed tool) can run them.

Lifecycle, as in Linux's kernel/livepatch/transition.c:
``Transition(...)`` init (every byte to write and every busy range computed
here, before any thread stops) -> ``start`` (retry loop) -> ``try_complete``
(one stopped-window attempt) -> ``complete`` (record updated) or, when no
safe moment comes, ``NotQuiescent`` naming the threads that blocked.
operations.py runs it (cutover, revert, recovery); lifecycle.py has the
states it moves the edition through.
"""
from __future__ import annotations

import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from . import editions as ed
from . import consistency, harness, interrupts, quiescence, runout
from .consistency import Consistency
from .errors import HotpatchError, NotQuiescent, PatchMismatch, RemoteError
from .lifecycle import Direction
from .maps import read_maps
from .quiescence import Blocker, CodeRange, Verdict
from .target import Target
from .tracer import World
from .unwind import Unwinder

REG_NAMES = ("rip", "rsp", "rbp", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10",
             "r11", "r12", "r13", "r14", "r15", "orig_rax", "fs_base")
STOP_TIMEOUT = 0.2  # longest wait for every thread to reach its stop, per attempt


@dataclass
class AttemptResult:
    done: bool
    pause_us: float = 0.0
    blockers: list[Blocker] = field(default_factory=list)
    in_rip: bool = False  # some thread was executing retired code (hot-function case)


@contextmanager
def realtime():
    """Run SCHED_FIFO from the moment the world is stopped until it is
    released: otherwise threads we already released take our CPU and the
    rest of the world waits (2 cores: releasing 5 busy threads 3.5 ms ->
    30 µs)."""
    try:
        old = os.sched_getscheduler(0), os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except OSError:  # not permitted: carry on at normal priority
        old = None
    try:
        yield
    finally:
        if old is not None:
            os.sched_setscheduler(0, old[0], old[1])


def sleep_backoff(attempt: int, remaining: float) -> None:
    """Exponential back-off with jitter; the target runs freely (we are
    detached) while we sleep."""
    delay = min(0.001 * (1.6 ** attempt), 0.05) * (0.5 + random.random())
    time.sleep(max(0.0, min(delay, remaining)))


class Transition:
    """Switch ``edition`` in (Direction.PATCH) or out (Direction.UNPATCH)."""

    def __init__(self, target: Target, edition: ed.Edition, direction: Direction,
                 functions: list[ed.FunctionSwitch] | None = None) -> None:
        self.target, self.pid, self.mem = target, target.pid, target.mem
        self.edition = edition
        self.direction = direction
        self.functions = edition.functions if functions is None else functions
        self.attempts = 0
        self.longest_pause_us = 0.0
        self.stopped_us = 0.0
        self.advanced = 0  # threads moved out of retired code (runout.py)
        others = [e for e in target.editions() if e.id != edition.id]
        self._check_code(others)
        self.harnesses = harness.by_names(edition.harnesses)
        # Harness-critical code counts in both directions: switching resolver
        # code (either way) while a thread is inside the resolver is unsafe.
        self.ranges = quiescence.busy_ranges(
            self._busy_ranges(others), harness.critical_ranges(self.harnesses, target.symbols)
            + runout.leftovers(read_maps(self.pid)))
        self.checks = [h for h in self.harnesses if h.check]
        self.writes = self._writes()
        self.unwinder: Unwinder | None = None  # built after a first blocked attempt
        self.runout: runout.Runout | None = None  # likewise, when a thread was in retired code
        self._backtraces: dict[int, list[int]] = {}

    # -- init: everything computed before any thread stops ------------------------
    def _check_code(self, others: list[ed.Edition]) -> None:
        """The bytes we replace must be exactly those the record expects."""
        for f in self.functions:
            want = bytes.fromhex(f.old_bytes if self.direction is Direction.PATCH else f.new_bytes)
            have = self.mem.read(f.addr, len(want))
            if have == want:
                continue
            newer = quiescence.redirected_to(f.addr, have, others)
            if self.direction is Direction.UNPATCH and newer:
                raise PatchMismatch(
                    f"edition {newer.id} ({newer.patch}) replaced {f.symbol} after edition "
                    f"{self.edition.id}; revert edition {newer.id} first")
            if self.direction is Direction.PATCH and newer:
                raise PatchMismatch(
                    f"{f.symbol} changed since edition {self.edition.id} was prepared "
                    f"(edition {newer.id} now redirects it); abort and prepare again")
            raise PatchMismatch(
                f"{f.symbol} in process {self.pid} no longer holds the code edition "
                f"{self.edition.id} expects; abort and prepare again")

    def _busy_ranges(self, others: list[ed.Edition]) -> list[CodeRange]:
        if self.direction is Direction.PATCH and self.edition.consistency == Consistency.NEW_CALLS:
            # Weaker, by the patch's explicit choice: threads may finish old bodies.
            return [consistency.overwritten(f.addr, len(bytes.fromhex(f.old_bytes)), f.symbol)
                    for f in self.functions]
        if self.direction is Direction.PATCH:
            return quiescence.patch_ranges(self.functions, others, self._split_parts)
        return quiescence.unpatch_ranges(self.edition, self.functions)

    def _split_parts(self, f: ed.FunctionSwitch) -> list[CodeRange]:
        """gcc moves unlikely code to ``name.cold``: a thread there is inside
        the function although neither its rip nor its stack says so."""
        out = []
        for suffix in (".cold", ".part.0"):
            try:
                sym = self.target.symbols.resolve(f.symbol + suffix)
            except HotpatchError:
                continue
            out.append(CodeRange(sym.addr, sym.addr + sym.size, sym.qualified))
        return out

    def _writes(self) -> list[tuple[int, bytes]]:
        """The window's one batch: the state while switching, every
        trampoline, then (for a cutover) the final state. A revert's final
        state is the cleanup's unmap."""
        during = self.edition.state_bytes(self.direction.during)
        if self.direction is Direction.PATCH:
            return [during, *[(f.addr, bytes.fromhex(f.new_bytes)) for f in self.functions],
                    self.edition.state_bytes(self.direction.outcome)]
        return [during, *[(f.addr, bytes.fromhex(f.old_bytes)) for f in self.functions]]

    # -- start / try_complete ------------------------------------------------------
    def start(self, timeout: float) -> AttemptResult:
        """Retry with back-off until a safe moment or ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        for h in self.harnesses:
            if h.before_cutover:
                h.before_cutover(self.target, self.edition)
        try:
            return self._retry(deadline, timeout)
        finally:
            self._close_runout()

    def _retry(self, deadline: float, timeout: float) -> AttemptResult:
        while True:
            self.attempts += 1
            # SIGINT/SIGTERM wait for the attempt to end: before its write
            # they then unwind as usual; after it, the switch is complete
            # and recorded before anyone hears of the interrupt.
            with interrupts.held():
                result = self.try_complete(write=True)
                if result.done:
                    self.complete(result)
                    for h in self.harnesses:
                        if h.after_cutover:
                            h.after_cutover(self.target, self.edition)
                    return result
            remaining = deadline - time.monotonic()
            if self.unwinder is None:
                # one more attempt, with precise unwinding, even when time is up
                self.load_unwinder()
                remaining = max(remaining, 0.001)
            self._open_runout(result)
            if remaining <= 0:
                within = f"within {timeout:g}s" if timeout else "at once (--timeout 0: one try)"
                raise NotQuiescent(
                    f"no safe moment to {self.direction.verb} edition {self.edition.id} {within} "
                    f"({self.attempts} attempts): {quiescence.summarize(result.blockers)}; "
                    f"retry later or with a longer --timeout",
                    blockers=result.blockers, attempts=self.attempts)
            sleep_backoff(self.attempts, remaining)

    def load_unwinder(self) -> None:
        """Ready the DWARF unwinder (outside the window) once an attempt was
        blocked: it dismisses conservative false positives and explains who
        blocks. Not built up front: most cutovers never need it."""
        self.unwinder = Unwinder(self.pid, self.mem, read_maps(self.pid))
        self.unwinder.preload()

    def probe(self) -> AttemptResult:
        """A check without writing; a blocked probe is retried once with
        precise unwinding so its verdict and explanation are the real ones."""
        self.attempts += 1
        result = self.try_complete(write=False)
        if not result.done:
            self.load_unwinder()
            self._open_runout(result)
            self.attempts += 1
            try:
                result = self.try_complete(write=False)
            finally:
                self._close_runout()
        return result

    def _open_runout(self, result: AttemptResult) -> None:
        """Hot functions (runout.py): once an attempt found a thread executing
        retired code, map the run-out copy that lets the next attempts move
        such threads out instead of waiting for them."""
        if result.in_rip and self.runout is None:
            self.runout = runout.Runout(self.pid, self.mem, self.ranges)
            try:
                self.runout.prepare()
            except HotpatchError:  # no room near the code, say: wait as before
                self.runout.plan = None

    def _close_runout(self) -> None:
        if self.runout is not None:
            self.advanced += self.runout.advanced
            self.runout.close()
            self.runout = None

    def try_complete(self, write: bool) -> AttemptResult:
        """One attempt: stop every thread, check, write if safe, release.
        Between stop and release the stop, scan, writes and release are C;
        Python runs only a maps re-read (a thread stack born after we read
        them), the DWARF unwinding of flagged threads (once an attempt was
        blocked) and harness checks."""
        maps = read_maps(self.pid)
        world = World(self.pid).seize()
        lo_hi = [(r.start, r.end) for r in self.ranges]
        late: list[int] = []
        t0 = world.lib.kp_now_us()
        try:
            # Stop at normal priority: interrupted threads must get a CPU to
            # reach their stop, and at SCHED_FIFO our polling keeps them off
            # ours (64 threads: 7 ms -> 0.6 ms; 256: 34 ms -> 3 ms).
            late = world.stop(STOP_TIMEOUT)
            stop_us = world.lib.kp_now_us() - t0
            with realtime():  # from here on, nothing of the target should run
                unsafe = world.scan(lo_hi, maps) if not late else 0
                if unsafe and any(t.unsafe == Verdict.STACK_UNKNOWN for t in world.threads()):
                    unsafe = world.scan(lo_hi, read_maps(self.pid))
                rescan = lambda: world.scan(lo_hi, maps)  # noqa: E731
                if unsafe and self.runout is not None:  # hot functions, before any slow path
                    unsafe = self.runout.advance(world, unsafe, rescan, stop_us)
                if unsafe and self.unwinder is not None:
                    unsafe -= self._precise(world)
                if unsafe and self.runout is not None:  # the deeper ones were false positives
                    unsafe = self.runout.advance(world, unsafe, rescan, stop_us)
                vetoes = self._run_checks(world) if not late and not unsafe else []
                if not late and not unsafe and not vetoes and write:
                    self._write_all(world)
                    interrupts.commit()  # the change is made: the command must complete
                verdicts = [(t.tid, t.unsafe, t.hit_value) for t in world.threads() if t.unsafe]
                world.release()
        finally:
            world.release()  # no-op unless something above raised
            pause = world.lib.kp_now_us() - t0
        self.longest_pause_us = max(self.longest_pause_us, pause)
        self.stopped_us += pause
        if late or verdicts or vetoes:
            blockers = self._blockers(verdicts, late) + [
                Blocker(tid, quiescence.thread_name(self.pid, tid), reason) for tid, reason in vetoes]
            return AttemptResult(False, pause, blockers,
                                 in_rip=any(v == Verdict.IN_RIP for _, v, _ in verdicts))
        return AttemptResult(True, pause)

    def _precise(self, world: World) -> int:
        """Unwind the flagged threads with DWARF CFI (slow path, in the
        window): a stale address the conservative scan saw in a dead stack
        slot is dismissed when the real call chain is complete and clean.
        A thread whose rip is in busy code is never dismissed."""
        dismissed = 0
        for t in world.threads():
            if t.unsafe not in (Verdict.IN_RIP, Verdict.ON_STACK):
                continue
            frames, complete = self.unwinder.unwind({k: getattr(t.regs, k) for k in REG_NAMES}, 64)
            pcs = [f.pc for f in frames]
            self._backtraces[t.tid] = pcs
            if t.unsafe == Verdict.ON_STACK and complete and quiescence.frames_are_safe(pcs, self.ranges):
                t.unsafe = Verdict.SAFE
                dismissed += 1
        return dismissed

    def _run_checks(self, world: World) -> list[tuple[int, str]]:
        """Harness checks, inside the window (they may read memory/registers)."""
        if not self.checks:
            return []
        view = harness.StoppedView(self.pid, self.mem, [
            harness.StoppedThread(t.tid, {k: getattr(t.regs, k) for k in REG_NAMES})
            for t in world.threads() if t.state == world.lib.KP_STOPPED])
        vetoes = []
        for h in self.checks:
            try:
                found = list(h.check(view))
            except Exception as e:  # a plugin's bug: refuse to switch, say whose
                raise HotpatchError(
                    f"harness {h.name} check failed: {type(e).__name__}: {e}; nothing was switched") from None
            vetoes += [(tid, f"{reason} (harness {h.name})") for tid, reason in found]
        return vetoes

    def _write_all(self, world: World) -> None:
        ffi, lib = world.ffi, world.lib
        bufs = [ffi.from_buffer(b) for _, b in self.writes]
        failed = lib.kp_write_all(
            self.mem.mem_fd(), len(self.writes),
            ffi.new("unsigned long[]", [a for a, _ in self.writes]),
            ffi.new("unsigned char *[]", bufs),
            ffi.new("unsigned long[]", [len(b) for _, b in self.writes]))
        if failed >= 0:
            self._undo_partial()
            raise RemoteError(f"writing into process {self.pid} failed at write {failed}; nothing was switched")

    def _undo_partial(self) -> None:
        """Still inside the window: put back what landed (all or nothing)."""
        for f in self.functions:
            before = f.old_bytes if self.direction is Direction.PATCH else f.new_bytes
            try:
                self.mem.write(f.addr, bytes.fromhex(before))
            except HotpatchError:
                pass

    def _blockers(self, verdicts, late) -> list[Blocker]:
        out = [quiescence.blocker(self.pid, tid, v, val, self.ranges, self.target.symbolize,
                                  self._backtraces.get(tid, ()))
               for tid, v, val in verdicts]
        notes = self.runout.notes if self.runout is not None else {}
        out = [replace(b, reason=f"{b.reason}; moving it out failed: it {notes[b.tid]}")
               if b.tid in notes else b for b in out]
        out += [quiescence.blocker(self.pid, tid, Verdict.NOT_STOPPED, 0, self.ranges, self.target.symbolize)
                for tid in late]
        return out

    # -- complete ------------------------------------------------------------------
    def complete(self, result: AttemptResult) -> None:
        """The window wrote the states; mirror them here, with the stops'
        timings (a cutover's record keeps them; a revert's are reported, its
        record goes with cleanup)."""
        e = self.edition
        e.advanced = self.advanced + (self.runout.advanced if self.runout else 0)
        e.move(self.direction.during)
        e.move(self.direction.outcome)
        if self.direction is Direction.PATCH:
            e.pause_us, e.attempts = result.pause_us, self.attempts
            e.longest_pause_us, e.stopped_us = self.longest_pause_us, self.stopped_us
            e.applied_at = time.time()
            self.mem.write(e.record_addr, e.header())
        else:  # the apply's figures stay: they say what the target felt then
            e.reverted_at, e.revert_pause_us = time.time(), result.pause_us

