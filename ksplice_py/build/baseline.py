"""Does the "before" build reproduce what runs? For every function the patch
replaces (and every one it forces in), the running object must hold the
same code: equal bytes outside relocation places, and every relocation
resolved there to the same function, variable or string. A different
compiler, different flags or a different source tree show up here, before a
patch built against the wrong code is ever applied."""
from __future__ import annotations

import struct

import capstone

from .objfile import GOTPCREL, PC_RELATIVE, ObjectFile, Rel, Section, Target
from .objdiff import UnitPlan
from .running import RunningObject

_CS = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


def check(units: list[UnitPlan], running: RunningObject) -> list[str]:
    reasons = []
    for unit in units:
        if unit.before is None:
            continue
        for name in unit.replace:
            why = _differs(unit.before, name, running)
            if why:
                reasons.append(f"{unit.source}: the build before the diff does not reproduce {name} in "
                               f"{running.path.name} ({why}): build with the same compiler, flags and "
                               "sources as the running program, or give --binary")
    return reasons


def _differs(obj: ObjectFile, name: str, running: RunningObject) -> str | None:
    sym = obj.functions.get(name)
    if sym is None:
        return "not in the build"
    found = running.find(name, obj.file, sym.local)
    if found is None:
        return "not found by name in its symbol table"
    code = running.read(found.addr, found.size)
    if code is None:
        return "its bytes are not in the file"
    sec = obj.section_of(sym)
    ours = _decode(obj.body(sym), sym.value)
    theirs = _decode(code, found.addr)
    if len(ours) != len(theirs):
        return f"{len(theirs)} instructions there, {len(ours)} here"
    index_ours = {i.address: k for k, i in enumerate(ours)}
    index_theirs = {i.address: k for k, i in enumerate(theirs)}
    relocs = obj.relocs_in(sym)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        mine = [r for r in relocs if a.address <= r.offset < a.address + a.size]
        where = f"+0x{a.address - sym.value:x}"
        if a.mnemonic != b.mnemonic:
            if not (mine and mine[0].type in GOTPCREL):  # ld relaxes GOT loads (mov -> lea)
                return f"{where}: {b.mnemonic} there, {a.mnemonic} here"
            continue
        if _is_branch(a) and not mine:
            # Within one section the assembler may pick a short jump where a
            # -ffunction-sections build needs a long one: compare where it lands.
            ta, tb = _branch_target(a), _branch_target(b)
            if index_ours.get(ta) != index_theirs.get(tb):
                return f"{where}: branch lands elsewhere"
            if ta not in index_ours:  # leaves the function: another function there
                return f"{where}: branch leaves the function"
            continue
        if _is_branch(a) and a.size != b.size:
            # our long form carries a relocation; theirs may be the short form
            if not index_theirs.get(_branch_target(b)) is None:
                return f"{where}: branch stays inside the function there"
            reached = _branch_target(b)
            why = _target_differs(obj, obj.target(sec, mine[0]), reached, running)
            if why:
                return f"{where} {why}"
            continue
        inside = [Rel(r.offset - a.address, r.type, r.sym, r.addend) for r in mine]
        if obj.masked(bytes(a.bytes), inside, 0, a.size) != obj.masked(bytes(b.bytes), inside, 0, b.size):
            return f"{where}: code differs"
        for r in mine:
            at = r.offset - a.address
            why = _reloc_differs(obj, sec, r, b.address + at, bytes(b.bytes[at:]), running)
            if why:
                return f"{where} {why}"
    return None


def _decode(code: bytes, address: int) -> list:
    return list(_CS.disasm(code, address))


def _is_branch(insn) -> bool:
    """A direct call or jump (its operand an address, not a register or memory)."""
    return (insn.mnemonic == "call" or insn.mnemonic.startswith("j")) and _branch_target(insn) is not None


def _branch_target(insn) -> int | None:
    op = insn.op_str
    return int(op, 16) if op.startswith("0x") else None


def _reloc_differs(obj: ObjectFile, sec: Section, r: Rel, place: int, at: bytes,
                   running: RunningObject) -> str | None:
    if r.type in GOTPCREL or r.type not in PC_RELATIVE:
        return None  # GOT loads may be relaxed; absolute words are RELATIVE relocs, not in the bytes
    reached = place + obj.pc_adjust(sec, r) + struct.unpack("<i", at[:4])[0]
    return _target_differs(obj, obj.target(sec, r), reached, running)


def _target_differs(obj: ObjectFile, t: Target, reached: int, running: RunningObject) -> str | None:
    if t.kind in ("str", "cst"):
        data = running.read(reached - t.offset, len(t.key))
        return None if data == t.key else f"reaches different data at 0x{reached:x}"
    if t.kind in ("sym", "extern"):
        local = t.kind == "sym" and obj.defined[t.name].local
        found = running.find(t.name, obj.file, local)
        if found is None and t.kind == "extern":
            return None  # an import: reached through the PLT
        if found is None:
            return f"references {t.name}, which the running object does not name"
        return None if found.addr + t.offset == reached else f"reaches 0x{reached:x}, not {t.name}"
    return None  # anonymous sections (jump tables) are compared by the bytes that use them
