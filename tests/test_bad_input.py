"""Acceptance: bad input gets its documented exit code and one line on
stderr, never a traceback, and a live target is left unchanged, untraced and
running.

Exit codes: 2 bad usage or bad input, 4 patch does not fit this target,
1 anything else (e.g. the target exited while we worked on it).
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time

import pytest

from conftest import assert_error, describe, run_hotpatch, tracer_pid, wait_until

PF_KTHREAD = 0x00200000


@pytest.fixture
def live(build, spawn):
    """A running workers target and a good patch for it."""
    target = spawn(build.target("workers"), 4)
    return target, build.patch("compute_mul", MUL=3)


def snapshot(target) -> tuple:
    return target.code("addr0"), target.maps()


def assert_unchanged(target, before: tuple, tracer: int = 0) -> None:
    target.assert_alive()
    assert snapshot(target) == before, "the target's code or mappings changed"
    assert tracer_pid(target.pid) == tracer
    target.assert_running()
    target.assert_healthy()
    assert target.status.lasts() == [14] * len(target.status.lasts()), "compute() changed"


# --- which process ------------------------------------------------------------

def free_pid() -> int:
    """A pid that no process has: a reaped child's (pids are reused only after
    the whole pid space wraps)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not os.path.exists(f"/proc/{proc.pid}")
    return proc.pid


@pytest.mark.parametrize("command", ["apply", "check"])
def test_missing_pid(build, command):
    patch = build.patch("compute_mul", MUL=3)
    assert_error(run_hotpatch(command, free_pid(), patch), 2)


def test_kernel_thread(build):
    with open("/proc/2/stat") as f:
        flags = int(f.read().rsplit(")", 1)[1].split()[6])
    assert flags & PF_KTHREAD, "premise: pid 2 (kthreadd) is a kernel thread"
    patch = build.patch("compute_mul", MUL=3)
    assert_error(run_hotpatch("apply", 2, patch), 2)
    assert tracer_pid(2) == 0


def test_bad_usage():
    cp = run_hotpatch("apply", "notapid", "fix.so")
    assert cp.returncode == 2, describe(cp)
    cp = run_hotpatch()
    assert cp.returncode == 2, describe(cp)


SEIZER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
pid = int(sys.argv[1])
for tid in sorted(os.listdir(f"/proc/{pid}/task")):
    if libc.ptrace(0x4206, int(tid), None, None) != 0:  # PTRACE_SEIZE: no stop
        sys.exit(f"PTRACE_SEIZE {tid}: {os.strerror(ctypes.get_errno())}")
print("seized", flush=True)
sys.stdin.read()  # hold on until the test closes our stdin
"""


def test_target_already_traced(live):
    target, patch = live
    tracer = subprocess.Popen([sys.executable, "-c", SEIZER, str(target.pid)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert tracer.stdout.readline().strip() == "seized"
        assert tracer_pid(target.pid) == tracer.pid
        before = snapshot(target)

        line = assert_error(run_hotpatch("apply", target.pid, patch, "--timeout", 2), 2)

        assert "trac" in line.lower(), f"the error should say the target is traced: {line!r}"
        assert_unchanged(target, before, tracer=tracer.pid)
    finally:
        tracer.kill()
        tracer.wait()
    wait_until(lambda: tracer_pid(target.pid) == 0, 1.0, "the helper tracer to let go")
    target.assert_running()


# --- which patch ----------------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b"this is not an ELF file\n" * 40],
                         ids=["empty", "not-elf"])
def test_bad_patch_file(live, tmp_path, content):
    target, _ = live
    bad = tmp_path / "bad.so"
    bad.write_bytes(content)
    before = snapshot(target)

    assert_error(run_hotpatch("apply", target.pid, bad, "--timeout", 2), 2)
    assert_error(run_hotpatch("check", target.pid, bad), 2)
    assert_error(run_hotpatch("info", bad), 2)

    assert_unchanged(target, before)


def test_missing_patch_file(live, tmp_path):
    target, _ = live
    before = snapshot(target)
    assert_error(run_hotpatch("apply", target.pid, tmp_path / "nope.so"), 2)
    assert_unchanged(target, before)


@pytest.mark.parametrize("name, mention", [("no_such_function_xyz", "no_such_function_xyz"),
                                           ("nosuch.so:f", "nosuch.so")])
def test_patch_does_not_fit(build, live, name, mention):
    target, _ = live
    patch = build.patch("replace_named", TARGET=f'"{name}"')
    before = snapshot(target)

    line = assert_error(run_hotpatch("apply", target.pid, patch, "--timeout", 2), 4)

    assert mention in line, f"the error should name {mention}: {line!r}"
    assert_unchanged(target, before)


# --- a target that goes away ------------------------------------------------------

def test_target_exits_while_patching(build, spawn):
    """hotpatch runs again and again while the target exits on its own after a
    random short time: any outcome but a traceback or a hang is acceptable."""
    exe = build.target("workers")
    patch = build.patch("compute_mul", MUL=3)
    rng = random.Random()
    for _ in range(3):
        life_ms = rng.randint(100, 500)
        target = spawn(exe, 4, life_ms)
        target.expect_exit = True
        gone = threading.Event()
        threading.Thread(target=lambda t=target: (t.proc.wait(), gone.set()), daemon=True).start()
        runs = 0
        deadline = time.monotonic() + life_ms / 1000 + 10
        while True:
            assert time.monotonic() < deadline, f"target did not exit on its own ({life_ms} ms)"
            was_gone = gone.is_set()
            cp = run_hotpatch("apply", target.pid, patch, "--timeout", 1, timeout=20)
            runs += 1
            context = f"run {runs}, target life {life_ms} ms: {describe(cp)}"
            assert cp.returncode in ((1, 2) if was_gone else (0, 1, 2)), context
            if cp.returncode:
                assert len(cp.stderr.strip().splitlines()) == 1, context
            if was_gone:
                break
        # It exited on its own, cleanly: not killed or crashed by a half-done patch.
        assert target.proc.wait(timeout=5) == 0, target.output()
