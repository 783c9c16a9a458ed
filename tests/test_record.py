"""Unit tests of the edition record (editions.py) and the state machine it
stores (lifecycle.py): the byte layout, a round trip through a fake target
memory, what counts as an orphan or an unreadable record, and the moves.
Pure: no target."""
from __future__ import annotations

import struct

import pytest

from ksplice_py import HotpatchError, RemoteError
from ksplice_py import editions as ed
from ksplice_py.constants import PAGE_SIZE
from ksplice_py.lifecycle import MOVES, Direction, State
from ksplice_py.maps import Mapping

BASE = 0x7F12_3400_0000


class FakeMemory:
    """A target's memory: one region of bytes at BASE (reads outside fail)."""

    def __init__(self, size: int = 128 * PAGE_SIZE) -> None:
        self.data = bytearray(size)

    def read(self, addr: int, size: int) -> bytes:
        if not BASE <= addr <= addr + size <= BASE + len(self.data):
            raise RemoteError(f"unmapped {addr:#x}")
        return bytes(self.data[addr - BASE:addr - BASE + size])

    def write(self, addr: int, data: bytes) -> None:
        self.data[addr - BASE:addr - BASE + len(data)] = data


def edition(**kw) -> ed.Edition:
    e = ed.Edition(id=3, patch="fix.so", sha256="ab" * 32, regions=[(BASE, 4 * PAGE_SIZE)],
                   pins={"main": "1234"}, prepared_at=1.5, harnesses=["glibc-resolver"], **kw)
    e.functions = [ed.FunctionSwitch(target="compute", symbol="main:compute", kind="replace",
                                     addr=0x5555_0000_1000, size=40, new_addr=BASE + 0x2000,
                                     old_bytes="554889e5c3", new_bytes="e9fbffffff")]
    return e


def store(mem: FakeMemory, e: ed.Edition) -> None:
    """As the cycle writes it: the JSON first, then the header."""
    mem.write(e.record_addr + ed.HEADER.size, e.body())
    mem.write(e.record_addr, e.header())


def test_layout_matches_the_documented_offsets():
    assert ed.HEADER.size == 80  # the JSON starts at 80 (module docstring)
    assert (ed.STATE_OFFSET, ed.STATE_SIZE) == (16, 16)
    e = edition(state=State.APPLIED)
    head = e.header()
    assert head[:16] == ed.MAGIC
    assert head[ed.STATE_OFFSET:ed.STATE_OFFSET + ed.STATE_SIZE].rstrip(b"\0") == b"applied"
    assert struct.unpack_from("<Q", head, 56)[0] == len(e.body())  # json length


def test_round_trip():
    mem, e = FakeMemory(), edition(state=State.APPLIED, pause_us=12.5, attempts=3,
                                   longest_pause_us=20.0, stopped_us=40.0, applied_at=2.5)
    store(mem, e)
    back = ed.read_edition(mem, BASE)
    assert back == e
    assert back.state is State.APPLIED


def test_state_write_is_one_field():
    mem, e = FakeMemory(), edition()
    store(mem, e)
    addr, data = e.state_bytes(State.SWITCHING)
    assert addr == BASE + ed.STATE_OFFSET and len(data) == ed.STATE_SIZE
    before = bytes(mem.data)
    mem.write(addr, data)
    changed = [i for i, (a, b) in enumerate(zip(before, mem.data)) if a != b]
    assert changed and min(changed) >= ed.STATE_OFFSET and max(changed) < ed.STATE_OFFSET + ed.STATE_SIZE
    assert ed.read_edition(mem, BASE).state is State.SWITCHING


def test_unknown_state_reads_as_unreadable():
    mem, e = FakeMemory(), edition()
    store(mem, e)
    mem.write(BASE + ed.STATE_OFFSET, b"from-the-future\0")
    assert ed.read_edition(mem, BASE).state is State.UNREADABLE


@pytest.mark.parametrize("damage", ["magic", "version", "json_len", "json"])
def test_damaged_record_is_not_read(damage):
    mem, e = FakeMemory(), edition(state=State.PREPARED)
    store(mem, e)
    if damage == "magic":
        mem.write(BASE, b"NOT-A-RECORD....")
    elif damage == "version":
        mem.write(BASE + len(ed.MAGIC_PREFIX), b"\x00\x09\x00")
    elif damage == "json_len":
        mem.write(BASE + 56, struct.pack("<Q", 0))
    else:
        mem.write(BASE + ed.HEADER.size, b"{torn")
    assert ed.read_edition(mem, BASE) is None


def test_may_be_live():
    mem, e = FakeMemory(), edition()
    assert not ed.may_be_live(mem, BASE)  # nothing written yet
    assert not ed.may_be_live(mem, BASE + 256 * PAGE_SIZE)  # unreadable memory
    store(mem, e)  # preparing: no trampoline can point here yet
    assert not ed.may_be_live(mem, BASE)
    mem.write(*e.state_bytes(State.PREPARED))
    mem.write(BASE + ed.HEADER.size, b"{torn")  # a torn JSON behind "prepared"
    assert ed.may_be_live(mem, BASE)
    mem.write(BASE + len(ed.MAGIC_PREFIX), b"\x00\x09\x00")  # another version's record
    assert ed.may_be_live(mem, BASE)


def region(eid: int, name: str, start: int, size: int = 4 * PAGE_SIZE, offset: int = 0) -> Mapping:
    return Mapping(start, start + size, "r--p", offset, 7, f"/memfd:ksplice_py:ed{eid}{name} (deleted)")


def test_list_editions_sorts_out_orphans_and_unreadable():
    mem = FakeMemory()
    good = edition(state=State.APPLIED)
    store(mem, good)
    maps = [region(3, ":fix.so", BASE),
            region(3, ":stubs", BASE + (1 << 32)),
            region(2, ":lost.so", BASE + 64 * PAGE_SIZE),  # killed before its first record
            Mapping(0x1000, 0x2000, "r-xp", 0, 1, "/bin/x")]
    eds, orphans = ed.list_editions(mem, maps)
    assert [e.id for e in eds] == [3] and eds[0] == good
    assert orphans == [2]


def test_list_editions_keeps_a_live_unreadable_record():
    mem, e = FakeMemory(), edition(state=State.PREPARED)
    store(mem, e)
    mem.write(BASE + ed.HEADER.size, b"{torn")
    (got,), orphans = ed.list_editions(mem, [region(3, ":fix.so", BASE)])
    assert got.state is State.UNREADABLE and got.patch == "fix.so" and orphans == []


def test_regions_in_primary_first():
    maps = [region(4, ":stubs", 0x1000), region(4, ":p.so", 0x9000), region(5, ":q.so", 0x5000)]
    by_id = ed.regions_in(maps)
    assert sorted(by_id) == [4, 5]
    assert [m.start for m in by_id[4]] == [0x9000, 0x1000]
    assert ed.next_id(maps) == 6 and ed.next_id([]) == 1


def test_region_name():
    assert ed.region_name(7, "fix.so") == "ksplice_py:ed7:fix.so"
    assert ed.region_name(7, "a b/../c;$(x)") == "ksplice_py:ed7:a_b_.._c___x_"
    assert ed.region_name(7, "x" * 100).endswith(":" + "x" * 64)
    assert ed.region_name(7, "fix.so", stubs=True) == "ksplice_py:ed7:stubs"


@pytest.mark.parametrize("nfuncs", [0, 1, 10, 100])
def test_record_size_holds_the_record(nfuncs):
    e = edition()
    e.functions = e.functions * nfuncs
    size = ed.record_size(nfuncs)
    assert size % PAGE_SIZE == 0 and ed.HEADER.size + len(e.body()) <= size


# -- the state machine ------------------------------------------------------------
def test_the_cycle_and_its_mirror_are_moves():
    e = edition()
    for state in (State.PREPARED, State.SWITCHING, State.APPLIED, State.REVERTING, State.REVERTED):
        e.move(state)
        e.move(state)  # staying put is no move (a recovery resumes mid-transition)
    assert e.state is State.REVERTED


@pytest.mark.parametrize("frm, to", [
    (State.PREPARING, State.APPLIED), (State.PREPARED, State.APPLIED), (State.APPLIED, State.PREPARED),
    (State.REVERTED, State.APPLIED), (State.UNREADABLE, State.SWITCHING), (State.SWITCHING, State.REVERTING),
])
def test_refused_moves(frm, to):
    e = edition(state=frm)
    with pytest.raises(HotpatchError, match="cannot become"):
        e.move(to)
    assert e.state is frm


def test_every_state_has_its_moves_and_directions_mirror():
    assert set(MOVES) == set(State)
    for d in Direction:
        assert d.during in MOVES[d.origin] and d.outcome in MOVES[d.during]
    assert Direction.PATCH.outcome is Direction.UNPATCH.origin
