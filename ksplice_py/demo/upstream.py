"""The demo's upstream: a stub DNS server on 127.0.0.1 that the demo server
forwards every non-zone name to (through glibc's res_nquery).

It answers each query after a configurable delay (so worker threads of the
demo server really sit inside the resolver, which is what a resolver
harness must wait out), deterministically from the name, so the load
generator can check every forwarded answer. One special name,
``BIG_NAME``, gets an oversized TXT answer (the CVE-2015-7547 shape: far
larger than a classic 512/2048-byte buffer).

Runs in its own process (``python -m ksplice_py.demo.upstream``) so that the
hot-patching Python process cannot delay its answers through the GIL.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import signal
import sys

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

BIG_NAME = "big.upstream.test."
BIG_STRINGS = 12  # x 200 bytes: an answer of ~2.5 KB
NX_PREFIX = "nx"  # forwarded names starting with this are NXDOMAIN
TTL = 60


def _h(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.lower().encode()).digest()[:4], "big")


def expected(name: str, qtype: str) -> tuple[str, list[str]]:
    """(rcode text, sorted rdata texts) the upstream gives for ``name``."""
    name = name.lower()
    if not name.endswith("."):
        name += "."
    if name.startswith(NX_PREFIX):
        return "NXDOMAIN", []
    if name == BIG_NAME:
        if qtype != "TXT":
            return "NOERROR", []
        return "NOERROR", sorted(f'"{chr(97 + i) * 200}"' for i in range(BIG_STRINGS))
    h = _h(name)
    if qtype == "A":
        return "NOERROR", [str(ipaddress.IPv4Address((198 << 24) | (51 << 16) | (100 << 8) | (h % 254 + 1)))]
    if qtype == "AAAA":
        return "NOERROR", [str(ipaddress.IPv6Address((0x20010DB8FFFF << 80) | h))]
    if qtype == "TXT":
        return "NOERROR", [f'"upstream {name}"']
    return "NOERROR", []


def answer(wire: bytes) -> bytes | None:
    """The reply to one query packet (None: not a query we answer)."""
    try:
        q = dns.message.from_wire(wire)
    except Exception:
        return None
    if q.flags & dns.flags.QR or len(q.question) != 1:
        return None
    rr = q.question[0]
    name, qtype = rr.name.to_text(), dns.rdatatype.to_text(rr.rdtype)
    rcode, datas = expected(name, qtype)
    r = dns.message.make_response(q, recursion_available=True)
    r.set_rcode(dns.rcode.from_text(rcode))
    if datas:
        r.answer.append(dns.rrset.from_text_list(rr.name, TTL, dns.rdataclass.IN, rr.rdtype, datas))
    return r.to_wire(max_size=65000)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.transport: asyncio.DatagramTransport | None = None
        self.queries = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        reply = answer(data)
        if reply is None:
            return
        self.queries += 1
        loop = asyncio.get_running_loop()
        if self.delay > 0:
            loop.call_later(self.delay, self.transport.sendto, reply, addr)
        else:
            self.transport.sendto(reply, addr)


async def serve(port: int, delay: float) -> None:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _Protocol(delay), local_addr=("127.0.0.1", port))
    sock = transport.get_extra_info("socket")
    print(f"READY port={sock.getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    transport.close()
    print(f"DONE queries={proto.queries}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ksplice_py.demo.upstream",
                                description="stub upstream DNS server for the demo (127.0.0.1 only)")
    p.add_argument("--port", type=int, default=0, help="UDP port (0: pick one; printed as READY port=N)")
    p.add_argument("--delay", type=float, default=0.005, help="seconds before each answer (default 0.005)")
    a = p.parse_args(argv)
    asyncio.run(serve(a.port, a.delay))
    return 0


if __name__ == "__main__":
    sys.exit(main())
