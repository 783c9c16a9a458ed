"""Hot functions: moving threads out of retired code instead of waiting.

With many threads calling a short function back to back, a moment when no
thread is inside it may never come. But a thread whose *rip* is in retired
code (and no retired return address on its stack) can be advanced out of it
while every other thread stays stopped. How, safely even if we are killed:

* not by single-stepping: the kernel does not clear a tracee's TF flag when
  its tracer dies (``exit_ptrace`` -> ``__ptrace_unlink`` clears only the
  syscall-trace flags; ``user_disable_single_step`` runs only on an explicit
  PTRACE_DETACH), so a pending step trap would kill the target with SIGTRAP;
* not with breakpoints in the code: a leftover int3 does the same.

Instead the thread runs out through a *run-out copy*: the retired code,
relocated into the edition's *run-out area* (a part of its region that
prepare reserves, sized for either direction, zero when unused), where every
way out and every instruction we cannot follow goes through a 48-byte stub::

    lea rsp,[rsp-128]; push rax; push rcx; push r11; mov eax,39; syscall   (prefix)
    pop r11; pop rcx; pop rax; lea rsp,[rsp+128]                          (suffix)
    ret | jmp [dest] | jmp [original instruction]                          (tail)

The tool sets the thread's rip to the copy and resumes it with
PTRACE_SYSCALL (csrc/native/kp_advance.c): the stub's getpid stops it, and
there the registers are set as after the exit. The syscall-trace flag *is*
cleared when a tracer dies, and the stub then restores the registers and
carries on by itself; so a killed tool leaves a thread that just finishes the
old code. A direct call or a return into copied code goes on in the copy
(a register-preserving thunk in front of the new code); an indirect call or
jump, a syscall of the code itself, a signal or the time budget (a spin on a
lock a stopped thread holds) gives up that thread's attempt: it is put back
on the equivalent original instruction, and no thread is ever left in the
copy after the window. The copy is written before the first attempt (mere
writes into the target's memory: no syscall, no stop) and the area zeroed
again when the transition ends, so the very first attempt can move threads.
A copy that is still there when a tool starts was left by a killed one: a
thread may still be finishing old code in it, so it is busy code to every
transition until ``recover`` finds it empty and zeroes it.
"""
from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field
from enum import Enum

import capstone
from capstone import x86

from . import placement
from . import x86relocator as rel
from . import x86writer as w
from .errors import HotpatchError, TrampolineError
from .maps import Mapping, read_maps
from .constants import SYSCALLS
from .quiescence import CodeRange, Verdict
from .tracer import World

STUB_SIZE = 48
STUB_PREFIX = (bytes.fromhex("488d642480" "50" "51" "4153")            # lea rsp,[rsp-128]; push x3
               + b"\xb8" + SYSCALLS["getpid"].to_bytes(4, "little")    # mov eax, getpid
               + b"\x0f\x05")                                           # syscall
STUB_SUFFIX = bytes.fromhex("415b" "59" "58" "488da42480000000")
MAX_AREA = 256 << 10  # retired code needing a bigger copy is waited for, as before
PADDING_RUN = 4  # this many zero-byte or int3 instructions in a row: padding, not code
TRAMPOLINE_INSNS = 16  # a trampoline, its int3 fill and a far jump with its address, decoded
# Time for the advanced threads to get out, per attempt: a base (or twice
# what the stop took, on a loaded machine) plus a share per thread, extended
# by the base whenever a thread gets out (up to 4x; kp_advance_all).
# KSPLICE_PY_ADVANCE_BUDGET_US overrides the base (the crash-safety test
# stretches it to be killed mid-advance).
BUDGET_US = int(os.environ.get("KSPLICE_PY_ADVANCE_BUDGET_US", 2000))
BUDGET_PER_THREAD_US = 40


def budget_us(threads: int, stop_us: float) -> int:
    """Time the advanced threads get, together: each needs a CPU once."""
    return int(max(BUDGET_US, 2 * stop_us) + BUDGET_PER_THREAD_US * threads)


class Stub(Enum):  # KP_STUB_* in kp_advance.h
    EXIT = 1     # leaves the retired code (or returns into copied retired code: goes on there)
    BARRIER = 2  # we cannot follow it: give up, put the thread back
    CALL = 3     # a direct call into copied retired code: followed (a thunk's call)


GIVE_UP = {  # KP_ADV_* -> why a thread was not advanced ("moving it out failed: it ...")
    1: "was in a syscall or signal stop", 2: "was at no instruction the run-out copy holds",
    3: "made a syscall inside it", 4: "reached a call it cannot be followed through",
    5: "got a signal", 6: "did not leave it in time (spinning on a lock?)",
    8: "was lost in the run-out copy",
}


@dataclass(frozen=True)
class StubSpec:
    orig: int       # the original instruction it stands for (put back there)
    kind: Stub
    dest: int = 0   # EXIT: where it leaves to, 0 = the return address
    pop: int = 0    # `ret imm16`
    resume: int = 0  # BARRIER, CALL: where a thread goes on by itself (tool died)
    ret: int = 0    # CALL: the original return address it pushes


@dataclass
class Plan:
    """The copy's layout at ``base``: code to write, and the C tables."""

    base: int
    code: bytes = b""
    orig: list[int] = field(default_factory=list)
    copy: list[int] = field(default_factory=list)
    stubs_at: int = 0
    stubs: list[StubSpec] = field(default_factory=list)


@dataclass(frozen=True)
class Insn:
    addr: int
    size: int
    raw: bytes
    cs: capstone.CsInsn


def decode(code: bytes, addr: int) -> list[Insn]:
    """Linear decode; an undecodable byte is skipped (no instruction starts there)."""
    out: list[Insn] = []
    off = 0
    while off < len(code):
        got = [Insn(i.address, i.size, bytes(i.bytes), i) for i in rel.disasm(code[off:], addr + off)]
        out += got
        if got:
            off = got[-1].addr + got[-1].size - addr
        if off < len(code):  # capstone stopped at a byte it cannot decode
            off += 1
    return out


def _is_padding(i: Insn) -> bool:
    return i.raw in (b"\x00\x00", b"\xcc")


def drop_padding(insns: list[Insn]) -> list[Insn]:
    """Without runs of zero bytes (unused region pages decode as
    ``add [rax],al``) and int3 fill: nobody executes them, and copying them
    would multiply the copy's size. A thread that is there anyway is at no
    instruction the copy holds, and is waited for."""
    out: list[Insn] = []
    run: list[Insn] = []
    for i in insns:
        if _is_padding(i) and (not run or run[-1].addr + run[-1].size == i.addr):
            run.append(i)
            continue
        out += run if len(run) < PADDING_RUN else []
        run = [i] if _is_padding(i) else []
        if not run:
            out.append(i)
    return out + (run if len(run) < PADDING_RUN else [])


def _inside(v: int, ranges: list[CodeRange]) -> bool:
    return any(r.start <= v < r.end for r in ranges)


class Builder:
    """Lay out the run-out copy of ``code`` (retired, executable bytes) at ``base``."""

    def __init__(self, code: list[tuple[int, bytes]], retired: list[CodeRange], base: int) -> None:
        self.retired, self.base = retired, base
        self.insns = drop_padding([i for addr, data in code for i in decode(data, addr)])
        self.index = {i.addr: n for n, i in enumerate(self.insns)}
        self.bound = size_bound(self.insns)

    def _fallthrough(self, n: int) -> int | None:
        i = self.insns[n]
        end = i.addr + i.size
        nxt = self.insns[n + 1].addr if n + 1 < len(self.insns) else None
        if nxt == end or (i.cs.group(capstone.CS_GRP_RET) or i.cs.group(capstone.CS_GRP_JUMP)) \
                and rel.condition_code(i.cs) is None:
            return None  # the next instruction follows, or this one never falls through
        return end

    def _classify(self, i: Insn) -> tuple[str, int | StubSpec | None]:
        """('copy', None) | ('branch', copy target orig) | ('stub', StubSpec)."""
        cs = i.cs
        target = rel.direct_target(cs)
        barrier = StubSpec(i.addr, Stub.BARRIER, resume=i.addr)
        if cs.group(capstone.CS_GRP_RET):
            if cs.id != x86.X86_INS_RET:
                return "stub", barrier  # retf
            pop = cs.operands[0].imm if cs.operands else 0
            return "stub", StubSpec(i.addr, Stub.EXIT, pop=pop)
        if target is not None:
            uncond = cs.id == x86.X86_INS_JMP
            if rel.is_call(cs) and target in self.index and 0x66 not in cs.prefix:
                return "stub", StubSpec(i.addr, Stub.CALL, dest=target, resume=i.addr, ret=i.addr + i.size)
            if rel.is_call(cs) or 0x66 in cs.prefix or not (uncond or rel.condition_code(cs) is not None):
                return "stub", barrier  # other calls, loop/jrcxz/xbegin, 16-bit forms
            if target in self.index:
                return "branch", target
            if _inside(target, self.retired):
                return "stub", StubSpec(i.addr, Stub.BARRIER, resume=target)
            return "stub", StubSpec(i.addr, Stub.EXIT, dest=target)
        if cs.group(capstone.CS_GRP_JUMP) or cs.group(capstone.CS_GRP_CALL) \
                or cs.group(capstone.CS_GRP_IRET) or cs.id == x86.X86_INS_SYSENTER:
            return "stub", barrier  # indirect jumps and calls, far transfers
        return "copy", None

    @staticmethod
    def _size(kind: str, i: Insn) -> int:
        if kind == "copy":
            return i.size
        return w.JCC_REL32_LEN if rel.condition_code(i.cs) is not None else w.JMP_REL32_LEN

    def plan(self) -> Plan:
        kinds = [self._classify(i) for i in self.insns]
        # Relocated RIP-relative operands must still reach: else a barrier.
        for n, (i, (kind, _)) in enumerate(zip(self.insns, kinds)):
            if kind == "copy" and rel.rip_operand(i.cs) is not None and not self._reaches(i):
                kinds[n] = ("stub", StubSpec(i.addr, Stub.BARRIER, resume=i.addr))
        at, where = self.base, {}
        for n, (i, (kind, _)) in enumerate(zip(self.insns, kinds)):
            where[i.addr] = at
            at += self._size(kind, i) + (w.JMP_REL32_LEN if self._fallthrough(n) else 0)
        p = Plan(self.base, orig=[i.addr for i in self.insns], copy=[where[i.addr] for i in self.insns])
        p.stubs_at = (at + 15) & ~15
        out = bytearray()
        for n, (i, (kind, arg)) in enumerate(zip(self.insns, kinds)):
            here = self.base + len(out)
            if kind == "copy":
                out += rel.relocate_one(i.cs, here, range(0))
            elif kind == "branch":
                out += self._branch(i, here, where[arg])
            else:
                out += self._branch(i, here, self._stub(p, arg))
            end = self._fallthrough(n)
            if end is not None:
                out += w.jmp_rel32(self.base + len(out), self._stub(p, self._leave_at(end)))
        out += bytes([w.INT3]) * (p.stubs_at - self.base - len(out))
        p.code = bytes(out) + b"".join(stub_code(s) for s in p.stubs)
        return p

    def _reaches(self, i: Insn) -> bool:
        try:
            rel.relocate_one(i.cs, self.base, range(0))
            rel.relocate_one(i.cs, self.base + self.bound, range(0))
            return True
        except TrampolineError:
            return False

    def _leave_at(self, end: int) -> StubSpec:
        """Falling through past the copied bytes to ``end``."""
        if _inside(end, self.retired):
            return StubSpec(end, Stub.BARRIER, resume=end)
        return StubSpec(end, Stub.EXIT, dest=end)

    @staticmethod
    def _branch(i: Insn, at: int, dest: int) -> bytes:
        cc = rel.condition_code(i.cs)
        return w.jcc_rel32(cc, at, dest) if cc is not None else w.jmp_rel32(at, dest)

    @staticmethod
    def _stub(p: Plan, spec: StubSpec) -> int:
        p.stubs.append(spec)
        return p.stubs_at + (len(p.stubs) - 1) * STUB_SIZE


def stub_code(s: StubSpec) -> bytes:
    if s.kind is Stub.EXIT and not s.dest:
        tail = b"\xc3" if not s.pop else b"\xc2" + struct.pack("<H", s.pop)
    else:  # a CALL re-runs the original call: we only follow calls while tracing
        tail = w.jmp_abs(s.dest if s.kind is Stub.EXIT else s.resume)
    body = STUB_PREFIX + STUB_SUFFIX + tail
    return body + bytes([w.INT3]) * (STUB_SIZE - len(body))


INSN_BOUND = 15 + w.JMP_REL32_LEN + 2 * STUB_SIZE  # the most one instruction can take in the copy


def size_bound(insns: list[Insn]) -> int:
    """Bytes the copy can take at any base: every instruction at least a
    rel32 branch long, plus a fall-through jump, plus two stubs each."""
    n = len(insns)
    return sum(max(i.size, w.JCC_REL32_LEN) for i in insns) + n * (w.JMP_REL32_LEN + 2 * STUB_SIZE) + 16


def retired_code(ranges: list[CodeRange], maps: list[Mapping], read) -> list[tuple[int, bytes]]:
    """The executable bytes of ``ranges`` (what the copy holds)."""
    out = []
    for r in ranges:
        for m in maps:
            lo, hi = max(r.start, m.start), min(r.end, m.end)
            if lo >= hi or not m.executable or not m.readable:
                continue
            try:
                out.append((lo, read(lo, hi - lo)))
            except HotpatchError:
                continue
    return out


def area_size(originals: list[tuple[int, bytes]], new: list[tuple[int, bytes]], trampolines: int) -> int:
    """The run-out area an edition reserves: room for the copy of either
    direction's code, given as (address, bytes) chunks: the original
    functions (a cutover), or the new code and stubs plus ``trampolines``
    entry jumps and far jumps written later (a revert). 0 when that would
    exceed MAX_AREA: such code is waited for, as before."""
    cut = Builder(originals, [], 0).bound if originals else 0
    back = Builder(new, [], 0).bound + trampolines * TRAMPOLINE_INSNS * INSN_BOUND
    need = max(cut, back)
    return placement.page_up(need) if need <= MAX_AREA else 0


def without(ranges: list[CodeRange], area: tuple[int, int] | None) -> list[CodeRange]:
    """``ranges`` minus the run-out area (a revert copies its edition's
    code, not the area the copy goes to)."""
    if not area:
        return ranges
    lo, hi = area[0], area[0] + area[1]
    out = []
    for r in ranges:
        out += [CodeRange(a, b, r.name) for a, b in ((r.start, min(r.end, lo)), (max(r.start, hi), r.end)) if a < b]
    return out


def is_clean(data: bytes) -> bool:
    return not data.strip(b"\0")


class Runout:
    """One transition's run-out copy, in the edition's run-out area
    ``area`` = (start, size): written before the first attempt, zeroed when
    the transition ends. ``copy``: the ranges it holds; ``retired``: every
    range no thread may be left in (a branch there is a barrier)."""

    def __init__(self, pid: int, mem, area: tuple[int, int], copy: list[CodeRange],
                 retired: list[CodeRange]) -> None:
        self.pid, self.mem = pid, mem
        self.area, self.copy_ranges, self.ranges = area, copy, retired
        self.plan: Plan | None = None
        self.lost = False
        self.notes: dict[int, str] = {}  # tid -> why its last advance gave up
        self.advanced = 0  # threads moved out, over all attempts
        self.last_us = 0.0  # time the last advance took
        self._moved_in = None  # the World of the last window we moved threads in

    # -- outside the window ------------------------------------------------------
    def prepare(self, maps: list[Mapping]) -> bool:
        """Plan the copy and write it into the area; False when it is not
        used this time (no room, or a killed tool's copy still there: that
        one is busy code, see ``leftovers``)."""
        start, size = self.area
        if not is_clean(self.mem.read(start, size)):
            return False
        code = retired_code(self.copy_ranges, maps, self.mem.read)
        if not code:
            return False
        plan = Builder(code, self.ranges, start).plan()
        if len(plan.code) > size:
            return False
        self.mem.write(start, plan.code)
        self.plan = plan
        self._tables()
        return True

    def _tables(self) -> None:
        from . import native
        ffi, lib = native.load()
        p = self.plan
        self._keep = [ffi.new("unsigned long[]", p.orig or [0]), ffi.new("unsigned long[]", p.copy or [0]),
                      ffi.new("unsigned long[]", [s.orig for s in p.stubs] or [0]),
                      ffi.new("unsigned long[]", [s.dest for s in p.stubs] or [0]),
                      ffi.new("int[]", [s.kind.value for s in p.stubs] or [0]),
                      ffi.new("int[]", [s.pop for s in p.stubs] or [0]),
                      ffi.new("unsigned long[]", [s.ret for s in p.stubs] or [0])]
        ro = ffi.new("struct kp_runout *")
        ro.n, ro.orig, ro.copy = len(p.orig), self._keep[0], self._keep[1]
        ro.nstubs, ro.stubs = len(p.stubs), p.stubs_at
        ro.stub_orig, ro.stub_dest, ro.stub_kind, ro.stub_pop, ro.stub_ret = self._keep[2:]
        self.ro = ro

    def close(self) -> None:
        """Zero the copy again, unless a thread may still run in it (lost
        by a failed ptrace call: then ``recover`` zeroes it once no thread
        is inside)."""
        if self.plan is not None and not self.lost:
            self.mem.write(self.area[0], bytes(len(self.plan.code)))
        self.plan = None

    # -- inside the window ----------------------------------------------------------
    def advance(self, world, unsafe: int, scan, stop_us: float = 0.0) -> int:
        """Advance every thread whose rip is in retired code, when those are
        the only ones in the way; ``scan()`` re-scans the world. ``stop_us``,
        how long this attempt's threads took to reach their stops, says how
        long a thread waits for a CPU right now: the budget allows twice
        that. Returns the new unsafe count."""
        if self.plan is None or self._moved_in is world:
            return unsafe  # at most once per stopped window
        threads = world.threads()
        self.notes = {}
        if any(t.unsafe not in (Verdict.SAFE, Verdict.IN_RIP) for t in threads):
            return unsafe  # someone deeper in: we must wait anyway
        self._moved_in = world
        idx = [n for n, t in enumerate(threads) if t.unsafe == Verdict.IN_RIP]
        ffi, lib = world.ffi, world.lib
        t0 = lib.kp_now_us()
        result = ffi.new("int[]", len(idx))
        out = lib.kp_advance_all(world.pid, world._arr, ffi.new("int[]", idx), len(idx),
                                 self.ro, budget_us(len(idx), stop_us), BUDGET_US, result)
        self.advanced += out
        self.last_us = lib.kp_now_us() - t0
        self.notes = {threads[n].tid: GIVE_UP.get(result[j], "could not be advanced")
                      for j, n in enumerate(idx) if result[j] != lib.KP_ADV_OUT}
        self.lost |= any(result[j] == lib.KP_ADV_LOST for j in range(len(idx)))
        if not out:
            return unsafe
        before = [t.unsafe for t in threads]
        unsafe = scan()
        for t, was in zip(world.threads(), before):
            if was == Verdict.SAFE and t.unsafe:
                # not advanced and stopped all along: an earlier precise
                # verdict stands
                t.unsafe = Verdict.SAFE
                unsafe -= 1
        return unsafe


def leftovers(editions) -> list[CodeRange]:
    """Run-out copies a killed tool left in editions' areas (``editions``:
    (edition, area bytes) pairs). A thread may still be in one, finishing
    old code: they count as busy code for every transition."""
    return [CodeRange(e.runout[0], e.runout[0] + e.runout[1], f"a run-out copy left by an interrupted tool "
                      f"(edition {e.id})") for e, data in editions if not is_clean(data)]


def areas(mem, editions) -> list:
    """(edition, its run-out area's bytes) for every edition that has one."""
    out = []
    for e in editions:
        if e.runout:
            try:
                out.append((e, mem.read(*e.runout)))
            except HotpatchError:
                continue
    return out


def remove_leftovers(pid: int, mem, editions, timeout: float = 5.0) -> int:
    """Zero the leftover run-out copies once no thread is inside one (rip
    or stack; nothing else can enter a copy), retrying until ``timeout``.
    Returns how many were removed (0: none, or still busy: left for later)."""
    left = leftovers(areas(mem, editions))
    deadline = time.monotonic() + timeout
    while left:
        with World(pid).seize() as world:
            late = world.stop(0.2)
            busy = late or world.scan([(r.start, r.end) for r in left], read_maps(pid))
            if not busy:
                for r in left:
                    mem.write(r.start, bytes(r.end - r.start))
                return len(left)
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return 0
