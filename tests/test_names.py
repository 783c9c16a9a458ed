"""How the tool names things in a target (issue #15, items 6 and 7):
return addresses in backtraces, and objects by file name or SONAME."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import assert_error, assert_ok, describe, run_hotpatch
from inline import Proc, gcc, patch


# --- item 6: a return address after a call that never returns -------------------
NORETURN_C = r"""
#include <stdio.h>
#include <unistd.h>
static volatile int stop;
__attribute__((noinline)) int wait_here(void)
{
    printf("ready\n"); fflush(stdout);  /* from inside: the thread is here from now on */
    while (!stop) pause();
    return 1;
}
__attribute__((noreturn, noinline)) static void serve(void) { for (;;) wait_here(); }
int main(void) { serve(); }
"""

WAIT_PATCH = r"""
#include <hotpatch.h>
static int wait_v2(void) { return 2; }
HOTPATCH_REPLACE("main:wait_here", wait_v2);
"""


def _main_ends_with_call(binary: Path) -> bool:
    """main's last instruction is the call to serve(): its return address
    lies just past main (objdump, independent of our symbolizer)."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "--disassemble=main", str(binary)],
                         capture_output=True, text=True, check=True).stdout
    size = subprocess.run(["nm", "-S", str(binary)], capture_output=True, text=True, check=True).stdout
    start, length = next((int(p[0], 16), int(p[1], 16)) for p in map(str.split, size.splitlines())
                         if len(p) == 4 and p[3] == "main")
    calls = [line for line in out.splitlines() if "\tcall" in line and "<serve>" in line]
    return bool(calls) and any(int(c.split(":")[0], 16) + 5 == start + length for c in calls)


def test_backtrace_names_frame_after_noreturn_call(tmp_path):
    (tmp_path / "t.c").write_text(NORETURN_C)
    gcc("-O2", "-g", "-o", tmp_path / "t", tmp_path / "t.c")
    assert _main_ends_with_call(tmp_path / "t"), "the compiler no longer ends main with the call"
    fix = patch(tmp_path, "fix", WAIT_PATCH)
    t = Proc([str(tmp_path / "t")])
    try:
        cp = run_hotpatch("check", t.pid, fix, "--json")
        assert cp.returncode == 3, describe(cp)  # a thread sits in wait_here()
        blockers = json.loads(cp.stdout)["blockers"]
        frames = blockers[0]["backtrace"]
        assert any(f.startswith("main:wait_here+") for f in frames), frames
        assert any(f.startswith("main:serve+") for f in frames), frames
        # serve()'s caller: the return address is main's end, shown as main, not hex
        assert any(f.startswith("main:main+") for f in frames), frames
        assert not any(f.startswith("0x") for f in frames[:4]), frames
    finally:
        t.kill()


# --- item 7: an object named by its SONAME -----------------------------------------
LIBFOO_C = "int foo_value(int x) { return x + VALUE; }\n"

SONAME_MAIN_C = r"""
#include <dlfcn.h>
#include <stdio.h>
#include <unistd.h>
int foo_value(int);
int main(int argc, char **argv) {
    if (argc > 1 && !dlopen(argv[1], RTLD_NOW | RTLD_LOCAL)) { puts(dlerror()); return 1; }
    printf("ready\n"); fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) { printf("%d\n", foo_value(1)); fflush(stdout); }
    return 0;
}
"""


def _foo_patch(target: str, pin: str | None = None) -> str:
    pin_line = f'HOTPATCH_BUILD_ID("{pin.split("=")[0]}", "{pin.split("=")[1]}");' if pin else ""
    return f"""
#include <hotpatch.h>
static int foo_v2(int x) {{ return x + 1000; }}
HOTPATCH_REPLACE("{target}", foo_v2);
{pin_line}
"""


def _build_id(path: Path) -> str:
    from elftools.elf.elffile import ELFFile
    with open(path, "rb") as f:
        return next(str(n["n_desc"]) for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_NOTE"
                    for n in s.iter_notes() if n["n_type"] == "NT_GNU_BUILD_ID")


@pytest.fixture(scope="module")
def soname_build(tmp_path_factory) -> Path:
    """libfoo.so.0.35.0 (SONAME libfoo.so.0) linked by a program through the
    usual symlinks, and a second build of it (libfoo.so.0.36.0, same SONAME)."""
    d = tmp_path_factory.mktemp("soname")
    (d / "foo.c").write_text(LIBFOO_C)
    for version, value in (("0.35.0", 1), ("0.36.0", 2)):
        gcc("-O0", "-shared", "-fPIC", f"-DVALUE={value}", "-Wl,-soname,libfoo.so.0",
            "-o", d / f"libfoo.so.{version}", d / "foo.c")
    (d / "libfoo.so.0").symlink_to("libfoo.so.0.35.0")
    (d / "libfoo.so").symlink_to("libfoo.so.0")
    (d / "main.c").write_text(SONAME_MAIN_C)
    gcc("-O2", "-o", d / "prog", d / "main.c", f"-L{d}", "-lfoo", f"-Wl,-rpath,{d}", "-ldl")
    return d


def test_soname_names_the_object_in_targets_and_pins(soname_build, tmp_path):
    d = soname_build
    bid = _build_id(d / "libfoo.so.0.35.0")
    fix = patch(tmp_path, "fix", _foo_patch("libfoo.so.0:foo_value", f"libfoo.so.0={bid}"))
    t = Proc([str(d / "prog")])
    try:
        assert int(t.ask()) == 2
        cp = run_hotpatch("apply", t.pid, fix)
        assert_ok(cp)
        assert "libfoo.so.0.35.0:foo_value" in cp.stdout, cp.stdout  # the file it patched
        assert int(t.ask()) == 1001
        # the file name still works, and a wrong pin by SONAME is refused (exit 4)
        wrong = patch(tmp_path, "wrong", _foo_patch("libfoo.so.0.35.0:foo_value", "libfoo.so.0=" + "ab" * 20))
        line = assert_error(run_hotpatch("check", t.pid, wrong), 4)
        assert "build-id" in line, line
    finally:
        t.kill()


def test_soname_carried_by_two_files_is_ambiguous(soname_build, tmp_path):
    d = soname_build
    fix = patch(tmp_path, "fix", _foo_patch("libfoo.so.0:foo_value"))
    t = Proc([str(d / "prog"), str(d / "libfoo.so.0.36.0")])
    try:
        line = assert_error(run_hotpatch("check", t.pid, fix), 4)
        assert "libfoo.so.0.35.0" in line and "libfoo.so.0.36.0" in line and "SONAME" in line, line
        by_file = patch(tmp_path, "by_file", _foo_patch("libfoo.so.0.36.0:foo_value"))
        assert run_hotpatch("check", t.pid, by_file).returncode == 0
        assert int(t.ask()) == 2  # check changed nothing
    finally:
        t.kill()


def test_unknown_object_lists_sonames(soname_build, tmp_path):
    fix = patch(tmp_path, "fix", _foo_patch("libnope.so.1:foo_value"))
    t = Proc([str(soname_build / "prog")])
    try:
        line = assert_error(run_hotpatch("check", t.pid, fix), 4)
        assert "libfoo.so.0.35.0/libfoo.so.0" in line, line
    finally:
        t.kill()
