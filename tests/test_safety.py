"""Acceptance: the cutover never happens while a thread is inside a function
being replaced, and functions that cannot take a trampoline are refused.
Whenever the tool refuses, the target is exactly as before and running.
"""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from conftest import (HOTPATCH, assert_error, describe, assert_not_stopped, disassembly,
                      run_hotpatch, symbol_size, tracer_pid, wait_until)


@pytest.fixture
def blocker(build, spawn):
    """The blocker target with its holder thread parked inside hold()."""
    go_r, go_w = os.pipe()
    ctl_r, ctl_w = os.pipe()
    target = spawn(build.target("blocker"), 2, go_r, ctl_r, pass_fds=(go_r, ctl_r))
    os.close(go_r)
    os.close(ctl_r)
    target.extra.update(go=go_w, ctl=ctl_w)
    os.write(go_w, b"g")
    wait_until(lambda: target.status["hold_state"] == 1, 1.0, "the holder to enter hold()")
    time.sleep(0.05)  # let it reach the blocking read
    yield target
    os.close(go_w)
    os.close(ctl_w)


def code_of(target, *slots: str) -> dict[str, bytes]:
    return {slot: target.code(slot) for slot in slots}


def assert_untouched(target, code_before: dict[str, bytes], maps_before: list[str]) -> None:
    """Same code (read back from /proc/PID/mem), same mappings, no tracer, running."""
    target.assert_alive()
    assert code_of(target, *code_before) == code_before, "function bytes changed"
    assert target.maps() == maps_before, "the target's mappings changed"
    assert tracer_pid(target.pid) == 0, "the target is still traced"
    target.assert_running()


def test_thread_inside_function_blocks_cutover(build, blocker):
    target = blocker
    patch = build.patch("hold_v2")
    code, maps = code_of(target, "addr0", "addr1"), target.maps()

    started = time.monotonic()
    cp = run_hotpatch("apply", target.pid, patch, "--timeout", 0.5)
    elapsed = time.monotonic() - started

    assert_error(cp, 3)
    assert elapsed < 4.0, f"--timeout 0.5 took {elapsed:.1f}s"
    assert_untouched(target, code, maps)
    assert target.status["hold_state"] == 1, "the holder was woken"
    # The original hold() still runs when released.
    os.write(target.extra["ctl"], b"\x05")
    wait_until(lambda: target.status["hold_calls"] == 1, 1.0, "hold() to return")
    assert target.status["hold_result"] == 1005
    target.assert_healthy()


def test_check_reports_blocked_function(build, blocker):
    """check's probe sees the thread inside hold(), names it, and exits 3
    (no safe moment now) so scripts can tell "fits, but not now"."""
    target = blocker
    patch = build.patch("hold_v2")
    code, maps = code_of(target, "addr0", "addr1"), target.maps()

    cp = run_hotpatch("check", target.pid, patch)

    assert cp.returncode == 3, describe(cp)
    assert "hold" in cp.stdout + cp.stderr, f"the probe should name hold(): {describe(cp)}"
    assert_untouched(target, code, maps)


def test_cutover_waits_until_thread_leaves(build, blocker):
    target = blocker
    patch = build.patch("hold_v2")
    code = target.code()

    proc = subprocess.Popen([HOTPATCH, "apply", str(target.pid), str(patch), "--timeout", "10"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.2)
        assert proc.poll() is None, f"hotpatch did not wait: exit {proc.returncode}, " \
                                    f"{proc.stderr.read()!r}"
        # While it waits, the target runs.
        target.assert_progress()
        assert target.code() == code, "trampoline written while a thread was inside hold()"
        os.write(target.extra["ctl"], b"\x01")  # release the holder
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err
    assert proc.returncode == 0, f"exit {proc.returncode}: {err!r}"
    # The cutover may come before the holder records hold()'s result.
    wait_until(lambda: target.status["hold_calls"] == 1, 1.0, "the released hold() to return")
    assert target.status["hold_result"] == 1001

    # The next call runs the new hold(), which does not block.
    os.write(target.extra["go"], b"g")
    wait_until(lambda: target.status["hold_calls"] == 2, 1.0, "the patched hold() to return")
    assert target.status["hold_result"] == 777
    assert_not_stopped(target.pid)
    target.assert_running()
    target.assert_healthy()


# --- functions that cannot take a 5-byte jmp ---------------------------------

def _premise_tiny(exe) -> None:
    assert symbol_size(exe, "tiny") < 5


def _premise_loopy(exe) -> None:
    insns = disassembly(exe, "loopy")
    start = insns[0][0]
    assert symbol_size(exe, "loopy") >= 5
    targets = [int(text.split()[1], 16) for _, text in insns if text.startswith("jg")]
    assert targets and all(start < t < start + 5 for t in targets), insns


@pytest.mark.parametrize("func, premise", [("tiny", _premise_tiny),
                                           ("loopy", _premise_loopy)])
@pytest.mark.parametrize("command", ["apply", "check"])
def test_untrampolinable_function_refused(build, spawn, func, premise, command):
    exe = build.target("workers")
    premise(exe)
    patch = build.patch("replace_named", TARGET=f'"{func}"')
    target = spawn(exe, 4)
    code, maps = code_of(target, "addr0", "addr1", "addr2"), target.maps()
    args = [command, target.pid, patch] + (["--timeout", 2] if command == "apply" else [])

    line = assert_error(run_hotpatch(*args), 4)

    assert func in line, f"the error should name {func}: {line!r}"
    assert_untouched(target, code, maps)
    target.assert_healthy()  # workers check tiny() and loopy() still work
