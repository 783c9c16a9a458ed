"""What gcc assumes about local functions, and patches that would break it
(issue #15 items 4 and 4b): clones with a changed ABI, and callers that keep
values in call-clobbered registers across a call (-fipa-ra)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from conftest import assert_error, assert_ok, describe, run_hotpatch, wait_until
from inline import Proc, patch, program

# --- item 4: clones ---------------------------------------------------------------
CLONE_C = r"""
#include <stdio.h>
#include <string.h>
static __attribute__((noinline)) int format_reply(char *buf, int code, int value)
{
    return sprintf(buf, "%d:%d", code, value);
}
int main(void)
{
    char line[64], out[64];
    printf("ready\n"); fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        format_reply(out, 200, (int)strlen(line));   /* code is always 200 */
        printf("%s\n", out); fflush(stdout);
    }
    return 0;
}
"""

SOURCE_SIGNATURE = r"""
#include <hotpatch.h>
#include <stdio.h>
static int format_v2(char *buf, int code, int value) { return sprintf(buf, "v2 %d:%d", code, value); }
HOTPATCH_REPLACE("TARGET", format_v2);
"""

CLONE_ABI = r"""
#include <hotpatch.h>
#include <stdio.h>
/* the clone's ABI: code folded in (constprop), return value dropped (isra) */
static void format_v2(char *buf, int value) { sprintf(buf, "v2 200:%d", value); }
HOTPATCH_REPLACE("TARGET", format_v2);
HOTPATCH_CLONE_ABI("TARGET");
"""


@pytest.fixture(scope="module")
def clone_prog(tmp_path_factory) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("clones")
    exe = program(d, "server", CLONE_C, "-O2", "-g")
    names = subprocess.run(["nm", str(exe)], capture_output=True, text=True, check=True).stdout
    clones = re.findall(r"\b(format_reply\.(?:constprop|isra|part)\.\d+\S*)", names)
    assert clones and "format_reply\n" not in names, f"gcc made no clone of format_reply:\n{names}"
    return exe, clones[0]


def test_missing_function_names_its_clones(clone_prog, tmp_path):
    exe, clone = clone_prog
    fix = patch(tmp_path, "fix", SOURCE_SIGNATURE.replace("TARGET", "main:format_reply"))
    with Proc([str(exe)]) as t:
        line = assert_error(run_hotpatch("check", t.pid, fix), 4)
        assert f"main:{clone}" in line and "HOTPATCH_CLONE_ABI" in line, line
        unqualified = patch(tmp_path, "fix2", SOURCE_SIGNATURE.replace("TARGET", "format_reply"))
        line = assert_error(run_hotpatch("check", t.pid, unqualified), 4)
        assert f"main:{clone}" in line, line


def test_clone_target_refused_without_declared_abi(clone_prog, tmp_path):
    exe, clone = clone_prog
    fix = patch(tmp_path, "fix", SOURCE_SIGNATURE.replace("TARGET", f"main:{clone}"))
    with Proc([str(exe)]) as t:
        before = t.ask("abc")
        line = assert_error(run_hotpatch("apply", t.pid, fix), 4)
        assert "gcc clone" in line and f'HOTPATCH_CLONE_ABI("main:{clone}")' in line, line
        assert t.ask("abc") == before == "200:4"


def test_clone_patched_when_abi_declared(clone_prog, tmp_path):
    exe, clone = clone_prog
    fix = patch(tmp_path, "fix", CLONE_ABI.replace("TARGET", f"main:{clone}"))
    info = run_hotpatch("info", fix, "--json")
    assert_ok(info)
    assert '"clone_abi": true' in info.stdout, info.stdout
    with Proc([str(exe)]) as t:
        assert_ok(run_hotpatch("apply", t.pid, fix))
        assert t.ask("abc") == "v2 200:4"


def test_clone_abi_must_name_a_replaced_clone(tmp_path):
    stray = patch(tmp_path, "stray", CLONE_ABI.replace('HOTPATCH_REPLACE("TARGET"', 'HOTPATCH_REPLACE("main:f.isra.0"')
                  .replace("TARGET", "main:g.isra.0"))
    line = assert_error(run_hotpatch("info", stray), 2)
    assert "neither replaces nor wraps" in line, line
    plain = patch(tmp_path, "plain", CLONE_ABI.replace("TARGET", "main:format_reply"))
    line = assert_error(run_hotpatch("info", plain), 2)
    assert "does not name a gcc clone" in line, line


# --- item 4b: callers that rely on a local callee's registers (-fipa-ra) -------------
IPA_RA_C = r"""
#include <stdio.h>
#include <stdlib.h>
static __attribute__((noinline, noclone)) int scale(int v) { return (v ^ 0x5a5a) * 3 + 1000000; }
__attribute__((noinline)) int combine(int x, int y)
{
    int keep = x * y + 7;      /* kept in a call-clobbered register across scale() */
    return scale(x) + keep;
}
int main(void)
{
    char line[64];
    printf("ready\n"); fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        int x = atoi(line);
        printf("%d\n", combine(x, x + 1)); fflush(stdout);
    }
    return 0;
}
"""

# Follows the ABI, and writes every argument register as the ABI allows.
CLOBBERING_SCALE = r"""
#include <hotpatch.h>
static int scale_v2(int v)
{
    __asm__ volatile("mov $-1, %%rcx; mov $-1, %%rdx; mov $-1, %%rsi; mov $-1, %%r8;"
                     "pcmpeqd %%xmm1, %%xmm1" ::: "rcx", "rdx", "rsi", "r8", "xmm1");
    return v * 5;
}
HOTPATCH_REPLACE("main:scale", scale_v2);
"""

# A wrapper: calls the original through its stub, and clobbers on the way back.
CLOBBERING_WRAP = r"""
#include <hotpatch.h>
static int (*scale_orig)(int);
static int scale_wrap(int v)
{
    int r = scale_orig(v);
    __asm__ volatile("mov $-1, %%rdx; mov $-1, %%rsi" ::: "rdx", "rsi");
    return r + 1;
}
HOTPATCH_WRAP("main:scale", scale_wrap, scale_orig);
"""

STACK_ARGS_C = r"""
#include <stdio.h>
#include <stdlib.h>
static __attribute__((noinline, noclone)) int sum8(int a, int b, int c, int d, int e, int f, int g, int h)
{ return ((a ^ 0x5a5a) + b + c + d + e + f) * 3 + g * 7 + h; }
__attribute__((noinline)) int outer(int x)
{
    int keep = x * x + 7;
    return sum8(x, 1, 2, 3, 4, 5, x + 6, x * 7) + keep;
}
int main(void)
{
    char line[64];
    printf("ready\n"); fflush(stdout);
    while (fgets(line, sizeof line, stdin)) { printf("%d\n", outer(atoi(line))); fflush(stdout); }
    return 0;
}
"""

CLOBBERING_SUM8 = r"""
#include <hotpatch.h>
static int sum8_v2(int a, int b, int c, int d, int e, int f, int g, int h)
{
    __asm__ volatile("mov $-1, %%rcx; mov $-1, %%rdx; mov $-1, %%rsi; mov $-1, %%r8;"
                     "mov $-1, %%r9; mov $-1, %%r10; mov $-1, %%r11; mov $-1, %%rdi"
                     ::: "rcx", "rdx", "rsi", "r8", "r9", "r10", "r11", "rdi");
    return a + b + c + d + e + f + g + h;
}
HOTPATCH_REPLACE("main:sum8", sum8_v2);
"""


_CLOBBERED = {**{r: r for r in ("rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11")},
              "ecx": "rcx", "edx": "rdx", "esi": "rsi", "edi": "rdi", "r8d": "r8", "r9d": "r9",
              "r10d": "r10", "r11d": "r11", "cl": "rcx", "dl": "rdx", "sil": "rsi", "dil": "rdi"}
_WRITE_ONLY = ("mov", "lea", "movzx", "movsx", "movsxd")


def _caller_keeps_value_across_call(exe: Path, caller: str, callee: str) -> set[str]:
    """Call-clobbered registers (rax aside) that ``caller`` reads after
    ``call callee`` before writing them: values it keeps there across the
    call, which the ABI alone would not allow -- gcc's -fipa-ra at work.
    Read from objdump, independent of the tool's own analysis."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-M", "intel",
                          f"--disassemble={caller}", str(exe)], capture_output=True, text=True,
                         check=True).stdout
    insns = [line.split("\t", 1)[1].split("#")[0].strip() for line in out.splitlines() if ":\t" in line]
    at = next(i for i, text in enumerate(insns) if text.startswith("call") and f"<{callee}" in text)
    written: set[str] = set()
    kept: set[str] = set()
    for text in insns[at + 1:]:
        mnemonic, _, args = text.partition(" ")
        if mnemonic.startswith(("call", "jmp", "ret")):
            break
        ops = [re.findall(r"\b\w+\b", op) for op in args.split(",")]
        first = ops[0] if ops else []
        read = [w for op in ops[1:] for w in op] + ([] if mnemonic in _WRITE_ONLY and len(first) == 1 else first)
        kept |= {_CLOBBERED[w] for w in read if w in _CLOBBERED} - written
        written |= {_CLOBBERED[w] for w in first if w in _CLOBBERED and len(first) == 1}
    return kept


@pytest.fixture(scope="module")
def ipa_prog(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ipa_ra")
    exe = program(d, "calc", IPA_RA_C, "-O2", "-g")
    kept = _caller_keeps_value_across_call(exe, "combine", "scale")
    assert kept, "gcc no longer keeps a value in a call-clobbered register across scale()"
    return exe


def _expected(x: int, scale) -> int:
    return scale(x) + x * (x + 1) + 7


def test_ipa_ra_registers_preserved_for_callers(ipa_prog, tmp_path):
    fix = patch(tmp_path, "fix", CLOBBERING_SCALE)
    with Proc([str(ipa_prog)]) as t:
        assert int(t.ask("5")) == _expected(5, lambda v: (v ^ 0x5a5a) * 3 + 1000000)
        cp = run_hotpatch("apply", t.pid, fix)
        assert_ok(cp)
        for x in (5, -3, 1000):
            assert int(t.ask(str(x))) == _expected(x, lambda v: v * 5), describe(cp)
        assert_ok(run_hotpatch("revert", t.pid))
        assert int(t.ask("5")) == _expected(5, lambda v: (v ^ 0x5a5a) * 3 + 1000000)


def test_ipa_ra_registers_preserved_around_a_wrapper(ipa_prog, tmp_path):
    fix = patch(tmp_path, "wrap", CLOBBERING_WRAP)
    original = lambda v: (v ^ 0x5a5a) * 3 + 1000000  # noqa: E731
    with Proc([str(ipa_prog)]) as t:
        assert_ok(run_hotpatch("apply", t.pid, fix))
        for x in (5, -3, 1000):
            assert int(t.ask(str(x))) == _expected(x, lambda v: original(v) + 1)


def test_ipa_ra_refused_when_a_thunk_cannot_stand_in_front(tmp_path):
    exe = program(tmp_path, "calc8", STACK_ARGS_C, "-O2", "-g")
    fix = patch(tmp_path, "fix", CLOBBERING_SUM8)
    if not _caller_keeps_value_across_call(exe, "outer", "sum8"):
        pytest.skip("gcc kept nothing in a call-clobbered register across sum8() here")
    with Proc([str(exe)]) as t:
        before = t.ask("5")
        line = assert_error(run_hotpatch("apply", t.pid, fix), 4)
        assert "-fipa-ra" in line and "stack arguments" in line, line
        assert t.ask("5") == before


# A thread parked in the new code, called through the thunk: the thunk is part
# of the edition, so a revert must wait for it (unmapping it would crash the
# target when the new code returns).
PARKED_C = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
volatile int release_parked, parked_now;
static volatile int zero;  /* keeps scale() from being a const function gcc calls once */
static __attribute__((noinline, noclone)) int scale(int v) { return (v ^ 0x5a5a) * 3 + 1000000 + zero; }
__attribute__((noinline)) int combine(int x, int y)
{
    int keep = x * y + 7;
    return scale(x) + keep;
}
static volatile int worker_result;
static void *worker(void *arg)
{
    (void)arg;
    for (;;) { worker_result = combine(2, 3); usleep(1000); }
    return NULL;
}
int main(void)
{
    char line[64];
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    printf("ready\n"); fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        if (line[0] == 'p') { printf("%d\n", parked_now); fflush(stdout); continue; }
        if (line[0] == 'r') release_parked = 1;
        printf("%d %d\n", combine(atoi(line + 1), atoi(line + 1) + 1), worker_result); fflush(stdout);
    }
    return 0;
}
"""

PARKING_SCALE = r"""
#include <hotpatch.h>
#include <unistd.h>
static volatile int *release, *parked;
static int scale_v2(int v)
{
    *parked = 1;
    while (!*release) usleep(1000);        /* an import: every register may be written */
    __asm__ volatile("mov $-1, %%rdx; mov $-1, %%rsi" ::: "rdx", "rsi");
    return v * 5;
}
HOTPATCH_REPLACE("main:scale", scale_v2);
HOTPATCH_SYMBOL("main:release_parked", release);
HOTPATCH_SYMBOL("main:parked_now", parked);
"""


def test_revert_waits_for_a_thread_inside_the_thunk(tmp_path):
    exe = program(tmp_path, "parked", PARKED_C, "-O2", "-g", "-pthread")
    assert _caller_keeps_value_across_call(exe, "combine", "scale")
    fix = patch(tmp_path, "park", PARKING_SCALE)
    with Proc([str(exe)]) as t:
        assert_ok(run_hotpatch("apply", t.pid, fix))
        wait_until(lambda: t.ask("p") == "1", 10, "the worker to park in scale_v2 (called by the thunk)")
        line = assert_error(run_hotpatch("revert", t.pid, "--timeout", "0.5"), 3)
        assert "return address into edition 1" in line, line
        assert "<- edition 1 (park.so)+0x" in line, line  # the new code's frame, named
        # released: results are right (the thunk kept combine's registers), then revert
        assert t.ask("r5").split()[0] == str(_expected(5, lambda v: v * 5))
        assert_ok(run_hotpatch("revert", t.pid, "--timeout", "5"))
        original = lambda v: (v ^ 0x5a5a) * 3 + 1000000  # noqa: E731
        want = [str(_expected(5, original)), str(_expected(2, original))]
        wait_until(lambda: t.ask("x5").split() == want, 10, f"main and worker to compute {want}")
