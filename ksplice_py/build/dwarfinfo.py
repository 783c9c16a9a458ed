"""What the DWARF of one object (the wrapper adds -g) tells the comparison:
where each function's source starts, which functions were inlined into
which, and the layout of every named structure and union."""
from __future__ import annotations

from dataclasses import dataclass, field

from elftools.dwarf.die import DIE
from elftools.elf.elffile import ELFFile


@dataclass
class DwarfInfo:
    cu_file: str = ""
    starts: dict[str, int] = field(default_factory=dict)  # function -> DW_AT_decl_line (CU file)
    inlined: dict[str, set[str]] = field(default_factory=dict)  # function -> names inlined into it
    layouts: dict[str, tuple] = field(default_factory=dict)  # "struct tally" -> (size, members)

    def extent(self, name: str) -> tuple[int, int] | None:
        """[first, last] source lines of a function: from its declaration to
        the line before the next function's (good enough to map diff hunks)."""
        start = self.starts.get(name)
        if start is None:
            return None
        later = sorted(v for v in self.starts.values() if v > start)
        return start, (later[0] - 1 if later else 1 << 30)


def _name(die: DIE) -> str | None:
    for attr in ("DW_AT_name", "DW_AT_abstract_origin", "DW_AT_specification"):
        if attr not in die.attributes:
            continue
        if attr == "DW_AT_name":
            return die.attributes[attr].value.decode(errors="replace")
        return _name(die.get_DIE_from_attribute(attr))
    return None


def _decl_in_cu(die: DIE, cu_file_index: set[int]) -> int | None:
    line = die.attributes.get("DW_AT_decl_line")
    file = die.attributes.get("DW_AT_decl_file")
    if line is None or (file is not None and file.value not in cu_file_index):
        return None
    return line.value


def _inlined_names(die: DIE, out: set[str]) -> None:
    for child in die.iter_children():
        if child.tag == "DW_TAG_inlined_subroutine":
            name = _name(child)
            if name:
                out.add(name)
        _inlined_names(child, out)


def _layout(die: DIE) -> tuple:
    members = []
    for m in die.iter_children():
        if m.tag != "DW_TAG_member":
            continue
        loc = m.attributes.get("DW_AT_data_member_location")
        bits = m.attributes.get("DW_AT_data_bit_offset")
        typ = m.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in m.attributes else None
        tsize = typ.attributes["DW_AT_byte_size"].value if typ is not None and "DW_AT_byte_size" in typ.attributes else None
        members.append((_name(m), loc.value if loc is not None and isinstance(loc.value, int) else None,
                        bits.value if bits is not None else None, tsize))
    size = die.attributes.get("DW_AT_byte_size")
    return (size.value if size else None, tuple(members))


def read(elf: ELFFile) -> DwarfInfo:
    info = DwarfInfo()
    if not elf.has_dwarf_info():
        return info
    dwarf = elf.get_dwarf_info()
    for cu in dwarf.iter_CUs():
        top = cu.get_top_DIE()
        info.cu_file = _name(top) or ""
        lineprog = dwarf.line_program_for_CU(cu)
        base = info.cu_file.rsplit("/", 1)[-1]
        indexes = {i for i, fe in enumerate(lineprog["file_entry"] if lineprog else [])
                   if fe.name.decode(errors="replace").rsplit("/", 1)[-1] == base}
        if lineprog and lineprog.header["version"] < 5:
            indexes = {i + 1 for i in indexes}  # DWARF 4 file numbers start at 1
        for die in top.iter_children():
            if die.tag == "DW_TAG_subprogram":
                name = _name(die)
                if not name:
                    continue
                if "DW_AT_specification" not in die.attributes and "DW_AT_abstract_origin" not in die.attributes:
                    line = _decl_in_cu(die, indexes)
                    if line is not None:
                        info.starts.setdefault(name, line)
                if "DW_AT_low_pc" in die.attributes or "DW_AT_ranges" in die.attributes:
                    _inlined_names(die, info.inlined.setdefault(name, set()))
            elif die.tag in ("DW_TAG_structure_type", "DW_TAG_union_type") and "DW_AT_name" in die.attributes:
                if die.attributes.get("DW_AT_declaration"):
                    continue
                kind = "struct" if die.tag == "DW_TAG_structure_type" else "union"
                info.layouts[f"{kind} {_name(die)}"] = _layout(die)
    return info
