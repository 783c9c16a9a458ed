"""The CFI unwinder must agree with gdb's `bt` on the same stopped thread.

One target, built twice (with and without frame pointers), runs three worker
threads: main -> thread_fn -> level_a -> level_b -> level_c, and then
  mode 0: level_c blocks in read();
  mode 1: level_c calls spin_here, whose first instruction jumps to itself; a
          SIGUSR1 handler then blocks in read(). The interrupted pc is exactly
          spin_here's first byte: a pc-1 lookup there would find the wrong CFI;
  mode 2: level_b reaches level_c through nocfi_fn, an asm function without CFI;
  mode 3: level_b's last instruction calls the noreturn stuck(), which reads:
          the return address is the first byte of the next function
          (-falign-functions=1), so only a pc-1 lookup finds level_b's CFI.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from elftools.elf.elffile import ELFFile

from ksplice_py.maps import mapped_files, read_maps
from ksplice_py.memory import RemoteMemory
from ksplice_py.unwind import Frame, Unwinder, clear_cache

TARGET_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>

static int pfd[2];
static volatile int spinning;
static volatile long tids[4];
volatile long sink;

void spin_here(void);
__asm__(".text\n.globl spin_here\n.type spin_here,@function\nspin_here:\n"
        "  .cfi_startproc\n1: jmp 1b\n  .cfi_endproc\n.size spin_here,.-spin_here\n");

int nocfi_fn(int x, int mode);  /* no .cfi directives: no FDE */
__asm__(".text\n.globl nocfi_fn\n.type nocfi_fn,@function\nnocfi_fn:\n"
        "  push %rbx\n  call level_c\n  pop %rbx\n  ret\n.size nocfi_fn,.-nocfi_fn\n");

__attribute__((noinline)) void on_signal(int sig) {
    char c;
    sink += read(pfd[0], &c, 1) + sig;
}

__attribute__((noinline, noreturn)) void stuck(int x) {
    char c;
    for (;;) sink += read(pfd[0], &c, 1) + x;
}

__attribute__((noinline)) int level_c(int x, int mode) {
    char buf[64];
    long a = x * 7L, b = x ^ 0x55, c = (long)&buf;
    memset(buf, x, sizeof buf);
    __asm__ volatile("" ::: "memory");
    long n = 0;
    if (mode == 1) {
        spinning = 1;
        spin_here();
    } else {
        n = read(pfd[0], buf, 1);
    }
    __asm__ volatile("" ::: "memory");
    return (int)(n + a + b + c + buf[3]);
}

__attribute__((noinline)) int level_b(int x, int mode) {
    /* alloca: the CFA is rbp-based even with -fomit-frame-pointer */
    char *v = __builtin_alloca(16 + (x & 31));
    long s = x * 3L, t = x + 11;
    memset(v, 1, 16);
    __asm__ volatile("" ::: "memory");
    if (mode == 3) stuck(x);
    int r = mode == 2 ? nocfi_fn(x + 1, mode) : level_c(x + 1, mode);
    __asm__ volatile("" ::: "memory");
    return r + (int)(s * t) + v[2];
}

__attribute__((noinline)) int level_a(int x, int mode) {
    long p = x * 13L, q = x - 5, u = p ^ q;
    __asm__ volatile("" ::: "memory");
    int r = level_b(x + 1, mode);
    __asm__ volatile("" ::: "memory");
    return r + (int)(p + q + u);
}

__attribute__((noinline)) void *thread_fn(void *arg) {
    long mode = (long)arg;
    tids[mode] = syscall(SYS_gettid);
    long k = mode * 17;
    int r = level_a((int)mode + 1, (int)mode);
    __asm__ volatile("" ::: "memory");
    sink += r + k;
    return NULL;
}

int main(void) {
    pthread_t th[4];
    if (pipe(pfd)) return 1;
    signal(SIGUSR1, on_signal);
    for (long i = 0; i < 4; i++) pthread_create(&th[i], NULL, thread_fn, (void *)i);
    while (!spinning || !tids[0] || !tids[1] || !tids[2] || !tids[3]) usleep(1000);
    pthread_kill(th[1], SIGUSR1);
    printf("%ld %ld %ld %ld\n", tids[0], tids[1], tids[2], tids[3]);
    fflush(stdout);
    for (int i = 0; i < 4; i++) pthread_join(th[i], NULL);
    return 0;
}
"""

CHAIN = ["level_c", "level_b", "level_a", "thread_fn", "start_thread", "clone3"]

# ---------------------------------------------------------------------------
# ptrace, directly (the process-control module is not used here on purpose)
# ---------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long
PTRACE_GETREGS, PTRACE_DETACH, PTRACE_SEIZE, PTRACE_INTERRUPT = 12, 17, 0x4206, 0x4207
WALL = 0x40000000


class UserRegs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_ulonglong) for n in (
        "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax "
        "rip cs eflags rsp ss fs_base gs_base ds es fs gs").split()]


def _ptrace(req: int, tid: int, addr: int = 0, data: object = None) -> None:
    if _libc.ptrace(req, tid, addr, data) == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"ptrace({req}, {tid}): {os.strerror(err)}")


@contextmanager
def stopped(tid: int):
    """Stop one thread, yield its registers, always detach."""
    _ptrace(PTRACE_SEIZE, tid)
    try:
        _ptrace(PTRACE_INTERRUPT, tid)
        os.waitpid(tid, WALL)
        regs = UserRegs()
        _ptrace(PTRACE_GETREGS, tid, 0, ctypes.byref(regs))
        yield {name: getattr(regs, name) for name, _ in UserRegs._fields_}
    finally:
        _ptrace(PTRACE_DETACH, tid)


# ---------------------------------------------------------------------------
# Test-only symbolizer: .symtab of the target, of libc's debug file if present
# ---------------------------------------------------------------------------
def _debug_file(path: str) -> str | None:
    with open(path, "rb") as f:
        elf = ELFFile(f)
        note = elf.get_section_by_name(".note.gnu.build-id")
        if note is None:
            return None
        bid = next(n["n_desc"] for n in note.iter_notes() if n["n_type"] == "NT_GNU_BUILD_ID")
    dbg = f"/usr/lib/debug/.build-id/{bid[:2]}/{bid[2:]}.debug"
    return dbg if os.path.exists(dbg) else None


class Symbols:
    def __init__(self, pid: int) -> None:
        self.syms: list[tuple[int, int, str]] = []
        self.libc_symtab = False
        for mf in mapped_files(pid):
            if mf.name not in ("main", "libc.so.6"):
                continue
            bias = mf.start - min(m.offset for m in mf.mappings)  # both start at offset 0, vaddr 0
            src = mf.path
            if mf.name == "libc.so.6":
                src = _debug_file(mf.path) or mf.path
                self.libc_symtab = src != mf.path
            with open(src, "rb") as f:
                elf = ELFFile(f)
                tab = elf.get_section_by_name(".symtab") or elf.get_section_by_name(".dynsym")
                for s in tab.iter_symbols():
                    if s["st_info"]["type"] == "STT_FUNC" and s["st_shndx"] != "SHN_UNDEF":
                        self.syms.append((s["st_value"] + bias, s["st_size"], s.name))
        self.syms.sort()

    def name(self, pc: int) -> str | None:
        best = None
        for start, size, name in self.syms:
            if start > pc:
                break
            if pc < start + size or pc == start:
                best = name
        return best

    def frame_names(self, frames: list[Frame], exact: tuple[int, ...] = (0,)) -> list[str | None]:
        # a return address can point past its call: look up pc-1, except for
        # frame 0, a signal trampoline's pc and the pc a signal interrupted
        return [self.name(f.pc) if i in exact or self.name(f.pc) == "__restore_rt"
                else self.name(f.pc - 1) for i, f in enumerate(frames)]


# ---------------------------------------------------------------------------
# gdb's view
# ---------------------------------------------------------------------------
@dataclass
class GdbFrame:
    pc: int | None  # None for <signal handler called> (and frame #0)
    name: str


_FRAME_RE = re.compile(r"^#(\d+)\s+(?:(0x[0-9a-f]+) in )?(\S+)")


def gdb_backtraces(pid: int) -> dict[int, list[GdbFrame]]:
    """Physical frames per LWP; inline frames (no address, not a signal frame)
    are folded into the frame that contains them, as they share its pc."""
    out = subprocess.run(["gdb", "-p", str(pid), "-nx", "-batch", "-ex", "thread apply all bt"],
                         capture_output=True, text=True, timeout=120).stdout
    result: dict[int, list[GdbFrame]] = {}
    frames: list[GdbFrame] | None = None
    for line in out.splitlines():
        lwp = re.search(r"^Thread \d+ .*\(LWP (\d+)\)", line)
        if lwp:
            frames = result.setdefault(int(lwp.group(1)), [])
            continue
        m = _FRAME_RE.match(line)
        if m is None or frames is None:
            continue
        num, addr, name = int(m.group(1)), m.group(2), m.group(3)
        if name == "<signal":
            frames.append(GdbFrame(None, "<signal handler called>"))
        elif addr is None and num > 0 and frames[-1].name != "<signal handler called>":
            continue  # inline frame
        else:
            frames.append(GdbFrame(int(addr, 16) if addr else None, name))
    return result


# ---------------------------------------------------------------------------
# The target
# ---------------------------------------------------------------------------
@dataclass
class Target:
    pid: int
    tids: list[int]  # by mode
    binary: str
    gdb: dict[int, list[GdbFrame]]
    symbols: Symbols


def _in_read(pid: int, tid: int) -> bool:
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            return f.read().split()[0] == "0"  # SYS_read
    except (OSError, IndexError):
        return False


FLAVOURS = {
    "fp": ["-fno-omit-frame-pointer"],
    "nofp": ["-fomit-frame-pointer"],
    # the target's own CFI only in .debug_frame (no .eh_frame FDEs)
    "debug_frame": ["-fomit-frame-pointer", "-fno-asynchronous-unwind-tables"],
}


@pytest.fixture(scope="module", params=list(FLAVOURS))
def target(request, tmp_path_factory):
    if shutil.which("gcc") is None or shutil.which("gdb") is None:
        pytest.skip("needs gcc and gdb")
    d = tmp_path_factory.mktemp(f"unwind_{request.param}")
    (d / "target.c").write_text(TARGET_C)
    binary = str(d / "target")
    subprocess.run(["gcc", "-O2", "-g", *FLAVOURS[request.param], "-falign-functions=1", "-fPIE", "-pie",
                    "-pthread", "-o", binary, str(d / "target.c")], check=True)
    if request.param == "debug_frame":
        with open(binary, "rb") as f:
            elf = ELFFile(f)
            assert elf.get_section_by_name(".debug_frame") is not None
    proc = subprocess.Popen([binary], stdout=subprocess.PIPE, text=True)
    try:
        tids = [int(t) for t in proc.stdout.readline().split()]
        assert len(tids) == 4
        deadline = time.monotonic() + 10
        while not all(_in_read(proc.pid, t) for t in tids):
            assert time.monotonic() < deadline, "worker threads never blocked in read()"
            time.sleep(0.005)
        yield Target(proc.pid, tids, binary, gdb_backtraces(proc.pid), Symbols(proc.pid))
    finally:
        proc.kill()
        proc.wait()


def unwind_thread(t: Target, tid: int, **kw) -> tuple[list[Frame], bool, dict[str, int]]:
    with stopped(tid) as regs:
        mem = RemoteMemory(t.pid)
        frames, complete = Unwinder(t.pid, mem, read_maps(t.pid)).unwind(regs, **kw)
    return frames, complete, regs


def assert_matches_gdb(frames: list[Frame], gdb: list[GdbFrame]) -> None:
    """Same number of physical frames, same pc wherever gdb prints one."""
    ours = " ".join(hex(f.pc) for f in frames)
    theirs = " ".join(f"{g.name}@{g.pc:#x}" if g.pc else g.name for g in gdb)
    msg = f"unwind differs from gdb:\n ours: {ours}\n gdb:  {theirs}"
    assert len(frames) == len(gdb), msg
    assert all(g.pc is None or g.pc == f.pc for f, g in zip(frames, gdb)), msg
    assert sum(g.pc is not None for g in gdb[1:]) >= len(CHAIN), msg


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------
def test_matches_gdb_plain_chain(target):
    tid = target.tids[0]
    frames, complete, regs = unwind_thread(target, tid)
    gdb = target.gdb[tid]
    assert [g.name for g in gdb[1:]] == CHAIN, gdb  # the scenario is what we think it is
    assert complete
    assert frames[0].pc == regs["rip"] and frames[0].sp == regs["rsp"]
    assert_matches_gdb(frames, gdb)
    names = target.symbols.frame_names(frames)
    expected = CHAIN if target.symbols.libc_symtab else CHAIN[:4]
    assert names[1:1 + len(expected)] == expected
    # the CFA grows toward the callers, and each frame's sp is its callee's CFA
    assert all(a.cfa < b.cfa for a, b in zip(frames, frames[1:]))
    assert all(a.cfa == b.sp for a, b in zip(frames, frames[1:]))


def test_matches_gdb_through_signal_frame(target):
    tid = target.tids[1]
    frames, complete, _ = unwind_thread(target, tid)
    gdb = target.gdb[tid]
    assert [g.name for g in gdb[1:]] == ["on_signal", "<signal handler called>", "spin_here"] + CHAIN, gdb
    assert target.symbols.name(frames[3].pc) == "spin_here"
    assert target.symbols.name(frames[3].pc - 1) != "spin_here"  # the trap is set
    assert complete
    assert_matches_gdb(frames, gdb)
    names = target.symbols.frame_names(frames, exact=(0, 3))
    assert names[1] == "on_signal" and names[4:8] == CHAIN[:4]
    if target.symbols.libc_symtab:
        assert names[2] == "__restore_rt" and names[8:] == CHAIN[4:]
    # the trampoline's CFA is the interrupted rsp, read from the ucontext
    assert all(a.cfa == b.sp for a, b in zip(frames, frames[1:]))


def test_return_address_past_noreturn_call(target):
    tid = target.tids[3]
    frames, complete, _ = unwind_thread(target, tid)
    gdb = target.gdb[tid]
    assert [g.name for g in gdb[1:]] == ["stuck"] + CHAIN[1:], gdb
    assert target.symbols.name(frames[2].pc) == "level_a"  # the trap is set
    assert complete
    assert_matches_gdb(frames, gdb)
    assert target.symbols.frame_names(frames)[1:5] == ["stuck", "level_b", "level_a", "thread_fn"]


def test_main_thread_ends_at_start(target):
    frames, complete, _ = unwind_thread(target, target.pid)  # in pthread_join
    assert complete
    names = target.symbols.frame_names(frames)
    assert names[-1] == "_start" and "main" in names
    # gdb stops at main (we go on to _start), and it adds *tail-call frames*
    # from DWARF call-site info (pthread_join jmp's to __pthread_clockjoin_ex):
    # functions that are not on the stack, which we must not report either.
    gdb = target.gdb[target.pid]
    assert gdb[-1].name == "main"
    ours = [f.pc for f in frames[1:names.index("main") + 1]]
    mem = RemoteMemory(target.pid)
    physical = [g.pc for g in gdb[1:] if mem.read(g.pc - 5, 1) != b"\xe9"]  # after a jmp rel32
    assert ours == physical, (names, gdb)


def test_frame_without_cfi_is_incomplete(target):
    frames, complete, _ = unwind_thread(target, target.tids[2])
    assert not complete
    names = target.symbols.frame_names(frames)
    assert names[1:] == ["level_c", "nocfi_fn"]
    assert frames[1].cfa is not None and frames[2].cfa is None


def test_pc_outside_any_object_is_incomplete(target):
    with stopped(target.tids[0]) as regs:
        unwinder = Unwinder(target.pid, RemoteMemory(target.pid), read_maps(target.pid))
        anon = dict(regs, rip=regs["rsp"])  # an address on the stack: no object, no CFI
        assert unwinder.unwind(anon) == ([Frame(regs["rsp"], None, regs["rsp"])], False)


def test_corrupt_stack_never_raises(target):
    tid = target.tids[0]
    mem = RemoteMemory(target.pid)
    with stopped(tid) as regs:
        unwinder = Unwinder(target.pid, mem, read_maps(target.pid))
        good, complete = unwinder.unwind(regs)
        assert complete and len(good) == 7, (good, target.symbols.frame_names(good), regs)
        # overwrite level_b's return address (into level_a) on the real stack
        slot = good[2].cfa - 8
        saved = mem.read(slot, 8)
        assert int.from_bytes(saved, "little") == good[3].pc
        mem.write(slot, (0x4141414141414141).to_bytes(8, "little"))
        try:
            frames, complete = unwinder.unwind(regs)
        finally:
            mem.write(slot, saved)
        assert not complete
        assert frames[:3] == good[:3]
        assert frames[3] == Frame(0x4141414141414141, None, good[3].sp)
        # garbage registers: unmapped stack, misaligned stack, wild pc, fp into text
        for bad in (dict(regs, rsp=0x10), dict(regs, rsp=(1 << 64) - 8), dict(regs, rip=0),
                    dict(regs, rbp=0xDEADBEEF, rip=good[2].pc),
                    *(dict(regs, rip=good[2].pc, rsp=regs["rsp"] + k) for k in range(-64, 512, 8))):
            frames, complete = unwinder.unwind(bad)
            assert len(frames) <= 256
        assert unwinder.unwind(regs, max_frames=3) == (good[:3], False)
    # sanity: the thread survived and its stack is intact. (Just after a
    # detach, the thread may still be at the `syscall` that restarts read().)
    frames, complete, _ = unwind_thread(target, tid)
    assert complete and frames[1:] == good[1:]
    assert frames[0].pc in (good[0].pc, good[0].pc - 2) and frames[0].sp == good[0].sp


def test_vdso_frame(target):
    maps = read_maps(target.pid)
    vdso = next((m for m in maps if m.path == "[vdso]"), None)
    if vdso is None:
        pytest.skip("no vdso")
    mem = RemoteMemory(target.pid)
    from io import BytesIO
    elf = ELFFile(BytesIO(mem.read(vdso.start, vdso.end - vdso.start)))
    sym = next(s for s in elf.get_section_by_name(".dynsym").iter_symbols()
               if s.name == "__vdso_clock_gettime")
    entry = vdso.start + sym["st_value"]  # the vdso is linked at 0
    tid = target.tids[0]
    with stopped(tid) as regs:
        unwinder = Unwinder(target.pid, mem, maps)
        good, _ = unwinder.unwind(regs)
        # pretend level_c had called clock_gettime instead of read: same return slot
        fake = dict(regs, rip=entry, rsp=good[0].cfa - 8)
        frames, _ = unwinder.unwind(fake)
    assert frames[0] == Frame(entry, good[0].cfa, good[0].cfa - 8)
    assert frames[1].pc == good[1].pc


def test_warm_unwind_time(target, capsys):
    tid = target.tids[1]  # the deepest chain (signal frame included)
    with stopped(tid) as regs:
        mem = RemoteMemory(target.pid)
        maps = read_maps(target.pid)
        clear_cache()
        t0 = time.perf_counter()
        first = Unwinder(target.pid, mem, maps).unwind(regs)
        cold = time.perf_counter() - t0
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):  # a new Unwinder per stop, as a cutover would: only the cache is warm
            again = Unwinder(target.pid, mem, maps).unwind(regs)
        warm = (time.perf_counter() - t0) / n
        unwinder = Unwinder(target.pid, mem, maps)
        unwinder.unwind(regs)
        t0 = time.perf_counter()
        for _ in range(n):
            unwinder.unwind(regs)
        hot = (time.perf_counter() - t0) / n
        clear_cache()
        unwinder = Unwinder(target.pid, mem, maps)
        t0 = time.perf_counter()
        unwinder.preload()
        preload = time.perf_counter() - t0
        t0 = time.perf_counter()
        after_preload = unwinder.unwind(regs)
        first_after_preload = time.perf_counter() - t0
    assert again == first == after_preload and first[1]
    with capsys.disabled():
        print(f"\n[unwind] {len(first[0])} frames: cold {cold * 1e3:.1f} ms, warm (new Unwinder) "
              f"{warm * 1e6:.0f} us, hot (same Unwinder) {hot * 1e6:.0f} us per thread; preload "
              f"{preload * 1e3:.1f} ms, then first unwind {first_after_preload * 1e6:.0f} us")
    assert warm < 0.02
