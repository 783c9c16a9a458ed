"""Link a parsed patch at a chosen base: pure computation, no target access.

The result says what bytes go where and which protections to set; the caller
maps the span in the target, writes, then mprotects. Symbols the patch
defines bind to the patch itself (like -Bsymbolic); imports are bound by the
caller's `bind`, once per (name, version). The HOTPATCH_WRAP/SYMBOL pointer
variables are left as the file has them: the caller fills them later.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from .constants import PAGE_SIZE, PROT_READ
from .errors import SymbolNotFound, UnsupportedPatch
from .patchfile import (R_64, R_GLOB_DAT, R_JUMP_SLOT, R_NONE, R_PC32,
                        R_PLT32, R_RELATIVE, Import, PatchFile, Reloc, reloc_name)

_U64 = 1 << 64


@dataclass(frozen=True)
class LinkedImage:
    base: int  # absolute address of patch vaddr 0 (== mapping start - span[0])
    size: int  # bytes to map (the span)
    writes: list[tuple[int, bytes]]  # absolute (addr, bytes): every segment, bss zero-filled
    protections: list[tuple[int, int, int]]  # absolute (addr, size, prot), page granular, final

    def addr(self, vaddr: int) -> int:
        return self.base + vaddr


Binder = Callable[[Import], "int | None"]


def link(patch: PatchFile, base: int, bind: Binder) -> LinkedImage:
    if base % PAGE_SIZE or base < 0 or base + patch.span[1] >= 1 << 47:
        raise ValueError(f"link base 0x{base:x} must be page aligned and in user space")
    lo, hi = patch.span
    image = bytearray(hi - lo)
    for seg in patch.segments:
        image[seg.vaddr - lo:seg.vaddr - lo + len(seg.data)] = seg.data
    symbols = _Symbols(patch, base, bind)
    for r in patch.relocs:
        _apply(image, lo, base, r, symbols)
    writes = [(base + s.vaddr, bytes(image[s.vaddr - lo:s.vaddr - lo + s.memsz]))
              for s in patch.segments]
    return LinkedImage(base, hi - lo, writes, _protections(patch, base))


class _Symbols:
    """S of the relocation formulas; imports bound once per (name, version)."""

    def __init__(self, patch: PatchFile, base: int, bind: Binder) -> None:
        self.patch, self.base, self.bind = patch, base, bind
        self.bound: dict[tuple[str, str | None], int | None] = {}

    def value(self, r: Reloc) -> int:
        if r.imp is not None:
            key = (r.imp.name, r.imp.version)
            if key not in self.bound:
                self.bound[key] = self.bind(r.imp)
            addr = self.bound[key]
            if addr is None:
                if r.imp.weak:
                    return 0  # unresolved weak reference: null, as ld.so does
                ver = f"@{r.imp.version}" if r.imp.version else ""
                raise SymbolNotFound(f"{self.patch.name}: needs '{r.imp.name}{ver}', which the "
                                     "target's loaded objects do not provide")
            return addr
        if r.sym_value is not None:
            return r.sym_value if r.sym_abs else self.base + r.sym_value
        return 0  # symbol index 0


def _apply(image: bytearray, lo: int, base: int, r: Reloc, symbols: _Symbols) -> None:
    if r.type == R_NONE:
        return
    at = r.offset - lo
    if r.type == R_RELATIVE:
        value = base + r.addend
    elif r.type == R_64:
        value = symbols.value(r) + r.addend
    elif r.type in (R_GLOB_DAT, R_JUMP_SLOT):
        value = symbols.value(r)
    elif r.type in (R_PC32, R_PLT32):
        disp = symbols.value(r) + r.addend - (base + r.offset)
        if not -(1 << 31) <= disp < 1 << 31:
            raise UnsupportedPatch(
                f"{symbols.patch.name}: {reloc_name(r.type)} at 0x{r.offset:x} to "
                f"'{r.sym_name}' is out of 32-bit range at base 0x{base:x}; build with -fPIC")
        struct.pack_into("<i", image, at, disp)
        return
    else:  # PatchFile refuses every other type; keep the loader honest anyway
        raise UnsupportedPatch(f"{symbols.patch.name}: cannot apply {reloc_name(r.type)}")
    struct.pack_into("<Q", image, at, value % _U64)


def _protections(patch: PatchFile, base: int) -> list[tuple[int, int, int]]:
    """Final prot per page of the span: the union of the segments touching the
    page (a page shared by two segments must serve both), holes PROT_NONE,
    RELRO pages read-only (as ld.so's _dl_protect_relro)."""
    lo, hi = patch.span
    pages = [0] * ((hi - lo) // PAGE_SIZE)
    for s in patch.segments:
        first = (s.vaddr - lo) // PAGE_SIZE
        last = (s.vaddr + s.memsz - 1 - lo) // PAGE_SIZE
        for i in range(first, last + 1):
            pages[i] |= s.prot
    for start, size in patch.relro:
        for i in range((start - lo) // PAGE_SIZE, (start + size - lo) // PAGE_SIZE):
            pages[i] = PROT_READ
    runs: list[tuple[int, int, int]] = []
    for i, prot in enumerate(pages):
        addr = base + lo + i * PAGE_SIZE
        if runs and runs[-1][2] == prot:
            a, n, p = runs[-1]
            runs[-1] = (a, n + PAGE_SIZE, p)
        else:
            runs.append((addr, PAGE_SIZE, prot))
    return runs
