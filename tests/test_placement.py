"""Unit tests of placement.py: where an edition's memory may go (within rel32
reach of every function it redirects, in a free gap, a guard page away from
every mapping), and how far-apart functions are grouped. Pure: no target."""
from __future__ import annotations

import pytest

from ksplice_py import placement
from ksplice_py.constants import PAGE_SIZE
from ksplice_py.maps import Mapping

GIB = 1 << 30
TEXT = 0x5555_5555_0000  # a PIE's text
LIBC = 0x7F00_0000_0000  # a library, terabytes away


def mapping(start: int, size: int, path: str = "/bin/x") -> Mapping:
    return Mapping(start, start + size, "r-xp", 0, 1, path)


def test_candidates_are_reachable_free_and_guarded():
    maps = [mapping(TEXT, 0x10_0000), mapping(TEXT + 0x20_0000, 0x1000, "[heap]")]
    size = 3 * PAGE_SIZE
    found = placement.candidates(maps, [TEXT + 0x1234], size)
    assert found, "a gap next to the code must be found"
    for start in found:
        assert start % PAGE_SIZE == 0
        assert placement.reachable(start, TEXT + 0x1234)
        assert placement.reachable(start + size, TEXT + 0x1234)
        for m in maps:  # free, and a guard page away from every mapping
            assert start + size + PAGE_SIZE <= m.start or start >= m.end + PAGE_SIZE, (hex(start), m)


def test_candidates_nearest_first():
    anchor = TEXT + 0x1000
    maps = [mapping(TEXT, 0x10_0000)]
    found = placement.candidates(maps, [anchor], PAGE_SIZE)
    distances = [abs(s - anchor) for s in found]
    assert distances == sorted(distances)
    # the nearest end of each gap: right below the mapping, right above it
    assert found[0] in (TEXT - 2 * PAGE_SIZE, TEXT + 0x10_0000 + PAGE_SIZE)


def test_size_is_rounded_to_pages():
    maps = [mapping(TEXT, 0x10_0000)]
    assert placement.candidates(maps, [TEXT], 1) == placement.candidates(maps, [TEXT], PAGE_SIZE)


def test_no_candidate_when_every_reachable_address_is_taken():
    anchor = TEXT
    maps = [mapping(anchor - 3 * GIB, 6 * GIB)]  # all of ±2 GiB and more
    assert placement.candidates(maps, [anchor], PAGE_SIZE) == []


def test_candidates_reach_every_anchor():
    a, b = TEXT, TEXT + GIB + 0x1000  # 1 GiB apart: one region must reach both
    found = placement.candidates([mapping(a, 0x1000), mapping(b, 0x1000)], [a, b], PAGE_SIZE)
    assert found and all(placement.reachable(s, a) and placement.reachable(s, b) for s in found)


def test_low_and_high_limits_respected():
    found = placement.candidates([], [placement.LOW_LIMIT + 0x1000], PAGE_SIZE)
    assert found and all(placement.LOW_LIMIT <= s < placement.HIGH_LIMIT for s in found)
    found = placement.candidates([], [placement.HIGH_LIMIT - 0x1000], PAGE_SIZE)
    assert found and all(s + PAGE_SIZE <= placement.HIGH_LIMIT for s in found)


@pytest.mark.parametrize("addrs, groups", [
    ([], []),
    ([TEXT], [[TEXT]]),
    ([TEXT + 0x100, TEXT], [[TEXT, TEXT + 0x100]]),  # sorted, one window
    ([LIBC, TEXT, LIBC + 0x10], [[TEXT], [LIBC, LIBC + 0x10]]),  # PIE and libc apart
])
def test_cluster(addrs, groups):
    assert placement.cluster(addrs) == groups


def test_cluster_groups_fit_one_window():
    addrs = [TEXT + i * GIB // 2 for i in range(10)]
    for group in placement.cluster(addrs):
        assert placement.reachable(group[0], group[-1])


def test_reach_keeps_a_margin_below_rel32():
    assert placement.reachable(0, placement.REACH - 1)
    assert not placement.reachable(0, placement.REACH)
    assert placement.REACH < 1 << 31
