"""x86 code layer: writer (encoders), relocator, trampoline planning.

Encoders are checked by decoding their output with capstone. Validation and
relocation run on functions gcc compiles here; relocated code is verified by
*running* it inside a harness process that maps the stub at the address we
computed it for and compares its result with the original function's.
"""
from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import capstone
import pytest
from elftools.elf.elffile import ELFFile

from ksplice_py import x86writer as w
from ksplice_py import PatchMismatch, TrampolineError
from ksplice_py.trampoline import (FunctionCode, call_original_size_bound, check_window,
                                   plan_call_original, plan_redirect)
from ksplice_py.x86relocator import relocate

CS = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
CS.detail = True
GiB = 1 << 30


def dis(code: bytes, addr: int) -> list[capstone.CsInsn]:
    return list(CS.disasm(code, addr))


def gcc(out: Path, *args: str) -> Path:
    subprocess.run(["gcc", *args, "-o", str(out)], check=True, capture_output=True)
    return out


def elf_function(path: Path, name: str) -> tuple[int, int, bytes]:
    """(symbol value, size, bytes) of function `name` in an ELF .o or executable."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        sym = elf.get_section_by_name(".symtab").get_symbol_by_name(name)[0]
        sec = elf.get_section(sym["st_shndx"])
        start = sym["st_value"] - sec["sh_addr"]  # sh_addr is 0 in a .o
        return sym["st_value"], sym["st_size"], sec.data()[start:start + sym["st_size"]]


def fn_from_elf(path: Path, name: str, addr: int | None = None) -> FunctionCode:
    value, size, code = elf_function(path, name)
    return FunctionCode(name, value if addr is None else addr, size, code)


# --------------------------------------------------------------------------
# x86writer: decode what we emit


def test_jmp_rel32_decodes_and_range_is_exact():
    at = 0x7F00_0000_1000
    for dest in (at, at + 5, at - 0x1234, at + 5 + (1 << 31) - 1, at + 5 - (1 << 31)):
        code = w.jmp_rel32(at, dest)
        (insn,) = dis(code, at)
        assert (insn.mnemonic, insn.size, insn.operands[0].imm) == ("jmp", 5, dest)
        assert w.fits_rel32(at + 5, dest)
    for dest in (at + 5 + (1 << 31), at + 5 - (1 << 31) - 1):
        assert not w.fits_rel32(at + 5, dest)
        with pytest.raises(ValueError):
            w.jmp_rel32(at, dest)


def test_jmp_abs_is_position_independent():
    dest = 0x1122_3344_5566_7788
    code = w.jmp_abs(dest)
    assert len(code) == w.JMP_ABS_LEN
    for at in (0, 0x400000, 0x7FFF_FFFF_0000):
        insn = dis(code, at)[0]
        assert insn.mnemonic == "jmp" and insn.size == 6
        mem = insn.operands[0].mem
        assert mem.base == capstone.x86.X86_REG_RIP and mem.disp == 0
        assert struct.unpack("<Q", code[6:14])[0] == dest


def test_jmp_best_picks_short_form_only_in_range():
    at = 0x5555_0000_0000
    assert w.jmp_best(at, at + GiB) == w.jmp_rel32(at, at + GiB)
    assert w.jmp_best(at, at + 3 * GiB) == w.jmp_abs(at + 3 * GiB)


def test_call_abs_returns_past_its_quad():
    at, dest = 0x1000, 0x7777_0000_1234
    code = w.call_abs(dest)
    call, skip = dis(code[:8], at)
    assert call.mnemonic == "call" and call.operands[0].mem.disp == 2
    # The call reads [rip+2] = the quad; it returns to `jmp`, which lands after the quad.
    assert at + call.size + 2 == at + 8
    assert skip.mnemonic == "jmp" and skip.operands[0].imm == at + len(code)
    assert struct.unpack("<Q", code[8:])[0] == dest
    (near,) = dis(w.call_best(at, at + 0x100), at)
    assert near.mnemonic == "call" and near.operands[0].imm == at + 0x100


JCC_NAMES = ["jo", "jno", "jb", "jae", "je", "jne", "jbe", "ja",
             "js", "jns", "jp", "jnp", "jl", "jge", "jle", "jg"]


@pytest.mark.parametrize("cc", range(16))
def test_jcc_forms_decode(cc):
    at = 0x40_0000
    (insn,) = dis(w.jcc_rel32(cc, at, at + 0x1234), at)
    assert (insn.mnemonic, insn.size, insn.operands[0].imm) == (JCC_NAMES[cc], 6, at + 0x1234)
    far = 0x7000_0000_0000
    code = w.jcc_abs(cc, far)
    inv, jmp = dis(code[:8], at)
    assert inv.mnemonic == JCC_NAMES[cc ^ 1] and inv.operands[0].imm == at + len(code)
    assert jmp.mnemonic == "jmp" and code[2:] == w.jmp_abs(far)


# --------------------------------------------------------------------------
# trampoline validation on compiled C

C_FUNCS = r"""
int counter = 42;
int compute(int x) { int s = 0; for (int i = 0; i < x; i++) s += i * counter; return s; }
void nothing(void) {}
int zero(void) { return 0; }
"""


@pytest.fixture(scope="module")
def c_objects(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cfuncs")
    (d / "f.c").write_text(C_FUNCS)
    return {opt: gcc(d / f"f{opt}.o", opt, "-fcf-protection=none", "-c", str(d / "f.c"))
            for opt in ("-O0", "-O2")}


@pytest.mark.parametrize("opt", ["-O0", "-O2"])
def test_plan_redirect_normal_function(c_objects, opt):
    fn = fn_from_elf(c_objects[opt], "compute", addr=0x5555_5555_1000)
    dest = fn.addr + 0x1000_0000
    r = plan_redirect(fn, dest)
    assert len(r.old) == len(r.new) >= 5 and r.old == fn.code[:len(r.old)]
    jmp = dis(r.new[:5], fn.addr)[0]
    assert (jmp.mnemonic, jmp.operands[0].imm) == ("jmp", dest)
    assert r.new[5:] == b"\xcc" * (len(r.new) - 5)
    # `old` is exactly the whole instructions covering 5 bytes.
    sizes, n = [i.size for i in dis(fn.code, fn.addr)], 0
    while sum(sizes[:n]) < 5:
        n += 1
    assert len(r.old) == sum(sizes[:n])
    assert (r.stub_addr, r.stub) == (None, b"")


def test_tiny_functions_are_refused(c_objects):
    obj = c_objects["-O2"]
    with pytest.raises(TrampolineError, match=r"cannot redirect zero: function is 3 bytes, "
                                              r"a jump needs 5"):
        plan_redirect(fn_from_elf(obj, "zero"), 0x1000)
    with pytest.raises(TrampolineError, match="nothing: function is 1 bytes"):
        check_window(fn_from_elf(obj, "nothing"), 5)
    assert issubclass(TrampolineError, PatchMismatch)  # -> exit 4


def test_unknown_size_and_undecodable_window_are_refused():
    with pytest.raises(TrampolineError, match="cannot redirect f: its size is unknown"):
        plan_redirect(FunctionCode("f", 0x1000, 0, b""), 0x2000)
    bad = FunctionCode("g", 0x1000, 6, bytes.fromhex("31c0 06 06 06 c3"))  # 06: invalid in 64-bit
    with pytest.raises(TrampolineError, match=r"cannot decode the instruction at g\+0x2, "
                                              r"inside the first 5 bytes"):
        plan_redirect(bad, 0x2000)


def test_far_dest_needs_near_stub(c_objects):
    fn = fn_from_elf(c_objects["-O2"], "compute", addr=0x5555_5555_1000)
    far = fn.addr + 8 * GiB
    with pytest.raises(TrampolineError, match="compute: its replacement .* more than 2 GiB"):
        plan_redirect(fn, far)
    stub_at = fn.addr - 0x10_0000
    r = plan_redirect(fn, far, near_stub=stub_at)
    assert dis(r.new[:5], fn.addr)[0].operands[0].imm == stub_at
    assert r.stub_addr == stub_at and r.stub == w.jmp_abs(far)
    with pytest.raises(TrampolineError, match="near stub .* more than 2 GiB away too"):
        plan_redirect(fn, far, near_stub=far - 0x1000)


# --------------------------------------------------------------------------
# the harness: compiled targets + a runner that maps our stubs and calls them

TARGETS_C = r"""
int counter = 42;
long get_counter(long x) { return counter + x; }           /* movslq [rip+x] first */
const char *greeting(long x) { (void)x; return "hello"; }  /* lea [rip+x] first */
long scaled(long x) { return x * counter + 1; }
"""

TARGETS_IBT_C = r"""
extern int counter;
long get_counter_ibt(long x) { return counter - x; }  /* endbr64; movslq [rip+x] */
"""

TARGETS_S = r"""
    .text
    .globl helper_add1, asm_call, asm_jcc, asm_jcc32, asm_tailjmp, asm_loophead
    .globl asm_reentry, asm_inwindow, asm_jrcxz
    .type helper_add1,@function
helper_add1:            # rdi + 1
    lea 1(%rdi), %rax
    ret
    .size helper_add1, .-helper_add1

    .type asm_call,@function
asm_call:               # call rel32 in the prologue: 2x + 1
    call helper_add1
    add %rdi, %rax
    ret
    .size asm_call, .-asm_call

    .type asm_jcc,@function
asm_jcc:                # jcc rel8 in the window: x ? 2x + 7 : 99
    test %rdi, %rdi
    je 1f
    lea 7(%rdi,%rdi), %rax
    ret
1:  mov $99, %eax
    ret
    .size asm_jcc, .-asm_jcc

    .type asm_jcc32,@function
asm_jcc32:              # jcc rel32 in the window: x < 0 ? -1 : x + 5
    test %rdi, %rdi
    {disp32} js 1f
    lea 5(%rdi), %rax
    ret
1:  mov $-1, %rax
    ret
    .size asm_jcc32, .-asm_jcc32

    .type asm_tailjmp,@function
asm_tailjmp:            # a tail call: jmp rel32
    {disp32} jmp helper_add1
    .size asm_tailjmp, .-asm_tailjmp

    .type asm_loophead,@function
asm_loophead:           # loop head at +2: must be refused
    xor %eax, %eax
2:  add %rdi, %rax
    dec %rdi
    jnz 2b
    ret
    .size asm_loophead, .-asm_loophead

    .type asm_reentry,@function
asm_reentry:            # loops back to its own entry from after the window
    add %rdi, %rax
    dec %rdi
    jnz asm_reentry
    ret
    .size asm_reentry, .-asm_reentry

    .type asm_inwindow,@function
asm_inwindow:           # a branch inside the window back to the entry
    dec %edi
    jnz asm_inwindow
    mov %edi, %eax
    ret
    .size asm_inwindow, .-asm_inwindow

    .type asm_jrcxz,@function
asm_jrcxz:
    jrcxz 1f
    mov $1, %eax
    ret
1:  xor %eax, %eax
    ret
    .size asm_jrcxz, .-asm_jrcxz
"""

# Protocol on stdin, one command a line, one answer a line:
#   C name stub_addr stub_hex arg   -> "OK <stub(arg)> <name(arg)>": run a relocated copy
#   W name stub_addr stub_hex new_hex arg
#       -> "OK <before> <after>": map the call-original stub, redirect `name` to
#          wrapper() (which returns 10 * orig(x)) by writing new_hex at its entry.
MAIN_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef long (*fn_t)(long);
long get_counter(long), scaled(long), get_counter_ibt(long), helper_add1(long);
long asm_call(long), asm_jcc(long), asm_jcc32(long), asm_tailjmp(long);
const char *greeting(long);
static struct { const char *name; fn_t fn; } fns[] = {
    {"get_counter", get_counter}, {"greeting", (fn_t)greeting}, {"scaled", scaled},
    {"get_counter_ibt", get_counter_ibt}, {"asm_call", asm_call}, {"asm_jcc", asm_jcc},
    {"asm_jcc32", asm_jcc32}, {"asm_tailjmp", asm_tailjmp},
};
#define NFNS (sizeof fns / sizeof fns[0])

static fn_t orig_ptr;
__attribute__((noinline)) long wrapper(long x) { return orig_ptr(x) * 10; }

static fn_t lookup(const char *name) {
    for (size_t i = 0; i < NFNS; i++) if (!strcmp(fns[i].name, name)) return fns[i].fn;
    fprintf(stderr, "unknown %s\n", name); exit(2);
}

static size_t unhex(const char *s, unsigned char *out) {
    size_t n = strlen(s) / 2;
    for (size_t i = 0; i < n; i++) sscanf(s + 2 * i, "%2hhx", &out[i]);
    return n;
}

static void *map_at(uintptr_t at) {
    void *p = mmap((void *)at, 4096, PROT_READ | PROT_WRITE | PROT_EXEC,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (p == MAP_FAILED || (uintptr_t)p != at) {
        printf("ERR mmap %#lx: %s\n", (unsigned long)at, strerror(errno)); fflush(stdout);
        exit(3);
    }
    return p;
}

int main(void) {
    for (size_t i = 0; i < NFNS; i++) printf("%s %#lx\n", fns[i].name, (unsigned long)fns[i].fn);
    printf("wrapper %#lx\nREADY\n", (unsigned long)wrapper);
    fflush(stdout);
    char cmd[2], name[64], stub_hex[512], new_hex[128];
    unsigned long at; long arg;
    unsigned char buf[256];
    while (scanf("%1s %63s %lx %511s", cmd, name, &at, stub_hex) == 4) {
        fn_t fn = lookup(name);
        unsigned char *stub = map_at(at);
        memcpy(stub, buf, unhex(stub_hex, buf));
        if (cmd[0] == 'C') {
            if (scanf("%ld", &arg) != 1) return 2;
            long got = ((fn_t)stub)(arg);
            printf("OK %ld %ld\n", got, fn(arg));
            munmap(stub, 4096);
        } else {
            if (scanf("%127s %ld", new_hex, &arg) != 2) return 2;
            long before = fn(arg);
            uintptr_t page = (uintptr_t)fn & ~4095UL;
            if (mprotect((void *)page, 8192, PROT_READ | PROT_WRITE | PROT_EXEC)) return 4;
            orig_ptr = (fn_t)stub;
            memcpy((void *)fn, buf, unhex(new_hex, buf));
            printf("OK %ld %ld\n", before, fn(arg));
        }
        fflush(stdout);
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def harness_exe(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("harness")
    for name, text in (("targets.c", TARGETS_C), ("targets_ibt.c", TARGETS_IBT_C),
                       ("asm.S", TARGETS_S), ("main.c", MAIN_C)):
        (d / name).write_text(text)
    objs = [gcc(d / "targets.o", "-O2", "-fPIE", "-fcf-protection=none", "-c",
                str(d / "targets.c")),
            gcc(d / "targets_ibt.o", "-O2", "-fPIE", "-fcf-protection=full", "-c",
                str(d / "targets_ibt.c")),
            gcc(d / "asm.o", "-c", str(d / "asm.S")),
            gcc(d / "main.o", "-O1", "-fPIE", "-c", str(d / "main.c"))]
    return gcc(d / "harness", "-pie", *map(str, objs))


class Harness:
    """One run of the harness: learn the addresses, then send a batch of commands."""

    def __init__(self, exe: Path) -> None:
        self.exe = exe
        self.proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.addr: dict[str, int] = {}
        for line in self.proc.stdout:
            if line.strip() == "READY":
                break
            name, addr = line.split()
            self.addr[name] = int(addr, 16)

    def fn(self, name: str) -> FunctionCode:
        return fn_from_elf(self.exe, name, addr=self.addr[name])

    def near(self, name: str, slot: int = 0) -> int:
        """A page 256 MiB (+ slot pages) below the function: in rel32 reach, free."""
        return (self.addr[name] & ~0xFFF) - 0x1000_0000 - slot * 0x1000

    @staticmethod
    def far(slot: int = 0) -> int:
        """A page ~16 TiB up: more than 2 GiB from the PIE text at 0x55.../0x56..."""
        return 0x1000_0000_0000 + slot * 0x1000

    def run(self, commands: list[str]) -> list[tuple[int, int]]:
        try:
            out, _ = self.proc.communicate("".join(c + "\n" for c in commands), timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        lines = out.splitlines()
        assert self.proc.returncode == 0 and len(lines) == len(commands), \
            f"harness exited {self.proc.returncode} (negative = killed by a signal); said {lines}"
        return [tuple(int(v) for v in line.split()[1:]) for line in lines]


def call_cmd(name: str, at: int, stub: bytes, arg: int) -> str:
    return f"C {name} {at:#x} {stub.hex()} {arg}"


def test_first_instruction_rip_relative_runs_relocated(harness_exe):
    h = Harness(harness_exe)
    cmds, stubs = [], []
    for slot, (name, arg) in enumerate([("get_counter", 5), ("greeting", 0),
                                        ("scaled", 3), ("get_counter_ibt", 2)]):
        fn = h.fn(name)
        first = dis(fn.code, fn.addr)[1 if name.endswith("_ibt") else 0]
        assert first.operands[1].mem.base == capstone.x86.X86_REG_RIP, "test premise"
        at = h.near(name, slot)
        stub = plan_call_original(fn, at)
        assert len(stub) <= call_original_size_bound(fn)
        # The copy of the RIP-relative instruction must have a different disp32.
        assert stub[:first.size] != fn.code[:first.size] or name.endswith("_ibt")
        stubs.append(stub)
        cmds.append(call_cmd(name, at, stub, arg))
    assert dis(h.fn("get_counter_ibt").code, 0)[0].mnemonic == "endbr64"
    results = h.run(cmds)
    assert results[0] == (47, 47)
    assert results[1][0] == results[1][1] != 0  # same "hello" pointer
    assert results[2] == (127, 127)
    assert results[3] == (40, 40)


def test_prologue_call_jmp_and_jcc_relocated_near_and_far(harness_exe):
    h = Harness(harness_exe)
    cases = [("asm_call", 20, 41), ("asm_jcc", 0, 99), ("asm_jcc", 4, 15),
             ("asm_jcc32", -3, -1), ("asm_jcc32", 3, 8), ("asm_tailjmp", 6, 7)]
    cmds, forms = [], []
    for slot, (name, arg, _) in enumerate(cases):
        fn = h.fn(name)
        for at in (h.near(name, slot), h.far(slot)):
            stub = plan_call_original(fn, at)
            assert len(stub) <= call_original_size_bound(fn)
            forms.append(dis(stub, at)[:3])
            cmds.append(call_cmd(name, at, stub, arg))
    results = h.run(cmds)
    for (name, arg, want), near, far in zip(cases, results[0::2], results[1::2]):
        assert near == (want, want), (name, arg)
        assert far == (want, want), (name, arg)
    # The far copies really use the absolute forms (not just the near ones twice).
    far_call = forms[1]
    assert far_call[0].mnemonic == "call"
    assert far_call[0].operands[0].type == capstone.x86.X86_OP_MEM
    far_jcc = forms[3]
    assert [i.mnemonic for i in far_jcc[:3]] == ["test", "jne", "jmp"]
    near_jcc = forms[2]
    assert [i.mnemonic for i in near_jcc[:2]] == ["test", "je"] and near_jcc[1].size == 6


def test_wrap_end_to_end(harness_exe):
    """Redirect get_counter to wrapper() (10 * orig), orig = our call-original stub."""
    h = Harness(harness_exe)
    fn = h.fn("get_counter")
    at = h.near("get_counter")
    stub = plan_call_original(fn, at)
    r = plan_redirect(fn, h.addr["wrapper"])
    (result,) = h.run([f"W get_counter {at:#x} {stub.hex()} {r.new.hex()} 8"])
    assert result == (50, 500)


def test_rip_relative_to_far_stub_is_refused(harness_exe):
    fn = fn_from_elf(harness_exe, "get_counter")
    with pytest.raises(TrampolineError, match=r"cannot wrap get_counter: `movsxd rax, dword ptr "
                                              r"\[rip \+ 0x[0-9a-f]+\]` at get_counter\+0x0 "
                                              r"cannot be moved .* out of ±2 GiB reach"):
        plan_call_original(fn, fn.addr + 3 * GiB)
    with pytest.raises(TrampolineError, match="out of ±2 GiB reach"):
        relocate(fn.code, fn.addr, fn.addr - 3 * GiB, 5)
    # The bound does not depend on the address, so it is computed even when relocation fails.
    assert call_original_size_bound(fn) == 7 + w.JMP_ABS_LEN


def test_branch_into_window_refused_naming_offset(harness_exe):
    fn = fn_from_elf(harness_exe, "asm_loophead")
    with pytest.raises(TrampolineError, match=r"cannot redirect asm_loophead: instruction at "
                                              r"asm_loophead\+0x8 jumps into the first 5 bytes "
                                              r"\(to asm_loophead\+0x2\)"):
        plan_redirect(fn, fn.addr + 0x1000)


def test_unrelocatable_prologues_refused(harness_exe):
    # A jump to the entry from after the window is fine to redirect but not to wrap.
    fn = fn_from_elf(harness_exe, "asm_reentry")
    plan_redirect(fn, fn.addr + 0x1000)
    with pytest.raises(TrampolineError, match=r"cannot wrap asm_reentry: instruction at "
                                              r"asm_reentry\+0x6 jumps back to its entry"):
        plan_call_original(fn, fn.addr + 0x1000)
    fn = fn_from_elf(harness_exe, "asm_inwindow")
    with pytest.raises(TrampolineError, match=r"`jne 0x[0-9a-f]+` at asm_inwindow\+0x2 .* "
                                              r"branches into the relocated bytes"):
        plan_call_original(fn, fn.addr + 0x1000)
    fn = fn_from_elf(harness_exe, "asm_jrcxz")
    with pytest.raises(TrampolineError, match=r"`jrcxz 0x[0-9a-f]+` at asm_jrcxz\+0x0 .* "
                                              r"no relocatable form"):
        plan_call_original(fn, fn.addr + 0x1000)
    loop = bytes.fromhex("e2fe") + b"\x90" * 4  # loop $ (hand-made: gas won't emit it at entry)
    with pytest.raises(TrampolineError, match=r"`loop 0x1000` at 0x1000"):
        relocate(loop, 0x1000, 0x2000, 5)


def test_relocate_consumes_fewest_whole_instructions(harness_exe):
    fn = fn_from_elf(harness_exe, "asm_jcc")  # test(3) je(2) lea(5) ...
    assert relocate(fn.code, fn.addr, fn.addr + 0x100, 5).consumed == 5
    assert relocate(fn.code, fn.addr, fn.addr + 0x100, 6).consumed == 10
    # A plain instruction is copied byte for byte; the jcc grows to rel32.
    out = relocate(fn.code, fn.addr, fn.addr + 0x100, 5).code
    assert out[:3] == fn.code[:3] and out[3:5] == b"\x0f\x84" and len(out) == 9
