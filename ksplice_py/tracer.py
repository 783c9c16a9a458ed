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

from . import native
from .constants import (ERESTART_RESTARTBLOCK, ERESTARTNOHAND, ERESTARTNOINTR, ERESTARTSYS, MAP_ANONYMOUS,
                        MAP_PRIVATE, MFD_CLOEXEC, PAGE_SIZE, PROT_EXEC, PROT_READ, PROT_WRITE, SYSCALLS,
                        syscall_failed)
from .errors import AccessDenied, NoSuchProcess, RemoteError, TargetGone
from .identity import status_field
from .maps import Mapping

MAX_THREADS = 1 << 20


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
                if rc == -errno.EPERM and _tracer_of(self.pid, tid) == os.getpid():
                    # cloned by a thread we had seized: auto-attached to us
                    # (PTRACE_O_TRACECLONE); it reports its own stop later
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
    def stop(self, timeout_s: float) -> list[int]:
        """Stop all threads. Returns tids that did not stop in time."""
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
        """Conservative scan (C); per-thread verdicts land in ``unsafe``."""
        ranges = _merge(ranges)
        stacks = _merge([(m.start, m.end) for m in maps if m.writable])
        ffi = self.ffi
        lo = ffi.new("unsigned long[]", [r[0] for r in ranges] or [0])
        hi = ffi.new("unsigned long[]", [r[1] for r in ranges] or [0])
        slo = ffi.new("unsigned long[]", [s[0] for s in stacks] or [0])
        shi = ffi.new("unsigned long[]", [s[1] for s in stacks] or [0])
        return self.lib.kp_scan(self.pid, self._arr, self._n[0], lo, hi, len(ranges),
                                slo, shi, len(stacks), max_scan)

    def release(self) -> None:
        """Detach every stopped thread (re-delivering caught signals).
        Threads that never stopped (or were seized but never interrupted) are
        stopped briefly so none is left in a ptrace-stop behind us; the
        kernel detaches the rest when we exit."""
        release_threads(self.lib, self.pid, self._arr, self._n, self._cap)

    def __enter__(self) -> "World":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def release_threads(lib, pid: int, arr, n, cap: int) -> None:
    """Detach every thread of a C array; one still running (never stopped,
    or seized and never interrupted) is stopped briefly first, so none is
    left in a ptrace-stop behind us."""
    if not n[0]:
        return
    lib.kp_release_all(pid, arr, n[0])
    if any(arr[i].state == lib.KP_RUNNING for i in range(n[0])):
        lib.kp_stop_all(arr, n, cap, 200_000)
        lib.kp_release_all(pid, arr, n[0])
    n[0] = 0


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(a, b) for a, b in out]


# -- syscall injection ------------------------------------------------------

INJECTOR_NAME = "ksplice_py:injector"
_ERESTART = (-ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND)
# Save area order (page 2 of the injector): what the stub pops, then rsp, rip.
_SAVED = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp",
          "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "eflags")


def entry_stub() -> bytes:
    """``syscall``, then put every register back from the save area on the
    next page and jump to the saved rip: a thread whose tracer dies in the
    middle of an injected syscall resumes exactly where it was, by itself."""
    code = bytearray(b"\x0f\x05")                              # syscall
    code += b"\x48\x8d\x25" + (PAGE_SIZE - (len(code) + 7)).to_bytes(4, "little")  # lea rsp,[save area]
    code += b"\x58\x5b\x59\x5a\x5e\x5f\x5d"                   # pop rax rbx rcx rdx rsi rdi rbp
    code += b"".join(bytes([0x41, 0x58 + i]) for i in range(8))  # pop r8 .. r15
    code += b"\x9d"                                             # popfq
    rsp_slot, rip_slot = PAGE_SIZE + 8 * len(_SAVED), PAGE_SIZE + 8 * (len(_SAVED) + 1)
    code += b"\x48\x8b\x25" + (rsp_slot - (len(code) + 7)).to_bytes(4, "little")  # mov rsp,[saved rsp]
    code += b"\xff\x25" + (rip_slot - (len(code) + 6)).to_bytes(4, "little")       # jmp [saved rip]
    return bytes(code)


def continuation(regs) -> bytes:
    """The save area: the registers the thread must resume with if it has to
    restore itself, with the kernel's syscall-restart rule already applied
    (an interrupted read/futex restarts; nanosleep via restart_syscall)."""
    r = {k: getattr(regs, k) for k in (*_SAVED, "rsp", "rip", "orig_rax")}
    rax = r["rax"] - (1 << 64) if r["rax"] >= 1 << 63 else r["rax"]
    if r["orig_rax"] < 1 << 63 and rax in _ERESTART:
        r["rax"], r["rip"] = r["orig_rax"], r["rip"] - 2
    elif r["orig_rax"] < 1 << 63 and rax == -ERESTART_RESTARTBLOCK:
        r["rax"], r["rip"] = SYSCALLS["restart_syscall"], r["rip"] - 2
    r["eflags"] &= ~0x10100  # never resume with TF/RF set
    return b"".join(r[k].to_bytes(8, "little") for k in (*_SAVED, "rsp", "rip"))


class Injector:
    """One thread of the target, borrowed to run raw syscalls.

    Only that thread pauses (a few µs per syscall); the others keep running.
    Raw syscalls are safe at any instruction: unlike calling dlopen or malloc
    in the target they take no user-space lock. They run from the entry stub
    of a small ``ksplice_py:injector`` mapping (created once per process and
    kept), so the thread is whole again at any instant the tool might die."""

    def __init__(self, pid: int, mem, tid: int | None = None) -> None:
        self.pid, self.mem = pid, mem
        self.ffi, self.lib = native.load()
        self.tid = tid or pid
        self._t = self.ffi.new("struct kp_thread[]", 8)
        self._n = self.ffi.new("int *", 0)
        self.entry = 0

    def __enter__(self) -> "Injector":
        self._borrow()
        try:
            self.entry = self._find_injector() or self._create_injector()
            self._arm(self.entry)
        except BaseException:
            self._release()
            raise
        return self

    def _borrow(self) -> None:
        live = list_tids(self.pid)  # zombies (an exited leader) excluded
        tids = ([self.tid] if self.tid in live else []) + [t for t in live if t != self.tid]
        # One still ours (a World's stop it missed) cannot be borrowed: skip those.
        tids = [t for t in tids if _tracer_of(self.pid, t) != os.getpid()]
        for tid in tids[:4]:  # a thread may be stuck (D state); try a few
            # No PTRACE_O_TRACECLONE: this thread must never stop inside a
            # clone() (see kp_inject_syscall), and its children are not ours.
            rc = self.lib.kp_seize(tid, self.lib.KP_SYSCALL_STOPS)
            if rc == -errno.ESRCH:
                continue
            if rc != 0:
                raise _seize_error(self.pid, tid, -rc)
            self._t[0].tid, self._t[0].state, self._n[0] = tid, self.lib.KP_RUNNING, 1
            if self.lib.kp_stop_all(self._t, self._n, 8, 500_000) == 0 and \
                    self._t[0].state == self.lib.KP_STOPPED:
                self.tid = tid
                return
            self._release()
        raise TargetGone(f"no thread of process {self.pid} could be stopped to run a syscall")

    def _arm(self, entry: int) -> None:
        self.mem.write(entry + PAGE_SIZE, continuation(self._t[0].regs))

    def _find_injector(self) -> int:
        from .maps import read_maps
        for m in read_maps(self.pid):
            if m.path.startswith(f"/memfd:{INJECTOR_NAME}") and m.executable and m.offset == 0:
                return m.start
        return 0

    def _create_injector(self) -> int:
        """First injection into this process. One bare syscall from a libc
        ``syscall`` instruction maps a scratch page (the only moment, once
        per process, where our death would leave the thread with our
        registers); everything else already runs from a self-restoring stub."""
        from .maps import read_maps
        self.entry = find_syscall_gadget(self.pid, read_maps(self.pid), self.mem.read)
        scratch = self.checked("mmap", 0, 2 * PAGE_SIZE, PROT_READ | PROT_WRITE | PROT_EXEC,
                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        stub = entry_stub()
        self.mem.write(scratch, stub)
        self._arm(scratch)
        self.entry = scratch
        name_addr = scratch + PAGE_SIZE + 512  # past the save area
        self.mem.write(name_addr, INJECTOR_NAME.encode() + b"\0")
        fd = self.checked("memfd_create", name_addr, MFD_CLOEXEC)
        try:
            self.checked("ftruncate", fd, 2 * PAGE_SIZE)
            page = self.checked("mmap", 0, 2 * PAGE_SIZE, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0)
        finally:
            self("close", fd)
        self.checked("mprotect", page + PAGE_SIZE, PAGE_SIZE, PROT_READ | PROT_WRITE)  # the save area
        self.mem.write(page, stub)
        self._arm(page)
        self.entry = page
        self.checked("munmap", scratch, 2 * PAGE_SIZE)
        return page

    def __call__(self, name: str, *args: int) -> int:
        a = [int(x) for x in args] + [0] * (6 - len(args))
        ret = self.ffi.new("long *")
        rc = self.lib.kp_inject_syscall(self._t, self.entry, SYSCALLS[name], *a, ret)
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
        """Bytes of the injector's data page free for syscall arguments."""
        return self.entry + PAGE_SIZE + 512

    def _release(self) -> None:
        release_threads(self.lib, self.pid, self._t, self._n, 8)

    def __exit__(self, *exc: object) -> None:
        self._release()


def find_syscall_gadget(pid: int, maps: list[Mapping], read) -> int:
    """Address of a ``syscall`` instruction (0f 05) in the target's code;
    any such byte pair executes as syscall when jumped to directly."""
    def rank(m: Mapping) -> int:
        return 0 if "libc" in m.path else 1 if m.path == "[vdso]" else 2
    for m in sorted((m for m in maps if m.executable and m.readable), key=rank):
        size = min(m.end - m.start, 1 << 20)
        for off in range(0, size, 65536):
            try:
                chunk = read(m.start + off, min(65536 + 1, size - off))
            except Exception:
                break
            i = chunk.find(b"\x0f\x05")
            if i >= 0:
                return m.start + off + i
    raise RemoteError(f"no syscall instruction found in process {pid}'s code")
