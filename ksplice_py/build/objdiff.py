"""Compare the objects of one translation unit before and after the diff,
function by function and variable by variable, and decide what the live
patch carries — or why there can be none.

A function is *changed* when its bytes differ outside relocation places or
when a relocation reaches something else (another function, variable,
string, constant, or another place inside it); where the linker will put
things does not matter. Static locals (`count.3`) are matched across builds
by their base name and the functions that use them, since gcc's numbering
may shift. `.cold` parts travel with their parent. A changed compiler clone
(`.constprop`/`.isra`/`.part`: its own calling convention) is added as new
code and its callers are replaced instead of it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import dwarfinfo
from .objfile import R_PLT32, ObjectFile, Sym
from .sourcediff import FileChange

_COLD = re.compile(r"^(?P<parent>.+)\.cold(\.\d+)?$")
_CLONE = re.compile(r"\.(constprop|isra|part)\.\d+")
_NUMBERED = re.compile(r"^(?P<base>.+)\.(\d+)$")
UNREPLACEABLE_SECTIONS = (".text.startup", ".init", ".fini", ".text.exit")


def cold_parent(name: str) -> str | None:
    m = _COLD.match(name)
    return m.group("parent") if m else None


def is_clone(name: str) -> bool:
    return bool(_CLONE.search(name))


@dataclass
class UnitPlan:
    """What one translation unit contributes to the patch."""

    source: str  # path relative to the tree
    before: ObjectFile | None
    after: ObjectFile
    replace: dict[str, str] = field(default_factory=dict)  # function -> why
    inlined_via: dict[str, list[str]] = field(default_factory=dict)  # function -> helpers
    add: dict[str, str] = field(default_factory=dict)  # new function / cold part / clone -> why
    new_vars: set[str] = field(default_factory=set)
    rename: dict[str, str] = field(default_factory=dict)  # after name -> before name (static locals)

    @property
    def carried(self) -> set[str]:
        return set(self.replace) | set(self.add) | self.new_vars

    @property
    def empty(self) -> bool:
        return not (self.replace or self.add or self.new_vars)


@dataclass
class Comparison:
    units: list[UnitPlan]
    refusals: list[str]
    inline_only: dict[str, list[str]] = field(default_factory=dict)  # helper -> where it was inlined


# --- signatures -----------------------------------------------------------
def signature(obj: ObjectFile, sym: Sym, rename: dict[str, str]) -> tuple:
    """What must be equal for two builds of a function/variable to be the same."""
    sec = obj.section_of(sym)
    relocs = obj.relocs_in(sym)
    body = obj.masked(obj.body(sym), relocs, sym.value, sym.value + sym.size) if not sec.nobits else b""
    refs = []
    for r in relocs:
        t = obj.target(sec, r)
        key = rename.get(t.key, t.key) if t.kind in ("sym", "extern") else t.key
        refs.append((r.offset - sym.value, r.type, t.kind, key, t.offset))
    kind = "bss" if sec.nobits else ("data" if sec.writable else "const")
    return (kind if sym.type == "OBJECT" else "code", sym.size, body, tuple(refs))


def _users(obj: ObjectFile) -> dict[str, set[str]]:
    """Numbered local variable -> the functions that reference it."""
    users: dict[str, set[str]] = {}
    for name, f in obj.functions.items():
        sec = obj.section_of(f)
        for r in obj.relocs_in(f):
            t = obj.target(sec, r)
            if t.kind == "sym" and _NUMBERED.match(t.key) and t.key in obj.variables:
                users.setdefault(t.key, set()).add(name)
    return users


def match_static_locals(before: ObjectFile, after: ObjectFile) -> dict[str, str]:
    ub, ua = _users(before), _users(after)
    rename = {}
    for name, users in ua.items():
        base = _NUMBERED.match(name).group("base")
        same = [b for b, bu in ub.items() if _NUMBERED.match(b).group("base") == base and bu & users]
        if len(same) == 1 and same[0] != name:
            rename[name] = same[0]
    return rename


# --- one translation unit --------------------------------------------------
class _Unit:
    def __init__(self, source: str, before: Path | None, after: Path, change: FileChange | None,
                 refusals: list[str], not_in_place: Callable[[str], str | None]) -> None:
        self.not_in_place = not_in_place
        self.before = ObjectFile(before) if before else None
        self.after = ObjectFile(after)
        self.plan = UnitPlan(source, self.before, self.after)
        self.change = change
        self.refusals = refusals
        self.source = source
        self.dw_before = dwarfinfo.read(self.before.elf) if self.before else dwarfinfo.DwarfInfo()
        self.dw_after = dwarfinfo.read(self.after.elf)

    def compare(self) -> UnitPlan:
        plan = self.plan
        if self.before is not None:
            plan.rename = match_static_locals(self.before, self.after)
        changed = self._changed_functions()
        self._variables(changed)
        self._clones_and_cold(changed)
        self._layouts()
        self._explain()
        return plan

    def _before_sig(self, name: str) -> tuple | None:
        if self.before is None:
            return None
        sym = self.before.defined.get(self.plan.rename.get(name, name))
        return signature(self.before, sym, {}) if sym is not None else None

    def _changed_functions(self) -> dict[str, str]:
        changed: dict[str, str] = {}
        for name, f in self.after.functions.items():
            old = self._before_sig(name)
            if old is None:
                changed[name] = "new"
            elif signature(self.after, f, self.plan.rename) != old:
                changed[name] = "changed"
        return changed

    def _clones_and_cold(self, changed: dict[str, str]) -> None:
        plan = self.plan
        for name, how in list(changed.items()):
            parent = cold_parent(name)
            if parent is not None and parent in self.after.functions and parent not in changed:
                changed[parent] = "changed"  # its cold part changed: they travel together
        # A changed clone, or a static whose name the running object shares with
        # another, is added as new code and its callers are replaced instead
        # (to the end: callers may be such functions too).
        work = [n for n, how in changed.items() if how != "new" and self._via_callers(n)]
        indirect = {n: self._why_indirect(n) for n in work}
        while work:
            callee = work.pop()
            self._check_only_called(callee)
            for caller in self._callers(callee):
                if caller not in changed:
                    changed[caller] = f"calls {callee}"
                    if self._via_callers(caller):
                        work.append(caller)
                        indirect[caller] = self._why_indirect(caller)
        for name, how in changed.items():
            if cold_parent(name) is not None:
                continue
            if how == "new":
                plan.add[name] = "new function"
            elif name in indirect:
                plan.add[name] = f"{indirect[name]}: added as new code, its callers replaced"
            else:
                plan.replace[name] = how
        for name in self.after.functions:  # cold parts go wherever their parent goes
            parent = cold_parent(name)
            if parent is not None and (parent in plan.replace or parent in plan.add):
                plan.add[name] = f"cold part of {parent}"

    def _via_callers(self, name: str) -> bool:
        return cold_parent(name) is None and (is_clone(name) or self.not_in_place(name) is not None)

    def _why_indirect(self, name: str) -> str:
        return "compiler clone with its own calling convention" if is_clone(name) else self.not_in_place(name)

    def _check_only_called(self, name: str) -> None:
        """Replacing callers only works if nothing holds the function's address."""
        for obj in (self.before, self.after):
            for sec in (obj.sections if obj else []):
                for r in sec.relocs:
                    if r.type != R_PLT32 and obj.symbols[r.sym].name == name:
                        self.refuse(f"{name} changed and cannot be redirected where it is "
                                    f"({self.not_in_place(name) or 'a compiler clone'}), and its address "
                                    "is taken, so replacing its callers is not enough")
                        return

    def _callers(self, callee: str) -> list[str]:
        out = []
        for name, f in self.after.functions.items():
            sec = self.after.section_of(f)
            if any(self.after.target(sec, r).key == callee for r in self.after.relocs_in(f)):
                out.append(cold_parent(name) or name)
        return out

    def _variables(self, changed: dict[str, str]) -> None:
        for name, v in self.after.variables.items():
            old = self._before_sig(name)
            if old is None:
                self.plan.new_vars.add(name)
                continue
            new = signature(self.after, v, self.plan.rename)
            if new == old:
                continue
            shown = self.plan.rename.get(name, name)
            if new[0] == "const" and old[0] == "const" and v.local:
                # A file-local constant (a table, gcc's CSWTCH switch table):
                # the new one travels, and every function reading it is replaced.
                self.plan.new_vars.add(name)
                for user in self._callers(name):
                    changed.setdefault(user, f"reads {shown}, a constant that changed")
            elif new[1] != old[1]:
                self.refuse(f"variable {shown} changed size ({old[1]} -> {new[1]} bytes): the running "
                            "program's copy cannot grow")
            elif new[0] == "const" and old[0] == "const":
                self.refuse(f"constant {shown} changed and other files may read it: unchanged code in "
                            "the running program keeps reading the old one")
            else:
                self.refuse(f"the initial value of {shown} changed: the running program's variable "
                            "keeps its current value (a live patch cannot re-initialise it)")

    def _layouts(self) -> None:
        for name, layout in self.dw_after.layouts.items():
            old = self.dw_before.layouts.get(name)
            if old is not None and old != layout:
                detail = f"size {old[0]} -> {layout[0]}" if old[0] != layout[0] else "members moved"
                self.refuse(f"{name} changed layout ({detail}): data the running program already "
                            "holds would be misread")

    def _explain(self) -> None:
        """Why each replaced function changed, from the diff's lines and DWARF."""
        touched = self._touched()
        for name, how in list(self.plan.replace.items()):
            if how != "changed":
                continue
            base = name.split(".")[0]
            if base in touched:
                continue
            via = sorted((self.dw_after.inlined.get(base, set()) |
                          self.dw_before.inlined.get(base, set())) & touched)
            if via:
                self.plan.replace[name] = f"{', '.join(via)} inlined into it"
                self.plan.inlined_via[name] = via
            else:
                self.plan.replace[name] = "code changed (its own lines did not: a macro, type or constant it uses)"

    def _touched(self) -> set[str]:
        if self.change is None:
            return set()
        out = set()
        for dw, lines in ((self.dw_after, self.change.new_lines), (self.dw_before, self.change.old_lines)):
            for name in dw.starts:
                ext = dw.extent(name)
                if ext and any(ext[0] <= n <= ext[1] for n in lines):
                    out.add(name)
        return out

    def refuse(self, why: str) -> None:
        self.refusals.append(f"{self.source}: {why}")


def _is_lto(path: Path) -> bool:
    return any(s.name.startswith(".gnu.lto_") for s in ObjectFile(path).sections)


def compare(before: dict[str, Path], after: dict[str, Path], assembly: set[str],
            changes: dict[str, FileChange], not_in_place: Callable[[str], str | None]) -> Comparison:
    """`not_in_place(name)`: why the running object's function cannot be
    redirected where it is (its name is shared, it is too short), or None."""
    refusals: list[str] = []
    units: list[UnitPlan] = []
    inline_only: dict[str, list[str]] = {}
    for path in sorted(changes):
        if path.endswith((".s", ".S")):
            refusals.append(f"{path}: assembly changed; assembly is not compared function by function "
                            "(write this fix by hand with hotpatch.h)")
    for source, obj in sorted(after.items()):
        if _is_lto(obj):
            refusals.append(f"{source}: built with -flto (GIMPLE bytecode): objects cannot be compared "
                            "function by function; build without LTO")
            continue
        unit = _Unit(source, before.get(source), obj, changes.get(source), refusals, not_in_place)
        plan = unit.compare()
        if source in assembly and not plan.empty:
            if source not in changes:  # (a diff to it was refused above)
                refusals.append(f"{source}: assembly changed; assembly is not compared function by function")
            continue
        for name, why in plan.replace.items():
            sec = unit.after.section_of(unit.after.functions[name]).name
            if name == "main" or sec.startswith(UNREPLACEABLE_SECTIONS):
                what = (f"{', '.join(plan.inlined_via[name])} changed and the running program inlined "
                        f"it into {name}, which" if name in plan.inlined_via else f"{name} changed but it")
                life = ("runs for the program's whole life" if name == "main" else "runs only at start-up or exit")
                refusals.append(f"{source}: {what} cannot be replaced: it {life}, so new code would never "
                                "be entered")
        for name, via in plan.inlined_via.items():
            for helper in via:
                if helper not in unit.after.functions:
                    inline_only.setdefault(helper, []).append(name)
        if not plan.empty:
            units.append(plan)
    if not units and not refusals:
        refusals.append("the diff changes no code in the object: there is nothing to patch")
    return Comparison(units, refusals, inline_only)
