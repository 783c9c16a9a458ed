"""The object the running processes execute (`RELPATH` as built, or
`--binary`): its symbols by translation unit, its bytes, its build-id, and
the name a patch uses for it ("main" or the library's basename)."""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile

from ..errors import BuildInputError
from ..x86writer import JMP_REL32_LEN as JMP_LEN


@dataclass(frozen=True)
class BinSym:
    name: str
    addr: int
    size: int
    type: str  # FUNC, OBJECT, ...
    local: bool
    file: str  # the STT_FILE name that precedes a local symbol ("" for globals)


class RunningObject:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.raw = path.read_bytes()
            self.elf = ELFFile(io.BytesIO(self.raw))
        except Exception as e:
            raise BuildInputError(f"{path}: not a readable ELF object ({e})") from None
        self.is_executable = self.elf["e_type"] == "ET_EXEC" or any(
            seg["p_type"] == "PT_INTERP" for seg in self.elf.iter_segments())
        self.patch_name = "main" if self.is_executable else path.name
        symtab = self.elf.get_section_by_name(".symtab")
        if symtab is None:
            raise BuildInputError(f"{path} has no symbol table (stripped); give --binary an "
                                  "unstripped copy of what runs")
        self.symbols: list[BinSym] = []
        current = ""
        for s in symtab.iter_symbols():
            typ, bind = s["st_info"]["type"][4:], s["st_info"]["bind"][4:]
            if typ == "FILE":
                current = s.name
                continue
            if not s.name or not isinstance(s["st_shndx"], int) or typ not in ("FUNC", "OBJECT", "NOTYPE"):
                continue
            local = bind == "LOCAL"
            self.symbols.append(BinSym(s.name, s["st_value"], s["st_size"], typ, local,
                                       current if local else ""))
        self.by_name: dict[str, list[BinSym]] = {}
        for sym in self.symbols:
            self.by_name.setdefault(sym.name, []).append(sym)

    @property
    def build_id(self) -> str | None:
        for sec in self.elf.iter_sections(type="SHT_NOTE"):
            for note in sec.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID":
                    return note["n_desc"].lower()
        return None

    def find(self, name: str, tu_file: str, local: bool) -> BinSym | None:
        """The definition of `name` the given translation unit's code reaches."""
        named = self.by_name.get(name, [])
        if local:
            hits = [s for s in named if s.local and s.file == tu_file]
            if not hits:  # built from another directory: the file names differ in their paths
                base = tu_file.rsplit("/", 1)[-1]
                hits = [s for s in named if s.local and s.file.rsplit("/", 1)[-1] == base]
        else:
            hits = [s for s in named if not s.local]
        return hits[0] if len(hits) == 1 else None

    def unique(self, name: str) -> bool:
        """Does "object:name" name one address (as symbols.resolve decides)?"""
        return len({s.addr for s in self.by_name.get(name, [])}) == 1

    def why_not_in_place(self, name: str) -> str | None:
        """Why a changed function cannot be redirected where it is (None: it can)."""
        if not self.unique(name):
            return f"{self.path.name} has several functions named {name}"
        sizes = {s.size for s in self.by_name.get(name, [])}
        if sizes and max(sizes) < JMP_LEN:
            return f"it is {max(sizes)} bytes, too short for a jump"
        return None

    def anchor(self) -> BinSym:
        """A global function whose name is unique: references to ambiguous
        statics are bound relative to it (the build-id is pinned, so their
        distance is fixed)."""
        for s in sorted(self.symbols, key=lambda s: s.addr):
            if s.type == "FUNC" and not s.local and s.size and self.unique(s.name):
                return s
        raise BuildInputError(f"{self.path} has no uniquely named global function to anchor "
                              "references to same-named statics")

    def read(self, addr: int, size: int) -> bytes | None:
        for sec in self.elf.iter_sections():
            a = sec["sh_addr"]
            if sec["sh_type"] != "SHT_NOBITS" and sec["sh_flags"] & 2 and a <= addr and addr + size <= a + sec["sh_size"]:
                off = sec["sh_offset"] + addr - a
                return self.raw[off:off + size]
        return None

    def section_name_at(self, addr: int) -> str:
        for sec in self.elf.iter_sections():
            if sec["sh_flags"] & 2 and sec["sh_addr"] <= addr < sec["sh_addr"] + sec["sh_size"]:
                return sec.name
        return ""
