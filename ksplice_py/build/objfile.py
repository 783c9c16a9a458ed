"""A relocatable object (.o built with -ffunction-sections -fdata-sections)
as the comparison sees it: sections, symbols, and every relocation resolved
to *what* it reaches — a named function or variable, a string literal, a
constant — independent of where the linker will put it.

Two builds of one source place strings and sections at different offsets;
what must compare equal is the meaning: "this call reaches helper", "this lea
loads the string 'ok\\n'". A relocation's place inside an instruction is
not where the instruction's target is computed from (the CPU adds the
displacement to the *next* instruction's address), so instructions are
decoded (capstone) to find the real target offset, as kpatch does.
"""
from __future__ import annotations

import hashlib
import io
from bisect import bisect_right
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import capstone
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_RELOC_TYPE_x64 as R
from elftools.elf.relocation import RelocationSection

SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR, SHF_MERGE, SHF_STRINGS = 0x1, 0x2, 0x4, 0x10, 0x20

# Relocations computed relative to the place (their target is reached from
# the end of the instruction holding them).
# (pyelftools' table stops before the GOTPCRELX types: numbers from the psABI)
R_GOTPCREL, R_GOTPCRELX, R_REX_GOTPCRELX = R["R_X86_64_GOTPCREL"], 41, 42
GOTPCREL = {R_GOTPCREL, R_GOTPCRELX, R_REX_GOTPCRELX}
PC_RELATIVE = {R["R_X86_64_PC32"], R["R_X86_64_PLT32"], *GOTPCREL}
R_PC32, R_PLT32, R_64 = R["R_X86_64_PC32"], R["R_X86_64_PLT32"], R["R_X86_64_64"]
RELOC_NAMES = {**{v: k for k, v in R.items() if k != "_default_"},
               R_GOTPCRELX: "R_X86_64_GOTPCRELX", R_REX_GOTPCRELX: "R_X86_64_REX_GOTPCRELX"}
SIZE = {R_64: 8}  # every other type we accept writes 4 bytes


def reloc_size(rtype: int) -> int:
    return SIZE.get(rtype, 4)


@dataclass(frozen=True)
class Rel:
    offset: int
    type: int
    sym: int
    addend: int


@dataclass
class Section:
    index: int
    name: str
    type: str
    flags: int
    align: int
    entsize: int
    size: int
    data: bytes
    relocs: list[Rel] = field(default_factory=list)

    @property
    def code(self) -> bool:
        return bool(self.flags & SHF_EXECINSTR)

    @property
    def alloc(self) -> bool:
        return bool(self.flags & SHF_ALLOC)

    @property
    def writable(self) -> bool:
        return bool(self.flags & SHF_WRITE)

    @property
    def nobits(self) -> bool:
        return self.type == "SHT_NOBITS"

    @property
    def strings(self) -> bool:
        return bool(self.flags & SHF_MERGE and self.flags & SHF_STRINGS)

    @property
    def constants(self) -> bool:
        return bool(self.flags & SHF_MERGE and not self.flags & SHF_STRINGS and self.entsize)


@dataclass(frozen=True)
class Sym:
    index: int
    name: str
    value: int
    size: int
    type: str  # FUNC, OBJECT, NOTYPE, SECTION, FILE
    bind: str  # LOCAL, GLOBAL, WEAK
    shndx: int | None  # None: undefined (or ABS/COMMON, which we treat as outside)

    @property
    def local(self) -> bool:
        return self.bind == "LOCAL"


@dataclass(frozen=True)
class Target:
    """What a relocation reaches. kind: "sym" (a named function/variable of
    this object), "extern" (an undefined symbol), "str" (a string literal),
    "cst" (a mergeable constant), "sec" (an anonymous section, e.g. a jump
    table). key identifies it across builds; offset is where inside it."""

    kind: str
    key: object
    offset: int
    section: int | None = None  # the section holding it (not for extern)
    name: str = ""  # symbol name for sym/extern


class ObjectFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            self.raw = f.read()
        self.elf = ELFFile(io.BytesIO(self.raw))
        self.sections: list[Section] = []
        for i, s in enumerate(self.elf.iter_sections()):
            data = b"" if s["sh_type"] == "SHT_NOBITS" else s.data()
            self.sections.append(Section(i, s.name, s["sh_type"], s["sh_flags"], s["sh_addralign"],
                                         s["sh_entsize"], s["sh_size"], data))
        self.symbols: list[Sym] = []
        self.file = ""
        symtab = self.elf.get_section_by_name(".symtab")
        for i, s in enumerate(symtab.iter_symbols() if symtab else []):
            info = s["st_info"]
            shndx = s["st_shndx"] if isinstance(s["st_shndx"], int) else None
            sym = Sym(i, s.name, s["st_value"], s["st_size"], info["type"][4:], info["bind"][4:], shndx)
            self.symbols.append(sym)
            if sym.type == "FILE" and not self.file:
                self.file = sym.name
        for s in self.elf.iter_sections():
            if isinstance(s, RelocationSection) and s["sh_info"] < len(self.sections):
                target = self.sections[s["sh_info"]]
                if target.alloc:
                    target.relocs = sorted((Rel(r["r_offset"], r["r_info_type"], r["r_info_sym"],
                                                r["r_addend"]) for r in s.iter_relocations()),
                                           key=lambda r: r.offset)

    # -- symbols ------------------------------------------------------------
    @cached_property
    def defined(self) -> dict[str, Sym]:
        """Named functions and variables defined here, by name."""
        return {s.name: s for s in self.symbols
                if s.name and s.shndx is not None and s.type in ("FUNC", "OBJECT")}

    @property
    def functions(self) -> dict[str, Sym]:
        return {n: s for n, s in self.defined.items() if s.type == "FUNC"}

    @property
    def variables(self) -> dict[str, Sym]:
        return {n: s for n, s in self.defined.items() if s.type == "OBJECT"}

    def section_of(self, sym: Sym) -> Section:
        return self.sections[sym.shndx]

    def body(self, sym: Sym) -> bytes:
        sec = self.section_of(sym)
        return bytes(sym.size) if sec.nobits else sec.data[sym.value:sym.value + sym.size]

    def relocs_in(self, sym: Sym) -> list[Rel]:
        return [r for r in self.section_of(sym).relocs if sym.value <= r.offset < sym.value + max(sym.size, 1)]

    @cached_property
    def _by_section(self) -> dict[int, list[tuple[int, Sym]]]:
        out: dict[int, list[tuple[int, Sym]]] = {}
        for s in self.defined.values():
            out.setdefault(s.shndx, []).append((s.value, s))
        for syms in out.values():
            syms.sort(key=lambda vs: vs[0])
        return out

    def covering(self, sec: int, offset: int) -> Sym | None:
        """The named function or variable whose bytes hold `offset` of `sec`."""
        syms = self._by_section.get(sec, [])
        i = bisect_right(syms, offset, key=lambda vs: vs[0])
        for value, s in reversed(syms[max(0, i - 8):i]):  # the nearest few: aliases, nesting
            if offset < value + max(s.size, 1):
                return s
        return None

    # -- instructions ---------------------------------------------------------
    @cached_property
    def _decoder(self) -> capstone.Cs:
        return capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)

    def _insn_starts(self, sec: Section) -> list[tuple[int, int]]:
        cache = self.__dict__.setdefault("_insns", {})
        if sec.index not in cache:
            cache[sec.index] = [(i[0], i[0] + i[1]) for i in
                                self._decoder.disasm_lite(sec.data, 0)]
        return cache[sec.index]

    def pc_adjust(self, sec: Section, r: Rel) -> int:
        """End of the instruction holding a PC-relative field minus the
        field's place (4 for a plain rip-relative disp32, more when an
        immediate follows); 0 outside code."""
        if r.type not in PC_RELATIVE or not sec.code:
            return 0
        insns = self._insn_starts(sec)
        i = bisect_right(insns, (r.offset, 1 << 62)) - 1
        if i >= 0 and insns[i][0] <= r.offset < insns[i][1]:
            return insns[i][1] - r.offset
        return 4  # data inside code (or undecodable): the usual case

    # -- targets ---------------------------------------------------------------
    def target(self, sec: Section, r: Rel) -> Target:
        sym = self.symbols[r.sym]
        adj = self.pc_adjust(sec, r)
        if sym.shndx is None or sym.shndx >= len(self.sections):
            return Target("extern", sym.name, r.addend + adj, name=sym.name)
        tsec = self.sections[sym.shndx]
        at = sym.value + r.addend + adj
        if sym.type in ("FUNC", "OBJECT") and sym.name:
            return Target("sym", sym.name, at - sym.value, tsec.index, sym.name)
        if tsec.strings:
            start = tsec.data.rfind(b"\0", 0, max(at, 0)) + 1 if at > 0 else 0
            end = tsec.data.find(b"\0", max(at, 0))
            return Target("str", tsec.data[start:end if end >= 0 else None], at - start, tsec.index)
        if tsec.constants:
            start = at - at % tsec.entsize
            return Target("cst", tsec.data[start:start + tsec.entsize], at - start, tsec.index)
        owner = self.covering(tsec.index, at)
        if owner is not None:
            return Target("sym", owner.name, at - owner.value, tsec.index, owner.name)
        return Target("sec", self.section_fingerprint(tsec), at, tsec.index)

    def section_fingerprint(self, sec: Section) -> str:
        """An anonymous section (jump table...) compares by its content."""
        h = hashlib.sha256(self.masked(sec.data, sec.relocs, 0, len(sec.data)))
        for r in sec.relocs:
            t = self.target(sec, r) if self.symbols[r.sym].shndx != sec.index else None
            h.update(repr((r.offset, r.type, t and (t.kind, t.key, t.offset))).encode())
        return h.hexdigest()[:16]

    @staticmethod
    def masked(data: bytes, relocs: list[Rel], start: int, end: int) -> bytes:
        out = bytearray(data[start:end])
        for r in relocs:
            for i in range(r.offset - start, r.offset - start + reloc_size(r.type)):
                if 0 <= i < len(out):
                    out[i] = 0
        return bytes(out)
