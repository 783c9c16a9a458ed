"""IFUNCs and the vDSO (issue #15 item 5): a patch of something the process
does not call is refused, naming what it calls instead -- never a success
that does nothing."""
from __future__ import annotations

import os

import pytest

from conftest import assert_error, assert_ok, run_hotpatch
from inline import Proc, patch, program
from ksplice_py.memory import RemoteMemory
from ksplice_py.symbols import TargetSymbols

# Calls gettimeofday and strlen once before "ready", so the lazily bound PLT
# slots hold what the IFUNC resolvers chose for this process.
TOD_C = r"""
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
int main(int argc, char **argv)
{
    char line[64];
    struct timeval tv;
    gettimeofday(&tv, NULL);
    size_t n = strlen(argv[0]);
    printf("ready\n"); fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        gettimeofday(&tv, NULL);
        printf("%ld %zu\n", (long)(tv.tv_sec > 1000000 ? 1 : 0), n + strlen(line)); fflush(stdout);
    }
    return 0;
}
"""

TOD_PATCH = r"""
#include <hotpatch.h>
#include <sys/time.h>
static int tod_v2(struct timeval *tv, void *tz) { (void)tz; tv->tv_sec = 7; tv->tv_usec = 0; return 0; }
HOTPATCH_REPLACE("TARGET", tod_v2);
"""


@pytest.fixture(scope="module")
def tod(tmp_path_factory):
    d = tmp_path_factory.mktemp("tod")
    exe = program(d, "tod", TOD_C, "-O2")
    with Proc([str(exe)]) as t:
        mem = RemoteMemory(t.pid)
        syms = TargetSymbols(t.pid, mem)
        if syms.vdso is None:
            pytest.skip("this process has no vDSO")
        chosen = syms.ifunc_selection(syms.resolve("libc.so.6:gettimeofday"))
        mem.close()
        if not syms.vdso.start <= chosen < syms.vdso.end:
            pytest.skip("glibc did not pick the vDSO's gettimeofday here")
        yield t, d


def test_ifunc_names_the_vdso_implementation(tod):
    t, d = tod
    fix = patch(d, "ifunc", TOD_PATCH.replace("TARGET", "libc.so.6:gettimeofday"))
    line = assert_error(run_hotpatch("check", t.pid, fix), 4)
    assert "IFUNC" in line and "[vdso]:" in line and "gettimeofday" in line and "vDSO" in line, line


def test_unselected_implementation_refused_naming_the_vdso(tod):
    t, d = tod
    syms = TargetSymbols(t.pid, RemoteMemory(t.pid))
    try:
        syms.resolve("libc.so.6:__gettimeofday_syscall")
    except Exception:
        pytest.skip("libc's static symbols are not installed (libc6-dbg)")
    fix = patch(d, "syscall", TOD_PATCH.replace("TARGET", "libc.so.6:__gettimeofday_syscall"))
    before = t.ask()
    line = assert_error(run_hotpatch("apply", t.pid, fix), 4)
    assert "gettimeofday ->" in line and "vDSO" in line and "__gettimeofday_syscall" in line, line
    assert t.ask() == before


def test_vdso_named_but_never_patched(tod):
    t, d = tod
    fix = patch(d, "vdso", TOD_PATCH.replace("TARGET", "linux-vdso.so.1:__vdso_gettimeofday"))
    line = assert_error(run_hotpatch("check", t.pid, fix), 4)
    assert "[vdso]:__vdso_gettimeofday" in line and "not patched" in line, line


def test_ifunc_in_libc_names_its_implementation(tod):
    t, d = tod
    fix = patch(d, "strlen", r"""
#include <hotpatch.h>
#include <stddef.h>
static size_t strlen_v2(const char *s) { size_t n = 0; while (s[n]) n++; return n; }
HOTPATCH_REPLACE("libc.so.6:strlen", strlen_v2);
""")
    line = assert_error(run_hotpatch("check", t.pid, fix), 4)
    assert "IFUNC" in line and "resolved it to libc.so.6:" in line, line
    impl = line.split("resolved it to ")[1].split(";")[0]
    if "unnamed" not in impl:  # with libc's debug symbols: e.g. __strlen_avx2, and it applies
        named = patch(d, "strlen_impl", r"""
#include <hotpatch.h>
#include <stddef.h>
/* volatile: gcc would turn the loop back into a call to strlen */
static size_t strlen_v2(const char *s) { size_t n = 0; for (const volatile char *p = s; *p; p++) n++; return n + 1000; }
HOTPATCH_REPLACE("TARGET", strlen_v2);
""".replace("TARGET", impl))
        before = int(t.ask("abc").split()[1])
        assert_ok(run_hotpatch("apply", t.pid, named))
        assert int(t.ask("abc").split()[1]) == before + 1000
