"""Acceptance: harnesses. The glibc-resolver harness keeps a libc patch from
switching while a thread is inside a DNS lookup (and only a libc patch);
harnesses from $KSPLICE_PY_HARNESS_PATH and from entry points veto a
cutover through their check.

Real processes throughout: tests/targets/resolver.c runs threads that call
res_nquery() (private res_state) and getaddrinfo() (per-thread _res) against
a stub DNS server in this file (UDP on 127.0.0.1, port 0), which answers
after a configurable delay, or never.
"""
from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

import ksplice_py
from ksplice_py import harness
from conftest import (TARGETS, assert_error, assert_not_stopped, assert_ok, describe, read_mem,
                      run_hotpatch, tracer_pid, wait_until)

ROOT = Path(__file__).resolve().parent.parent
RESOLVER_HARNESS = ROOT / "harnesses" / "glibc_resolver.py"

# Resolver-only status slots (tests/targets/resolver.c), after common.h's.
SLOT = {"inside": 23, "done": 24, "ok": 25, "wrapped": 26, "started": 27}
ANSWER = bytes([127, 0, 0, 7])


def slot(target, name: str) -> int:
    return target.status._q(32 + 8 * SLOT[name])


def load_resolver_harness():
    spec = importlib.util.spec_from_file_location("glibc_resolver_under_test", RESOLVER_HARNESS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.HARNESS


# --- the stub DNS server -------------------------------------------------------

def dns_reply(query: bytes) -> bytes:
    """NOERROR; for an A question one answer (127.0.0.7), else none."""
    end = 12
    while query[end]:
        end += 1 + query[end]
    end += 5  # root label, qtype, qclass
    qtype = struct.unpack_from(">H", query, end - 4)[0]
    answers = b""
    if qtype == 1:
        answers = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + ANSWER
    flags = struct.pack(">BB", 0x84 | (query[2] & 0x01), 0x80)  # QR AA [RD], RA
    header = query[:2] + flags + struct.pack(">HHHH", 1, 1 if answers else 0, 0, 0)
    return header + query[12:end] + answers


class StubDNS:
    """Answers every query ``delay`` seconds after it came, or never (None);
    a ``gated`` stub also waits for ``release()``."""

    def __init__(self, delay: float | None, gated: bool = False) -> None:
        self.delay = delay
        self.released = threading.Event()
        if not gated:
            self.released.set()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.01)
        self.port = self.sock.getsockname()[1]
        self.queries: list[float] = []  # monotonic arrival times
        self.replies: list[float] = []  # monotonic send times
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        pending: list[tuple[float, bytes, tuple]] = []
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except socket.timeout:
                pass
            else:
                self.queries.append(time.monotonic())
                if self.delay is not None:
                    pending.append((time.monotonic() + self.delay, dns_reply(data), peer))
            now = time.monotonic()
            for item in [p for p in pending if p[0] <= now and self.released.is_set()]:
                pending.remove(item)
                self.sock.sendto(item[1], item[2])
                self.replies.append(time.monotonic())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def test_dns_reply_is_well_formed():
    """The stub's answer parses (so a target failing to resolve is not our bug)."""
    q = bytes.fromhex("abcd0100000100000000000002687004746573740000010001")  # hp.test A IN
    r = dns_reply(q)
    assert r[:2] == b"\xab\xcd" and r[2] & 0x80 and struct.unpack_from(">HH", r, 4) == (1, 1)
    assert r[12:12 + len(q) - 12] == q[12:] and r.endswith(ANSWER)


# --- targets -------------------------------------------------------------------

@pytest.fixture(scope="session")
def resolver_exe(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resolver") / "resolver"
    cmd = ["gcc", "-O2", "-g", "-Wall", "-Wextra", "-pie", "-fPIE", "-pthread", f"-I{TARGETS}",
           "-o", str(out), str(TARGETS / "resolver.c"), "-lresolv"]
    cp = subprocess.run(cmd, capture_output=True, text=True)
    assert cp.returncode == 0, f"compile failed: {cmd}\n{cp.stderr}"
    return out


@pytest.fixture
def resolver(resolver_exe, spawn):
    """resolver(delay, retrans, nquery, ngai) -> (target, stub): the target's
    lookup threads all inside a lookup, waiting on the stub."""
    stubs: list[StubDNS] = []

    def start(delay: float | None, retrans: int, nquery: int = 1, ngai: int = 1,
              gated: bool = False):
        stub = StubDNS(delay, gated)
        stubs.append(stub)
        target = spawn(resolver_exe, stub.port, retrans, nquery, ngai, stdin=subprocess.PIPE)
        target.extra["stub"] = stub
        target.extra["threads"] = nquery + ngai
        lookup(target)
        return target, stub

    yield start
    for s in stubs:
        s.close()


def lookup(target, wait_inside: bool = True) -> None:
    """One lookup in every lookup thread; wait until each query reached the stub."""
    stub, n = target.extra["stub"], target.extra["threads"]
    before = len(stub.queries)
    target.proc.stdin.write(b"go\n")
    target.proc.stdin.flush()
    if wait_inside:
        wait_until(lambda: len(stub.queries) >= before + n and slot(target, "inside") == n, 10.0,
                   lambda: f"{n} lookups to reach the stub (queries {len(stub.queries) - before}, "
                           f"inside {slot(target, 'inside')})")


def threads_by_name(pid: int) -> dict[str, int]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            out[f.read().strip()] = int(tid)
    return out


def assert_untouched(target, addr: int, code: bytes, maps: list[str]) -> None:
    target.assert_alive()
    assert read_mem(target.pid, addr, len(code)) == code, "function bytes changed"
    assert target.maps() == maps, "the target's mappings changed"
    assert tracer_pid(target.pid) == 0, "the target is still traced"
    assert_not_stopped(target.pid)
    target.assert_progress(timeout=5.0)


def apply_json(*args, timeout: float = 30) -> tuple[subprocess.CompletedProcess, dict, float]:
    t0 = time.monotonic()
    cp = run_hotpatch("apply", *args, "--json", timeout=timeout)
    elapsed = time.monotonic() - t0
    return cp, output_json(cp), elapsed


def output_json(cp: subprocess.CompletedProcess) -> dict:
    """--json output: one document (a result, or on failure an error object
    on the last line after anything else printed)."""
    out = cp.stdout.strip()
    for text in (out, out.splitlines()[-1] if out else ""):
        try:
            return json.loads(text)
        except ValueError:
            pass
    pytest.fail(f"--json output is not JSON: {describe(cp)}")


# --- the harness itself ------------------------------------------------------------

def test_harnesses_command_lists_glibc_resolver():
    cp = run_hotpatch("harnesses", "--json")
    assert_ok(cp)
    by_name = {h["name"]: h for h in json.loads(cp.stdout)}
    h = by_name.get("glibc-resolver")
    assert h, f"glibc-resolver not listed: {sorted(by_name)}"
    assert h["objects"] == ["libc.so.6", "libresolv.so.2"]
    assert "send_dg" in h["critical"] and "res_nquery" in h["critical"]
    assert h["source"].endswith("harnesses/glibc_resolver.py")
    text = run_hotpatch("harnesses")
    assert_ok(text)
    assert re.search(r"^glibc-resolver\s+libc\.so\.6, libresolv\.so\.2", text.stdout, re.M), text.stdout


def test_patterns_stay_out_of_unrelated_functions():
    """No pattern reaches the signal trampoline or the name predicates."""
    h = load_resolver_harness()
    for name in ("__restore_rt", "res_hnok", "res_dnok", "__libc_res_hnok", "res_setoptions",
                 "getaddrinfo_a", "__getaddrinfo_a", "inet_pton", "poll", "__poll", "malloc",
                 "gethosts", "freeaddrinfo", "__nscd_gethostbyname_r"):
        hits = [p for p in h.critical if fnmatch.fnmatchcase(name, p)]
        assert not hits, f"{name} is matched by {hits}"


def test_critical_ranges_cover_the_lookup_path(resolver_exe, spawn):
    """In the live process (by address, whichever alias names it): entry
    points, the res_* API and, with libc6-dbg, the internals are critical;
    poll/malloc/res_hnok/inet_pton are not."""
    target = spawn(resolver_exe, 9, 1, 0, 0, stdin=subprocess.PIPE)
    with ksplice_py.attach(target.pid) as proc:
        t0 = time.monotonic()
        ranges = harness.critical_ranges([load_resolver_harness()], proc.symbols)
        took = time.monotonic() - t0

        def critical(name: str) -> bool:
            addr = proc.symbols.resolve(name).addr
            return any(r.start <= addr < r.end for r in ranges)

        want = [f"libc.so.6:{n}" for n in (
            "getaddrinfo", "getnameinfo", "gethostbyname", "gethostbyname2_r", "gethostbyaddr_r",
            "res_nquery", "res_query", "res_nsearch", "res_search", "res_nquerydomain",
            "res_nsend", "res_send", "res_nmkquery", "__res_ninit", "__res_nclose")]
        want += ["libresolv.so.2:res_gethostbyname", "libresolv.so.2:res_gethostbyaddr"]
        if has_debug_file(proc, "libc.so.6"):
            want += [f"libc.so.6:{n}" for n in (
                "send_dg", "send_dg.cold", "send_vc", "__res_context_send", "__res_context_query",
                "__res_context_search", "__res_context_querydomain", "context_send_common",
                "_nss_dns_gethostbyname4_r", "_nss_dns_gethostbyaddr2_r", "getanswer_r",
                "__resolv_context_get_override", "___res_nquery", "__GI___res_context_send")]
        if has_debug_file(proc, "libresolv.so.2"):
            want += ["libresolv.so.2:getanswer", "libresolv.so.2:res_gethostbyaddr_context"]
        missing = [n for n in want if not critical(n)]
        assert not missing, f"not critical: {missing}"
        wrong = [n for n in ("libc.so.6:poll", "libc.so.6:malloc", "libc.so.6:res_hnok",
                             "libc.so.6:inet_pton", "libc.so.6:getaddrinfo_a", "libc.so.6:freeaddrinfo",
                             "libresolv.so.2:ns_initparse") if critical(n)]
        assert not wrong, f"critical but unrelated: {wrong}"
    print(f"\n{len(ranges)} critical ranges computed in {took * 1000:.0f} ms")


def has_debug_file(proc, obj: str) -> bool:
    bid = proc.symbols.build_id(obj)
    return bool(bid) and Path(f"/usr/lib/debug/.build-id/{bid[:2]}/{bid[2:]}.debug").is_file()


# --- cutover waits for the resolver ------------------------------------------------------

OBSERVER_MODULE = '''
import os, time
from ksplice_py.harness import Harness

def note(what):
    with open(os.environ["HP_TEST_OBSERVER_LOG"], "a") as f:
        f.write("%s %r\\n" % (what, time.monotonic()))

HARNESS = Harness(name="test-observer", description="notes when the cutover starts and ends",
                  objects=("libc.so.6",), before_cutover=lambda proc, e: note("before"),
                  after_cutover=lambda proc, e: note("after"))
'''


def observed(log: Path, what: str) -> float | None:
    """CLOCK_MONOTONIC (shared by all processes) of the observer's note."""
    for line in log.read_text().splitlines() if log.exists() else []:
        if line.split()[0] == what:
            return float(line.split()[1])
    return None


def test_apply_waits_until_threads_leave_the_resolver(build, resolver, tmp_path, monkeypatch):
    """(a) Threads wait for the stub's answer (1.5 s after their query): the
    wrap of res_nquery waits (several attempts) until every thread is out,
    then switches; the wrapper runs on the next lookups.

    A second harness (a plugin with before/after hooks) tells when the
    tool's attempts begin and when the switch happened; the stub holds its
    answers until attempts have run for 0.3 s, so on a loaded machine a
    slow tool start cannot turn this into a test of nothing."""
    plugins, log = tmp_path / "plugins", tmp_path / "observer.log"
    plugins.mkdir()
    (plugins / "observer.py").write_text(OBSERVER_MODULE)
    monkeypatch.setenv("KSPLICE_PY_HARNESS_PATH", str(plugins))
    monkeypatch.setenv("HP_TEST_OBSERVER_LOG", str(log))
    patch = build.patch("resolver_wrap")  # before the lookups: compiling takes time
    target, stub = resolver(delay=1.5, retrans=5, nquery=2, ngai=1, gated=True)
    nquery = target.addr("addr1")
    asked = max(stub.queries)

    result: list = []
    tool = threading.Thread(target=lambda: result.append(apply_json(target.pid, patch, "--timeout", 5)))
    tool.start()
    before = wait_until(lambda: observed(log, "before"), 10.0, "the cutover to begin")
    time.sleep(max(0.0, before + 0.3 - time.monotonic()))
    stub.released.set()
    tool.join(timeout=30)
    cp, data, elapsed = result[0]

    assert_ok(cp)
    assert len(stub.replies) == 3, f"stub replies: {stub.replies}"
    answered, switched = max(stub.replies), observed(log, "after")
    assert switched and switched > answered, "switched before the threads got their answers"
    assert data["attempts"] > 1, f"no waiting: {data}"
    assert set(data["harnesses"]) == {"glibc-resolver", "test-observer"}, data
    assert slot(target, "done") == 3 and slot(target, "ok") == 3, "lookups failed while waiting"
    print(f"\nattempts began {before - asked:.2f}s after the queries; the answers came "
          f"{answered - asked:.2f}s after them; the switch {switched - answered:.3f}s after the "
          f"answers, at attempt {data['attempts']} (pause {data['pause_us']:.0f} µs); "
          f"hotpatch ran {elapsed:.2f}s")

    assert read_mem(target.pid, nquery, 1) == b"\xe9", "res_nquery has no trampoline"
    stub.delay = 0.0
    assert slot(target, "wrapped") == 0
    lookup(target, wait_inside=False)
    wait_until(lambda: slot(target, "done") == 6, 6.0, "the second round of lookups")
    assert slot(target, "ok") == 6, "lookups through the wrapper failed"
    # Only the res_nquery threads go through res_nquery (getaddrinfo does not).
    wait_until(lambda: slot(target, "wrapped") == 2, 1.0,
               lambda: f"wrap_calls == 2 (is {slot(target, 'wrapped')})")
    target.assert_healthy()


def test_no_safe_moment_names_the_thread_inside_the_resolver(build, resolver):
    """(b) The stub never answers and retrans is 30 s: --timeout 1 gives up
    with exit 3, naming each lookup thread (tid, name) and the resolver
    function it is in; nothing changed."""
    patch = build.patch("resolver_wrap")
    target, stub = resolver(delay=None, retrans=30, nquery=1, ngai=1)
    nquery = target.addr("addr1")
    code, maps = read_mem(target.pid, nquery, 32), target.maps()
    tids = threads_by_name(target.pid)

    cp, data, elapsed = apply_json(target.pid, patch, "--timeout", 1)

    line = assert_error(cp, 3)
    assert 1.0 <= elapsed < 15.0, f"--timeout 1 took {elapsed:.2f}s"  # tool start-up included
    blockers = {b["tid"]: b for b in data["blockers"]}
    assert set(blockers) == {tids["dnsq-0"], tids["gai-0"]}, f"blockers: {data['blockers']}"
    critical = load_resolver_harness().critical
    for name in ("dnsq-0", "gai-0"):
        b = blockers[tids[name]]
        assert b["comm"] == name
        func = b["where"].split("+")[0]
        assert func.startswith("libc.so.6:") and any(
            fnmatch.fnmatchcase(func.split(":")[1], p) for p in critical), b
        assert f"thread {tids[name]} ({name})" in line and b["where"] in line, line
    assert "glibc-resolver" in line, line
    assert data["attempts"] > 1
    print(f"\ngave up after {elapsed:.2f}s, {data['attempts']} attempts: {line}")
    assert_untouched(target, nquery, code, maps)
    assert slot(target, "inside") == 2 and slot(target, "done") == 0, "a lookup was disturbed"

    # check's one probe says the same, and also changes nothing.
    cp = run_hotpatch("check", target.pid, patch, "--json")
    assert cp.returncode in (0, 3), describe(cp)
    report = output_json(cp)
    assert report.get("safe_now") is not True
    assert {b["tid"] for b in report["blockers"]} == set(blockers), report
    assert_untouched(target, nquery, code, maps)


def test_main_executable_patch_ignores_threads_in_the_resolver(build, resolver):
    """(c) The harness governs libc.so.6 and libresolv.so.2 only: a patch of
    main:compute switches at once while lookups hang in the resolver (and
    the same patch with the harness forced on would wait)."""
    patch = build.patch("compute_mul", MUL=3, TARGET='"main:compute"')
    target, _ = resolver(delay=None, retrans=30, nquery=1, ngai=1)
    compute = target.addr("addr0")
    code, maps = read_mem(target.pid, compute, 32), target.maps()

    cp, data, _ = apply_json(target.pid, patch, "--timeout", 0.5, "--harness", "glibc-resolver")
    line = assert_error(cp, 3)
    assert "dnsq-0" in line and "gai-0" in line, line
    assert_untouched(target, compute, code, maps)

    cp, data, elapsed = apply_json(target.pid, patch, "--timeout", 5)
    assert_ok(cp)
    # Success at all proves it: those threads never leave the resolver.
    assert data["harnesses"] == [], data
    print(f"\nmain:compute switched in {elapsed:.2f}s, {data['attempts']} attempt(s), "
          f"with 2 threads inside the resolver")
    target.wait_all_return(21, timeout=5.0)
    assert slot(target, "inside") == 2 and slot(target, "done") == 0, "a lookup was disturbed"


def test_no_harness_is_refused_without_force(build, resolver):
    """(d) res_nmkquery is not on any waiting thread's stack, so only the
    harness can hold its patch back; --no-harness is refused (exit 2)
    unless --force, which then switches at once."""
    patch = build.patch("resolver_mkquery")
    target, _ = resolver(delay=None, retrans=30, nquery=1, ngai=1)
    with ksplice_py.attach(target.pid) as proc:
        mk = proc.symbols.resolve("libc.so.6:res_nmkquery").addr
    code, maps = read_mem(target.pid, mk, 32), target.maps()

    cp, _, _ = apply_json(target.pid, patch, "--timeout", 0.5)
    line = assert_error(cp, 3)
    assert "into glibc-resolver: libc.so.6:" in line, line
    assert_untouched(target, mk, code, maps)

    cp, _, _ = apply_json(target.pid, patch, "--no-harness")
    line = assert_error(cp, 2)
    assert "glibc-resolver" in line and "--force" in line, line
    assert_untouched(target, mk, code, maps)

    cp, data, _ = apply_json(target.pid, patch, "--no-harness", "--force", "--timeout", 5)
    assert_ok(cp)
    assert data["harnesses"] == [], data
    assert read_mem(target.pid, mk, 1) == b"\xe9"
    assert slot(target, "inside") == 2 and slot(target, "done") == 0, "a lookup was disturbed"


# --- plugins -------------------------------------------------------------------------------

VETO_MODULE = '''
from ksplice_py.harness import Harness

def veto(view):
    return [(t.tid, "vetoed by {label} at rip %#x" % t.regs["rip"]) for t in view.threads]

{export}
'''


@pytest.fixture
def workers_target(build, spawn):
    return spawn(build.target("workers"), 2)


def listed_harness(name: str) -> dict:
    """`hotpatch harnesses --json` shows the plugin beside the built-in one."""
    cp = run_hotpatch("harnesses", "--json")
    assert_ok(cp)
    listed = {h["name"]: h for h in json.loads(cp.stdout)}
    assert name in listed and listed[name]["check"] is True, listed
    assert "glibc-resolver" in listed, "a plugin must not hide the built-in harnesses"
    return listed[name]


def test_plugin_from_harness_path_vetoes_cutover(build, workers_target, tmp_path, monkeypatch):
    """(f) A harness module in $KSPLICE_PY_HARNESS_PATH governing `main`:
    its check vetoes every thread, so the cutover gives up (exit 3) with the
    plugin's reason; without the plugin the same patch applies."""
    target = workers_target
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "harness_veto.py").write_text(VETO_MODULE.format(
        label="the path plugin",
        export='HARNESS = Harness(name="path-veto", description="vetoes everything", '
               'objects=("main",), check=veto)'))
    (plugins / "_ignored.py").write_text("raise RuntimeError('files starting with _ are skipped')\n")
    monkeypatch.setenv("KSPLICE_PY_HARNESS_PATH", f"{tmp_path / 'missing'}:{plugins}")
    patch = build.patch("compute_mul", MUL=3, TARGET='"main:compute"')
    compute = target.addr("addr0")
    code, maps = read_mem(target.pid, compute, 32), target.maps()

    info = listed_harness("path-veto")
    assert info["source"] == str(plugins / "harness_veto.py") and info["objects"] == ["main"]
    cp, data, _ = apply_json(target.pid, patch, "--timeout", 0.3)
    line = assert_error(cp, 3)
    assert re.search(r"vetoed by the path plugin at rip 0x[0-9a-f]+ \(harness path-veto\)", line), line
    all_tids = {int(t) for t in os.listdir(f"/proc/{target.pid}/task")}
    assert {b["tid"] for b in data["blockers"]} == all_tids, data["blockers"]
    assert_untouched(target, compute, code, maps)

    monkeypatch.delenv("KSPLICE_PY_HARNESS_PATH")
    cp, data, _ = apply_json(target.pid, patch, "--timeout", 5)
    assert_ok(cp)
    target.wait_all_return(21, timeout=5.0)


def test_plugin_from_entry_point_vetoes_cutover(build, workers_target, tmp_path, monkeypatch):
    """(f) A distribution (a *.dist-info with entry_points.txt on PYTHONPATH)
    exposing a ksplice_py.harnesses entry point: a callable returning a list."""
    target = workers_target
    site = tmp_path / "site"
    dist = site / "hp_veto_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hp-veto-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[ksplice_py.harnesses]\nep-veto = hp_veto_plugin:harnesses\n")
    (site / "hp_veto_plugin.py").write_text(VETO_MODULE.format(
        label="the entry point",
        export='def harnesses():\n    return [Harness(name="ep-veto", description="vetoes everything", '
               'objects=("main",), check=veto)]'))
    monkeypatch.setenv("PYTHONPATH", str(site))
    patch = build.patch("compute_mul", MUL=3, TARGET='"main:compute"')
    compute = target.addr("addr0")
    code, maps = read_mem(target.pid, compute, 32), target.maps()

    info = listed_harness("ep-veto")
    assert info["source"] == "entry point hp_veto_plugin:harnesses", info
    cp, data, _ = apply_json(target.pid, patch, "--timeout", 0.3)
    line = assert_error(cp, 3)
    assert re.search(r"vetoed by the entry point at rip 0x[0-9a-f]+ \(harness ep-veto\)", line), line
    assert_untouched(target, compute, code, maps)


def test_broken_plugin_is_one_error_line(tmp_path, monkeypatch):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "broken.py").write_text("import no_such_module_for_ksplice_tests\n")
    monkeypatch.setenv("KSPLICE_PY_HARNESS_PATH", str(plugins))
    line = assert_error(run_hotpatch("harnesses"), 1)
    assert str(plugins / "broken.py") in line and "ModuleNotFoundError" in line, line


def test_check_that_raises_fails_cleanly(build, workers_target, tmp_path, monkeypatch):
    """A check runs with every thread stopped: when it raises, the command
    fails (exit 1, one line) and the target is released, untouched."""
    target = workers_target
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "harness_raises.py").write_text(
        "from ksplice_py.harness import Harness\n"
        "def check(view):\n    raise ValueError('check exploded')\n"
        "HARNESS = Harness(name='raises', description='a buggy check', objects=('main',), check=check)\n")
    monkeypatch.setenv("KSPLICE_PY_HARNESS_PATH", str(plugins))
    patch = build.patch("compute_mul", MUL=3, TARGET='"main:compute"')
    compute = target.addr("addr0")
    code, maps = read_mem(target.pid, compute, 32), target.maps()

    line = assert_error(run_hotpatch("apply", target.pid, patch, "--timeout", 1), 1)
    assert "check exploded" in line and "harness raises" in line, line
    assert_untouched(target, compute, code, maps)
