"""Precise safety (issue #4): the conservative scan's false positive is
dismissed by DWARF unwinding, and a blocking thread's backtrace is gdb's."""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

import ksplice_py
from ksplice_py import quiescence
from ksplice_py.cycle import PatchCycle
from ksplice_py.patchfile import cflags
from ksplice_py.lifecycle import Direction
from ksplice_py.transition import Transition
from ksplice_py.trust import load_patch

from conftest import assert_error, run_hotpatch

# A worker calls compute(), which calls helper(): the return address into
# compute is pushed. Back in worker, park() reserves an uninitialised buffer
# over that same stack depth and blocks: a stale address into compute now
# sits in a live frame, though no call chain passes through compute.
STALE = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
volatile int sink;
__attribute__((noipa)) int helper(int x) { return x + 1; }
__attribute__((noipa)) int compute(int x) { return helper(x) * 2; }
__attribute__((noipa)) void park(int fd) {
    volatile char buf[512];
    char c;
    buf[0] = 1;
    sink = read(fd, &c, 1);          /* blocks: the pipe never gets data */
}
int pipefd[2];
static void *worker(void *arg) {
    pthread_setname_np(pthread_self(), "stale-worker");
    sink = compute(1);
    park(pipefd[0]);
    return NULL;
}
int main(void) {
    pthread_t t;
    pipe(pipefd);
    pthread_create(&t, NULL, worker, NULL);
    printf("ready\n");
    fflush(stdout);
    for (;;) { sink = compute(2); usleep(1000); }
}
"""

# A thread sleeps inside compute, three calls deep, with a name.
BLOCKED = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
__attribute__((noipa)) int compute(int x) { if (x == 7) sleep(1000); return x * 2 + 1; }
__attribute__((noipa)) int middle(int x) { return compute(x) + 1; }
__attribute__((noipa)) int outer(int x) { return middle(x) + 1; }
static void *sleeper(void *a) { pthread_setname_np(pthread_self(), "sleeper-7"); outer(7); return 0; }
int main(void) {
    pthread_t t;
    pthread_create(&t, 0, sleeper, 0);
    printf("ready\n");
    fflush(stdout);
    for (;;) { outer(1); usleep(1000); }
}
"""

PATCH = r"""
#include <hotpatch.h>
static int compute_v2(int x) { return x * 3; }
HOTPATCH_REPLACE("compute", compute_v2);
"""


def _build(tmp: Path, name: str, src: str, shared: bool = False) -> Path:
    (tmp / f"{name}.c").write_text(src)
    out = tmp / (f"{name}.so" if shared else name)
    if shared:
        cmd = ["gcc", "-shared", "-fPIC", "-O2", *cflags().split(), "-o", str(out), str(tmp / f"{name}.c")]
    else:
        cmd = ["gcc", "-O2", "-g", "-pie", "-fPIE", "-pthread", "-o", str(out), str(tmp / f"{name}.c")]
    subprocess.run(cmd, check=True)
    return out


@pytest.fixture
def run_target(tmp_path):
    procs = []

    def start(name: str, src: str) -> subprocess.Popen:
        exe = _build(tmp_path, name, src)
        p = subprocess.Popen([str(exe)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.1)  # let the worker reach its blocking call
        procs.append(p)
        return p

    yield start
    for p in procs:
        assert p.poll() is None, "target died during the test"
        p.kill()
        p.wait()


def test_stale_return_address_blocks_conservative_and_precise_dismisses(tmp_path, run_target):
    target = run_target("stale", STALE)
    patch = load_patch(str(_build(tmp_path, "fix", PATCH, shared=True)))
    with ksplice_py.attach(target.pid) as proc:
        cycle = PatchCycle(proc.target, patch)
        try:
            cycle.stage()
            t = Transition(proc.target, cycle.edition, Direction.PATCH)
            conservative = t.try_complete(write=False)
            assert not conservative.done, "the stale slot should fool the conservative scan"
            (b,) = conservative.blockers
            assert b.comm == "stale-worker" and "return address into main:compute" in b.reason
            t.load_unwinder()
            precise = t.try_complete(write=False)
            assert precise.done, f"precise unwinding should dismiss it: {precise.blockers}"
        finally:
            cycle.abort()
    # and the CLI gets there on its own: blocked once, then dismissed
    cp = run_hotpatch(target.pid, tmp_path / "fix.so", "--json", "--timeout", "3")
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["attempts"] >= 2


def _gdb_frames(pid: int, tid: int) -> list[int]:
    out = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt"],
                         capture_output=True, text=True, timeout=60).stdout
    block = re.search(rf"\(LWP {tid}\).*?\n((?:#\d+.*\n?)+)", out)
    assert block, out
    frames = []
    for line in block.group(1).splitlines():
        m = re.match(r"#(\d+)\s+(0x[0-9a-f]+) in ", line)
        if m:
            frames.append(int(m.group(2), 16))
        elif line.startswith("#0"):
            frames.append(None)  # gdb omits the pc of frame 0 when it has line info
    return frames


def test_blocking_thread_backtrace_matches_gdb(tmp_path, run_target):
    target = run_target("blocked", BLOCKED)
    _build(tmp_path, "fix", PATCH, shared=True)
    cp = run_hotpatch(target.pid, tmp_path / "fix.so", "--json", "--timeout", "0.3")
    assert_error(cp, 3)
    assert "sleeper-7" in cp.stderr and "main:compute" in cp.stderr
    report = json.loads(cp.stdout)
    (b,) = report["blockers"]
    assert b["comm"] == "sleeper-7"
    ours = [int(pc, 16) for pc in b["pcs"]]
    names = b["backtrace"]
    assert [n.split("+")[0] for n in names[3:6]] == ["main:compute", "main:middle", "main:outer"]
    gdb = _gdb_frames(target.pid, b["tid"])
    # Frames 1..n: return addresses, comparable one to one (frame 0 may lack a pc in gdb's output).
    n = min(len(ours), len(gdb))
    assert n >= 6
    assert ours[1:n] == gdb[1:n], (names, [hex(x) for x in gdb if x])
    # the quiescence predicate agrees with what the record says is busy
    assert not quiescence.frames_are_safe(ours, [quiescence.CodeRange(ours[3] - 0x10, ours[3] + 1, "c")])
