"""Quiescence: may the code be switched now?

A thread is safe for a switch when neither its ``rip`` nor any return
address on its stack lies in code that the switch retires. The scan itself
runs in C inside the stopped window (``tracer.World.scan``, conservative:
every aligned word from rsp to the top of the thread's stack mapping); this
module decides *which* code counts and explains, afterwards, who blocked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

SAFE, IN_RIP, ON_STACK, STACK_UNKNOWN, NOT_STOPPED = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class CodeRange:
    """Code a thread must not be in: [start, end) and a name for reports."""

    start: int
    end: int
    name: str


def busy_ranges(old_code: Iterable[CodeRange], retired_code: Iterable[CodeRange] = ()) -> list[CodeRange]:
    """The stacking rule, in one place.

    Applying a patch retires the code each replaced function runs *now*: the
    original function (whose first bytes the trampoline overwrites), and, if
    an earlier edition already redirected it, that edition's code too, since
    threads inside it would otherwise keep running superseded code.
    Reverting retires the edition's new code and its call-original stubs
    (they are unmapped) plus the trampoline windows being rewritten.
    Callers pass both kinds; the union is what a thread must not be in."""
    ranges = [r for r in (*old_code, *retired_code) if r.end > r.start]
    return sorted(ranges, key=lambda r: r.start)


def frames_are_safe(pcs: list[int], ranges: list[CodeRange]) -> bool:
    """Precise verdict from an unwound stack: frame 0's pc as is, callers'
    return addresses minus one (a call that ends a function returns just
    past it, which is still "in" that function)."""
    def inside(v: int) -> bool:
        return any(r.start <= v < r.end for r in ranges)
    return not any(inside(pc if i == 0 else pc - 1) for i, pc in enumerate(pcs))


@dataclass(frozen=True)
class Blocker:
    """A thread that kept the cutover from happening, and why."""

    tid: int
    comm: str
    reason: str  # human sentence
    addr: int | None = None
    where: str | None = None  # symbolized address
    backtrace: tuple[str, ...] = ()  # symbolized, innermost first
    pcs: tuple[int, ...] = ()  # the same frames, raw

    def describe(self, frames: int = 6) -> str:
        text = f"thread {self.tid} ({self.comm}) {self.reason}"
        if self.backtrace:
            text += ": " + " <- ".join(self.backtrace[:frames])
        return text

    def to_dict(self) -> dict:
        return {"tid": self.tid, "comm": self.comm, "reason": self.reason,
                "addr": hex(self.addr) if self.addr is not None else None, "where": self.where,
                "backtrace": list(self.backtrace), "pcs": [hex(pc) for pc in self.pcs]}


def thread_name(pid: int, tid: int) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def blocker(pid: int, tid: int, verdict: int, value: int, ranges: list[CodeRange],
            symbolize: Callable[[int, bool], str], backtrace: Iterable[int] = ()) -> Blocker:
    """``symbolize(addr, is_return_address)``: every frame but the innermost,
    and a stack hit, is a return address."""
    owner = next((r.name for r in ranges if r.start <= value < r.end), None)
    where = symbolize(value, verdict == ON_STACK) if verdict in (IN_RIP, ON_STACK) else None
    if verdict == IN_RIP:
        reason = f"is executing {where} (in {owner})"
    elif verdict == ON_STACK:
        reason = f"has a return address into {owner} on its stack ({where})"
    elif verdict == STACK_UNKNOWN:
        reason = "has a stack outside any known mapping"
    else:
        reason = "did not stop in time (uninterruptible sleep?)"
    pcs = tuple(backtrace)
    return Blocker(tid, thread_name(pid, tid), reason, value, where,
                   tuple(symbolize(pc, i > 0) for i, pc in enumerate(pcs)), pcs)


def summarize(blockers: list[Blocker], limit: int = 3) -> str:
    text = "; ".join(b.describe() for b in blockers[:limit])
    if len(blockers) > limit:
        text += f"; and {len(blockers) - limit} more"
    return text

