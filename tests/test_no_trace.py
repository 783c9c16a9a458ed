"""Acceptance for issue #10, part 1: a command that leaves no applied edition
leaves the target exactly as it was — /proc/PID/maps identical, the bytes of
every readable mapping identical (the code padding and the borrowed stack
the syscall stub used included), and no descriptor of ours open.

The target is `blocker` with no workers: the holder thread sleeps inside
hold() (so hold_v2 finds no safe moment) and the main thread in pause(), so
nothing in the target itself changes its memory while we compare.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import time

import pytest

import ksplice_py
from ksplice_py import trust
from ksplice_py.cycle import PatchCycle

from conftest import assert_error, assert_ok, describe, maps_lines, run_hotpatch, tracer_pid, wait_until

SKIP = ("[vvar]", "[vvar_vclock]", "[vsyscall]")  # the kernel's, not the target's


def memory_image(pid: int) -> dict[str, str]:
    """sha256 of every readable mapping, keyed by its maps line."""
    out = {}
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps_lines(pid):
            fields = line.split()
            if fields[1][0] != "r" or (len(fields) > 5 and fields[5] in SKIP):
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            mem.seek(lo)
            out[line] = hashlib.sha256(mem.read(hi - lo)).hexdigest()
    return out


def descriptors(pid: int) -> dict[str, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return out


def trace(pid: int) -> tuple:
    return maps_lines(pid), memory_image(pid), descriptors(pid)


def assert_no_trace(target, before: tuple, after_what: str) -> None:
    target.assert_alive()
    maps, image, fds = trace(target.pid)
    assert maps == before[0], f"/proc/PID/maps changed after {after_what}"
    changed = [k for k in image if before[1].get(k) != image[k]]
    assert not changed, f"bytes changed after {after_what} in: {changed}"
    assert fds == before[2], f"descriptors changed after {after_what}: {before[2]} -> {fds}"
    assert tracer_pid(target.pid) == 0
    assert target.status["hold_state"] == 1, "the holder was woken"


@pytest.fixture
def quiet(build, spawn, monkeypatch):
    # Without rseq: the kernel itself rewrites a thread's rseq cpu_id (in its
    # TLS) whenever the thread wakes on another CPU, as any ptrace stop or
    # signal does; those bytes are the kernel's, not a trace of ours.
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0")
    go_r, go_w = os.pipe()
    ctl_r, ctl_w = os.pipe()
    target = spawn(build.target("blocker"), 0, go_r, ctl_r, pass_fds=(go_r, ctl_r))
    os.close(go_r)
    os.close(ctl_r)
    os.write(go_w, b"g")
    wait_until(lambda: target.status["hold_state"] == 1, 2.0, "the holder to enter hold()")
    time.sleep(0.05)  # let it reach the blocking read
    # The target settles (lazy binding, first page faults) before we compare.
    first = trace(target.pid)
    wait_until(lambda: trace(target.pid) == first, 2.0, "the quiet target to stop changing")
    yield target
    os.close(go_w)
    os.close(ctl_w)


def patch_from(source: str, out, cflags: list[str]):
    """A patch built the contract's way from C source text."""
    src = out.with_suffix(".c")
    src.write_text("#include <hotpatch.h>\n" + source)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", *cflags, "-o", out, src], check=True)
    return out


@pytest.fixture
def no_such_import(hotpatch_cflags, tmp_path):
    return patch_from('extern int ksplice_test_no_such_function(int);\n'
                      'static int compute_new(int x) { return ksplice_test_no_such_function(x); }\n'
                      'HOTPATCH_REPLACE("compute", compute_new);\n', tmp_path / "needs_missing.so", hotpatch_cflags)


def test_refused_patch_leaves_no_trace(quiet, no_such_import):
    before = trace(quiet.pid)
    line = assert_error(run_hotpatch("apply", quiet.pid, no_such_import), 4)
    assert "ksplice_test_no_such_function" in line, line
    assert_no_trace(quiet, before, "a refused patch")


def test_no_safe_moment_leaves_no_trace(build, quiet):
    before = trace(quiet.pid)
    assert_error(run_hotpatch("apply", quiet.pid, build.patch("hold_v2"), "--timeout", 0.3), 3)
    assert_no_trace(quiet, before, "exit 3")


def test_check_leaves_no_trace(build, quiet):
    before = trace(quiet.pid)
    assert_ok(run_hotpatch("check", quiet.pid, build.patch("compute_mul")))
    assert_no_trace(quiet, before, "check")


def test_prepare_then_abort_leaves_no_trace(build, quiet):
    before = trace(quiet.pid)
    assert_ok(run_hotpatch("prepare", quiet.pid, build.patch("compute_mul")))
    assert any("ksplice_py:ed" in m for m in maps_lines(quiet.pid))
    assert_ok(run_hotpatch("abort", quiet.pid))
    assert_no_trace(quiet, before, "prepare + abort")


def test_revert_of_the_last_edition_leaves_no_trace(build, quiet):
    before = trace(quiet.pid)
    patch = build.patch("compute_mul")
    assert_ok(run_hotpatch("apply", quiet.pid, patch))
    assert trace(quiet.pid)[1] != before[1], "premise: apply changed the code"
    assert_ok(run_hotpatch("apply", quiet.pid, build.patch("compute_mul", MUL=5)))
    assert_ok(run_hotpatch("revert", quiet.pid))
    cp = run_hotpatch("revert", quiet.pid)
    assert_ok(cp)
    assert_no_trace(quiet, before, "revert of the last edition")


def test_syscalls_with_every_thread_stopped_leave_no_trace(build, quiet, monkeypatch):
    """When borrowing one thread takes long (spinning threads hold every
    CPU), the injector stops them all and borrows one of them: apply and
    revert that way leave the target exactly as before, the holder still
    blocked in its read, never woken."""
    from ksplice_py.tracer import Injector
    used = []

    def world_only(self, maps):
        used.append(self.pid)
        return Injector._borrow_from_stopped_world(self, maps)
    monkeypatch.setattr(Injector, "_borrow", world_only)
    before = trace(quiet.pid)
    with ksplice_py.attach(quiet.pid) as proc:
        proc.apply(str(build.patch("compute_mul")), timeout=5)
        assert trace(quiet.pid)[1] != before[1], "premise: apply changed the code"
        proc.revert(timeout=5)
    assert len(used) >= 3, "premise: prepare, link and cleanup injected with the world stopped"
    assert_no_trace(quiet, before, "apply + revert, syscalls injected with every thread stopped")


def test_recover_of_an_orphan_leaves_no_trace(build, quiet):
    """A tool killed after mapping its region leaves a `preparing` record;
    `recover` removes it and, with it, every trace."""
    before = trace(quiet.pid)
    with ksplice_py.attach(quiet.pid) as proc:
        PatchCycle(proc.target, trust.load_patch(build.patch("compute_mul"))).prepare()  # and "dies"
    assert any("ksplice_py:ed" in m for m in maps_lines(quiet.pid))
    cp = run_hotpatch("recover", quiet.pid)
    assert_ok(cp)
    assert "removed" in cp.stdout, describe(cp)
    assert_no_trace(quiet, before, "recover")


def test_a_stub_left_by_a_killed_tool_is_cleared(build, quiet):
    """A tool killed mid-syscall leaves the stub in the padding (harmless:
    never executed but by the thread it belongs to); the next command that
    injects puts the file's bytes back once no thread is inside it."""
    from ksplice_py import stub
    from ksplice_py.maps import read_maps
    before = trace(quiet.pid)
    with ksplice_py.attach(quiet.pid) as proc:
        pad = stub.find_padding(quiet.pid, read_maps(quiet.pid), len(stub.code()), proc.mem.read)
    with open(f"/proc/{quiet.pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(pad.addr)
        mem.write(stub.code())
    assert trace(quiet.pid)[1] != before[1]
    assert_ok(run_hotpatch("prepare", quiet.pid, build.patch("compute_mul")))
    assert_ok(run_hotpatch("abort", quiet.pid))
    assert_no_trace(quiet, before, "clearing a stale stub")


# --- part 2: a patch that does not fit is refused before the first write ------------

def traced_calls(tmp_path, *args: object) -> tuple[subprocess.CompletedProcess, str]:
    """Run `hotpatch ARGS` under strace; return it and the ptrace/write calls it made."""
    log = tmp_path / "strace.log"
    from conftest import HOTPATCH
    cp = subprocess.run(["strace", "-f", "-qq", "-e", "trace=ptrace,pwrite64,pwritev,process_vm_writev",
                         "-o", str(log), HOTPATCH, *map(str, args)], capture_output=True, text=True, timeout=60)
    return cp, log.read_text()


@pytest.fixture
def pinned_elsewhere(hotpatch_cflags, tmp_path):
    """A patch pinned to a build of the executable that is not the target's."""
    return patch_from('static int compute_new(int x) { return x * 3; }\n'
                      'HOTPATCH_REPLACE("compute", compute_new);\n'
                      'HOTPATCH_BUILD_ID("main", "00112233445566778899aabbccddeeff00112233");\n',
                      tmp_path / "pinned.so", hotpatch_cflags)


@pytest.mark.skipif(not __import__("shutil").which("strace"), reason="strace is not installed")
@pytest.mark.parametrize("case", ["missing import", "build-id pin"])
def test_a_patch_that_does_not_fit_never_touches_the_target(quiet, no_such_import, pinned_elsewhere,
                                                             tmp_path, case):
    patch = no_such_import if case == "missing import" else pinned_elsewhere
    before = trace(quiet.pid)
    cp, calls = traced_calls(tmp_path, "apply", quiet.pid, patch)
    assert cp.returncode == 4, describe(cp)
    assert "PTRACE_SEIZE" not in calls, f"attached to the target for a patch that does not fit:\n{calls}"
    assert "pwrite" not in calls and "process_vm_writev" not in calls, calls
    assert_no_trace(quiet, before, case)


@pytest.mark.skipif(not __import__("shutil").which("strace"), reason="strace is not installed")
def test_strace_sees_the_writes_of_a_patch_that_fits(build, quiet, tmp_path):
    """The premise of the test above: the same tracing does see attach and write."""
    cp, calls = traced_calls(tmp_path, "check", quiet.pid, build.patch("compute_mul"))
    assert cp.returncode == 0, describe(cp)
    assert "PTRACE_SEIZE" in calls and "pwrite64(" in calls, calls[-2000:]
