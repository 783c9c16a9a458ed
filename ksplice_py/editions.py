"""Editions: the record of applied patches, kept inside the target.

Each edition owns one memfd-backed region named ``ksplice_py:ed<ID>:<patch>``
(memfd names show in /proc/PID/maps on every kernel). Its first pages hold
the record; the patch image and stubs follow. The record therefore lives and
dies with the edition's memory: `hotpatch list` from any later invocation
reads the truth from the target, and nothing depends on a host file.

Record layout (little-endian), at the region's start:

    0   16  magic
    16  16  state, ASCII, NUL padded     <- small fixed fields: updated with
    32   8  pause_us  (f64)                 one short pwrite each, so a tool
    40   8  applied_at (f64, unix time)     killed mid-update never tears them
    48   8  attempts (u64)
    56   8  json length (u64)
    64   8  longest_pause_us (f64): the longest stop of any attempt
    72   8  stopped_us (f64): all attempts' stops added up
    80   .. JSON: everything fixed at prepare/apply time

The JSON is written once, before any trampoline can point at the region;
states then move as lifecycle.py allows (prepared -> switching -> applied
-> reverting), each a 16-byte write. See cycle.py for the order of writes
that makes a crash at any instant recoverable.
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import asdict, dataclass, field, fields

from .constants import page_up
from .errors import HotpatchError
from .lifecycle import MOVES, UNSTABLE, State
from .maps import Mapping
from .memory import RemoteMemory

MAGIC_PREFIX = b"KSPLICEPY-REC"
MAGIC = MAGIC_PREFIX + b"\x00\x02\x00"  # \x02: layout version
# The fixed header, field by field (the layout above); its offsets come from here.
_HEADER_FIELDS = (("magic", "16s"), ("state", "16s"), ("pause_us", "d"), ("applied_at", "d"),
                  ("attempts", "Q"), ("json_len", "Q"), ("longest_pause_us", "d"), ("stopped_us", "d"))
HEADER = struct.Struct("<" + "".join(fmt for _, fmt in _HEADER_FIELDS))


def _field(name: str) -> tuple[int, int]:
    """(offset, size) of one header field."""
    names = [n for n, _ in _HEADER_FIELDS]
    before = "".join(fmt for _, fmt in _HEADER_FIELDS[:names.index(name)])
    return struct.calcsize("<" + before), struct.calcsize("<" + _HEADER_FIELDS[names.index(name)][1])


STATE_OFFSET, STATE_SIZE = _field("state")
PREFIX = "ksplice_py:ed"
_NAME_RE = re.compile(r"^/memfd:ksplice_py:ed(\d+)(:stubs)?(?::(.*?))?(?: \(deleted\))?$")


@dataclass
class FunctionSwitch:
    target: str  # as the patch wrote it
    symbol: str  # resolved, object-qualified
    kind: str  # "replace" | "wrap"
    addr: int  # the old function
    size: int
    new_addr: int  # where the trampoline jumps (new code, or its far stub)
    old_bytes: str  # hex: what the trampoline overwrote (restored on revert)
    new_bytes: str  # hex: the trampoline
    stub_addr: int | None = None  # call-original stub (WRAP)


@dataclass
class Edition:
    id: int
    patch: str
    sha256: str
    state: State = State.PREPARING
    functions: list[FunctionSwitch] = field(default_factory=list)
    regions: list[tuple[int, int]] = field(default_factory=list)  # (start, size)
    pins: dict[str, str] = field(default_factory=dict)
    prepared_at: float = 0.0
    staged: bool = False  # from `hotpatch prepare`: keep it prepared until cutover/abort
    harnesses: list[str] = field(default_factory=list)  # applied at cutover and at revert
    consistency: str = "strict"  # consistency.Consistency: what the cutover required
    runout: tuple[int, int] | None = None  # (start, size) of the run-out area (runout.py)
    applied_at: float | None = None
    pause_us: float | None = None  # the stop that switched
    attempts: int = 0
    # Blocked attempts stop the world too: what the target really felt.
    longest_pause_us: float | None = None
    stopped_us: float | None = None
    # Known to this invocation only, never in the target's record:
    reverted_at: float | None = None  # unix time of the revert (pause_us stays the apply's)
    revert_pause_us: float | None = None  # the stop that switched it back
    already_applied: bool = False  # apply found this content applied: nothing was done
    orphaned: bool = False  # left half-way by a tool that was killed (see mark_orphans)
    advanced: int = 0  # threads moved out of retired code by the switch (runout.py)

    @property
    def last_pause_us(self) -> float | None:
        """The stop of the latest switch: the revert's once reverted."""
        return self.revert_pause_us if self.state == State.REVERTED else self.pause_us

    @property
    def record_addr(self) -> int:
        return self.regions[0][0]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["regions"] = [[hex(a), s] for a, s in self.regions]
        if self.runout:
            d["runout"] = [hex(self.runout[0]), self.runout[1]]
        for f in d["functions"]:
            for k in ("addr", "new_addr", "stub_addr"):
                if f[k] is not None:
                    f[k] = hex(f[k])
        return d

    # -- record encoding --------------------------------------------------
    def body(self) -> bytes:
        # Shallow, not asdict(): this runs several times a cycle (once per
        # header write), and a fleet run does a thousand cycles.
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_IN_BODY}
        d["functions"] = [{f.name: getattr(fs, f.name) for f in fields(fs)} for fs in self.functions]
        return json.dumps(d, separators=(",", ":")).encode()

    def header(self) -> bytes:
        return HEADER.pack(
            MAGIC, self.state.encode(), self.pause_us or 0.0, self.applied_at or 0.0,
            self.attempts, len(self.body()), self.longest_pause_us or 0.0, self.stopped_us or 0.0,
        )

    def move(self, to: State) -> None:
        """Take one move of the lifecycle (staying put is no move)."""
        if to != self.state and to not in MOVES[self.state]:
            raise HotpatchError(f"edition {self.id} is {self.state}; it cannot become {to}")
        self.state = to

    def move_to(self, to: State) -> tuple[int, bytes]:
        """Take the move and return the write that records it in the target."""
        self.move(to)
        return self.state_bytes(to)

    def state_bytes(self, state: State) -> tuple[int, bytes]:
        """(address, bytes) that set the record's state: one 16-byte write."""
        return self.record_addr + STATE_OFFSET, state.encode().ljust(STATE_SIZE, b"\0")


# The header holds the first six (updated in place); the rest never reaches the target.
_NOT_IN_BODY = ("state", "applied_at", "pause_us", "attempts", "longest_pause_us", "stopped_us",
                "reverted_at", "revert_pause_us", "already_applied", "orphaned", "advanced")
def may_be_orphan(e: Edition) -> bool:
    """What a live tool passes through (an unstable state, or ``prepared``
    by an apply rather than staged by `hotpatch prepare`): found while no
    tool is at work on the target, a killed one left it."""
    return e.state in UNSTABLE or (e.state == State.PREPARED and not e.staged)


def mark_orphans(editions: list[Edition]) -> None:
    """Call only while no tool holds the target's lock (locking.py)."""
    for e in editions:
        e.orphaned = may_be_orphan(e)


def find_applied(editions: list[Edition], sha256: str) -> Edition | None:
    """The applied edition with this content, if any (newest first)."""
    return next((e for e in editions if e.sha256 == sha256 and e.state == State.APPLIED), None)


def record_size(nfuncs: int) -> int:
    """Bytes to reserve for a record of nfuncs functions (page multiple)."""
    need = HEADER.size + 1024 + 640 * nfuncs
    return page_up(need)


def region_name(edition_id: int, patch_name: str, stubs: bool = False) -> str:
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", patch_name)[:64]
    return f"{PREFIX}{edition_id}:stubs" if stubs else f"{PREFIX}{edition_id}:{safe}"


def regions_in(maps: list[Mapping]) -> dict[int, list[Mapping]]:
    """Mappings of ksplice_py regions, by edition id (primary region first)."""
    out: dict[int, list[Mapping]] = {}
    for m in maps:
        hit = _NAME_RE.match(m.path)
        if hit:
            out.setdefault(int(hit.group(1)), []).append(m)
    for ms in out.values():
        ms.sort(key=lambda m: (":stubs" in m.path, m.start))
    return out


def read_edition(mem: RemoteMemory, start: int) -> Edition | None:
    """Decode the record at a region start; None if it is not (yet) valid."""
    try:
        magic, state, pause, applied, attempts, n, longest, stopped = HEADER.unpack(
            mem.read(start, HEADER.size))
        if magic != MAGIC or n == 0 or n > 64 << 20:
            return None
        d = json.loads(mem.read(start + HEADER.size, n))
        d["functions"] = [FunctionSwitch(**f) for f in d["functions"]]
        d["regions"] = [tuple(r) for r in d["regions"]]
        if d.get("runout"):
            d["runout"] = tuple(d["runout"])
        ed = Edition(**d)
    except (ValueError, TypeError, KeyError, struct.error):
        return None
    ed.state = State.parse(state.rstrip(b"\0").decode(errors="replace"))
    ed.pause_us = pause or None
    ed.applied_at = applied or None
    ed.attempts = attempts
    ed.longest_pause_us = longest or None
    ed.stopped_us = stopped or None
    return ed


def may_be_live(mem: RemoteMemory, start: int) -> bool:
    """Could a trampoline point into the region whose record is at start?

    No when no record was ever written (the tool died between mmap and the
    first record), and no when the fixed header still says ``preparing``:
    trampolines are written only after ``prepared``. The latter holds even
    if the JSON is torn, as when a tool dies while finalize rewrites it in
    place before updating the header's length."""
    try:
        head = mem.read(start, HEADER.size)
    except HotpatchError:
        return False
    if not head.startswith(MAGIC_PREFIX):
        return False
    magic, state = HEADER.unpack(head)[:2]
    return not (magic == MAGIC and state.rstrip(b"\0") == State.PREPARING.encode())


def list_editions(mem: RemoteMemory, maps: list[Mapping]) -> tuple[list[Edition], list[int]]:
    """(editions newest first, ids of orphan regions).

    An orphan is a region no code can point into (see may_be_live), so
    unmapping it is safe. A region whose record cannot be read and that may
    be live (another version of the tool wrote it, or it is damaged) may be
    code behind a trampoline: it is listed as ``unreadable`` and never
    unmapped for us."""
    editions, orphans = [], []
    for eid, ms in sorted(regions_in(maps).items(), reverse=True):
        primary = [m for m in ms if m.offset == 0 and ":stubs" not in m.path]
        ed = read_edition(mem, primary[0].start) if primary else None
        if ed is not None:
            editions.append(ed)
        elif primary and may_be_live(mem, primary[0].start):
            hit = _NAME_RE.match(primary[0].path)
            editions.append(Edition(id=eid, patch=(hit and hit.group(3)) or "?", sha256="",
                                    state=State.UNREADABLE,
                                    regions=[(m.start, m.end - m.start) for m in ms]))
        else:
            orphans.append(eid)
    return editions, orphans


def leaked_descriptors(pid: int) -> list[int]:
    """The target's descriptors to one of our memfds: a tool killed between
    memfd_create and close leaves one (the mapping itself needs none)."""
    out = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:ksplice_py:"):
                out.append(int(fd))
        except OSError:
            continue  # closed meanwhile
    return out


def next_id(maps: list[Mapping]) -> int:
    return max(regions_in(maps), default=0) + 1
