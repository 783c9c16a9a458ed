"""Write the patch: the carried functions and data of each translation unit
as assembly (their bytes, and each relocation re-stated with `.reloc`), a
`.hotpatch` manifest, then `cc -shared` with the patch flags.

Every reference from carried code to something the patch does not carry
reaches the running original, never a copy:

* a rip-relative field (call, jmp, lea, mov ...) becomes a Bind32 record:
  the loader stores the running symbol's address minus the place;
* a GOT load (`foo@GOTPCREL`) reads a slot of ours that a HOTPATCH_SYMBOL
  record fills with the running symbol's address;
* an absolute word in carried data is itself such a slot.

References to functions the patch replaces or adds reach the new code;
imports the running object does not define (libc...) stay imports.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HotpatchError
from ..patchfile import HOTPATCH_CFLAGS, KIND_BIND32, KIND_BUILD_ID, KIND_REPLACE, KIND_SYMBOL, MAGIC, VERSION
from .objdiff import UnitPlan
from .objfile import GOTPCREL, R_64, R_PC32, R_PLT32, RELOC_NAMES, ObjectFile, Rel, Section, reloc_size
from .running import RunningObject


@dataclass
class Manifest:
    """The records of the patch, as assembly."""

    lines: list[str] = field(default_factory=list)
    strings: dict[str, str] = field(default_factory=dict)

    def string(self, text: str) -> str:
        if text not in self.strings:
            self.strings[text] = f".Lhp_str{len(self.strings)}"
        return self.strings[text]

    def record(self, kind: int, target: str, a: str, b: str = "0") -> None:
        self.lines.append(f"\t.long {MAGIC:#x}\n\t.short {VERSION}, {kind}\n"
                          f"\t.quad {self.string(target)}, {a}, {b}")

    def text(self) -> str:
        out = ['\t.section .hotpatch,"aw",@progbits', "\t.p2align 3", *self.lines,
               '\t.section .rodata.hotpatch_strings,"a",@progbits']
        out += [f'{label}:\n\t.asciz "{text}"' for text, label in self.strings.items()]
        return "\n".join(out) + "\n"


class _UnitWriter:
    """One translation unit's carried sections, with global labels unique to it."""

    def __init__(self, n: int, unit: UnitPlan, running: RunningObject, patch_globals: set[str],
                 manifest: Manifest, refusals: list[str]) -> None:
        self.n, self.unit, self.obj = n, unit, unit.after
        self.running, self.patch_globals = running, patch_globals
        self.manifest, self.refusals = manifest, refusals
        self.sections = self._closure()
        self.slots: list[str] = []
        self.fills: dict[int, dict[int, int]] = {}  # section -> {offset: value (4 bytes)}
        self.filled_words: set[int] = set()  # sections with absolute words we fill (must be writable)
        self.relocs: list[str] = []

    def label(self, sec: int) -> str:
        return f".Lhp{self.n}_s{sec}"

    # -- what travels ---------------------------------------------------------
    def _closure(self) -> list[int]:
        obj, carried = self.obj, self.unit.carried
        todo = sorted({obj.defined[n].shndx for n in carried})
        seen: set[int] = set()
        while todo:
            i = todo.pop()
            if i in seen:
                continue
            seen.add(i)
            sec = obj.sections[i]
            for s in obj.defined.values():
                if s.shndx == i and s.name not in carried:
                    self.refuse(f"{s.name} shares section {sec.name} with carried code or data and "
                                "would be copied (does the compiler ignore -ffunction-sections/-fdata-sections?)")
            for r in sec.relocs:
                t = obj.target(sec, r)
                if t.kind in ("str", "cst", "sec") and t.section not in seen:
                    todo.append(t.section)
        return sorted(seen)

    # -- relocations ----------------------------------------------------------
    def write_relocs(self) -> None:
        for i in self.sections:
            sec = self.obj.sections[i]
            for r in sec.relocs:
                self._reloc(sec, r)

    def _reloc(self, sec: Section, r: Rel) -> None:
        obj = self.obj
        sym = obj.symbols[r.sym]
        place = f"{self.label(sec.index)}+{r.offset:#x}"
        rname = RELOC_NAMES.get(r.type, str(r.type))
        t = obj.target(sec, r)
        if sym.shndx is not None and sym.shndx in self.sections:
            if r.type in GOTPCREL and not (sym.type in ("FUNC", "OBJECT") and sym.name):
                self.refuse(f"GOT load of an anonymous location in {sec.name}")
            # a GOT slot holds the symbol itself; the addend moves the field, not the symbol
            expr = (f"{sym.name}{r.addend:+d}" if r.type in GOTPCREL
                    else f"{self.label(sym.shndx)}{sym.value + r.addend:+d}")
            self.relocs.append(f"\t.reloc {place}, {rname}, {expr}")
            return
        if t.kind == "extern" and (t.name in self.patch_globals or self.running.find(t.name, "", False) is None):
            self.relocs.append(f"\t.reloc {place}, {rname}, {t.name}{r.addend:+d}")  # ours, or an import
            return
        if t.kind not in ("sym", "extern"):
            self.refuse(f"{sec.name}+{r.offset:#x} reaches an anonymous location outside the patch")
            return
        name = self.unit.rename.get(t.name, t.name)
        found = self.running.find(name, obj.file, t.kind == "sym" and obj.defined[t.name].local)
        if found is None:
            self.refuse(f"{name} (used by the patch) is not in {self.running.path.name}'s symbol table")
            return
        self._bind(sec, r, place, name, found, t.offset - obj.pc_adjust(sec, r))

    def _bind(self, sec: Section, r: Rel, place: str, name: str, found, addend: int) -> None:
        running = self.running
        if r.type in (R_PC32, R_PLT32):
            target, extra = f"{running.patch_name}:{name}", 0
            if not running.unique(name):  # same-named statics: reach it from a unique anchor
                anchor = running.anchor()
                target, extra = f"{running.patch_name}:{anchor.name}", found.addr - anchor.addr
            self.fills.setdefault(sec.index, {})[r.offset] = addend + extra
            self.manifest.record(KIND_BIND32, target, place)
            return
        if r.type in GOTPCREL or r.type == R_64:
            if not running.unique(name):
                self.refuse(f"{name} is defined more than once in {running.path.name} and is used "
                            "through a pointer: it cannot be named")
                return
            if r.type == R_64:
                if addend:
                    self.refuse(f"a pointer to {name}+{addend} in new data cannot be bound")
                    return
                self.filled_words.add(sec.index)
                self.manifest.record(KIND_SYMBOL, f"{running.patch_name}:{name}", place)
                return
            slot = f".Lhp{self.n}_slot{len(self.slots)}"
            self.slots.append(slot)
            self.manifest.record(KIND_SYMBOL, f"{running.patch_name}:{name}", slot)
            self.relocs.append(f"\t.reloc {place}, R_X86_64_PC32, {slot}{r.addend:+d}")
            return
        self.refuse(f"{RELOC_NAMES.get(r.type, r.type)} in {sec.name} (to {name}) cannot be bound: "
                    "build the project as position-independent code (-fPIE/-fPIC), without TLS in patched code")

    # -- assembly --------------------------------------------------------------
    def text(self) -> str:
        self.write_relocs()
        out = []
        for i in self.sections:
            sec = self.obj.sections[i]
            out.append(self._section_header(sec))
            out.append(f"{self.label(i)}:")
            out += self._symbols(i)
            if sec.nobits:
                out.append(f"\t.zero {sec.size}")
            else:
                out += self._bytes(sec)
        for slot in self.slots:
            out += ['\t.section .data.hotpatch_slots,"aw",@progbits', "\t.p2align 3", f"{slot}:", "\t.quad 0"]
        # .reloc places are label+offset, so each lands in its label's section
        out += self.relocs
        out.append(self.manifest.text())
        return "\n".join(out) + "\n"

    def _section_header(self, sec: Section) -> str:
        kind = ("text" if sec.code else "bss" if sec.nobits else
                "data" if sec.writable or sec.index in self.filled_words else "rodata")
        flags = {"text": '"ax",@progbits', "bss": '"aw",@nobits', "data": '"aw",@progbits',
                 "rodata": '"a",@progbits'}[kind]
        head = f"\t.section .{kind}.hotpatch.{self.n}.{sec.index},{flags}"
        return f"{head}\n\t.balign {max(sec.align, 1)}"

    def _symbols(self, i: int) -> list[str]:
        out = []
        for s in self.obj.defined.values():
            if s.shndx != i:
                continue
            kind = "@function" if s.type == "FUNC" else "@object"
            out.append(f"\t.set {s.name}, {self.label(i)}+{s.value}\n\t.type {s.name}, {kind}\n"
                       f"\t.size {s.name}, {s.size}")
            if not s.local:
                out.append(f"\t.globl {s.name}\n\t.hidden {s.name}")
        return out

    def _bytes(self, sec: Section) -> list[str]:
        data = bytearray(sec.data)
        for r in sec.relocs:  # RELA: the place holds nothing until we fill it
            data[r.offset:r.offset + reloc_size(r.type)] = bytes(reloc_size(r.type))
        for off, value in self.fills.get(sec.index, {}).items():
            data[off:off + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")
        return [f"\t.byte {', '.join(str(b) for b in data[k:k + 16])}" for k in range(0, len(data), 16)]

    def refuse(self, why: str) -> None:
        self.refusals.append(f"{self.unit.source}: {why}")


def write(units: list[UnitPlan], running: RunningObject, workdir: Path, out: Path) -> list[str]:
    """Assemble and link the patch at `out`; returns refusals (nothing is
    written when there are any)."""
    refusals: list[str] = []
    patch_globals = {n for u in units for n in u.carried if not u.after.defined[n].local}
    sources = []
    for n, unit in enumerate(units):
        manifest = Manifest()  # per unit: its records name the unit's local labels
        if n == 0 and running.build_id:
            manifest.record(KIND_BUILD_ID, running.patch_name, manifest.string(running.build_id))
        for name in unit.replace:  # objdiff replaced only names the running object defines once
            manifest.record(KIND_REPLACE, f"{running.patch_name}:{name}", name)
        writer = _UnitWriter(n, unit, running, patch_globals, manifest, refusals)
        path = workdir / f"unit{n}.s"
        path.write_text(writer.text() + '\t.section .note.GNU-stack,"",@progbits\n')
        sources.append(path)
    if refusals:
        return refusals
    _link(sources, out)
    return []


def _link(sources: list[Path], out: Path) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    cmd = ["cc", "-shared", *HOTPATCH_CFLAGS, "-o", str(tmp), *map(str, sources)]
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if cp.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = (cp.stderr.strip().splitlines() or ["(no output)"])[0]
        raise HotpatchError(f"linking the patch failed: {first}")
    tmp.replace(out)
