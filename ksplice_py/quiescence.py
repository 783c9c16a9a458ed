"""Quiescence: may the code be switched now?

A thread is safe for a switch when neither its ``rip`` nor any return
address on its stack lies in code that the switch retires. The scan itself
runs in C inside the stopped window (``tracer.World.scan``, conservative:
every aligned word from rsp to the top of the thread's stack mapping); this
module decides *which* code counts and explains, afterwards, who blocked.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Callable, Iterable

from . import editions as ed
from .errors import HotpatchError
from .native import header_constants
from .x86relocator import jump_destination

_KP = header_constants()


class Verdict(IntEnum):
    """A thread's verdict, as kp_scan writes it (defined in kp_native.h)."""

    SAFE = _KP["KP_SAFE"]
    IN_RIP = _KP["KP_IN_RIP"]
    ON_STACK = _KP["KP_ON_STACK"]
    STACK_UNKNOWN = _KP["KP_STACK_UNKNOWN"]
    NOT_STOPPED = _KP["KP_NOT_STOPPED"]


@dataclass(frozen=True)
class CodeRange:
    """Code a thread must not be in: [start, end) and a name for reports."""

    start: int
    end: int
    name: str


def busy_ranges(old_code: Iterable[CodeRange], retired_code: Iterable[CodeRange] = ()) -> list[CodeRange]:
    """The union of code a thread must not be in (empty ranges dropped), by start."""
    ranges = [r for r in (*old_code, *retired_code) if r.end > r.start]
    return sorted(ranges, key=lambda r: r.start)


# -- the stacking rule, in one place ---------------------------------------------
def owner_edition(addr: int, editions: list[ed.Edition]) -> ed.Edition | None:
    """The edition whose memory holds ``addr``."""
    for e in editions:
        if any(start <= addr < start + size for start, size in e.regions):
            return e
    return None


def redirected_to(addr: int, code: bytes, editions: list[ed.Edition]) -> ed.Edition | None:
    """The edition a trampoline (``code``, at ``addr``) jumps into, if any."""
    dest = jump_destination(code, addr)
    return None if dest is None else owner_edition(dest, editions)


def patch_ranges(functions: list[ed.FunctionSwitch], others: list[ed.Edition],
                 split_parts: Callable[[ed.FunctionSwitch], list[CodeRange]]) -> list[CodeRange]:
    """What a cutover retires: the code each replaced function runs *now*.
    That is the original function (its whole body, and at least the bytes
    the trampoline overwrites), its split-off parts (``split_parts``: gcc's
    ``.cold``), and, when an earlier edition already redirected it, that
    edition's code too, since threads inside it would keep running
    superseded code. We do not record each new function's size, so the
    earlier edition's whole memory counts: conservative, never unsafe."""
    old = old_code(functions, split_parts)
    retired = []
    for f in functions:
        below = redirected_to(f.addr, bytes.fromhex(f.old_bytes), others)
        if below:
            retired += [CodeRange(s, s + n, f"edition {below.id}") for s, n in below.regions]
    return busy_ranges(old, retired)


def old_code(functions: list[ed.FunctionSwitch],
             split_parts: Callable[[ed.FunctionSwitch], list[CodeRange]]) -> list[CodeRange]:
    """The original functions a cutover retires, split-off parts included."""
    old = [CodeRange(f.addr, f.addr + max(f.size, len(bytes.fromhex(f.old_bytes))), f.symbol)
           for f in functions]
    return old + [c for f in functions for c in split_parts(f)]


def split_parts(symbols, symbol: str) -> list[CodeRange]:
    """gcc moves unlikely code to ``name.cold``: a thread there is inside
    the function although neither its rip nor its stack says so."""
    out = []
    for suffix in (".cold", ".part.0"):
        try:
            sym = symbols.resolve(symbol + suffix)
        except HotpatchError:
            continue
        out.append(CodeRange(sym.addr, sym.addr + sym.size, sym.qualified))
    return out


def unpatch_ranges(edition: ed.Edition, functions: list[ed.FunctionSwitch]) -> list[CodeRange]:
    """What a revert retires: the edition's memory (new code and stubs: it
    is unmapped afterwards, so no thread may be anywhere in it), and the
    trampolines being rewritten."""
    windows = [CodeRange(f.addr, f.addr + len(bytes.fromhex(f.new_bytes)), f.symbol) for f in functions]
    regions = [CodeRange(s, s + n, f"edition {edition.id}") for s, n in edition.regions]
    return busy_ranges(windows, regions)


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
    where = symbolize(value, verdict == Verdict.ON_STACK) if verdict in (Verdict.IN_RIP, Verdict.ON_STACK) else None
    if verdict == Verdict.IN_RIP:
        reason = f"is executing {where} (in {owner})"
    elif verdict == Verdict.ON_STACK:
        reason = f"has a return address into {owner} on its stack ({where})"
    elif verdict == Verdict.STACK_UNKNOWN:
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

