"""The demo's load generator: a constant query rate against the demo server,
every answer checked, every query's send time and latency recorded.

Queries go out round-robin from several UDP sockets (one receiver thread
each) on a fixed schedule (query i is due at start + i/qps; a late sender
catches up, so the rate holds on average). Each answer is checked against
what the zone file or the upstream stub must give (id, question, rcode and
the exact set of records). A query without an answer by the end of the
drain (5 s after the last send) is lost; an answer that differs is wrong.

Run it in its own process (``python -m ksplice_py.demo.loadgen``) so the
hot-patching Python process cannot skew rate or latency through the GIL.
It prints "READY", then one JSON progress line every 0.25 s on stdout, and
stops on SIGTERM/SIGINT or when stdin closes; then it drains, writes all
per-query records to --out and prints a final JSON summary line.
"""
from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import math
import random
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype

from . import upstream

PENDING, OK, WRONG = 0, 1, 2
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; not exported by Python
FORWARD_SHARE = 3  # of every 10 queries go upstream through res_nquery


@dataclass(frozen=True)
class Query:
    name: str
    qtype: str
    rcode: str
    rdatas: tuple[str, ...]  # sorted rdata texts, as dnspython prints them
    forwarded: bool


# --- what the answers must be ---------------------------------------------------

def read_zone(path: Path) -> dict[tuple[str, str], list[str]]:
    """(name, type) -> rdata texts, from the zone file the server reads."""
    zone: dict[tuple[str, str], list[str]] = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split(None, 2)
        if len(parts) < 3 or parts[0].startswith("#"):
            continue
        name, rtype, value = parts[0].lower(), parts[1].upper(), parts[2].strip()
        if rtype == "A":
            value = str(ipaddress.IPv4Address(value))
        elif rtype == "AAAA":
            value = str(ipaddress.IPv6Address(value))
        zone.setdefault((name, rtype), []).append(value)
    return zone


def query_mix(zone_path: Path) -> tuple[list[Query], list[Query]]:
    """(authoritative queries, forwarded queries) the load cycles through."""
    zone = read_zone(zone_path)
    names = {n for n, _ in zone}
    local = [Query(n, t, "NOERROR", tuple(sorted(v)), False) for (n, t), v in sorted(zone.items())]
    some = sorted(names)[0]
    missing = next(t for t in ("TXT", "AAAA", "A") if (some, t) not in zone)
    local.append(Query(some, missing, "NOERROR", (), False))  # NODATA
    local.append(Query("nope.demo.test.", "A", "NXDOMAIN", (), False))
    fwd = []
    for i, t in itertools.product(range(16), ("A", "AAAA", "TXT")):
        name = f"host{i}.example.net."
        rcode, datas = upstream.expected(name, t)
        fwd.append(Query(name, t, rcode, tuple(datas), True))
    fwd.append(Query("nxhost.example.net.", "A", "NXDOMAIN", (), True))
    return local, fwd


def check(q: Query, wire: bytes) -> bool:
    try:
        r = dns.message.from_wire(wire)
    except dns.exception.DNSException:
        return False
    if len(r.question) != 1 or dns.rcode.to_text(r.rcode()) != q.rcode:
        return False
    rq = r.question[0]
    if rq.name.to_text().lower() != q.name or dns.rdatatype.to_text(rq.rdtype) != q.qtype:
        return False
    got = sorted(rd.to_text() for rrset in r.answer for rd in rrset
                 if dns.rdatatype.to_text(rrset.rdtype) == q.qtype)
    return tuple(got) == q.rdatas


# --- statistics -----------------------------------------------------------------

def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (nan when empty)."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def latency_summary(latencies: list[float]) -> dict:
    """n, p50, p99, max in milliseconds."""
    v = sorted(latencies)
    ms = lambda x: round(x * 1000, 3) if not math.isnan(x) else None  # noqa: E731
    return {"n": len(v), "p50_ms": ms(percentile(v, 50)), "p99_ms": ms(percentile(v, 99)),
            "max_ms": ms(v[-1]) if v else None}


# --- the generator --------------------------------------------------------------

class LoadGen:
    """Constant-rate checked DNS load against 127.0.0.1:port."""

    def __init__(self, port: int, qps: float, zone: Path, sockets: int = 4,
                 timeout: float = 1.0) -> None:
        if qps <= 0 or sockets < 1:
            raise ValueError("qps must be > 0 and sockets >= 1")
        self.addr = ("127.0.0.1", port)
        self.qps, self.timeout = qps, timeout
        # At stop, wait this long for answers still out: on a starved machine
        # this process itself may read them late, and late is not lost.
        self.drain = max(timeout, 5.0)
        self.local, self.forward = query_mix(zone)
        self.socks = [self._socket() for _ in range(sockets)]
        self.ids = [itertools.count(random.randrange(65536)) for _ in self.socks]  # id = next % 65536
        self.lock = threading.Lock()
        self.pending: dict[tuple[int, int], int] = {}  # (socket, id) -> query index
        self.t_send: list[float] = []
        self.lag: list[float] = []  # t_send - due: this process's own scheduling delay
        self.latency: list[float] = []
        self.status: list[int] = []
        self.queries: list[Query] = []
        self.answered = self.wrong = self.unexpected = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @staticmethod
    def _socket() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        try:  # answers released in a burst after a long stall must not be dropped here
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.settimeout(0.05)
        return s

    def pick(self, i: int) -> Query:
        if i % 10 < FORWARD_SHARE:
            return self.forward[(i // 10 * FORWARD_SHARE + i % 10) % len(self.forward)]
        return self.local[i % len(self.local)]

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._receive, args=(k,), daemon=True)
                         for k in range(len(self.socks))]
        self._threads.append(threading.Thread(target=self._send, daemon=True))
        for t in self._threads:
            t.start()

    def _send(self) -> None:
        self.t0 = t0 = time.monotonic()
        for i in itertools.count():
            due = t0 + i / self.qps
            delay = due - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return
            if self._stop.is_set():
                return
            q = self.pick(i)
            k = i % len(self.socks)
            qid = next(self.ids[k]) % 65536
            wire = dns.message.make_query(q.name, q.qtype, id=qid).to_wire()
            with self.lock:
                self.pending[(k, qid)] = len(self.t_send)
                self.queries.append(q)
                self.latency.append(math.nan)
                self.status.append(PENDING)
                now = time.monotonic()
                self.t_send.append(now)
                self.lag.append(now - due)
            self.socks[k].sendto(wire, self.addr)

    def _receive(self, k: int) -> None:
        sock = self.socks[k]
        while not (self._stop.is_set() and self._drained()):
            try:
                wire, _ = sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            now = time.monotonic()
            qid = int.from_bytes(wire[:2], "big") if len(wire) >= 2 else -1
            with self.lock:
                i = self.pending.pop((k, qid), None)
                if i is None:
                    self.unexpected += 1
                    continue
                self.latency[i] = now - self.t_send[i]
            ok = check(self.queries[i], wire)
            with self.lock:
                self.status[i] = OK if ok else WRONG
                self.answered += 1
                self.wrong += not ok

    def _drained(self) -> bool:
        with self.lock:
            return not self.pending or time.monotonic() > self._stop_at + self.drain

    def stop(self) -> None:
        """Stop sending, wait up to ``drain`` seconds for outstanding answers."""
        self._stop_at = time.monotonic()
        self._stop.set()
        for t in self._threads:
            t.join()
        for s in self.socks:
            s.close()

    def progress(self, since: float | None = None) -> dict:
        with self.lock:
            sent, answered, wrong = len(self.t_send), self.answered, self.wrong
            late = sum(1 for i in self.pending.values() if time.monotonic() - self.t_send[i] > self.timeout)
            recent = []
            if since is not None:
                i = len(self.t_send) - 1
                while i >= 0 and self.t_send[i] >= since:
                    if not math.isnan(self.latency[i]):
                        recent.append(self.latency[i])
                    i -= 1
        return {"t": time.monotonic(), "sent": sent, "answered": answered, "wrong": wrong,
                "late": late, "recent": latency_summary(recent)}

    def results(self) -> dict:
        """Per-query records (after stop): pending ones are lost."""
        lost = sum(1 for s in self.status if s == PENDING)
        return {
            "qps": self.qps,
            "summary": {"sent": len(self.t_send), "answered": self.answered, "lost": lost,
                        "wrong": self.wrong, "unexpected": self.unexpected},
            "t_send": self.t_send,
            "lag": self.lag,
            "latency": [None if math.isnan(x) else x for x in self.latency],
            "status": ["lost" if s == PENDING else "ok" if s == OK else "wrong" for s in self.status],
            "forwarded": [q.forwarded for q in self.queries],
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ksplice_py.demo.loadgen",
                                description="constant-rate checked DNS load against 127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="demo server UDP port")
    p.add_argument("--qps", type=float, default=400.0)
    p.add_argument("--sockets", type=int, default=4)
    p.add_argument("--zone", type=Path, required=True, help="the zone file the server serves")
    p.add_argument("--timeout", type=float, default=1.0,
                   help="seconds after which a query counts as late in progress lines (default 1); "
                        "at the end, one still unanswered after max(5, this) seconds is lost")
    p.add_argument("--out", type=Path, required=True, help="write per-query records (JSON) here")
    a = p.parse_args(argv)

    gen = LoadGen(a.port, a.qps, a.zone, a.sockets, a.timeout)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    gen.start()
    print("READY", flush=True)
    last = time.monotonic()
    while not stop.wait(0.25):
        print(json.dumps(gen.progress(since=last)), flush=True)
        last = time.monotonic()
    gen.stop()
    res = gen.results()
    tmp = a.out.with_name(a.out.name + ".tmp")
    tmp.write_text(json.dumps(res))
    tmp.replace(a.out)
    print(json.dumps({"done": res["summary"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
