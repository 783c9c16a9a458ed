"""How the tool names things in a target (issue #15, items 6 and 7):
return addresses in backtraces, and objects by file name or SONAME."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import assert_error, assert_ok, describe, get_cflags, run_hotpatch


class Proc:
    """A target that prints one line when ready; killed at teardown."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.line = self.proc.stdout.readline().strip()
        assert self.line, "target printed nothing"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def gcc(*args: object) -> None:
    cp = subprocess.run(["gcc", *map(str, args)], capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr


def patch(d: Path, name: str, source: str) -> Path:
    (d / f"{name}.c").write_text(source)
    gcc("-shared", "-fPIC", "-O2", *get_cflags(), "-o", d / f"{name}.so", d / f"{name}.c")
    return d / f"{name}.so"


# --- item 6: a return address after a call that never returns -------------------
NORETURN_C = r"""
#include <stdio.h>
#include <unistd.h>
static volatile int stop;
__attribute__((noinline)) int wait_here(void) { while (!stop) pause(); return 1; }
__attribute__((noreturn, noinline)) static void serve(void) { for (;;) wait_here(); }
int main(void) { printf("ready\n"); fflush(stdout); serve(); }
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
