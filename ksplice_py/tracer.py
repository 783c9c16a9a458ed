"""Process control: ptrace over every thread of a target.

Two tools, both context managers that release on every path:

* ``World`` seizes all threads and can stop them all at once (the cutover).
* ``Injector`` borrows one thread for raw syscalls (mmap & co. in prepare).

Threads are seized only for the operation that needs them, never across the
Python work between phases: a seized thread that gets a signal or calls
clone() waits for its tracer, and we do not want the target waiting on our
ELF parsing. If the tool dies, the kernel detaches every tracee.
"""
from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass

from . import native
from .constants import SYSCALLS, syscall_failed
from .errors import AccessDenied, NoSuchProcess, RemoteError, TargetGone
from . import stub
from .identity import status_field
from .maps import Mapping, read_maps

MAX_THREADS = 1 << 20
# How long one borrowed thread may take to stop before the injector stops
# them all instead (Injector._borrow_from_stopped_world).
BORROW_PATIENCE_US = 20_000
WORLD_STOP_TIMEOUT = 0.5
PTRACE_EVENT_STOP = 128


def list_tids(pid: int) -> list[int]:
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        raise TargetGone(f"process {pid} exited") from None
    return sorted(t for t in tids if not _is_zombie(pid, t))


def _is_zombie(pid: int, tid: int) -> bool:
    # A leader that called pthread_exit stays listed as a zombie; it will
    # never stop, so waiting for it would hang.
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZX"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True


def _tracer_of(pid: int, tid: int) -> int:
    return status_field(f"/proc/{pid}/task/{tid}/status", "TracerPid") or 0


def _still_ours(pid: int, rc: int, tid: int) -> bool:
    """PTRACE_SEIZE failed with EPERM because this thread of ours already
    traces ``tid`` (TracerPid names the tracing *thread*): a clone of a
    thread we seized, or a thread an earlier release could not stop (see
    release_threads) and so could not detach. Not a permission problem."""
    return rc == -errno.EPERM and _tracer_of(pid, tid) == threading.get_native_id()


def check_target(pid: int) -> None:
    """Refuse what can never be patched, before touching it."""
    if pid <= 0:
        raise NoSuchProcess(f"invalid pid {pid}")
    if pid == os.getpid():
        raise AccessDenied("refusing to patch the hotpatch process itself")
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except FileNotFoundError:
        raise NoSuchProcess(f"no process with pid {pid}") from None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if fields.get("State", "").split()[:1] in (["Z"], ["X"]):
        raise TargetGone(f"process {pid} has exited (it is a zombie waiting for its parent)")
    # Kernel threads have no user address space: no VmSize line, no exe.
    if "VmSize" not in fields:
        raise NoSuchProcess(f"pid {pid} is a kernel thread; only user processes can be patched")
    tracer = int(fields.get("TracerPid", "0").strip() or 0)
    if tracer and tracer != os.getpid():
        raise AccessDenied(
            f"process {pid} is already traced by pid {tracer} (a debugger?); detach it first"
        )


def _seize_error(pid: int, tid: int, err: int) -> Exception:
    if err == errno.EPERM:
        try:
            check_target(pid)
        except AccessDenied as e:
            return e
        return AccessDenied(f"not allowed to trace process {pid} (need root or CAP_SYS_PTRACE)")
    return RemoteError(f"cannot attach to thread {tid} of process {pid}: {os.strerror(err)}")


class World:
    """Every thread of one process, seized; ``stop()`` freezes them all."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.ffi, self.lib = native.load()
        self._cap = 64
        self._arr = self.ffi.new("struct kp_thread[]", self._cap)
        self._n = self.ffi.new("int *", 0)
        self._rt: tuple[int, int] | None = None  # the scheduling to restore after a realtime stop

    # -- attach -----------------------------------------------------------
    def seize(self) -> "World":
        """Seize every thread; repeat until no new thread appears (threads
        cloned by an already-seized thread are auto-attached)."""
        seen: set[int] = set()
        while True:
            fresh = [t for t in list_tids(self.pid) if t not in seen]
            if not fresh:
                break
            for tid in fresh:
                seen.add(tid)
                rc = self.lib.kp_seize(tid, self.lib.KP_FOLLOW_CLONES)
                if rc == -errno.ESRCH:
                    continue  # the thread exited meanwhile
                if _still_ours(self.pid, rc, tid):
                    # auto-attached clone or left by an earlier release:
                    # it reports its own stop later
                    self._append(tid)
                    continue
                if rc != 0:
                    if not self._n[0]:
                        raise _seize_error(self.pid, tid, -rc)
                    self.release()
                    raise _seize_error(self.pid, tid, -rc)
                self._append(tid)
        if not self._n[0]:
            raise TargetGone(f"process {self.pid} exited")
        return self

    def _append(self, tid: int) -> None:
        if self._n[0] == self._cap:
            self._grow(self._cap * 2)
        t = self._arr[self._n[0]]
        t.tid = tid
        t.state = self.lib.KP_RUNNING
        self._n[0] += 1

    def _grow(self, cap: int) -> None:
        cap = min(cap, MAX_THREADS)
        new = self.ffi.new("struct kp_thread[]", cap)
        self.ffi.memmove(new, self._arr, self.ffi.sizeof("struct kp_thread") * self._n[0])
        self._arr, self._cap = new, cap

    # -- the stopped window ----------------------------------------------
    def stop(self, timeout_s: float, realtime: bool = False) -> list[int]:
        """Stop all threads. Returns tids that did not stop in time.
        ``realtime``: at SCHED_FIFO, as the stopped window stops them, until
        ``release``."""
        if realtime and self._rt is None:
            old = self.ffi.new("int[2]")
            self.lib.kp_rt_enter(old, old + 1)
            self._rt = (old[0], old[1])
        # Room for threads born during the stop, grown before, not inside;
        # a thread born past the room would stay in its auto-attach stop.
        if self._cap - self._n[0] < 1024:
            self._grow(self._n[0] + 1024)
        late = self.lib.kp_stop_all(self._arr, self._n, self._cap, int(timeout_s * 1e6))
        if self.alive() == 0:
            raise TargetGone(f"process {self.pid} exited")
        if late:
            return [t.tid for t in self.threads() if t.state == self.lib.KP_RUNNING]
        return []

    def threads(self):
        return [self._arr[i] for i in range(self._n[0])]

    def alive(self) -> int:
        return sum(1 for t in self.threads() if t.state != self.lib.KP_GONE)

    def scan(self, ranges: list[tuple[int, int]], maps: list[Mapping], max_scan: int = 8 << 20) -> int:
        """Conservative scan (C) of the stopped threads; per-thread verdicts
        land in ``unsafe``. Returns how many are unsafe."""
        ranges = _merge(ranges)
        stacks = stack_spans(maps)
        ffi = self.ffi
        lo = ffi.new("unsigned long[]", [r[0] for r in ranges] or [0])
        hi = ffi.new("unsigned long[]", [r[1] for r in ranges] or [0])
        slo = ffi.new("unsigned long[]", [s[0] for s in stacks] or [0])
        shi = ffi.new("unsigned long[]", [s[1] for s in stacks] or [0])
        return self.lib.kp_scan(self.pid, self._arr, self._n[0], lo, hi, len(ranges),
                                slo, shi, len(stacks), max_scan)

    def run(self, window: "Window", between=None, advance=None) -> bool:
        """The stopped window, in C (kp_window): stop -> scan -> write ->
        release. Python runs while the threads are stopped only when asked,
        through the kp_window_open/close split, between scan and write:
        ``advance(world, unsafe) -> unsafe`` (hot functions, runout.py: moves
        threads out of retired code, then re-scans) when the scan flagged
        threads, then ``between(stopped_threads) -> bool`` (a harness's
        check) when none is flagged. Returns whether the writes were made;
        every thread is released either way, its verdict kept for reading."""
        if self._cap - self._n[0] < 1024:  # room for threads born during the stop
            self._grow(self._n[0] + 1024)
        c = window.c
        if between is None and advance is None:
            done = self.lib.kp_window(self._arr, self._n, self._cap, c)
        else:
            go = False  # a step that raises writes nothing
            try:
                ok = self.lib.kp_window_open(self._arr, self._n, self._cap, c)
                if not ok and advance is not None and not c.late and c.unsafe:
                    c.unsafe = advance(self, c.unsafe)  # kp_window_close writes only if 0
                    ok = not c.unsafe
                if ok:
                    go = between is None or bool(
                        between([t for t in self.threads() if t.state == self.lib.KP_STOPPED]))
            finally:
                done = self.lib.kp_window_close(self._arr, self._n, self._cap, c, int(go))
        self.count, self._n[0] = self._n[0], 0  # released; verdicts stay readable
        return bool(done)

    def verdicts(self) -> list:
        """Threads of the last ``run`` (released since), as C structs."""
        return [self._arr[i] for i in range(self.count)]

    def release(self) -> None:
        """Detach every stopped thread (re-delivering caught signals).
        Threads that never stopped (or were seized but never interrupted) are
        stopped briefly so none is left in a ptrace-stop behind us; the
        kernel detaches the rest when we exit."""
        release_threads(self.lib, self.pid, self._arr, self._n, self._cap)
        if self._rt is not None:
            self.lib.kp_rt_leave(*self._rt)
            self._rt = None

    def __enter__(self) -> "World":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def release_threads(lib, pid: int, arr, n, cap: int) -> None:
    """Detach every thread of a C array (kp_release_world). A thread that
    does not stop even for the second try (D state, or no CPU for 200 ms on
    a loaded machine) cannot be detached: it stays seized by this thread,
    our interrupt pending, until a later attach meets it (``_still_ours``)
    and releases it, or we exit and the kernel detaches it."""
    lib.kp_release_world(pid, arr, n, cap)


@dataclass(frozen=True)
class Known:
    """A thread precise unwinding cleared, as it was: raw registers and the
    stack bytes from rsp that the walk read (see struct kp_known)."""

    tid: int
    regs: bytes
    stack: bytes


@dataclass(frozen=True)
class StackCopy:
    """A flagged thread's registers and stack, copied inside the window."""

    tid: int
    regs: dict[str, int]
    raw_regs: bytes
    stack: bytes
    whole: bool  # reaches the top of its stack mapping (else cut by the arena's room)


class Window:
    """The stopped window's inputs as C structures, built before any thread
    stops (the window itself runs no Python)."""

    ARENA = 1 << 20  # stack copies of flagged threads, for unwinding after release

    def __init__(self, pid: int, memfd: int, ranges: list[tuple[int, int]],
                 writes: list[tuple[int, bytes, bytes]], write: bool, stop_timeout_s: float) -> None:
        self.ffi, self.lib = native.load()
        ffi = self.ffi
        self.c = c = ffi.new("struct kp_window *")
        self._keep: list = []
        c.pid, c.memfd, c.write, c.realtime = pid, memfd, int(write), 1
        c.stop_timeout_us, c.max_scan = int(stop_timeout_s * 1e6), 8 << 20
        ranges = _merge(ranges)
        c.lo, c.hi = self._ulongs([r[0] for r in ranges]), self._ulongs([r[1] for r in ranges])
        c.nranges = len(ranges)
        c.nwrites = len(writes)
        c.waddr = self._ulongs([a for a, _, _ in writes])
        c.wlen = self._ulongs([len(b) for _, b, _ in writes])
        c.wbuf = self._bufs([b for _, b, _ in writes])
        c.ubuf = self._bufs([u for _, _, u in writes])
        self.arena = ffi.new("unsigned char[]", self.ARENA)
        c.arena, c.arena_cap = self.arena, self.ARENA
        self.set_known([])

    def _ulongs(self, values: list[int]):
        arr = self.ffi.new("unsigned long[]", values or [0])
        self._keep.append(arr)
        return arr

    def _bufs(self, blobs: list[bytes]):
        bufs = [self.ffi.from_buffer(b) for b in blobs]
        arr = self.ffi.new("unsigned char *[]", bufs or [self.ffi.NULL])
        self._keep += [blobs, bufs, arr]
        return arr

    def set_stacks(self, maps: list[Mapping]) -> None:
        """Writable mappings, where each thread's stack top is found."""
        stacks = stack_spans(maps)
        self._stacks = tuple(self.ffi.new("unsigned long[]", [s[i] for s in stacks] or [0]) for i in (0, 1))
        self.c.stack_lo, self.c.stack_hi = self._stacks
        self.c.nstacks = len(stacks)

    def set_known(self, known: list[Known]) -> None:
        ffi = self.ffi
        arr = ffi.new("struct kp_known[]", max(1, len(known)))
        bufs = [ffi.from_buffer(k.stack) for k in known]
        for i, (k, buf) in enumerate(zip(known, bufs)):
            arr[i].tid, arr[i].len, arr[i].stack = k.tid, len(k.stack), buf
            ffi.memmove(ffi.addressof(arr[i], "regs"), k.regs, len(k.regs))
        self._known = (arr, bufs, known)  # alive as long as C may read them
        self.c.known, self.c.nknown = arr, len(known)

    def stack_copies(self, threads) -> list[StackCopy]:
        """The flagged threads' stacks the window copied (after release)."""
        ffi, out = self.ffi, []
        for t in threads:
            if t.unsafe and t.snap_len:
                raw = bytes(ffi.buffer(ffi.addressof(t, "regs"), ffi.sizeof("struct kp_regs")))
                regs = {k: getattr(t.regs, k) for k, _ in ffi.typeof("struct kp_regs").fields}
                stack = bytes(ffi.buffer(self.arena + t.snap_off, t.snap_len))
                out.append(StackCopy(t.tid, regs, raw, stack, bool(t.snap_whole)))
        return out


def stack_spans(maps: list[Mapping]) -> list[tuple[int, int]]:
    """Writable mappings as [lo, hi) spans for finding a thread's stack top.
    Adjacent anonymous private ones are joined (a stack split by mprotect
    must be scanned whole); a file or shared mapping is never part of a
    thread's stack, so scanning stops at it (the status file next to a
    thread stack once made one thread's scan 33 times longer)."""
    spans: list[list[int]] = []
    joinable = False
    for m in sorted((m for m in maps if m.writable), key=lambda m: m.start):
        anon = m.perms[3] == "p" and m.path in ("", "[stack]")
        if spans and joinable and anon and m.start == spans[-1][1]:
            spans[-1][1] = m.end
        else:
            spans.append([m.start, m.end])
        joinable = anon
    return [(a, b) for a, b in spans]


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(a, b) for a, b in out]


# -- syscall injection ------------------------------------------------------



class Injector:
    """One thread of the target, borrowed to run raw syscalls.

    Only that thread pauses (a few µs per syscall); the others keep running
    — unless it takes long to stop, a sign that spinning threads hold every
    CPU: then all are stopped while it is borrowed (_borrow_from_stopped_world).
    Raw syscalls are safe at any instruction: unlike calling dlopen or malloc
    in the target they take no user-space lock. They run from a
    self-restoring stub written into code padding, with its save area on the
    thread's own stack (stub.py), so the thread is whole again at any
    instant the tool might die, and both areas are put back on exit: the
    target keeps no page, descriptor or byte of ours."""

    def __init__(self, pid: int, mem, tid: int | None = None) -> None:
        self.pid, self.mem = pid, mem
        self.ffi, self.lib = native.load()
        self.tid = tid or pid
        self._t = self.ffi.new("struct kp_thread[]", 8)
        self._n = self.ffi.new("int *", 0)
        self.entry = 0
        self.block: stub.StackBlock | None = None
        self._restore: list[tuple[int, bytes]] = []  # (addr, original bytes), put back on exit
        self._stale = False  # the padding held a stub a killed tool left
        self._world: World | None = None  # when every thread was stopped to borrow one

    def __enter__(self) -> "Injector":
        maps = read_maps(self.pid)
        _refuse_shadow_stack(self.pid)
        code = stub.code()
        pad = stub.find_padding(self.pid, maps, len(code), self.mem.read)  # before anything stops
        self._borrow(maps)
        try:
            self._place(pad, code)
        except BaseException:
            self._put_back()
            self._release()
            raise
        return self

    def _borrow(self, maps: list[Mapping]) -> None:
        live = list_tids(self.pid)  # zombies (an exited leader) excluded
        tids = ([self.tid] if self.tid in live else []) + [t for t in live if t != self.tid]
        no_room = 0
        # One still ours (a World's stop it missed) cannot be borrowed: skip those.
        tids = [t for t in tids if _tracer_of(self.pid, t) != os.getpid()]
        for tid in tids[:4]:  # a thread may be stuck (D state); try a few
            # No PTRACE_O_TRACECLONE: this thread must never stop inside a
            # clone() (see kp_inject_syscall), and its children are not ours.
            rc = self.lib.kp_seize(tid, self.lib.KP_SYSCALL_STOPS)
            if rc == -errno.ESRCH or _still_ours(self.pid, rc, tid):
                continue  # gone, or did not stop for an earlier attach: try another
            if rc != 0:
                raise _seize_error(self.pid, tid, -rc)
            self._t[0].tid, self._t[0].state, self._n[0] = tid, self.lib.KP_RUNNING, 1
            if self.lib.kp_stop_all(self._t, self._n, 8, BORROW_PATIENCE_US):
                # Still running: the World adopts it (seized by us, our
                # interrupt pending) rather than wait here to release it.
                return self._borrow_from_stopped_world(maps)
            if self._t[0].state == self.lib.KP_STOPPED:
                block = stub.StackBlock(self._t[0].regs.rsp)
                if block.fits(maps):
                    self.tid, self.block = tid, block
                    return
                no_room += 1
            self._release()
        if no_room:
            raise RemoteError(f"no stopped thread of process {self.pid} has {stub.RET_SKIP + 8 * len(stub.SLOTS) + stub.SCRATCH} "
                              "bytes of mapped stack below its red zone for the syscall stub")
        raise TargetGone(f"no thread of process {self.pid} could be stopped to run a syscall")

    def _borrow_from_stopped_world(self, maps: list[Mapping]) -> None:
        """The CPUs are busy (threads spinning): one thread waits its turn
        behind all of them, for each of its syscalls (measured: 0.1-0.5 s
        each among 256 spinning threads on 2 CPUs), while stopping them all
        takes what one stopped window takes. So stop them all, borrow one,
        and release them all when done."""
        world = World(self.pid).seize()
        try:
            world.stop(WORLD_STOP_TIMEOUT, realtime=True)
            order = sorted(range(world._n[0]), key=lambda i: world._arr[i].tid != self.tid)
            for i in order:
                t = world._arr[i]
                if t.state != self.lib.KP_STOPPED or t.event not in (0, PTRACE_EVENT_STOP):
                    continue
                block = stub.StackBlock(t.regs.rsp)
                if block.fits(maps) and self.lib.kp_set_options(t.tid, self.lib.KP_SYSCALL_STOPS) == 0:
                    self._t, self.tid, self.block, self._world = world._arr + i, t.tid, block, world
                    return
        except BaseException:
            world.release()
            raise
        world.release()
        raise TargetGone(f"no thread of process {self.pid} could be stopped to run a syscall")

    def _place(self, pad: stub.Padding, code: bytes) -> None:
        """Save what we overwrite, then write the stub and the save area."""
        block = self.block
        self._restore.append((block.lo, self.mem.read(block.lo, block.hi - block.lo)))
        here = self.mem.read(pad.addr, len(code))
        if here == code and pad.file_bytes(len(code)) != code:
            self._stale = True  # left by a killed tool; a thread may still be in it
        else:
            self._restore.append((pad.addr, here))
            self.mem.write(pad.addr, code)
        self.pad = pad
        self.mem.write(block.save, stub.save_area(self._t[0].regs))
        self.entry = pad.addr

    def __call__(self, name: str, *args: int) -> int:
        a = [int(x) for x in args] + [0] * (6 - len(args))
        ret = self.ffi.new("long *")
        rc = self.lib.kp_inject_syscall(self._t, self.entry, self.block.save, SYSCALLS[name], *a, ret)
        if rc == -errno.ESRCH:
            raise TargetGone(f"process {self.pid} exited")
        if rc != 0:
            raise RemoteError(f"cannot run {name} in process {self.pid}: {os.strerror(-rc)}")
        return ret[0]

    def checked(self, name: str, *args: int) -> int:
        r = self(name, *args)
        if syscall_failed(r):
            raise RemoteError(f"{name} in process {self.pid} failed: {os.strerror(-r)}")
        return r

    @property
    def scratch(self) -> int:
        """Bytes on the borrowed stack free for syscall arguments (stub.SCRATCH)."""
        return self.block.scratch

    def _put_back(self) -> None:
        """The thread is stopped with its own registers: nothing runs our
        bytes now, so the originals go back (the stack block first: the
        padding is what a killed tool's thread could still need)."""
        while self._restore:
            addr, data = self._restore.pop(0)
            try:
                self.mem.write(addr, data)
            except TargetGone:
                return

    def _release(self) -> None:
        if self._world is not None:
            self._world.release()
            return
        release_threads(self.lib, self.pid, self._t, self._n, 8)

    def __exit__(self, *exc: object) -> None:
        try:
            self._put_back()
        finally:
            self._release()
        if self._stale:
            clear_stale_stub(self.pid, self.mem, self.pad)


def clear_stale_stub(pid: int, mem, pad: stub.Padding) -> bool:
    """Put the file's bytes back over a stub a killed tool left, unless a
    thread is still inside it (then it stays until the next command)."""
    code = stub.code()
    original = pad.file_bytes(len(code))
    if original is None:
        return False
    with World(pid).seize() as world:
        if world.stop(0.2):
            return False
        if any(pad.addr <= t.regs.rip < pad.addr + len(code)
               for t in world.threads() if t.state == world.lib.KP_STOPPED):
            return False
        mem.write(pad.addr, original)
    return True


def _refuse_shadow_stack(pid: int) -> None:
    """The stub returns with `ret`: a thread with a user shadow stack would
    fault on it. (No x86-64 distribution enables one by default yet.)"""
    try:
        with open(f"/proc/{pid}/status") as f:
            features = [ln for ln in f if ln.startswith("x86_Thread_features:")]
    except OSError:
        return
    if features and "shstk" in features[0].split():
        raise RemoteError(f"process {pid} uses a shadow stack (CET); syscall injection is not supported there")
