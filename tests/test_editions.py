"""Acceptance for issue #3: editions stack, revert in order, prepare/cutover/
abort as separate invocations, and apply/revert leaves nothing behind.

Target: tests/targets/ed_target.c. Its workers publish
``compute(7) * 100000 + g() * 100 + h()`` (see ``decode``), so every step is
observed from inside the running target, never inferred from the tool's
own report. Every `hotpatch` call is a fresh process: what `list` shows
comes from the target's memory, not from a tool that remembers.
"""
from __future__ import annotations

import json
import os
import re
import time

import pytest

from conftest import assert_error, assert_ok, describe, run_hotpatch, tracer_pid, wait_until

WORKERS = 4
# compute(7) per edition stack
PRISTINE, V2, V3 = 14, 21, 28  # x*2, compute_mul MUL=3, MUL=4
WRAP_OF = lambda below: below * 10 + 1  # noqa: E731  (ed_wrap.c)
G_OLD, G_NEW = 101, 202  # g() of ed_target and of ed_fg (VER=2)
H_OLD, H_NEW = 5, 6
SL_MISMATCH = 23  # ed_target.c: SL_COUNT_ + 0
SL_MIX_VALUE = 24


def decode(value: int) -> tuple[int, int, int]:
    """(compute(7), g(), h()) from a worker's last result."""
    return value // 100000, (value // 100) % 1000, value % 100


def slot(target, index: int) -> int:
    return target.status._q(32 + 8 * index)


def mismatches(target) -> int:
    return slot(target, SL_MISMATCH)


def observed(target) -> list[tuple[int, int, int]]:
    return [decode(v) for v in target.status.lasts()]


def wait_values(target, compute: int | None = None, g: int | None = None,
                h: int | None = None, timeout: float = 2.0, batches: int = 1) -> None:
    """Every worker runs ``batches`` fresh batches and then reports exactly
    these values (None: don't care)."""
    want = (compute, g, h)

    def ok(vals):
        return all(w is None or v == w for val in vals for v, w in zip(val, want))

    for _ in range(batches):
        before = target.status.iters()
        wait_until(lambda: all(i > b for i, b in zip(target.status.iters(), before))
                   and ok(observed(target)), timeout,
                   lambda: f"workers to report compute,g,h={want} (they report {observed(target)})")


def assert_stays(target, compute=None, g=None, h=None, batches: int = 3) -> None:
    """The values hold over several fresh batches (nothing switched late)."""
    wait_values(target, compute, g, h, batches=batches)


def list_json(pid: int) -> list[dict]:
    """`hotpatch list --json PID` from a fresh process."""
    cp = run_hotpatch("list", "--json", pid)
    assert_ok(cp)
    data = json.loads(cp.stdout)
    assert isinstance(data, list), cp.stdout
    return data


def ids_and_states(pid: int) -> list[tuple[int, str]]:
    return [(e["id"], e["state"]) for e in list_json(pid)]


def ed_maps(pid: int) -> list[str]:
    """Lines of /proc/PID/maps that belong to our editions."""
    with open(f"/proc/{pid}/maps") as f:
        return [line for line in f.read().splitlines() if "ksplice_py:ed" in line]


def ed_maps_of(pid: int, eid: int) -> list[str]:
    return [line for line in ed_maps(pid) if re.search(rf"ksplice_py:ed{eid}(:|\s|$)", line)]


def apply(pid: int, patch) -> dict:
    cp = run_hotpatch("apply", "--json", pid, patch)
    assert_ok(cp)
    return json.loads(cp.stdout)


def revert(pid: int, *eid) -> dict:
    cp = run_hotpatch("revert", "--json", pid, *eid)
    assert_ok(cp)
    return json.loads(cp.stdout)


def assert_clean(target, pristine: dict[str, bytes]) -> None:
    """No edition left: no record, no memory, original code, running."""
    assert list_json(target.pid) == []
    assert ed_maps(target.pid) == []
    assert {s: target.code(s) for s in pristine} == pristine, "function bytes not restored"
    assert tracer_pid(target.pid) == 0
    target.assert_running()
    target.assert_healthy()
    assert mismatches(target) == 0, f"a worker saw f and g of two editions: {slot(target, SL_MIX_VALUE)}"


@pytest.fixture
def ed_target(build, spawn):
    target = spawn(build.target("ed_target"), WORKERS)
    assert observed(target) == [(PRISTINE, G_OLD, H_OLD)] * WORKERS
    target.extra["pristine"] = {s: target.code(s) for s in ("addr0", "addr1", "addr2", "addr3")}
    return target


# --- stacking ------------------------------------------------------------------

def test_stack_v2_v3_then_revert_in_order(build, ed_target):
    t, pid = ed_target, ed_target.pid
    v2, v3 = build.patch("compute_mul", MUL=3), build.patch("compute_mul", MUL=4)

    e1 = apply(pid, v2)
    wait_values(t, V2, G_OLD, H_OLD)
    assert [e["id"] for e in list_json(pid)] == [e1["id"]]

    e2 = apply(pid, v3)
    assert e2["id"] != e1["id"]
    wait_values(t, V3, G_OLD, H_OLD)
    assert_stays(t, V3)
    assert ids_and_states(pid) == [(e2["id"], "applied"), (e1["id"], "applied")]  # newest first
    assert len(ed_maps_of(pid, e1["id"])) >= 1 and len(ed_maps_of(pid, e2["id"])) >= 1

    r = revert(pid)  # newest by default
    assert r["id"] == e2["id"]
    wait_values(t, V2, G_OLD, H_OLD)  # the edition below, not the original
    assert_stays(t, V2)
    assert ids_and_states(pid) == [(e1["id"], "applied")]
    assert ed_maps_of(pid, e2["id"]) == [], "the reverted edition's memory is still mapped"

    r = revert(pid)
    assert r["id"] == e1["id"]
    wait_values(t, PRISTINE, G_OLD, H_OLD)
    assert_clean(t, t.extra["pristine"])


def test_wrap_calls_the_edition_below(build, ed_target):
    t, pid = ed_target, ed_target.pid
    v2, wrap = build.patch("compute_mul", MUL=3), build.patch("ed_wrap")

    # Premise: on the pristine function the wrap calls the original.
    apply(pid, wrap)
    wait_values(t, WRAP_OF(PRISTINE))
    revert(pid)
    wait_values(t, PRISTINE)

    e1 = apply(pid, v2)
    wait_values(t, V2)
    e2 = apply(pid, wrap)
    wait_values(t, WRAP_OF(V2), G_OLD, H_OLD)  # 211: v2 below it, not the pristine 141
    assert_stays(t, WRAP_OF(V2))
    wrapped = [f for f in list_json(pid)[0]["functions"]]
    assert [f["kind"] for f in wrapped] == ["wrap"], wrapped

    # The edition the wrap calls cannot go while the wrap is in.
    cp = run_hotpatch("revert", pid, e1["id"])
    line = assert_error(cp, 4)
    assert re.search(rf"\bedition {e2['id']}\b", line), line
    assert_stays(t, WRAP_OF(V2))

    revert(pid)
    wait_values(t, V2)
    revert(pid)
    wait_values(t, PRISTINE)
    assert_clean(t, t.extra["pristine"])


# --- prepare / cutover / abort ----------------------------------------------------

def test_prepare_then_cutover_and_abort_from_other_invocations(build, ed_target):
    t, pid = ed_target, ed_target.pid
    v2, hpatch = build.patch("compute_mul", MUL=3), build.patch("ed_h")

    cp = run_hotpatch("prepare", "--json", pid, v2)
    assert_ok(cp)
    p1 = json.loads(cp.stdout)
    assert p1["state"] == "prepared", p1
    # Prepared is not switched: the old code keeps running, the tool is gone.
    assert_stays(t, PRISTINE, G_OLD, H_OLD, batches=5)
    assert tracer_pid(pid) == 0
    t.assert_running()
    assert ids_and_states(pid) == [(p1["id"], "prepared")]
    assert ed_maps_of(pid, p1["id"]), "a prepared edition must own memory in the target"

    cp = run_hotpatch("prepare", "--json", pid, hpatch)
    assert_ok(cp)
    p2 = json.loads(cp.stdout)
    assert p2["id"] != p1["id"]
    assert ids_and_states(pid) == [(p2["id"], "prepared"), (p1["id"], "prepared")]
    p2_maps = ed_maps_of(pid, p2["id"])
    assert p2_maps

    assert_ok(run_hotpatch("cutover", pid, p1["id"]))
    wait_values(t, V2, G_OLD, H_OLD)
    assert_stays(t, V2, G_OLD, H_OLD)  # h: its edition is prepared only
    assert ids_and_states(pid) == [(p2["id"], "prepared"), (p1["id"], "applied")]

    assert_ok(run_hotpatch("abort", pid, p2["id"]))
    assert ed_maps_of(pid, p2["id"]) == [], f"aborted edition still mapped: {ed_maps_of(pid, p2['id'])}"
    with open(f"/proc/{pid}/maps") as f:
        text = f.read()
    for line in p2_maps:  # not just renamed: the address range is free
        assert line.split()[0] not in text, line
    assert ids_and_states(pid) == [(p1["id"], "applied")]
    assert_stays(t, V2, G_OLD, H_OLD)
    assert t.code("addr3") == t.extra["pristine"]["addr3"]

    # An aborted edition cannot be cut over.
    cp = run_hotpatch("cutover", pid, p2["id"])
    assert cp.returncode != 0, describe(cp)
    assert_stays(t, V2, G_OLD, H_OLD)

    revert(pid)
    wait_values(t, PRISTINE)
    assert_clean(t, t.extra["pristine"])


def test_cutover_refused_when_code_changed_since_prepare(build, ed_target):
    t, pid = ed_target, ed_target.pid
    v2, v3 = build.patch("compute_mul", MUL=3), build.patch("compute_mul", MUL=4)

    cp = run_hotpatch("prepare", "--json", pid, v3)
    assert_ok(cp)
    staged = json.loads(cp.stdout)
    other = apply(pid, v2)  # another edition touches compute after the prepare
    wait_values(t, V2)

    cp = run_hotpatch("cutover", pid, staged["id"])
    line = assert_error(cp, 4)
    assert "compute" in line and re.search(rf"\bedition {other['id']}\b", line), line
    assert_stays(t, V2, G_OLD, H_OLD)
    t.assert_running()
    assert ids_and_states(pid) == [(other["id"], "applied"), (staged["id"], "prepared")]

    assert_ok(run_hotpatch("abort", pid, staged["id"]))
    assert ed_maps_of(pid, staged["id"]) == []
    assert ids_and_states(pid) == [(other["id"], "applied")]
    revert(pid)
    wait_values(t, PRISTINE)
    assert_clean(t, t.extra["pristine"])


def test_cutover_refused_after_the_edition_below_was_reverted(build, ed_target):
    """A patch prepared on top of an edition that is gone since: its saved
    bytes are stale, so the cutover must refuse, not write them."""
    t, pid = ed_target, ed_target.pid
    v2, wrap = build.patch("compute_mul", MUL=3), build.patch("ed_wrap")

    apply(pid, v2)
    wait_values(t, V2)
    cp = run_hotpatch("prepare", "--json", pid, wrap)  # its stub calls v2
    assert_ok(cp)
    staged = json.loads(cp.stdout)
    below = [e for e in list_json(pid) if e["state"] == "applied"][0]
    revert(pid, below["id"])  # allowed: the staged wrap is not switched in
    wait_values(t, PRISTINE)

    cp = run_hotpatch("cutover", pid, staged["id"])
    assert_error(cp, 4)
    assert_stays(t, PRISTINE, G_OLD, H_OLD)
    assert_ok(run_hotpatch("abort", pid, staged["id"]))
    assert_clean(t, t.extra["pristine"])


# --- revert order ---------------------------------------------------------------------

def test_revert_blocked_by_newer_edition(build, ed_target):
    t, pid = ed_target, ed_target.pid
    e1 = apply(pid, build.patch("compute_mul", MUL=3))
    e2 = apply(pid, build.patch("compute_mul", MUL=4))
    wait_values(t, V3)
    maps_before = ed_maps(pid)

    cp = run_hotpatch("revert", pid, e1["id"])
    line = assert_error(cp, 4)
    assert re.search(rf"\bedition {e2['id']}\b", line), f"the message must name edition {e2['id']}: {line}"
    cp = run_hotpatch("revert", "--json", pid, e1["id"])
    assert cp.returncode == 4
    assert json.loads(cp.stdout.strip().splitlines()[-1])["exit_code"] == 4

    assert_stays(t, V3, G_OLD, H_OLD)
    assert ids_and_states(pid) == [(e2["id"], "applied"), (e1["id"], "applied")]
    assert ed_maps(pid) == maps_before
    t.assert_running()

    revert(pid)
    revert(pid)
    wait_values(t, PRISTINE)
    assert_clean(t, t.extra["pristine"])


def test_revert_older_edition_nobody_newer_touches(build, ed_target):
    t, pid = ed_target, ed_target.pid
    e1 = apply(pid, build.patch("ed_h"))
    e2 = apply(pid, build.patch("compute_mul", MUL=3))
    e3 = apply(pid, build.patch("ed_fg"))
    wait_values(t, V2, G_NEW, H_NEW)

    r = revert(pid, e1["id"])  # the oldest; compute, f and g are not h
    assert r["id"] == e1["id"]
    wait_values(t, V2, G_NEW, H_OLD)
    assert_stays(t, V2, G_NEW, H_OLD)
    assert ids_and_states(pid) == [(e3["id"], "applied"), (e2["id"], "applied")]
    assert ed_maps_of(pid, e1["id"]) == []
    assert t.code("addr3") == t.extra["pristine"]["addr3"]

    r = revert(pid, e2["id"])  # the middle one: f and g are not compute
    wait_values(t, PRISTINE, G_NEW, H_OLD)
    assert ids_and_states(pid) == [(e3["id"], "applied")]

    revert(pid)
    wait_values(t, PRISTINE, G_OLD, H_OLD)
    assert_clean(t, t.extra["pristine"])


# --- nothing leaks --------------------------------------------------------------------

def _vm(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmSize"):
                out[key] = int(rest.split()[0])
    return out


def _footprint(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/maps") as f:
        nmaps = len(f.read().splitlines())
    return {"maps": nmaps, "fds": len(os.listdir(f"/proc/{pid}/fd")), **_vm(pid)}


def test_apply_revert_cycles_leak_nothing(build, ed_target):
    """CYCLES apply/revert cycles of ed_fg (two functions and a symbol
    reference) through the library in this process; every 10th cycle also
    stacks a WRAP on compute. The target's mappings, fds and RSS come back.
    KSPLICE_PY_CYCLES=N overrides the count (KSPLICE_PY_LONG=1: 5000)."""
    import ksplice_py
    from ksplice_py.trust import load_patch

    cycles = int(os.environ.get("KSPLICE_PY_CYCLES", 5000 if os.environ.get("KSPLICE_PY_LONG") else 1000))
    t, pid = ed_target, ed_target.pid
    fg, wrap = load_patch(build.patch("ed_fg")), load_patch(build.patch("ed_wrap"))
    own_fds = len(os.listdir("/proc/self/fd"))

    with ksplice_py.attach(pid) as proc:
        # warm-up: copy-on-write of the patched text pages happens once
        proc.apply(fg, timeout=5)
        proc.apply(wrap, timeout=5)
        proc.revert(timeout=5)
        proc.revert(timeout=5)
        wait_values(t, PRISTINE, G_OLD, H_OLD)
        start = _footprint(pid)
        peak_maps = start["maps"]
        t0 = time.monotonic()
        for i in range(cycles):
            proc.apply(fg, timeout=5)
            if i % 10 == 0:
                proc.apply(wrap, timeout=5)
                peak_maps = max(peak_maps, _footprint(pid)["maps"])
                proc.revert(timeout=5)
                assert t.alive(), f"target died at cycle {i}"
            proc.revert(timeout=5)
        elapsed = time.monotonic() - t0
        wait_values(t, PRISTINE, G_OLD, H_OLD)
        end = _footprint(pid)
        assert proc.editions() == []

    print(f"\n{cycles} cycles in {elapsed:.1f}s ({elapsed / cycles * 1000:.1f} ms/cycle); "
          f"start {start}; end {end}; peak maps {peak_maps}")
    assert peak_maps > start["maps"], "premise: the patches add mappings while applied"
    assert end["maps"] == start["maps"], (start, end)
    assert end["fds"] == start["fds"], (start, end)
    assert abs(end["VmRSS"] - start["VmRSS"]) <= 8, (start, end)  # kB: two pages
    assert abs(end["VmSize"] - start["VmSize"]) <= 8, (start, end)
    assert len(os.listdir("/proc/self/fd")) == own_fds, "the library leaked file descriptors"
    assert_clean(t, t.extra["pristine"])
