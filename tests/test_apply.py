"""Acceptance: patches land in running multi-threaded targets.

Each target runs 8 workers that call the patched function in batches and
publish the last result; after `hotpatch` every worker must return the new
value within 1 s, keep making progress, in the same process.
"""
from __future__ import annotations

import json
import subprocess

from conftest import assert_not_stopped, assert_ok, first_instruction, run_hotpatch, wait_until

WORKERS = 8
INPUT = 7  # workers call compute(7)


def check_patched(target, new_value: int, start_time: str) -> None:
    target.assert_alive()
    assert target.start_time() == start_time, "the target was restarted"
    assert_not_stopped(target.pid)
    target.wait_all_return(new_value, timeout=1.0)
    target.assert_progress()
    # The new value sticks: a later round of batches still returns it.
    target.wait_all_return(new_value, timeout=1.0)
    target.assert_healthy()


def test_replace_function_in_pie_executable(build, spawn):
    exe = build.target("workers")
    patch = build.patch("compute_mul", MUL=3)
    target = spawn(exe, WORKERS)
    assert target.status.lasts() == [INPUT * 2] * WORKERS
    started = target.start_time()

    cp = run_hotpatch(target.pid, patch)  # short form == apply
    assert_ok(cp)

    check_patched(target, INPUT * 3, started)


def test_replace_function_in_needed_library_json(build, spawn):
    exe = build.target("workers", {"USE_LIBDEMO": 1}, libs=["libdemo"])
    patch = build.patch("compute_mul", MUL=3, TARGET='"libdemo.so:compute"')
    target = spawn(exe, WORKERS)
    assert target.status.lasts() == [INPUT * 5] * WORKERS  # libdemo's compute
    assert any(line.endswith("/libdemo.so") for line in target.maps())
    started = target.start_time()

    cp = run_hotpatch("apply", "--json", target.pid, patch, "--timeout", 5)
    assert_ok(cp)
    report = json.loads(cp.stdout)
    assert isinstance(report, dict)
    assert report.get("id") is not None, report
    assert isinstance(report["functions"], list) and report["functions"], report
    assert "compute" in json.dumps(report["functions"]), report
    assert isinstance(report["pause_us"], (int, float)) and report["pause_us"] >= 0, report

    check_patched(target, INPUT * 3, started)


def test_replace_exported_libc_function(build, spawn):
    exe = build.target("workers", {"USE_RAND": 1})
    patch = build.patch("rand_const")
    target = spawn(exe, WORKERS)
    assert all(0 <= v for v in target.status.lasts())
    started = target.start_time()

    assert_ok(run_hotpatch("apply", target.pid, patch))

    check_patched(target, -4242, started)


def test_wrap_rip_relative_function_and_reach_statics(build, spawn):
    exe = build.target("wrap")
    # The premise of this test: the first instruction of scaled() is the one
    # the trampoline displaces, and it is RIP-relative.
    assert "(%rip)" in first_instruction(exe, "scaled"), first_instruction(exe, "scaled")
    patch = build.patch("scaled_wrap")
    target = spawn(exe, 4, stdin=subprocess.PIPE)
    assert target.status.lasts() == [5 * 3] * 4
    assert target.status["wrap_hits"] == 0
    started = target.start_time()

    assert_ok(run_hotpatch("apply", target.pid, patch, "--timeout", 5))

    # wrapper: orig(5) * 10 + bonus (a static read through HOTPATCH_SYMBOL)
    check_patched(target, 5 * 3 * 10 + 7, started)
    # The wrapper's writes to the static wrap_hits are seen by the target.
    hits = target.status["wrap_hits"]
    assert hits > 0
    wait_until(lambda: target.status["wrap_hits"] > hits, 1.0, "wrap_hits to keep growing")

    # The original, reached through the relocated RIP-relative load, reads
    # the live value of `factor`, not a stale or misplaced one.
    target.proc.stdin.write(b"factor 4\n")
    target.proc.stdin.flush()
    wait_until(lambda: target.status["commands"] == 1, 1.0, "the target to take the command")
    target.wait_all_return(5 * 4 * 10 + 7, timeout=1.0)
    target.assert_healthy()
