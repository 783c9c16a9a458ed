"""Acceptance for issue #3: a `hotpatch` SIGKILLed at any instant leaves the
target alive, running, and either on the old edition or on the new one —
never both halves of one patch — and `recover` + `list` then tell the truth.

Target: tests/targets/ed_target.c; patch: tests/patches/ed_fg.c replaces
TWO functions, f and g, and g calls f while on the stack (so no safe
cutover separates the two calls). A g() whose hundreds (g's edition) differ
from its units (f's edition) increments the target's MISMATCH slot.

Kill times: half uniform over the tool's whole runtime (mostly Python
start-up), half uniform over its working tail, counted from the moment it
takes the per-target lock (an fd on ``ksplice_py.PID.lock``), so the
prepare/cutover/cleanup phases are hit often. Where each kill landed is
read from the target's own record before `recover`, and printed (-s).
KSPLICE_PY_KILLS=N changes the number of kills per test (default 50).
"""
from __future__ import annotations

import collections
import json
import os
import random
import statistics
import subprocess
import time

import pytest

import ksplice_py
from ksplice_py.editions import list_editions
from ksplice_py.maps import read_maps
from ksplice_py.memory import RemoteMemory
from ksplice_py.trust import load_patch

from conftest import HOTPATCH, assert_not_stopped, assert_ok, describe, run_hotpatch, tracer_pid
from test_editions import (G_NEW, G_OLD, H_OLD, PRISTINE, SL_MIX_VALUE, WORKERS, ed_maps,
                           mismatches, observed, slot, wait_values)

KILLS = int(os.environ.get("KSPLICE_PY_KILLS", 50))


@pytest.fixture
def fg_target(build, spawn):
    target = spawn(build.target("ed_target"), WORKERS)
    assert observed(target) == [(PRISTINE, G_OLD, H_OLD)] * WORKERS
    target.extra["pristine"] = {s: target.code(s) for s in ("addr1", "addr2")}
    target.extra["patch"] = build.patch("ed_fg")
    return target


# --- the tool, killed ---------------------------------------------------------------
#
# A trigger says when the kill delay starts counting:
#   "start"  when the tool is started (the delay spans its whole runtime)
#   "lock"   when it holds the target's lock (imports done, work begins)
#   "memfd"  when its edition's memory appears in the target (apply)
#   "traced" when it has the target's threads attached (TracerPid != 0):
#            injected syscalls, the cutover window
# The delay is then uniform over the time a run takes from that trigger to
# its end, a running estimate kept from unkilled and finished runs.

def holds_lock(tool: int, pid: int) -> bool:
    try:
        for fd in os.listdir(f"/proc/{tool}/fd"):
            try:
                if f"ksplice_py.{pid}.lock" in os.readlink(f"/proc/{tool}/fd/{fd}"):
                    return True
            except OSError:
                pass
    except OSError:
        pass
    return False


def has_memfd(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "ksplice_py:ed" in f.read()


def fired(trigger: str, tool: int, pid: int) -> bool:
    if trigger == "lock":
        return holds_lock(tool, pid)
    if trigger == "memfd":
        return has_memfd(pid)
    if trigger == "traced":
        return tracer_pid(pid) == tool
    return True


def start_tool(args: list[object], pid: int, trigger: str) -> tuple[subprocess.Popen, float, bool]:
    """Start `hotpatch ARGS` and wait for ``trigger``. Returns the process,
    the time the delay counts from, and whether the trigger fired (a tool
    may finish before, e.g. when a brief attach fell between two polls)."""
    tool = subprocess.Popen([HOTPATCH, *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while tool.poll() is None and not fired(trigger, tool.pid, pid):
        if time.monotonic() - t0 > 60:
            tool.kill()
            pytest.fail(f"`hotpatch {args}` ran 60 s without reaching {trigger!r}")
        time.sleep(0.0002)
    return tool, time.monotonic(), tool.returncode is None


class Estimate:
    """A running median of recent runtimes: the machine's load changes
    while the loop runs, so a kill window calibrated once drifts."""

    def __init__(self) -> None:
        self.samples: collections.deque[float] = collections.deque(maxlen=7)

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)

    def value(self) -> float:
        return statistics.median(self.samples) if self.samples else 0.3


def run_unkilled(args: list[object], pid: int, trigger: str) -> float:
    """How long one full run takes from ``trigger`` to its end."""
    tool, t0, _ = start_tool(args, pid, trigger)
    _, err = tool.communicate(timeout=60)
    assert tool.returncode == 0, f"calibration run of {args} failed: {err}"
    return time.monotonic() - t0


def kill_after(args: list[object], pid: int, trigger: str, delay: float) -> tuple[int, str, float | None]:
    """Start the tool, SIGKILL it ``delay`` s after ``trigger``. Returns
    (exit status, stderr, its runtime from the trigger if it finished first)."""
    tool, t0, ok = start_tool(args, pid, trigger)
    while time.monotonic() - t0 < delay and tool.poll() is None:
        time.sleep(0.0002)
    tool.kill()  # a no-op on a tool that already finished
    ran = time.monotonic() - t0
    _, err = tool.communicate(timeout=30)
    return tool.returncode, err, ran if ok and tool.returncode == 0 else None


# --- the target, after the kill ------------------------------------------------------

def record_states(pid: int) -> tuple[list[str], list[int]]:
    """(states of the editions the target records, ids of regions without
    a record) — read before `recover` changes anything."""
    mem = RemoteMemory(pid)
    try:
        eds, orphans = list_editions(mem, read_maps(pid))
    finally:
        mem.close()
    return [e.state for e in eds], orphans


def leaked_fds(pid: int) -> list[str]:
    """Descriptors of ours left open in the target (memfd_create'd)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if "ksplice_py" in link:
            out.append(f"{fd} -> {link}")
    return out


def phase_of(rc: int, states: list[str], orphans: list[int], direction: str) -> str:
    if rc == 0:
        return "finished before the kill"
    if orphans:
        return "mapping memory (no record yet)"
    if direction == "apply":
        if not states:
            return "before anything was mapped"
        return {"preparing": "prepare (record: preparing)", "prepared": "apply/finalize (record: prepared)",
                "switching": "inside the cutover writes (record: switching)",
                "applied": "after the cutover (record: applied)"}.get(states[0], f"record: {states[0]}")
    if not states:
        return "after the revert (memory unmapped)"
    return {"applied": "before the revert writes (record: applied)",
            "reverting": "after the revert writes, before unmap (record: reverting)"}.get(
        states[0], f"record: {states[0]}")


def thread_report(pid: int) -> str:
    """State, CPU time and /proc/TID/syscall of every thread (diagnosis)."""
    rows = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                sc = f.read().strip()
        except OSError:
            continue
        rows.append(f"{tid}: state {fields[0]} utime {fields[11]} stime {fields[12]} syscall {sc}")
    return "; ".join(rows)


def assert_alive_and_running(target, when: str) -> None:
    assert target.alive(), f"target died {when}: exit {target.proc.returncode}"
    assert_not_stopped(target.pid)
    assert tracer_pid(target.pid) == 0, f"target still traced {when}"
    try:
        target.assert_progress(timeout=5.0)  # the CI machine may be loaded
    except BaseException:
        print(f"\nworkers stuck {when}: {thread_report(target.pid)}")
        time.sleep(1)
        print(f"one second later: {thread_report(target.pid)}")
        raise


def assert_one_edition(target) -> None:
    n = mismatches(target)
    assert n == 0, f"workers saw f and g from two editions {n} times (e.g. g() = {slot(target, SL_MIX_VALUE)})"


QUIET_PHASES = ("finished before the kill", "before anything was mapped",
                "after the revert (memory unmapped)", "before the revert writes (record: applied)")


def recover_and_check(target, pristine: dict[str, bytes], phase: str) -> bool:
    """`hotpatch recover`, then the editions list: they must agree with what
    the workers execute. Returns whether the patch is in. The list comes from
    a fresh `hotpatch list --json` whenever the kill left something to
    recover; otherwise from a fresh library attach (same reader, without
    another 0.2 s interpreter start: the loop has a time budget)."""
    pid = target.pid
    cp = run_hotpatch("recover", "--json", pid)
    assert_ok(cp)
    recovered = json.loads(cp.stdout)
    if phase in QUIET_PHASES:
        with ksplice_py.attach(pid) as fresh:
            eds = [e.to_dict() for e in fresh.editions()]
    else:
        cp = run_hotpatch("list", "--json", pid)
        assert_ok(cp)
        eds = json.loads(cp.stdout)
    assert all(e["state"] == "applied" for e in eds), f"recover ({recovered}) left {eds}"
    assert len(eds) <= 1, eds
    applied = bool(eds)
    if applied:
        wait_values(target, g=G_NEW, batches=2)
        assert {e["symbol"] for e in eds[0]["functions"]} == {"main:f", "main:g"}, eds
        for f in eds[0]["functions"]:
            new = bytes.fromhex(f["new_bytes"])
            assert target.code({"main:f": "addr1", "main:g": "addr2"}[f["symbol"]], len(new)) == new
    else:
        wait_values(target, g=G_OLD, batches=2)
        assert ed_maps(pid) == [], f"no edition listed, but memory left: {ed_maps(pid)} (recover said {recovered})"
        assert {s: target.code(s) for s in pristine} == pristine
    assert_one_edition(target)
    return applied


def kill_loop(target, direction: str, report: dict) -> None:
    pid, patch = target.pid, target.extra["patch"]
    pristine = target.extra["pristine"]
    args = ["apply", pid, patch] if direction == "apply" else ["revert", pid]
    triggers = ["start", "lock", "memfd", "traced"] if direction == "apply" else ["start", "lock", "traced"]
    fg = load_patch(patch)
    seed = int(os.environ.get("KSPLICE_PY_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    report["seed"] = seed

    with ksplice_py.attach(pid) as proc:
        def set_up():
            if direction == "revert":
                proc.apply(fg, timeout=5)
                wait_values(target, g=G_NEW)

        def reset(applied: bool):
            if applied:
                proc.revert(timeout=5)
            wait_values(target, g=G_OLD)

        # Calibrate on this machine, and keep calibrating from every run
        # that finished before its kill.
        est = {t: Estimate() for t in triggers}
        for trig in triggers:
            set_up()
            est[trig].add(run_unkilled(args, pid, trig))
            reset(applied=direction == "apply")
        report["calibration_ms"] = {t: round(e.value() * 1000) for t, e in est.items()}

        phases: collections.Counter[str] = collections.Counter()
        by_trigger: collections.Counter[str] = collections.Counter()
        leaks: list[str] = []
        for i in range(KILLS):
            set_up()
            trig = triggers[i % len(triggers)]
            delay = rng.uniform(0, est[trig].value())
            rc, err, ran = kill_after(args, pid, trig, delay)
            if ran is not None:
                est[trig].add(ran)
            assert rc in (0, -9), f"the tool failed on its own: exit {rc}: {err}"
            assert "Traceback" not in err, err
            when = (f"after kill {i} of the {direction} ({delay * 1000:.1f} ms after {trig}; "
                    f"seed {seed}; earlier kills: {dict(phases)})")
            time.sleep(0.01)  # a target hurt by the kill dies within this
            assert target.alive(), f"target died {when}: exit {target.proc.returncode}"
            states, orphans = record_states(pid)
            phase = phase_of(rc, states, orphans, direction)
            phases[phase] += 1
            by_trigger[f"{trig}: {phase}"] += 1
            assert_alive_and_running(target, when)
            assert_one_edition(target)
            assert set(g for _, g, _ in observed(target)) <= {G_OLD, G_NEW}, observed(target)
            applied = recover_and_check(target, pristine, phase)
            leaks += [f"{when}, {phase}: {x}" for x in leaked_fds(pid)]
            reset(applied)
        report["phases"] = dict(phases)
        report["by_trigger"] = dict(by_trigger)
        report["leaked_fds"] = leaks
    print(f"\nSIGKILL during {direction} x{KILLS}: {json.dumps(report, indent=1)}")
    assert_alive_and_running(target, "at the end")
    target.assert_healthy()
    assert_one_edition(target)
    assert not leaks, f"descriptors left open in the target: {leaks}"


def assert_kills_landed(report: dict) -> None:
    """Premise: most kills hit a working tool, not one that had finished."""
    finished = report["phases"].get("finished before the kill", 0)
    assert finished <= KILLS // 2, f"too many kills came too late to test anything: {report}"


def test_sigkill_during_apply(fg_target):
    report: dict = {}
    kill_loop(fg_target, "apply", report)
    assert_kills_landed(report)


def test_sigkill_during_revert(fg_target):
    report: dict = {}
    kill_loop(fg_target, "revert", report)
    assert_kills_landed(report)


# --- the narrowest window, made wide -------------------------------------------------

BORROW_AND_DIE = r"""
import struct, sys
from ksplice_py import constants, tracer
from ksplice_py.memory import RemoteMemory
pid, tid, fifo = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
constants.SYSCALLS.update(open=2, read=0)
mem = RemoteMemory(pid)
inj = tracer.Injector(pid, mem, tid).__enter__()
assert inj.tid == tid
path = inj.scratch                   # the injector's data page, as cycle.py places the memfd name
mem.write(path, fifo.encode() + b"\0")
fd = inj.checked("open", path, 2)    # O_RDWR: never blocks on a FIFO
# (A blocking read, not a nanosleep: nanosleep resets the thread's
# restart_block, which the syscalls the tool really injects never touch.)
print(fd, flush=True)
inj("read", fd, path + 256, 1)       # SIGKILLed while this blocks
"""


def test_sigkill_while_an_injected_syscall_runs(fg_target):
    """The tool runs raw syscalls on a borrowed thread (mmap, mprotect...).
    Killed while one is in flight, the thread must still come back to its
    own code. In real runs that window is microseconds wide, yet the random
    loop above hits it (a few kills in a hundred near prepare, SIGTRAP);
    here the library's Injector runs a 1 s nanosleep to make it wide."""
    target = fg_target
    pid = target.pid
    tid = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)[0]
    fifo = f"/tmp/ksplice_py_test_fifo.{os.getpid()}.{pid}"
    os.mkfifo(fifo)
    tool = subprocess.Popen([os.sys.executable, "-c", BORROW_AND_DIE, str(pid), str(tid), fifo],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        fd = int(tool.stdout.readline() or -1)
        assert fd >= 0, tool.stderr.read()

        def in_injected_sleep() -> bool:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                fields = f.read().split()
            return fields[:2] == ["0", hex(fd)]

        deadline = time.monotonic() + 5
        while not in_injected_sleep():
            assert time.monotonic() < deadline, "the borrowed thread never entered the injected syscall"
            time.sleep(0.001)
    finally:
        tool.kill()
        tool.wait()
    with open(fifo, "wb", buffering=0) as w:  # let the injected read return
        w.write(b"x")
    os.unlink(fifo)
    time.sleep(0.3)  # the thread restores itself from the stub and goes on
    assert target.alive(), (f"target died (exit {target.proc.returncode}) after the tool was killed "
                            f"during an injected syscall")
    assert_alive_and_running(target, "after the tool died during an injected syscall")
    target.assert_healthy()
    wait_values(target, PRISTINE, G_OLD, H_OLD)


# --- a kill between two writes of one window, set up exactly -------------------------

def test_recover_finishes_a_switch_or_revert_cut_between_two_writes(fg_target):
    """The random loop almost never lands between two pwrites of the
    stopped window (microseconds); write that state ourselves: record
    ``switching`` with only the first trampoline in (resp. ``reverting``
    with only the first one out), as a tool killed there leaves it. The
    workers may see the mix until `recover` runs — the design accepts
    that — but `recover` must then finish the interrupted direction."""
    target, pid = fg_target, fg_target.pid
    fg = load_patch(target.extra["patch"])
    with ksplice_py.attach(pid) as proc:
        e = proc.prepare(fg)
        first = e.functions[0]
        proc.mem.write(*e.state_bytes("switching"))
        proc.mem.write(first.addr, bytes.fromhex(first.new_bytes))
    listed = json.loads(run_hotpatch("list", "--json", pid).stdout)
    assert [x["state"] for x in listed] == ["switching"], listed

    cp = run_hotpatch("recover", "--json", pid)
    assert_ok(cp)
    assert any("switch" in m for m in json.loads(cp.stdout)), cp.stdout
    listed = json.loads(run_hotpatch("list", "--json", pid).stdout)
    assert [x["state"] for x in listed] == ["applied"], listed
    seen = mismatches(target)
    wait_values(target, g=G_NEW, batches=3)
    assert mismatches(target) == seen, "f and g still from two editions after recover"

    with ksplice_py.attach(pid) as proc:
        (e,) = proc.editions()
        first = e.functions[0]
        proc.mem.write(*e.state_bytes("reverting"))
        proc.mem.write(first.addr, bytes.fromhex(first.old_bytes))
    cp = run_hotpatch("recover", "--json", pid)
    assert_ok(cp)
    assert any("revert" in m for m in json.loads(cp.stdout)), cp.stdout
    assert json.loads(run_hotpatch("list", "--json", pid).stdout) == []
    seen = mismatches(target)
    wait_values(target, PRISTINE, G_OLD, H_OLD, batches=3)
    assert mismatches(target) == seen
    assert ed_maps(pid) == []
    assert {s: target.code(s) for s in target.extra["pristine"]} == target.extra["pristine"]
    assert_alive_and_running(target, "after recover")


# --- a record this tool cannot read ---------------------------------------------------

def test_unreadable_record_under_live_code_is_never_unmapped(fg_target):
    """`recover` (which every apply/revert/prepare runs first) treats a region
    without a valid record as memory of a tool killed while preparing, and
    unmaps it. A record it cannot read for another reason — written by
    another ksplice_py version (the magic carries the layout version),
    or damaged — may belong to an applied edition whose trampolines jump
    into it: unmapping it crashes the target. Simulated here by changing the
    record's version byte of an applied edition."""
    target, pid = fg_target, fg_target.pid
    assert_ok(run_hotpatch("apply", pid, target.extra["patch"]))
    wait_values(target, g=G_NEW)
    (line,) = [m for m in ed_maps(pid) if ":stubs" not in m and int(m.split()[2], 16) == 0]
    start = int(line.split("-")[0], 16)
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(start + 14)
        mem.write(b"\x7f")  # a layout version no tool knows

    cp = run_hotpatch("recover", pid)
    assert "Traceback" not in cp.stderr
    time.sleep(0.05)
    assert target.alive(), f"target died (exit {target.proc.returncode}) after `hotpatch recover`: {describe(cp)}"
    assert ed_maps(pid), f"recover unmapped memory that live code jumps into: {describe(cp)}"
    wait_values(target, g=G_NEW)
    assert_alive_and_running(target, "after recover")
    assert_one_edition(target)
