"""hotpatch ACTION --all: one patch, every matching process (issue #11).

Every run is narrowed with --pids to processes the test started, and the
patched object (libfleet.so) exists only in these tests.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ksplice_py.symbols import build_id_of

from conftest import (HOTPATCH, TARGETS, _compile, assert_not_stopped, maps_lines, run_hotpatch,
                      tracer_pid, wait_until)
from test_harness import resolver, resolver_exe, slot  # noqa: F401 (fixtures)

BASE, NEW = 15, 21  # fleet_compute(3) before / after fleet_v2


def build_id(path: Path) -> str:
    bid = build_id_of(str(path))
    assert bid, f"{path} has no build-id"
    return bid


@pytest.fixture(scope="module")
def fleet(build, tmp_path_factory):
    """Targets linked to libfleet.so, to another build of it, and the patches."""
    exe = build.target("fleet_target", libs=["libfleet"])
    lib = build.library("libfleet")
    other_dir = tmp_path_factory.mktemp("other-build")
    other_lib = other_dir / "libfleet.so"
    _compile(["gcc", "-O2", "-g", "-shared", "-fPIC", "-DFLEET_MUL=6", "-o", str(other_lib),
              str(TARGETS / "libfleet.c")])
    other_exe = other_dir / "fleet_target"
    _compile(["gcc", "-O2", "-g", "-pie", "-fPIE", "-pthread", f"-I{TARGETS}", "-o", str(other_exe),
              str(TARGETS / "fleet_target.c"), f"-L{other_dir}", "-lfleet", f"-Wl,-rpath,{other_dir}"])
    return {"exe": exe, "other_exe": other_exe, "patch": build.patch("fleet_v2"),
            "pinned": build.patch("fleet_v2", PIN=f'"{build_id(lib)}"')}


def pids_arg(*targets) -> str:
    return ",".join(str(t.pid) for t in targets)


def run_json(*args, timeout: float = 60) -> tuple[subprocess.CompletedProcess, dict]:
    cp = run_hotpatch(*args, "--json", timeout=timeout)
    try:
        return cp, json.loads(cp.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"no JSON document: exit {cp.returncode}\n{cp.stdout}\n{cp.stderr}")


def by_pid(doc: dict) -> dict[int, dict]:
    return {p["pid"]: p for p in doc["processes"]}


def editions(t) -> set[int]:
    """Ids of the edition regions mapped in the target."""
    return {int(m.group(1)) for line in maps_lines(t.pid) if (m := re.search(r"ksplice_py:ed(\d+)", line))}


def assert_untouched(t, maps_before: list[str]) -> None:
    t.assert_alive()
    assert_not_stopped(t.pid)
    assert tracer_pid(t.pid) == 0
    assert maps_lines(t.pid) == maps_before


def test_mixed_machine(fleet, spawn, sleeper):
    """Matching processes are patched; another build, one not mapping the
    object, one that exits during the run and a busy one (no safe moment)
    each get exactly their result; exit 3 (the only failure: no safe moment)."""
    busy = spawn(fleet["exe"], 1000, "hold")  # first in pid order: the single worker waits on it
    leaving = spawn(fleet["exe"])
    matching = [spawn(fleet["exe"]) for _ in range(3)]
    other = spawn(fleet["other_exe"])
    unrelated = sleeper()
    leaving.expect_exit = True
    before = {t.pid: maps_lines(t.pid) for t in (busy, other)}
    other_first = other.status.lasts()[0]

    args = [HOTPATCH, "apply", "--all", fleet["pinned"], "--timeout", "1.5", "--jobs", "1", "--json",
            "--pids", pids_arg(busy, leaving, *matching, other) + f",{unrelated.pid}"]
    # One attempt of the whole --timeout: while the only worker waits on the
    # busy process, the next one exits.
    env = dict(os.environ, KSPLICE_PY_FLEET_FIRST_TRY="1.5")
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_until(lambda: editions(busy), 30, "the busy process to be worked on")
    leaving.proc.kill()
    leaving.proc.wait()
    out, err = run.communicate(timeout=60)
    assert "Traceback" not in err
    doc = json.loads(out)
    res = by_pid(doc)
    assert run.returncode == 3, (out, err)
    assert len(err.strip().splitlines()) == 1, err

    assert res[busy.pid]["result"] == "failed" and res[busy.pid]["exit_code"] == 3
    assert "no safe moment" in res[busy.pid]["reason"]
    assert res[leaving.pid]["result"] == "skipped" and "exited" in res[leaving.pid]["reason"]
    assert res[other.pid]["result"] == "skipped" and "build-id" in res[other.pid]["reason"]
    assert res[unrelated.pid]["result"] == "skipped" and "does not map libfleet.so" in res[unrelated.pid]["reason"]
    for t in matching:
        r = res[t.pid]
        assert r["result"] == "applied" and r["edition"] == 1 and r["pause_us"] > 0, r
        assert set(r) >= {"pid", "name", "result", "edition", "pause_us", "reason", "exit_code"}
        assert r["name"] == "fleet_target"
    assert (doc["applied"], doc["skipped"], doc["failed"]) == (3, 3, 1)

    for t in matching:
        t.wait_all_return(NEW, timeout=5)
        t.assert_running()
        t.assert_healthy()
    assert_untouched(busy, before[busy.pid])
    assert_untouched(other, before[other.pid])
    other.assert_progress()
    assert other.status.lasts()[0] == other_first
    other.assert_healthy()


def test_idempotent_rerun_text_output(fleet, spawn):
    ts = [spawn(fleet["exe"]) for _ in range(3)]
    cp = run_hotpatch("apply", "--all", fleet["patch"], "--pids", pids_arg(*ts))
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.strip().splitlines()
    assert lines[-1] == "processes: 3 applied, 0 skipped, 0 failed"
    assert sorted(int(x.split()[1]) for x in lines[:-1]) == sorted(t.pid for t in ts)
    assert all("applied edition 1" in x for x in lines[:-1])

    cp, doc = run_json("apply", "--all", fleet["patch"], "--pids", pids_arg(*ts))
    assert cp.returncode == 0, cp.stderr
    assert (doc["applied"], doc["skipped"], doc["failed"]) == (0, 3, 0)
    assert all(p["reason"] == "already applied as edition 1" for p in doc["processes"])
    for t in ts:
        assert editions(t) == {1}
        t.wait_all_return(NEW, timeout=5)
        t.assert_healthy()

    cp, doc = run_json("revert", "--all", fleet["patch"], "--pids", pids_arg(*ts))
    assert cp.returncode == 0 and doc["applied"] == 3, cp.stderr
    cp, doc = run_json("revert", "--all", fleet["patch"], "--pids", pids_arg(*ts))
    assert cp.returncode == 0 and doc["applied"] == 0, cp.stderr
    for t in ts:
        assert not editions(t)
        t.wait_all_return(BASE, timeout=5)


def test_staged_prepare_cutover_abort(fleet, spawn):
    ts = [spawn(fleet["exe"]) for _ in range(3)]
    pids = pids_arg(*ts)
    before = {t.pid: maps_lines(t.pid) for t in ts}
    cp, doc = run_json("prepare", "--all", fleet["patch"], "--pids", pids)
    assert cp.returncode == 0 and doc["applied"] == 3, cp.stderr
    for t in ts:  # staged: mapped and linked, still the old code
        assert editions(t)
        t.wait_all_return(BASE)
    cp, listed = run_json("list", "--all", "--pids", pids)
    assert cp.returncode == 0
    assert {p["pid"]: [e["state"] for e in p["editions"]] for p in listed["processes"]} == \
        {t.pid: ["prepared"] for t in ts}
    cp, doc = run_json("cutover", "--all", fleet["patch"], "--pids", pids)
    assert cp.returncode == 0 and doc["applied"] == 3, cp.stderr
    for t in ts:
        t.wait_all_return(NEW, timeout=5)
    cp, listed = run_json("list", "--all", "--pids", pids)
    assert all(e["state"] == "applied" and e["sha256"] for p in listed["processes"] for e in p["editions"])
    cp, doc = run_json("revert", "--all", fleet["patch"], "--pids", pids)
    assert cp.returncode == 0 and doc["applied"] == 3, cp.stderr

    # prepare, then abort everywhere (by the patch's sha256): exactly as before
    cp, doc = run_json("prepare", "--all", fleet["patch"], "--pids", pids)
    assert doc["applied"] == 3
    sha = doc["sha256"]
    cp, doc = run_json("abort", "--all", sha, "--pids", pids)
    assert cp.returncode == 0 and doc["applied"] == 3, cp.stderr
    for t in ts:
        assert maps_lines(t.pid) == before[t.pid]
        t.wait_all_return(BASE)
        t.assert_healthy()
    cp, listed = run_json("list", "--all", "--pids", pids)
    assert listed == {"processes": []}


def test_fits_no_process_and_bad_input(fleet, spawn, sleeper):
    other = spawn(fleet["other_exe"])
    cp = run_hotpatch("apply", "--all", fleet["pinned"], "--pids", f"{other.pid},{sleeper().pid}")
    assert cp.returncode == 4, cp.stdout + cp.stderr
    assert "fits no process" in cp.stderr
    assert cp.stdout.strip().splitlines()[-1] == "processes: 0 applied, 2 skipped, 0 failed"
    for bad in (["--pids", "1,x"], ["--jobs", "0"], ["--exe", "/nonexistent"], ["--user", "no-such-user-x"]):
        cp = run_hotpatch("apply", "--all", fleet["patch"], *bad)
        assert cp.returncode == 2 and len(cp.stderr.strip().splitlines()) == 1, cp.stderr


def test_ctrl_c_leaves_each_process_patched_or_untouched(fleet, spawn):
    ts = [spawn(fleet["exe"]) for _ in range(10)]
    before = {t.pid: maps_lines(t.pid) for t in ts}
    run = subprocess.Popen([HOTPATCH, "apply", "--all", fleet["patch"], "--jobs", "1",
                            "--pids", pids_arg(*ts)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    first = run.stdout.readline()  # one process done: interrupt the run
    run.send_signal(signal.SIGINT)
    rest, err = run.communicate(timeout=60)
    out = first + rest
    assert "Traceback" not in err
    assert run.returncode == 1, (out, err)
    assert "interrupted" in err and "processes:" in out.strip().splitlines()[-1]
    results = {int(x.split()[1]): x for x in out.strip().splitlines()[:-1]}
    assert set(results) == {t.pid for t in ts}
    assert any("not reached" in x for x in results.values())
    for t in ts:
        t.assert_running()
        t.assert_healthy()
        assert tracer_pid(t.pid) == 0
        if "applied edition" in results[t.pid]:
            t.wait_all_return(NEW, timeout=5)
        else:
            assert maps_lines(t.pid) == before[t.pid] or not editions(t)
            t.wait_all_return(BASE)


@pytest.fixture
def sleeper():
    """A process that maps no libfleet.so."""
    procs: list[subprocess.Popen] = []

    class _P:
        def __init__(self, p):
            self.proc, self.pid = p, p.pid

    def start():
        p = subprocess.Popen(["sleep", "300"])
        procs.append(p)
        time.sleep(0.05)  # past exec
        return _P(p)

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_busy_process_delays_no_other(fleet, spawn):
    """A process with no safe moment gives its worker back after a first
    short try and is tried again after the others (one worker here)."""
    busy = spawn(fleet["exe"], 1000, "hold")
    ts = [spawn(fleet["exe"]) for _ in range(3)]
    cp = run_hotpatch("apply", "--all", fleet["patch"], "--jobs", "1", "--timeout", "2",
                      "--pids", pids_arg(busy, *ts))
    assert cp.returncode == 3, cp.stdout + cp.stderr
    lines = cp.stdout.strip().splitlines()
    assert lines[-1] == "processes: 3 applied, 0 skipped, 1 failed"
    order = [int(x.split()[1]) for x in lines[:-1]]
    assert order[-1] == busy.pid and sorted(order[:-1]) == sorted(t.pid for t in ts), lines
    assert "no safe moment" in lines[-2]
    for t in ts:
        t.wait_all_return(NEW, timeout=5)
    busy.assert_alive()
    assert_not_stopped(busy.pid)
    assert not editions(busy)


def test_resolver_harness_per_process(build, resolver):
    """A libc patch (narrowed to two processes): the one whose threads sit
    inside the resolver fails with no safe moment, named by the glibc
    resolver harness; the other is patched first, not delayed by it."""
    patch = build.patch("resolver_wrap")
    stuck, _ = resolver(delay=None, retrans=30, nquery=1, ngai=1)
    free, _ = resolver(delay=0.2, retrans=5, nquery=1, ngai=1)
    wait_until(lambda: slot(free, "done") == 2, 10, "the free process's lookups to return")
    cp = run_hotpatch("apply", "--all", patch, "--jobs", "1", "--timeout", "1.5",
                      "--pids", f"{stuck.pid},{free.pid}")
    assert cp.returncode == 3, cp.stdout + cp.stderr
    lines = cp.stdout.strip().splitlines()
    assert lines[0].startswith(f"pid {free.pid} ") and "applied edition 1" in lines[0], lines
    assert lines[1].startswith(f"pid {stuck.pid} ") and "no safe moment" in lines[1], lines
    assert "glibc-resolver" in lines[1]
    assert lines[2] == "processes: 1 applied, 0 skipped, 1 failed"
    assert slot(stuck, "inside") == 2 and slot(stuck, "done") == 0, "a lookup was disturbed"
    assert_not_stopped(stuck.pid)


def test_audit_one_record_per_process_and_one_summary(fleet, spawn, tmp_path):
    ts = [spawn(fleet["exe"]) for _ in range(2)]
    log = tmp_path / "audit.jsonl"
    cp = run_hotpatch("apply", "--all", fleet["patch"], "--pids", pids_arg(*ts), "--log-file", log)
    assert cp.returncode == 0, cp.stderr
    records = [json.loads(x) for x in log.read_text().splitlines()]
    members = [r for r in records if "fleet" not in r]  # the library's, one per operation
    summary = [r for r in records if "fleet" in r]
    assert sorted(r["pid"] for r in members) == sorted(t.pid for t in ts)
    assert all(r["result"] == "ok" and r["edition"] == 1 and r["sha256"] for r in members)
    assert len(summary) == 1 and len(records) == 3
    assert summary[0]["fleet"] == {"applied": 2, "skipped": 0, "failed": 0, "interrupted": False}
    assert summary[0]["action"] == "apply" and summary[0]["exit_code"] == 0
