"""Where to map patch memory: within ±2 GiB of the code it redirects, so a
5-byte ``jmp rel32`` reaches it and RIP-relative operands of relocated
prologues still reach their data."""
from __future__ import annotations

from .constants import PAGE_SIZE, page_down, page_up
from .maps import Mapping

REACH = (1 << 31) - (16 << 20)  # rel32 reach, less a margin for in-region offsets
LOW_LIMIT = 0x10000  # below vm.mmap_min_addr
HIGH_LIMIT = 0x7FFF_FFFF_F000  # top of the x86-64 user address space (4-level)


def reachable(a: int, b: int) -> bool:
    return abs(a - b) < REACH


def _gaps(maps: list[Mapping]) -> list[tuple[int, int]]:
    """Free [lo, hi) address ranges, leaving a guard page around mappings."""
    spans = sorted((m.start, m.end) for m in maps)
    out, cursor = [], LOW_LIMIT
    for lo, hi in spans:
        if lo - PAGE_SIZE > cursor:
            out.append((cursor, lo - PAGE_SIZE))
        cursor = max(cursor, hi + PAGE_SIZE)
    if cursor < HIGH_LIMIT:
        out.append((cursor, HIGH_LIMIT))
    return out


def candidates(maps: list[Mapping], anchors: list[int], size: int) -> list[int]:
    """Page-aligned start addresses for ``size`` bytes such that the whole
    range is reachable from every anchor; closest to the anchors first."""
    size = page_up(size)
    lo_bound = max(max(anchors) - REACH, LOW_LIMIT)
    hi_bound = min(min(anchors) + REACH, HIGH_LIMIT)
    centre = (min(anchors) + max(anchors)) // 2
    found: list[int] = []
    for glo, ghi in _gaps(maps):
        lo, hi = max(glo, lo_bound), min(ghi, hi_bound)
        if hi - lo < size:
            continue
        # The end of the gap nearest the anchors keeps regions compact.
        if ghi <= centre:
            start = page_down(hi - size)
        else:
            start = page_up(lo)
        if start >= lo and start + size <= hi:
            found.append(start)
    return sorted(found, key=lambda s: abs(s - centre))


def cluster(addrs: list[int]) -> list[list[int]]:
    """Group addresses so each group fits in one reachable window (e.g. a PIE
    executable and libc, which the kernel maps terabytes apart)."""
    groups: list[list[int]] = []
    for a in sorted(addrs):
        if groups and reachable(groups[-1][0], a):
            groups[-1].append(a)
        else:
            groups.append([a])
    return groups
