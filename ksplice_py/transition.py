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

import random
import time
from dataclasses import dataclass, field, replace

from . import editions as ed
from . import consistency, harness, interrupts, quiescence, runout
from .consistency import Consistency
from .errors import HotpatchError, NotQuiescent, PatchMismatch, RemoteError, TargetGone
from .lifecycle import Direction
from .maps import read_maps
from .quiescence import Blocker, CodeRange, Verdict
from .target import Target
from .tracer import Known, StackCopy, Window, World

REG_NAMES = ("rip", "rsp", "rbp", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10",
             "r11", "r12", "r13", "r14", "r15", "orig_rax", "fs_base")
STOP_TIMEOUT = 0.2  # longest wait for every thread to reach its stop, per attempt


@dataclass
class AttemptResult:
    done: bool
    pause_us: float = 0.0
    blockers: list[Blocker] = field(default_factory=list)
    verdicts: list[tuple[int, int, int]] = field(default_factory=list)  # (tid, verdict, address)
    late: bool = False  # a thread did not stop, or a harness vetoed


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
            + runout.leftovers(runout.areas(self.mem, [edition, *others])))
        self.checks = [h for h in self.harnesses if h.check]
        self.writes = self._writes()
        # What is there now, to put back if a write fails half-way (in C).
        undo = [self.mem.read(addr, len(data)) for addr, data in self.writes]
        self._window_args = ([(r.start, r.end) for r in self.ranges],
                             [(a, d, u) for (a, d), u in zip(self.writes, undo)])
        self._window: Window | None = None
        self.unwinder = None  # an unwind.Unwinder, built after a first blocked attempt
        self._known: dict[int, Known] = {}  # threads precise unwinding cleared, as they were
        self._copies: list[StackCopy] = []  # flagged stacks of the last attempt
        self._vetoes: list[tuple[int, str]] = []
        self.last_split: dict[str, float] = {}
        self.runout: runout.Runout | None = None  # the run-out copy (hot functions), while it is out
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
        return quiescence.split_parts(self.target.symbols, f.symbol)

    def _copyable(self) -> list[CodeRange]:
        """What the run-out copy holds: the retired code threads run out of
        in a few instructions. Not an earlier edition's memory nor a
        harness's critical code (big; waited for, as before)."""
        if self.direction is Direction.PATCH and self.edition.consistency == Consistency.NEW_CALLS:
            return self.ranges
        if self.direction is Direction.PATCH:
            return quiescence.old_code(self.functions, self._split_parts)
        return runout.without(quiescence.unpatch_ranges(self.edition, self.functions), self.edition.runout)

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
        self._open_runout()
        try:
            return self._retry(deadline, timeout)
        finally:
            self._close_runout()

    def _retry(self, deadline: float, timeout: float) -> AttemptResult:
        quick_retry = False
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
            if self._worth_retrying_now(result) and not quick_retry and remaining > 0:
                quick_retry = True  # once in a row: never a busy loop of stops
                continue
            quick_retry = False
            if remaining <= 0:
                within = f"within {timeout:g}s" if timeout else "at once (--timeout 0: one try)"
                raise NotQuiescent(
                    f"no safe moment to {self.direction.verb} edition {self.edition.id} {within} "
                    f"({self.attempts} attempts): {quiescence.summarize(result.blockers)}; "
                    f"retry later or with a longer --timeout",
                    blockers=result.blockers, attempts=self.attempts)
            sleep_backoff(self.attempts, remaining)

    def load_unwinder(self) -> None:
        """Ready the DWARF unwinder once an attempt was blocked, and unwind
        the stacks that attempt copied: it dismisses conservative false
        positives and explains who blocks. Not built up front: most
        cutovers never need it."""
        if self.unwinder is None:
            from .unwind import Unwinder  # pyelftools' DWARF parser: only when needed
            self.unwinder = Unwinder(self.pid, self.mem, read_maps(self.pid))
            self.unwinder.preload()
        self._unwind_copies()

    def probe(self) -> AttemptResult:
        """A check without writing; a blocked probe is retried once with
        precise unwinding so its verdict and explanation are the real ones."""
        self._open_runout()
        try:
            self.attempts += 1
            result = self.try_complete(write=False)
            if not result.done:
                self.load_unwinder()
                self.attempts += 1
                result = self.try_complete(write=False)
        finally:
            self._close_runout()
        return result

    def _open_runout(self) -> None:
        """Hot functions (runout.py): write the run-out copy into the
        edition's area, so that any attempt can move threads executing
        retired code out of it instead of waiting for them."""
        if self.edition.runout and self.runout is None:
            r = runout.Runout(self.pid, self.mem, self.edition.runout, self._copyable(), self.ranges)
            if r.prepare(read_maps(self.pid)):
                self.runout = r

    def _close_runout(self) -> None:
        if self.runout is not None:
            self.advanced += self.runout.advanced
            self.runout.close()
            self.runout = None

    def try_complete(self, write: bool) -> AttemptResult:
        """One attempt: stop every thread, scan, write if safe, release —
        all in C (World.run). Everything it needs is computed here, before
        any thread stops; precise unwinding of the threads it flags runs
        after release, on copies of their stacks, and its verdict counts in
        the next attempt for every thread whose registers and stack are
        byte for byte the same (C compares them)."""
        if self._window is None:  # built once: ranges, writes, undo bytes, the arena
            self._window = Window(self.pid, self.mem.mem_fd(), *self._window_args, write=write,
                                  stop_timeout_s=STOP_TIMEOUT)
        window = self._window
        window.c.write = int(write)
        maps = read_maps(self.pid)
        window.set_stacks(maps)
        window.set_known(list(self._known.values()))
        world = World(self.pid).seize()
        self._vetoes = []
        try:
            done = world.run(window, self._run_checks if self.checks else None,
                             self._advance_step(maps) if self.runout is not None else None)
            if done:  # signals are held for the attempt: none falls in between
                interrupts.commit()  # the change is made: the command must complete
        finally:
            world.release()  # no-op unless something above raised
        c = window.c
        pause = c.pause_us
        self.last_split = {"stop": c.stop_us, "scan": c.scan_us, "write": c.write_us,
                           "release": c.release_us}  # µs: where the pause went
        self.longest_pause_us = max(self.longest_pause_us, pause)
        self.stopped_us += pause
        threads = world.verdicts()
        if all(t.state == world.lib.KP_GONE for t in threads):
            raise TargetGone(f"process {self.pid} exited")
        if c.failed_write >= 0:
            raise RemoteError(f"writing into process {self.pid} failed at write {c.failed_write}; "
                              "nothing was switched")
        self._copies = window.stack_copies(threads)
        if self.unwinder is not None:
            self._unwind_copies()
        verdicts = [(t.tid, t.unsafe, t.hit_value) for t in threads if t.unsafe]
        late = bool(c.late)
        if done or (not write and not late and not verdicts and not self._vetoes):
            return AttemptResult(True, pause)
        blockers = self._blockers(verdicts) + [
            Blocker(tid, quiescence.thread_name(self.pid, tid), reason) for tid, reason in self._vetoes]
        return AttemptResult(False, pause, blockers, verdicts, bool(late or self._vetoes))

    def _advance_step(self, maps):
        """Hot functions (runout.py): the step that moves threads out of
        retired code, run by World.run between the scan and the write."""
        lo_hi = [(r.start, r.end) for r in self.ranges]
        c = self._window.c

        def step(world: World, unsafe: int) -> int:
            return self.runout.advance(world, unsafe, lambda: world.scan(lo_hi, maps), c.stop_us)
        return step

    def _worth_retrying_now(self, result: AttemptResult) -> bool:
        """Blocked only by threads unwinding has just cleared (or whose stack
        was born after we read the maps): the next attempt will likely pass."""
        return bool(result.verdicts) and not result.late and all(
            (v == Verdict.ON_STACK and tid in self._known) or v == Verdict.STACK_UNKNOWN
            for tid, v, _ in result.verdicts)

    def _unwind_copies(self) -> None:
        """Unwind the stacks the last attempt copied (the threads run
        meanwhile: this reads only the copies). A thread whose real call
        chain is complete and clean is remembered as it was."""
        from .unwind import StackSnapshot
        for copy in self._copies:
            reader = StackSnapshot(copy)
            frames, complete = self.unwinder.unwind(copy.regs, 64, reader=reader)
            pcs = [f.pc for f in frames]
            self._backtraces[copy.tid] = pcs
            if complete and quiescence.frames_are_safe(pcs, self.ranges):
                # the verdict rests on the registers and the bytes the walk read
                self._known[copy.tid] = Known(copy.tid, copy.raw_regs, copy.stack[:reader.used])
            else:
                self._known.pop(copy.tid, None)
        self._copies = []

    def _run_checks(self, stopped) -> bool:
        """Harness checks: the one Python that runs with the threads stopped
        (between scan and write), only for a harness that brings one."""
        view = harness.StoppedView(self.pid, self.mem, [
            harness.StoppedThread(t.tid, {k: getattr(t.regs, k) for k in REG_NAMES}) for t in stopped])
        vetoes = []
        for h in self.checks:
            try:
                found = list(h.check(view))
            except Exception as e:  # a plugin's bug: refuse to switch, say whose
                raise HotpatchError(
                    f"harness {h.name} check failed: {type(e).__name__}: {e}; nothing was switched") from None
            vetoes += [(tid, f"{reason} (harness {h.name})") for tid, reason in found]
        self._vetoes = vetoes
        return not vetoes

    def _blockers(self, verdicts) -> list[Blocker]:
        out = [quiescence.blocker(self.pid, tid, v, val, self.ranges, self.target.symbolize,
                                  self._backtraces.get(tid, ()))
               for tid, v, val in verdicts]
        notes = self.runout.notes if self.runout is not None else {}
        return [replace(b, reason=f"{b.reason}; moving it out failed: it {notes[b.tid]}")
                if b.tid in notes else b for b in out]

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

