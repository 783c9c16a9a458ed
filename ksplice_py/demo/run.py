"""The orchestrated live-patching demo (issue #5).

A threaded C DNS server serves a zone and forwards other names upstream
through glibc's resolver while a load generator keeps a constant, checked
query rate. The demo shows that one crafted packet kills an unpatched
instance, then fixes the live server under load: it replaces the parser
(fix_parse.so), wraps glibc's res_nquery (limit_response.so), reverts the
wrap and applies it again — and reports queries lost (none), latency around
each cutover, the pause of each cutover, and the server pid (unchanged).
Last, the fleet step: three more instances start (and two other libc
processes, which must be left alone), and one `apply --all` narrowed to the
server's executable puts the resolver wrap into every instance.

Upstream stub and load generator run as separate processes: the GIL of
this process, busy hot-patching, must not delay answers or skew latency.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode

from .. import errors, trust
from ..discovery import Selector, editions_of
from ..fleet_results import Action, Outcome
from ..fleet_runner import fleet
from ..process import attach
from . import build as demo_build
from . import upstream
from .loadgen import latency_summary

RESPONSE_LIMIT = 1024  # keep in sync with csrc/demo/patches/limit_response.c
WINDOW = 1.0  # seconds of load compared before/after each cutover (at most a phase)
PROBE_TIMEOUT = 5.0  # a probe waits behind the queued load on a starved machine


class Interrupted(BaseException):
    """SIGINT/SIGTERM: unwind through every cleanup path."""


# --- child processes ------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _child_setup() -> None:
    # Children must not outlive a demo that is killed outright (SIGKILL);
    # the crash we provoke on purpose must not write (or pipe) a core dump.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked around Popen in _spawn


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    port: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, grace: float = 3.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit status."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            except ProcessLookupError:
                pass
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f:
                f.close()
        return self.proc.returncode


def _spawn(name: str, cmd: list[str], log: Path | None, started: list[Child] | None = None,
           ready_timeout: float = 20.0) -> Child:
    """Start ``cmd`` (stderr to ``log``) and wait for its "READY ..." line
    (port=N when given). ``started`` gets the child at once, so a record of
    what ran is complete even when we are interrupted while it starts."""
    # An interrupt inside Popen would leave a child we hold no handle for:
    # hold SIGINT/SIGTERM until it is recorded (the child unblocks them).
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        with open(log or "/dev/null", "w") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                    text=True, start_new_session=True, preexec_fn=_child_setup)
        child = Child(name, proc)
        if started is not None:
            started.append(child)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    try:  # the caller owns the child only once we return it
        line = _readline(proc, ready_timeout)
        if not line.startswith("READY"):
            child.stop()
            said = (log.read_text().strip().splitlines() or [""])[-1] if log else ""
            raise errors.HotpatchError(f"{name} did not start: {said or line.strip() or 'no output'}")
        for word in line.split()[1:]:
            key, _, value = word.partition("=")
            if key == "port":
                child.port = int(value)
    except BaseException:
        child.stop()
        raise
    return child


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return box[0] if box else ""


def start_upstream(delay: float, log: Path | None = None, started: list[Child] | None = None) -> Child:
    return _spawn("upstream", [sys.executable, "-m", "ksplice_py.demo.upstream", "--port", "0",
                               "--delay", str(delay)], log, started)


def start_server(art: demo_build.Artifacts, upstream_port: int, workers: int = 4, port: int = 0,
                 log: Path | None = None, name: str = "server", started: list[Child] | None = None) -> Child:
    return _spawn(name, [str(art.server), "-z", str(art.zone), "-p", str(port), "-w", str(workers),
                         "-u", str(upstream_port)], log, started)


def start_loadgen(port: int, qps: float, zone: Path, out: Path, log: Path | None = None,
                  started: list[Child] | None = None) -> Child:
    return _spawn("loadgen", [sys.executable, "-m", "ksplice_py.demo.loadgen", "--port", str(port),
                              "--qps", str(qps), "--zone", str(zone), "--out", str(out)], log, started)


def start_time(pid: int) -> int:
    """Kernel start time of ``pid`` (clock ticks since boot): a pid that is
    reused by another process has another start time."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[19])


# --- probes ---------------------------------------------------------------------

def crafted_packet(qid: int = 0xBAD1) -> bytes:
    """A query whose QNAME has 30 labels of 63 bytes (1920 bytes of labels,
    far beyond the 255 the protocol allows and the 256-byte buffer of
    parse_qname)."""
    header = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    qname = (bytes([63]) + b"x" * 63) * 30 + b"\0"
    return header + qname + struct.pack(">HH", 1, 1)


def send_raw(port: int, wire: bytes, timeout: float = 2.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(wire, ("127.0.0.1", port))
        try:
            return s.recv(65535)
        except socket.timeout:
            return None


def rcode_of(wire: bytes | None) -> str | None:
    return dns.rcode.to_text(wire[3] & 0x0F) if wire and len(wire) >= 12 else None


def ask(port: int, name: str, qtype: str, timeout: float = 2.0) -> tuple[str, int]:
    """(rcode, answer size in bytes) for one query; ("TIMEOUT", 0) without answer."""
    q = dns.message.make_query(name, qtype)
    try:
        r = dns.query.udp(q, "127.0.0.1", port=port, timeout=timeout)
    except dns.exception.Timeout:
        return "TIMEOUT", 0
    return dns.rcode.to_text(r.rcode()), len(r.to_wire())


def crash_unpatched(art: demo_build.Artifacts, upstream_port: int, workdir: Path,
                    started: list[Child] | None = None) -> dict:
    """Start a separate, unpatched server and send it the crafted packet."""
    log = workdir / "unpatched.stderr"
    victim = start_server(art, upstream_port, workers=1, log=log, name="unpatched server", started=started)
    try:
        sane = ask(victim.port, "www.demo.test.", "A")[0]
        answer = send_raw(victim.port, crafted_packet(), timeout=1.0)
        try:
            status = victim.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            status = None
    finally:
        victim.stop()
    said = log.read_text().strip().splitlines()
    sig = signal.Signals(-status).name if status is not None and status < 0 else None
    return {"pid": victim.pid, "answered_before": sane, "reply": rcode_of(answer), "exit_status": status,
            "signal": sig, "stderr": said[-1] if said else "", "crashed": status is not None and status != 0}


# --- the live part --------------------------------------------------------------

@dataclass
class Cutover:
    label: str
    action: str  # apply | revert
    patch: str
    edition: int
    t_start: float
    t_end: float
    pause_us: float
    attempts: int | None
    windows: dict = field(default_factory=dict)  # before/during/after -> stats


@dataclass
class Phase:
    name: str
    t_start: float
    t_end: float = 0.0
    stats: dict = field(default_factory=dict)


class LoadWatch:
    """Reads the load generator's progress lines in the background."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self.latest: dict = {}
        self.done: dict | None = None
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        for line in self.child.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "done" in msg:
                self.done = msg["done"]
            else:
                self.latest = msg

    def finish(self, timeout: float = 15.0) -> None:
        """Close its stdin (= stop), let it drain and write its records."""
        try:
            self.child.proc.stdin.close()
        except OSError:
            pass
        try:
            self.child.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.child.stop()
        self._t.join(2.0)


class Demo:
    def __init__(self, port: int = 0, workers: int = 4, qps: float = 400.0, phase: float = 3.0,
                 upstream_delay: float = 0.005, ui: "Display | None" = None) -> None:
        self.port, self.workers, self.qps, self.phase = port, workers, qps, phase
        self.upstream_delay = upstream_delay
        self.window = min(WINDOW, phase)
        self.ui = ui or Display(enabled=False)
        self.cutovers: list[Cutover] = []
        self.started: list[Child] = []  # every child process, for the interrupt message
        self.phases: list[Phase] = []
        self.report: dict = {}

    # one step of the story: shown live, recorded for the report
    def _event(self, text: str, ok: bool = True) -> None:
        self.ui.event(text, ok)

    def _phase(self, name: str) -> None:
        self.ui.step(f"{name}: serving under load for {self.phase:g} s")
        phase = Phase(name, time.monotonic())
        self._sleep(self.phase)
        phase.t_end = time.monotonic()
        self.phases.append(phase)

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.load and self.load.child.proc.poll() is not None:
                raise errors.HotpatchError("the load generator stopped unexpectedly")
            if self.server.proc.poll() is not None:
                raise errors.HotpatchError(f"the demo server died (status {self.server.proc.returncode})")
            self.ui.load(self.load.latest if self.load else {})
            time.sleep(min(left, 0.1))

    def _cutover(self, label: str, action: str, patch: Path | None = None, edition: int | None = None) -> Cutover:
        self.ui.step(f"{label} …")
        t0 = time.monotonic()
        with attach(self.server.pid) as p:
            e = p.apply(str(patch), timeout=10.0) if action == "apply" else p.revert(edition, timeout=10.0)
        t1 = time.monotonic()
        # a reverted Edition still carries the attempts of its apply: not reported
        c = Cutover(label, action, Path(e.patch).name, e.id, t0, t1, float(e.pause_us or 0.0),
                    e.attempts if action == "apply" else None)
        self.cutovers.append(c)
        self._event(f"{label}: edition {e.id} {'applied' if action == 'apply' else 'reverted'}, "
                    f"pause {c.pause_us:.0f} µs, call {(t1 - t0) * 1000:.0f} ms")
        return c

    def _oversized(self, stage: str, expect: str) -> dict:
        rcode, size = ask(self.server.port, upstream.BIG_NAME, "TXT", timeout=PROBE_TIMEOUT)
        ok = rcode == expect and (rcode != "NOERROR" or size > RESPONSE_LIMIT)
        self._event(f"oversized upstream answer ({stage}): {rcode}, {size} bytes", ok)
        return {"stage": stage, "rcode": rcode, "bytes": size, "expected": expect, "ok": ok}

    def run(self, stack: ExitStack) -> dict:
        """The whole story; everything started is registered on ``stack``."""
        self.load: LoadWatch | None = None
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ksplice_demo_")))
        art = self._start(stack, work)
        pid, born = self.server.pid, start_time(self.server.pid)
        # The crash first, on its own instance: the live server's baseline
        # then measures serving, not the start of a second process.
        self.ui.step("crafted packet → a separate, unpatched instance")
        crash = crash_unpatched(art, self.upstream.port, work, self.started)
        self._event(f"unpatched instance pid {crash['pid']}: killed by {crash['signal']} "
                    f"({crash['stderr'] or 'no message'})", crash["crashed"])

        results = work / "load.json"
        self.load = LoadWatch(start_loadgen(self.server.port, self.qps, art.zone, results,
                                            work / "loadgen.stderr", self.started))
        stack.callback(self.load.child.stop)
        self._event(f"load: {self.qps:g} queries/s from 4 sockets, 30% forwarded through res_nquery")
        crafted, oversized = self._patch_story(art)
        fleet_step = self._fleet_step(stack, art)

        self.ui.step("stopping the load and draining")
        self.load.finish()
        same_pid = self.server.proc.poll() is None and start_time(pid) == born
        with attach(pid) as p:
            editions = [{"id": e.id, "patch": Path(e.patch).name, "state": e.state} for e in p.editions()]
        load = json.loads(results.read_text())
        self._analyse(load)
        checks = {
            "no_query_lost": load["summary"]["lost"] == 0,
            "no_wrong_answer": load["summary"]["wrong"] == 0,
            "server_pid_unchanged": same_pid,
            "unpatched_instance_crashed": crash["crashed"],
            "crafted_packet_formerr_after_fix": crafted["rcode"] == "FORMERR" and crafted["server_alive"],
            "oversized_answers_as_expected": all(o["ok"] for o in oversized),
            "fleet_every_server_carries_the_wrap": fleet_step["ok"],
            "fleet_other_processes_left_alone": fleet_step["bystanders_untouched"],
        }
        self.report = {
            "window_s": self.window,
            "server": {"pid": pid, "port": self.server.port, "workers": self.workers,
                       "pid_unchanged": same_pid},
            "load": {"qps": self.qps, **load["summary"]},
            "crash_demo": crash,
            "crafted_after_fix": crafted,
            "oversized": oversized,
            "fleet": fleet_step,
            "cutovers": [_cutover_dict(c) for c in self.cutovers],
            "phases": [{"name": p.name, "seconds": round(p.t_end - p.t_start, 2), **p.stats}
                       for p in self.phases],
            "editions": editions,
            "checks": checks,
            "ok": all(checks.values()),
        }
        return self.report

    def _start(self, stack: ExitStack, work: Path) -> demo_build.Artifacts:
        self.ui.step("building the server and patches")
        art = demo_build.build()
        self._event(f"built {art.server.name}, {', '.join(p.name for p in art.patches.values())}")
        self.upstream = start_upstream(self.upstream_delay, work / "upstream.stderr", self.started)
        stack.callback(self.upstream.stop)
        self.server = start_server(art, self.upstream.port, self.workers, self.port, work / "server.stderr",
                                   started=self.started)
        stack.callback(self.server.stop)
        self.ui.server(self.server.pid, self.server.port)
        self._event(f"server pid {self.server.pid} on 127.0.0.1:{self.server.port}, {self.workers} workers; "
                    f"upstream on :{self.upstream.port} (delay {self.upstream_delay * 1000:g} ms)")
        return art

    def _patch_story(self, art: demo_build.Artifacts) -> tuple[dict, list[dict]]:
        """Under load: fix the parser, wrap res_nquery, revert, re-apply."""
        oversized = [self._oversized("before any patch: passed through", "NOERROR")]
        self._phase("baseline")

        self._cutover("apply fix_parse", "apply", art.patches["fix_parse"])
        reply = send_raw(self.server.port, crafted_packet(), timeout=PROBE_TIMEOUT)
        crafted = {"rcode": rcode_of(reply), "server_alive": self.server.proc.poll() is None}
        self._event(f"crafted packet → live server: {crafted['rcode'] or 'no answer'}, "
                    f"pid {self.server.pid} {'alive' if crafted['server_alive'] else 'DEAD'}",
                    crafted["rcode"] == "FORMERR" and crafted["server_alive"])
        self._phase("parser fixed")

        lim = self._cutover("apply limit_response", "apply", art.patches["limit_response"])
        oversized.append(self._oversized("res_nquery wrapped", "SERVFAIL"))
        self._phase("resolver limited")

        self._cutover("revert limit_response", "revert", edition=lim.edition)
        oversized.append(self._oversized("wrap reverted", "NOERROR"))
        self._phase("wrap reverted")

        self._cutover("re-apply limit_response", "apply", art.patches["limit_response"])
        oversized.append(self._oversized("wrap re-applied", "SERVFAIL"))
        self._phase("wrap re-applied")
        return crafted, oversized

    def _fleet_step(self, stack: ExitStack, art: demo_build.Artifacts) -> dict:
        """Every instance at once (issue #11): more servers start, and other
        libc users that must be left alone; one `--all` run, narrowed to the
        server's executable, applies the resolver wrap to every server, the
        live one still under load (it already carries it: skipped)."""
        self.ui.step("fleet: 3 more server instances, 2 other libc processes; one --all run")
        servers = [self.server]
        for i in range(3):
            c = start_server(art, self.upstream.port, 2, 0, None, name=f"server-{i + 2}", started=self.started)
            stack.callback(c.stop)
            servers.append(c)
        bystanders = []
        for i in range(2):
            c = Child(f"sleep-{i}", subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL,
                                                     preexec_fn=_child_setup))
            self.started.append(c)
            stack.callback(c.stop)
            bystanders.append(c)
        patch = trust.load_patch(str(art.patches["limit_response"]))
        t0 = time.monotonic()
        result = fleet(Action.APPLY, patch, selector=Selector(exes=(str(Path(art.server).resolve()),)),
                       timeout=10.0)
        seconds = time.monotonic() - t0
        for r in sorted(result.processes, key=lambda r: r.pid):
            self._event(f"pid {r.pid} ({r.name}): {r.result.value}"
                        + (f" edition {r.edition}" if r.edition else "") + (f": {r.reason}" if r.reason else ""),
                        r.result is not Outcome.FAILED)
        carried = {c.pid: any(e.sha256 == patch.sha256 and e.state == "applied" for e in editions_of(c.pid))
                   for c in servers}
        untouched = all(not editions_of(c.pid) for c in bystanders)
        self._event(f"apply --all limit_response.so --exe {Path(art.server).name}: {result.summary()} "
                    f"in {seconds:.2f} s; {len(bystanders)} other libc processes left alone",
                    all(carried.values()) and untouched)
        return {"summary": result.summary(), "applied": result.applied, "skipped": result.skipped,
                "failed": result.failed, "seconds": round(seconds, 3), "servers": len(servers),
                "bystanders_untouched": untouched, "ok": all(carried.values()) and result.failed == 0}

    def _analyse(self, load: dict) -> None:
        t, lat, status, lag = load["t_send"], load["latency"], load["status"], load["lag"]

        def window(a: float, b: float) -> dict:
            idx = [i for i, ts in enumerate(t) if a <= ts < b]
            s = latency_summary([lat[i] for i in idx if lat[i] is not None])
            s["lost"] = sum(1 for i in idx if status[i] == "lost")
            s["wrong"] = sum(1 for i in idx if status[i] == "wrong")
            # how late the load generator itself sent: when high, the
            # client was starved of CPU and latency there is partly its own
            s["client_lag_max_ms"] = round(max((lag[i] for i in idx), default=0.0) * 1000, 3)
            return s

        for c in self.cutovers:
            c.windows = {"before": window(c.t_start - self.window, c.t_start),
                         "during": window(c.t_start, c.t_end),
                         "after": window(c.t_end, c.t_end + self.window)}
        for p in self.phases:
            p.stats = window(p.t_start, p.t_end)


def _cutover_dict(c: Cutover) -> dict:
    d = asdict(c)
    d["call_ms"] = round((c.t_end - c.t_start) * 1000, 1)
    d["pause_us"] = round(c.pause_us, 1)
    for k in ("t_start", "t_end"):
        d.pop(k)
    return d


# --- display ----------------------------------------------------------------------

class Display:
    """A rich live panel while the demo runs (nothing with --json)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.events: list[tuple[bool, str]] = []
        self.current = "starting"
        self.progress: dict = {}
        self.pid = self.port = 0
        self._live = None
        self._t0 = time.monotonic()

    def __enter__(self) -> "Display":
        if self.enabled:
            from rich.console import Console
            from rich.live import Live

            self.console = Console()
            self._live = Live(get_renderable=self._render, console=self.console, refresh_per_second=8,
                              transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live:
            self._live.__exit__(*exc)

    def step(self, text: str) -> None:
        self.current = text

    def event(self, text: str, ok: bool = True) -> None:
        self.events.append((ok, f"{time.monotonic() - self._t0:5.1f}s  {text}"))

    def load(self, progress: dict) -> None:
        self.progress = progress

    def server(self, pid: int, port: int) -> None:
        self.pid, self.port = pid, port

    def _render(self):
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        p = self.progress
        rec = p.get("recent", {})
        stats = Table.grid(padding=(0, 3))
        for _ in range(6):
            stats.add_column(justify="right")
        stats.add_row("sent", "answered", "late", "wrong", "p50 ms", "p99 ms")
        stats.add_row(*(str(p.get(k, "-")) for k in ("sent", "answered", "late", "wrong")),
                      _ms(rec.get("p50_ms")), _ms(rec.get("p99_ms")))
        log = Text()
        for ok, line in self.events[-14:]:
            log.append("✔ " if ok else "✘ ", style="green" if ok else "bold red")
            log.append(line + "\n")
        title = f"ksplice_py live DNS demo — server pid {self.pid or '?'} on 127.0.0.1:{self.port or '?'}"
        return Panel(Group(Text(f"▶ {self.current}", style="bold cyan"), stats, Text(""), log), title=title)


def _ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def print_report(r: dict) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    con = Console()
    ld = r["load"]
    con.print(f"\n[bold]Load[/]: {ld['sent']} queries sent at {ld['qps']:g}/s, {ld['answered']} answered, "
              f"[{'green' if ld['lost'] == 0 else 'red'}]{ld['lost']} lost[/], {ld['wrong']} wrong")
    t = Table(title=f"Cutovers: queries sent {r['window_s']:g} s before, during the library call, "
                    f"{r['window_s']:g} s after", box=box.SIMPLE_HEAD, padding=(0, 1))
    for col in ("cutover", "window", "n", "p50 ms", "p99 ms", "max ms", "lost", "lag ms"):
        t.add_column(col, justify="left" if col in ("cutover", "window") else "right", no_wrap=True)
    for c in r["cutovers"]:
        verb = c["label"].split()[0]
        left = [f"{verb} (ed {c['edition']})", Path(c["patch"]).stem,
                f"pause {c['pause_us']:.0f} µs\ncall {c['call_ms']:.0f} ms"]
        for k, w in c["windows"].items():
            t.add_row(left.pop(0), k, str(w["n"] + w["lost"]), _ms(w["p50_ms"]), _ms(w["p99_ms"]),
                      _ms(w["max_ms"]), str(w["lost"]), _ms(w["client_lag_max_ms"]),
                      end_section=k == "after")
    con.print(t)
    t = Table(title="Phases (steady load between cutovers)", box=box.SIMPLE_HEAD, padding=(0, 1))
    for col in ("phase", "n", "p50 ms", "p99 ms", "max ms", "lost", "lag ms"):
        t.add_column(col, justify="left" if col == "phase" else "right")
    for p in r["phases"]:
        t.add_row(p["name"], str(p["n"] + p["lost"]), _ms(p["p50_ms"]), _ms(p["p99_ms"]), _ms(p["max_ms"]),
                  str(p["lost"]), _ms(p["client_lag_max_ms"]))
    con.print(t)
    con.print("[dim]lag: the longest the load generator itself sent late (its own CPU starvation: "
              "latency in such a window is partly the client's)[/]")
    cr = r["crash_demo"]
    con.print(f"Unpatched instance (pid {cr['pid']}) + crafted packet: {cr['signal'] or cr['exit_status']} "
              f"— {cr['stderr']}")
    con.print(f"Live server + crafted packet after fix_parse: {r['crafted_after_fix']['rcode']}")
    for o in r["oversized"]:
        con.print(f"Oversized upstream answer, {o['stage']}: {o['rcode']} ({o['bytes']} bytes)")
    f = r["fleet"]
    con.print(f"Fleet: {f['servers']} server instances, one apply --all: {f['summary']} in {f['seconds']:.2f} s; "
              f"other libc processes {'left alone' if f['bystanders_untouched'] else 'TOUCHED'}")
    s = r["server"]
    con.print(f"Server pid {s['pid']} {'unchanged' if s['pid_unchanged'] else 'CHANGED'} throughout; "
              f"editions now: " + ", ".join(f"{e['id']} {e['patch']} ({e['state']})" for e in r["editions"]))
    for name, ok in r["checks"].items():
        con.print(f"  {'[green]✔' if ok else '[bold red]✘'}[/] {name.replace('_', ' ')}")


# --- entry point -------------------------------------------------------------------

def _on_signal(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise _Usage(message)


def _stopped(demo: "Demo | None") -> str:
    """What the cleanup stopped (it ran before this is called)."""
    kids = demo.started if demo else []
    if not kids:
        return "nothing had been started"
    running = [c for c in kids if c.proc.poll() is None]
    if running:
        return "STILL RUNNING: " + ", ".join(f"{c.name} pid {c.pid}" for c in running)
    return "stopped " + ", ".join(f"{c.name} pid {c.pid}" for c in kids)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hotpatch demo",
                                description="Live-patch a threaded DNS server under load (127.0.0.1 only).")
    p.add_argument("--port", type=int, default=0, help="UDP port of the demo server (default: a free one)")
    p.add_argument("--workers", type=int, default=4, help="server worker threads (default 4)")
    p.add_argument("--qps", type=float, default=400.0, help="queries per second of the load (default 400)")
    p.add_argument("--duration-per-phase", type=float, default=3.0, metavar="S",
                   help="seconds of load between steps (default 3; 5 phases)")
    p.add_argument("--upstream-delay", type=float, default=0.005, metavar="S",
                   help="seconds the upstream stub waits before answering (default 0.005)")
    p.add_argument("--json", action="store_true", help="print the report as JSON, no live display")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        a = build_parser().parse_args(argv)
        if not (0 <= a.port <= 65535 and 1 <= a.workers <= 64 and 0 < a.qps <= 20000
                and 0 < a.duration_per_phase <= 600 and 0 <= a.upstream_delay <= 0.5):
            raise _Usage("want --port 0-65535, --workers 1-64, --qps up to 20000, "
                         "--duration-per-phase up to 600, --upstream-delay 0-0.5")
    except _Usage as e:
        print(f"hotpatch demo: {e} (see --help)", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    demo: Demo | None = None
    try:
        with ExitStack() as stack:
            ui = stack.enter_context(Display(enabled=not a.json))
            demo = Demo(a.port, a.workers, a.qps, a.duration_per_phase, a.upstream_delay, ui)
            report = demo.run(stack)
    except errors.HotpatchError as e:
        print(f"hotpatch demo: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    except Interrupted as e:
        print(f"hotpatch demo: interrupted by {e}; {_stopped(demo)}", file=sys.stderr)
        return 130
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
