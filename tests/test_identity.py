"""The right process (identity.py): a dead target, a reused pid (before and
in the middle of a cycle), an exec during an operation, a thread id or a
zombie given as the pid, and a program that is not x86-64. Refusals of input
exit 2; a target that died or whose pid was reused while we worked is 1.
"""
from __future__ import annotations

import os
import subprocess

import pytest

import ksplice_py
from conftest import assert_error, maps_lines, run_hotpatch, thread_states, tracer_pid, wait_until
from hardening_support import assert_unchanged, gcc, mul3, snapshot, workers  # noqa: F401 (fixtures)
from ksplice_py import NoSuchProcess, PidReused, TargetGone, UnsupportedTarget, trust

PROG32_C = r"""
#include <unistd.h>
__attribute__((noinline)) int compute(int x) { volatile int k = 2; return x * k; }
int main(void) { for (;;) pause(); }
"""


def test_dead_target_is_refused(workers, mul3):
    proc = ksplice_py.attach(workers.pid)
    workers.expect_exit = True
    workers.proc.kill()
    wait_until(lambda: not os.path.exists(f"/proc/{workers.pid}/maps") or
               thread_states(workers.pid).get(workers.pid) in ("Z", None), 5, "the target to exit")
    with pytest.raises(TargetGone) as err:
        proc.apply(str(mul3), timeout=1)  # exited, not yet reaped: the pidfd knows
    assert err.value.exit_code == 1 and "exited" in str(err.value)
    workers.proc.wait()  # reaped: the pid is free for anyone now
    with pytest.raises(TargetGone):
        proc.editions()
    with pytest.raises(TargetGone):
        proc.revert()
    proc.close()


def test_pid_reuse_detected_by_start_time(workers, mul3):
    """A pid cannot be made to wrap in a test; a recorded start time that no
    longer matches is what reuse looks like to us."""
    before = snapshot(workers)
    with ksplice_py.attach(workers.pid) as proc:
        assert proc.start_time == int(workers.start_time())
        proc.handle.start_time -= 1
        with pytest.raises(PidReused) as err:
            proc.apply(str(mul3), timeout=2)
        assert err.value.exit_code == 1 and "another process" in str(err.value)
        for op in (proc.editions, proc.recover, lambda: proc.revert(None)):
            with pytest.raises(PidReused):
                op()
    assert_unchanged(workers, before)


def test_pid_reuse_mid_cycle_never_touches_the_other_process(workers, mul3):
    """Identity lost after prepare: nothing more is written, not even the
    abort's munmap (that memory belongs to whoever has the pid now). Here it
    is really the same process, so `recover` then removes the leftover."""
    from ksplice_py.cycle import PatchCycle
    with ksplice_py.attach(workers.pid) as proc:
        cycle = PatchCycle(proc.target, trust.load_patch(mul3))
        cycle.prepare()
        proc.handle.start_time += 1
        with pytest.raises(PidReused):
            cycle.link()
        cycle.abort()
        assert any("ksplice_py:ed" in line for line in maps_lines(workers.pid)), \
            "abort must not unmap in a process that is not ours"
        proc.handle.start_time -= 1
        done = proc.recover()
    assert done and "removed" in done[0], done
    assert not any("ksplice_py:ed" in line for line in maps_lines(workers.pid))
    workers.assert_running()


def test_exec_during_operation_detected(tmp_path):
    proc = subprocess.Popen(["/bin/sh", "-c", "read x; exec sleep 60"], stdin=subprocess.PIPE)
    try:
        wait_until(lambda: os.path.exists(f"/proc/{proc.pid}/exe"), 5, "sh to start")
        with ksplice_py.attach(proc.pid) as p:
            assert p.editions() == []
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            wait_until(lambda: os.readlink(f"/proc/{proc.pid}/exe").endswith("/sleep"), 5, "exec")
            with pytest.raises(TargetGone, match="new program"):
                p.editions()
    finally:
        proc.kill()
        proc.wait()


def test_thread_id_and_zombie_refused(workers, mul3):
    tid = max(int(t) for t in os.listdir(f"/proc/{workers.pid}/task"))
    assert tid != workers.pid
    line = assert_error(run_hotpatch("apply", tid, mul3), 2)
    assert f"thread of process {workers.pid}" in line, line
    zombie = subprocess.Popen(["true"])
    try:
        wait_until(lambda: thread_states(zombie.pid).get(zombie.pid) == "Z", 5, "a zombie")
        line = assert_error(run_hotpatch("list", zombie.pid), 2)
        assert "exited" in line, line
        with pytest.raises(NoSuchProcess):
            ksplice_py.attach(zombie.pid)
    finally:
        zombie.wait()
    workers.assert_running()




def test_32bit_target_refused(mul3, tmp_path):
    src = tmp_path / "prog32.c"
    src.write_text(PROG32_C)
    cp = gcc("-m32", "-O2", "-o", tmp_path / "prog32", src)
    if cp.returncode:
        pytest.skip(f"no 32-bit toolchain (apt-get install gcc-multilib): {cp.stderr[-200:]}")
    proc = subprocess.Popen([str(tmp_path / "prog32")])
    try:
        wait_until(lambda: os.path.exists(f"/proc/{proc.pid}/exe"), 5, "prog32 to start")
        for args in (("apply", proc.pid, mul3), ("list", proc.pid), ("check", proc.pid, mul3)):
            line = assert_error(run_hotpatch(*args), 2)
            assert "32-bit" in line and "x86-64" in line, line
        with pytest.raises(UnsupportedTarget):
            ksplice_py.attach(proc.pid)
        assert tracer_pid(proc.pid) == 0 and proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
