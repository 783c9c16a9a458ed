"""A patch .so as data: its manifest (.hotpatch), segments, relocations, imports.

The file is read once; everything comes from those bytes (no re-open between
checking and loading). Parsing is strict: anything we would not load the way
ld.so would is refused here, so `hotpatch info` and `check` tell the truth
before the target is touched. Malformed input of any kind becomes one
BadPatchFile line, never a traceback.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import shlex
import string
import struct
from dataclasses import dataclass, field
from pathlib import Path

from elftools.elf.dynamic import DynamicSegment
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_RELOC_TYPE_x64
from elftools.elf.sections import SymbolTableSection

from . import clones, consistency, resources
from .consistency import Consistency

from .constants import PROT_EXEC, PROT_READ, PROT_WRITE, page_down, page_up
from .errors import BadPatchFile, HotpatchError, UnsupportedPatch

MAX_SPAN = 256 << 20  # a patch is a few functions; refuse absurd (fuzzed) sizes
MAX_STRING = 4096
MAX_INIT_ARRAY = 1 << 16  # bytes of DT_INIT_ARRAY & co. we walk (8192 entries)

# --- compiler flags -------------------------------------------------------
# Why each flag (the loader maps segments and relocates; it never runs code
# of the patch before cutover and never calls into ld.so):
#   -fPIC                      patch code must run at any base.
#   -fvisibility=hidden        patch symbols bind inside the patch at link
#                              time: RELATIVE relocs and direct calls, no
#                              exported symbol that could interpose.
#   -fno-plt                   calls to imports go through GOT slots
#                              (GLOB_DAT): no PLT0 / lazy-binding trampoline
#                              needing GOT[1]/GOT[2] that we never provide.
#   -nostartfiles              drop crti/crtn (DT_INIT/_init, DT_FINI/_fini)
#                              and crtbeginS/crtendS (frame_dummy,
#                              __do_global_dtors_aux, weak refs to
#                              __cxa_finalize/__gmon_start__/_ITM_*): we run
#                              no initialisers, so the patch carries none.
#   -Wl,-z,now -Wl,-z,relro    the whole GOT lies in PT_GNU_RELRO; we fill it
#                              eagerly, then it is made read-only.
#   -Wl,-z,max-page-size=4096  compact span (no 2 MiB gaps from other
#                              binutils defaults) so it fits near the target.
#   -Wl,--build-id=sha1        every patch is identifiable in edition records.
# Deliberately NOT -fno-stack-protector: the canary at %fs:0x28 is the TCB of
# whichever target thread runs the code (every thread has one) and
# __stack_chk_fail binds to the target's libc like any other import.
HOTPATCH_CFLAGS: tuple[str, ...] = (
    "-fPIC",
    "-fvisibility=hidden",
    "-fno-plt",
    "-nostartfiles",
    "-Wl,-z,now",
    "-Wl,-z,relro",
    "-Wl,-z,max-page-size=4096",
    "-Wl,--build-id=sha1",
)


def include_dir() -> Path:
    """csrc/include of the source tree this package lives in (hotpatch.h)."""
    return resources.csrc() / "include"


def cflags() -> str:
    """Flags for `cc -shared -fPIC -O2 $(hotpatch cflags) -o fix.so fix.c`."""
    return " ".join([shlex.quote(f"-I{include_dir()}"), *HOTPATCH_CFLAGS])


# --- manifest format (keep in sync with csrc/include/hotpatch.h) -------------
MAGIC = 0x43545048
VERSION = 1
KIND_REPLACE, KIND_WRAP, KIND_SYMBOL, KIND_BUILD_ID, KIND_BIND32, KIND_CONSISTENCY = 1, 2, 3, 4, 5, 6
KIND_CLONE_ABI = 7
RECORD = struct.Struct("<IHHQQQ")  # magic, version, kind, target, a, b

# --- relocation types -------------------------------------------------------
R = ENUM_RELOC_TYPE_x64
R_NONE, R_64, R_PC32, R_PLT32 = R["R_X86_64_NONE"], R["R_X86_64_64"], R["R_X86_64_PC32"], R["R_X86_64_PLT32"]
R_GLOB_DAT, R_JUMP_SLOT = R["R_X86_64_GLOB_DAT"], R["R_X86_64_JUMP_SLOT"]
R_RELATIVE, R_IRELATIVE = R["R_X86_64_RELATIVE"], R["R_X86_64_IRELATIVE"]
RELOC_SIZE = {R_NONE: 0, R_64: 8, R_GLOB_DAT: 8, R_JUMP_SLOT: 8, R_RELATIVE: 8, R_PC32: 4, R_PLT32: 4}
TLS_RELOCS = {R[n] for n in R if n != "_default_" and ("TLS" in n or "TPOFF" in n or "DTP" in n)}
RELOC_NAMES = {v: k for k, v in R.items() if k != "_default_"}

# Toolchain boilerplate that may sit in DT_INIT/DT_FINI/INIT_ARRAY/FINI_ARRAY
# when a patch is built without -nostartfiles. We never run any of them.
TOLERATED_INIT = {"_init", "frame_dummy"}
TOLERATED_FINI = {"_fini", "__do_global_dtors_aux"}


def reloc_name(rtype: int) -> str:
    return RELOC_NAMES.get(rtype, f"relocation type {rtype}")


@dataclass(frozen=True)
class Replacement:
    target: str
    func: int  # patch vaddr of the new function / wrapper
    orig_ptr: int | None  # patch vaddr of the call-original pointer (wrap)
    kind: str  # "replace" | "wrap"
    clone_abi: bool = False  # HOTPATCH_CLONE_ABI: written for a gcc clone's ABI


@dataclass(frozen=True)
class SymbolRef:
    target: str
    ptr: int  # patch vaddr of the pointer variable the tool fills


@dataclass(frozen=True)
class Bind32:
    """A 32-bit PC-relative field of the patch that must reach a symbol of
    the target (``hotpatch build`` binds references to unchanged code and
    data this way: to the running original, never a copy). The field holds
    the addend in the file (REL style); the loader stores S + A - P there and
    refuses the patch when the target lies beyond +-2 GiB."""

    target: str
    place: int  # patch vaddr of the 4-byte field
    addend: int


@dataclass(frozen=True)
class BuildIdPin:
    object: str
    build_id: str  # lowercase hex


@dataclass(frozen=True)
class Segment:
    vaddr: int
    memsz: int
    data: bytes  # p_filesz bytes; the rest up to memsz is zero (bss)
    prot: int  # PROT_READ | PROT_WRITE | PROT_EXEC


@dataclass(frozen=True)
class Import:
    name: str
    version: str | None  # e.g. "GLIBC_2.14"; None if unversioned
    weak: bool


@dataclass(frozen=True)
class Reloc:
    """One dynamic relocation, already validated (type known, place inside a
    segment). Exactly one of `imp` / `sym_value` is set for symbol relocs."""

    offset: int  # patch vaddr of the place
    type: int
    addend: int
    sym_name: str | None = None
    sym_value: int | None = None  # defined in the patch: its vaddr (or abs value)
    sym_abs: bool = False  # SHN_ABS: sym_value is absolute, not base-relative
    imp: Import | None = None  # undefined: bound against the target

    @property
    def size(self) -> int:
        return RELOC_SIZE[self.type]


@dataclass(frozen=True)
class PatchFile:
    name: str
    sha256: str
    size: int
    build_id: str | None
    replacements: list[Replacement]
    symbol_refs: list[SymbolRef]
    pins: list[BuildIdPin]
    segments: list[Segment]
    imports: list[Import]
    span: tuple[int, int]  # page-aligned [lo, hi) of all PT_LOAD vaddrs
    relro: list[tuple[int, int]]  # (vaddr, size), page-aligned as ld.so does
    func_names: dict[int, str]
    relocs: list[Reloc] = field(default_factory=list)
    needed: list[str] = field(default_factory=list)  # DT_NEEDED, informative
    binds: list[Bind32] = field(default_factory=list)
    consistency: Consistency = Consistency.STRICT  # HOTPATCH_CONSISTENCY

    @classmethod
    def from_bytes(cls, data: bytes, name: str) -> "PatchFile":
        try:
            return _Parser(bytes(data), name).parse()
        except HotpatchError:
            raise
        except Exception as e:  # pyelftools / struct / anything malformed input trips
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            short = Path(name).name or name
            raise BadPatchFile(f"{short}: malformed or truncated ELF file ({detail[:200]}); "
                               "rebuild the patch") from None

    def func_name(self, vaddr: int) -> str:
        return self.func_names.get(vaddr, f"0x{vaddr:x}")

    def to_dict(self) -> dict:
        def rep(r: Replacement) -> dict:
            d = {"target": r.target, "func": r.func, "func_name": self.func_name(r.func)}
            if r.orig_ptr is not None:
                d["orig_ptr"] = r.orig_ptr
                d["orig_ptr_name"] = self.func_name(r.orig_ptr)
            if r.clone_abi:
                d["clone_abi"] = True
            return d

        return {
            "name": self.name,
            "sha256": self.sha256,
            "size": self.size,
            "build_id": self.build_id,
            "replaces": [rep(r) for r in self.replacements if r.kind == "replace"],
            "wraps": [rep(r) for r in self.replacements if r.kind == "wrap"],
            "symbols": [{"target": s.target, "ptr": s.ptr, "ptr_name": self.func_name(s.ptr)}
                        for s in self.symbol_refs],
            "pins": [{"object": p.object, "build_id": p.build_id} for p in self.pins],
            "binds": [{"target": b.target, "place": b.place, "addend": b.addend} for b in self.binds],
            "imports": [{"name": i.name, "version": i.version, "weak": i.weak} for i in self.imports],
            "needed": list(self.needed),
            "consistency": self.consistency.value,
        }


# --- parsing ------------------------------------------------------------------
_PF_TO_PROT = ((4, PROT_READ), (2, PROT_WRITE), (1, PROT_EXEC))  # PF_R, PF_W, PF_X
_TARGET_CHARS = set(string.printable) - set(string.whitespace)
_HEX = set("0123456789abcdef")


@dataclass(frozen=True)
class _Sym:
    name: str
    value: int
    shndx: object  # int or "SHN_UNDEF"/"SHN_ABS"/...
    type: str
    bind: str
    version: str | None

    @property
    def defined(self) -> bool:
        return self.shndx != "SHN_UNDEF"


class _Budget:
    """A bound on loop iterations driven by counts read from the file."""

    def __init__(self, limit: int, error: Exception) -> None:
        self.left, self.error = limit, error

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise self.error


class _Parser:
    def __init__(self, data: bytes, name: str) -> None:
        self.data = data
        self.name = name
        self.short = Path(name).name or name
        # Filled in by parse(), one step after the other, in this order:
        self.elf: ELFFile | None = None
        self.segments: list[Segment] = []
        self.span = (0, 0)
        self.relro: list[tuple[int, int]] = []
        self.dynamic: DynamicSegment | None = None
        self.tags: dict[str, list[int]] = {}
        self.needed: list[str] = []
        self.dynsym: list[_Sym] = []
        self.symtab_names: dict[int, str] = {}
        self.relocs: list[Reloc] = []
        self.reloc_at: dict[int, Reloc] = {}

    # -- errors --
    def bad(self, what: str) -> BadPatchFile:
        return BadPatchFile(f"{self.short}: {what}")

    def unsupported(self, what: str) -> UnsupportedPatch:
        return UnsupportedPatch(f"{self.short}: {what}")

    # -- driver --
    def parse(self) -> PatchFile:
        self.check_header()
        self.elf = ELFFile(io.BytesIO(self.data))
        self.check_is_patch()
        self.check_elf_kind()
        self.read_segments()
        self.read_dynamic()
        self.dynsym = self.read_dynsym()
        self.symtab_names = self.read_symtab_names()
        self.relocs = self.read_relocs()
        self.reloc_at = {r.offset: r for r in self.relocs if r.type != R_NONE}
        self.check_initialisers()
        self.consistency = Consistency.STRICT
        replacements, symbol_refs, pins, binds = self.read_manifest()
        imports = list(dict.fromkeys(
            Import(s.name, s.version, s.bind == "STB_WEAK")
            for s in self.dynsym[1:] if not s.defined and s.name))
        return PatchFile(
            name=self.name,
            sha256=hashlib.sha256(self.data).hexdigest(),
            size=len(self.data),
            build_id=self.read_build_id(),
            replacements=replacements,
            symbol_refs=symbol_refs,
            pins=pins,
            consistency=self.consistency,
            segments=self.segments,
            imports=imports,
            span=self.span,
            relro=self.relro,
            func_names=self.func_names(),
            relocs=self.relocs,
            needed=self.needed,
            binds=binds,
        )

    # -- header --
    def check_header(self) -> None:
        if not self.data:
            raise self.bad("file is empty; build the patch with "
                           "`cc -shared -fPIC -O2 $(hotpatch cflags) -o fix.so fix.c`")
        if self.data[:4] != b"\x7fELF":
            raise self.bad("not an ELF file; a patch is a shared object built with "
                           "`cc -shared -fPIC $(hotpatch cflags)`")
        if len(self.data) < 64:
            raise self.bad(f"truncated ELF file ({len(self.data)} bytes)")

    def check_is_patch(self) -> None:
        """A library or a program given by mistake is named as such, before
        any complaint about what it contains (TLS, constructors, ...)."""
        h = self.elf.header
        if h["e_shoff"] + h["e_shnum"] * h["e_shentsize"] > len(self.data):
            return  # truncated: check_elf_kind says so
        if self.elf.get_section_by_name(".hotpatch") is None:
            kind = {"ET_EXEC": "a program", "ET_DYN": "a library or a program"}.get(h["e_type"], "an ELF file")
            raise self.bad(f"not a hotpatch patch ({kind} without a .hotpatch section); build patches "
                           "with hotpatch.h: cc -shared -fPIC -O2 $(hotpatch cflags) -o fix.so fix.c")

    def check_elf_kind(self) -> None:
        h = self.elf.header
        if self.elf.elfclass != 64 or not self.elf.little_endian:
            raise self.bad("not a 64-bit little-endian ELF file; build the patch for x86-64")
        if h["e_machine"] != "EM_X86_64":
            raise self.bad(f"built for {h['e_machine']}, not x86-64")
        if h["e_type"] != "ET_DYN":
            raise self.bad(f"is {h['e_type']}, not a shared object; link it with -shared -fPIC")
        end = h["e_phoff"] + h["e_phnum"] * h["e_phentsize"]
        if h["e_phnum"] == 0 or end > len(self.data):
            raise self.bad("truncated or missing program headers")
        shend = h["e_shoff"] + h["e_shnum"] * h["e_shentsize"]
        if shend > len(self.data):
            raise self.bad("truncated file: section headers lie past its end")

    # -- program headers --
    def read_segments(self) -> None:
        segs: list[Segment] = []
        self.relro = []
        self.dynamic = None
        raw_relro: list[tuple[int, int]] = []
        for seg in self.elf.iter_segments():
            ptype = seg["p_type"]
            if ptype == "PT_TLS":
                raise self.unsupported("uses thread-local storage (__thread / PT_TLS); the loader "
                                       "cannot add TLS to a running process: use plain globals")
            if ptype == "PT_GNU_RELRO":
                raw_relro.append((seg["p_vaddr"], seg["p_memsz"]))
            if ptype == "PT_DYNAMIC":
                self.dynamic = seg
            if ptype != "PT_LOAD" or seg["p_memsz"] == 0:
                continue
            off, filesz, memsz, vaddr = seg["p_offset"], seg["p_filesz"], seg["p_memsz"], seg["p_vaddr"]
            if filesz > memsz:
                raise self.bad(f"PT_LOAD at 0x{vaddr:x} has filesz > memsz")
            if off + filesz > len(self.data):
                raise self.bad(f"truncated file: segment at 0x{vaddr:x} needs bytes up to "
                               f"offset 0x{off + filesz:x}, file has 0x{len(self.data):x}")
            prot = sum(p for flag, p in _PF_TO_PROT if seg["p_flags"] & flag)
            segs.append(Segment(vaddr, memsz, self.data[off:off + filesz], prot))
        if not segs:
            raise self.bad("has no loadable segments")
        segs.sort(key=lambda s: s.vaddr)
        for a, b in zip(segs, segs[1:]):
            if a.vaddr + a.memsz > b.vaddr:
                raise self.bad(f"overlapping segments at 0x{a.vaddr:x} and 0x{b.vaddr:x}")
        lo, hi = page_down(segs[0].vaddr), page_up(segs[-1].vaddr + segs[-1].memsz)
        if hi - lo > MAX_SPAN:
            raise self.bad(f"segments span {hi - lo} bytes; a patch must be smaller than {MAX_SPAN}")
        self.segments, self.span = segs, (lo, hi)
        for vaddr, size in raw_relro:
            # ld.so (_dl_protect_relro): both ends rounded *down* to a page.
            start, end = page_down(vaddr), page_down(vaddr + size)
            start, end = max(start, lo), min(end, hi)
            if end > start:
                self.relro.append((start, end - start))
        if self.dynamic is None:
            raise self.bad("has no PT_DYNAMIC; link it with -shared -fPIC")

    def segment_at(self, vaddr: int, size: int = 1) -> Segment | None:
        for s in self.segments:
            if s.vaddr <= vaddr and vaddr + size <= s.vaddr + s.memsz:
                return s
        return None

    def file_bytes(self, vaddr: int, size: int) -> bytes | None:
        """Bytes the file provides at [vaddr, vaddr+size), None if not all in file."""
        for s in self.segments:
            if s.vaddr <= vaddr and vaddr + size <= s.vaddr + len(s.data):
                return s.data[vaddr - s.vaddr:vaddr - s.vaddr + size]
        return None

    def in_relro(self, vaddr: int, size: int) -> bool:
        return any(a < vaddr + size and vaddr < a + n for a, n in self.relro)

    # -- dynamic section --
    def read_dynamic(self) -> None:
        self.tags, self.needed = {}, []
        for tag in self.dynamic.iter_tags():
            t = tag.entry.d_tag
            if t == "DT_NULL":
                break
            if t == "DT_NEEDED":
                self.needed.append(tag.needed)
            self.tags.setdefault(str(t), []).append(tag.entry.d_val)
        if "DT_REL" in self.tags:
            raise self.unsupported("uses REL relocations (DT_REL); x86-64 patches use RELA — "
                                   "build with the system gcc/ld")
        if self.tags.get("DT_PLTREL", [7])[0] != 7:  # 7 == DT_RELA
            raise self.unsupported("DT_PLTREL is not DT_RELA")

    @property
    def textrel(self) -> bool:
        return "DT_TEXTREL" in self.tags or bool((self.tag("DT_FLAGS") or 0) & 0x4)  # DF_TEXTREL

    def tag(self, name: str) -> int | None:
        vals = self.tags.get(name)
        return vals[0] if vals else None

    # -- symbols --
    def versions(self, dynsym: SymbolTableSection) -> list[str | None]:
        """Version name of each .dynsym entry (needed versions; None = unversioned)."""
        names: dict[int, str] = {}
        versym = None
        for sec in self.elf.iter_sections():
            if sec["sh_type"] == "SHT_GNU_verneed":
                budget = self.version_budget(sec)
                for _verneed, auxes in sec.iter_versions():
                    budget.spend()
                    for aux in auxes:
                        budget.spend()
                        names[aux["vna_other"]] = aux.name
            elif sec["sh_type"] == "SHT_GNU_verdef":
                budget = self.version_budget(sec)
                for verdef, auxes in sec.iter_versions():
                    budget.spend()
                    first = next(iter(auxes), None)
                    if first is not None and not (verdef["vd_flags"] & 1):  # not VER_FLG_BASE
                        names[verdef["vd_ndx"]] = first.name
            elif sec["sh_type"] == "SHT_GNU_versym":
                versym = sec
        n = dynsym.num_symbols()
        if n > len(self.data) // 24 + 1:  # an Elf64_Sym is 24 bytes of the file
            raise self.bad(f".dynsym claims {n} symbols, more than the file can hold")
        if versym is None:
            return [None] * n
        out: list[str | None] = []
        for i in range(n):
            ndx = versym.get_symbol(i)["ndx"]
            out.append(names.get(ndx & 0x7FFF) if isinstance(ndx, int) else None)
        return out

    def version_budget(self, sec) -> "_Budget":
        """pyelftools follows vn_next/vna_next links sh_info/vn_cnt times; a
        zero link re-reads one record, so a fuzzed count (2**32) would spin.
        A record takes at least 8 bytes of the section (and of the file)."""
        return _Budget(min(sec["sh_size"], len(self.data)) // 8 + 1,
                       self.bad(f"symbol version section {sec.name} is malformed "
                                "(more records than its size can hold)"))

    def read_dynsym(self) -> list[_Sym]:
        secs = list(self.elf.iter_sections(type="SHT_DYNSYM"))
        if not secs:
            return [_Sym("", 0, "SHN_UNDEF", "STT_NOTYPE", "STB_LOCAL", None)]
        dynsym = secs[0]
        versions = self.versions(dynsym)
        syms = []
        for sym, ver in zip(dynsym.iter_symbols(), versions):
            syms.append(_Sym(sym.name, sym["st_value"], sym["st_shndx"],
                             sym["st_info"]["type"], sym["st_info"]["bind"], ver))
        for s in syms:
            if s.type == "STT_TLS":
                raise self.unsupported(f"uses thread-local variable '{s.name}'; the loader cannot "
                                       "add TLS to a running process")
        return syms

    def read_symtab_names(self) -> dict[int, str]:
        """vaddr -> name of defined FUNC/OBJECT symbols (.symtab first, then .dynsym)."""
        names: dict[int, str] = {}
        for typ in ("SHT_SYMTAB", "SHT_DYNSYM"):
            for sec in self.elf.iter_sections(type=typ):
                for sym in sec.iter_symbols():
                    info = sym["st_info"]
                    if (sym.name and sym["st_shndx"] not in ("SHN_UNDEF", "SHN_ABS")
                            and info["type"] in ("STT_FUNC", "STT_OBJECT")):
                        names.setdefault(sym["st_value"], sym.name)
        return names

    def func_names(self) -> dict[int, str]:
        return dict(self.symtab_names)

    # -- relocations --
    def read_relocs(self) -> list[Reloc]:
        tables = self.dynamic.get_relocation_tables()
        out: list[Reloc] = []
        for key in ("RELA", "JMPREL"):
            if key in tables:
                for rel in tables[key].iter_relocations():
                    out.append(self.make_reloc(rel["r_offset"], rel["r_info_type"],
                                               rel["r_addend"], rel["r_info_sym"]))
        if "RELR" in tables:  # packed RELATIVE relocs: the addend sits in the place
            for rel in tables["RELR"].iter_relocations():
                place = self.file_bytes(rel["r_offset"], 8)
                if place is None:
                    raise self.bad(f"RELR relocation at 0x{rel['r_offset']:x} outside file data")
                out.append(self.make_reloc(rel["r_offset"], R_RELATIVE,
                                           struct.unpack("<Q", place)[0], 0))
        return out

    def make_reloc(self, offset: int, rtype: int, addend: int, symidx: int) -> Reloc:
        where = f"at 0x{offset:x}"
        if rtype in TLS_RELOCS:
            raise self.unsupported(f"uses thread-local storage ({reloc_name(rtype)} {where}); "
                                   "the loader cannot add TLS to a running process")
        if rtype == R_IRELATIVE:
            raise self.unsupported(f"defines an ifunc (R_X86_64_IRELATIVE {where}); the loader "
                                   "does not run resolvers in the patch: call the implementation directly")
        if rtype not in RELOC_SIZE:
            raise self.unsupported(f"{reloc_name(rtype)} {where} is not supported; "
                                   "build with -fPIC $(hotpatch cflags)")
        size = RELOC_SIZE[rtype]
        seg = self.segment_at(offset, size) if size else None
        if size and seg is None:
            raise self.bad(f"{reloc_name(rtype)} {where} lies outside every loadable segment")
        if seg is not None and not seg.prot & PROT_WRITE and not self.textrel:
            # ld.so would fault writing there (no DT_TEXTREL): the slot the
            # code reads would stay unfilled, so refuse rather than load it.
            raise self.bad(f"{reloc_name(rtype)} {where} writes into a read-only segment "
                           "without DT_TEXTREL; build with -fPIC $(hotpatch cflags)")
        if rtype in (R_NONE, R_RELATIVE) or symidx == 0:
            if rtype not in (R_NONE, R_RELATIVE, R_64):
                raise self.bad(f"{reloc_name(rtype)} {where} has no symbol")
            return Reloc(offset, rtype, addend)
        if symidx >= len(self.dynsym):
            raise self.bad(f"relocation {where} names symbol #{symidx}, beyond .dynsym")
        sym = self.dynsym[symidx]
        if sym.type == "STT_GNU_IFUNC" and sym.defined:
            raise self.unsupported(f"defines ifunc '{sym.name}'; the loader does not run resolvers "
                                   "in the patch")
        if not sym.defined:
            if not sym.name:
                raise self.bad(f"relocation {where} references an unnamed undefined symbol")
            imp = Import(sym.name, sym.version, sym.bind == "STB_WEAK")
            return Reloc(offset, rtype, addend, sym.name, imp=imp)
        return Reloc(offset, rtype, addend, sym.name, sym_value=sym.value,
                     sym_abs=sym.shndx == "SHN_ABS")

    def pointer_value(self, vaddr: int) -> int | None:
        """What ld.so would store in the 8-byte slot at vaddr, as a patch vaddr;
        None when no relocation applies (then the slot is a link-time constant)."""
        r = self.reloc_at.get(vaddr)
        if r is None:
            return None
        if r.type == R_RELATIVE:
            return r.addend
        if r.type == R_64 and r.sym_value is not None and not r.sym_abs:
            return r.sym_value + r.addend
        raise self.bad(f"pointer at 0x{vaddr:x} is relocated by {reloc_name(r.type)}"
                       f"{' against ' + r.sym_name if r.sym_name else ''}, not to an address "
                       "inside the patch")

    # -- constructors / destructors --
    def check_initialisers(self) -> None:
        for tag, tolerated in (("DT_INIT", TOLERATED_INIT), ("DT_FINI", TOLERATED_FINI)):
            addr = self.tag(tag)
            if addr is not None and self.symtab_names.get(addr) not in tolerated:
                self.refuse_ctor(tag, addr)
        for tag, tolerated in (("DT_PREINIT_ARRAY", set()), ("DT_INIT_ARRAY", TOLERATED_INIT),
                               ("DT_FINI_ARRAY", TOLERATED_FINI)):
            addr, size = self.tag(tag), self.tag(tag + "SZ") or 0
            if addr is None:
                continue
            # Bound the walk by what a loadable segment holds: a fuzzed
            # DT_*_ARRAYSZ of 2**62 over unmapped space would loop for ever.
            if size and self.segment_at(addr, size) is None:
                raise self.bad(f"{tag} at 0x{addr:x} ({size} bytes) lies outside every loadable segment")
            if size > MAX_INIT_ARRAY:
                raise self.bad(f"{tag}SZ of {size} bytes is absurd for a patch")
            for slot in range(addr, addr + size - size % 8, 8):
                value = self.pointer_value(slot)
                if value is None:
                    raw = self.file_bytes(slot, 8)
                    value = struct.unpack("<Q", raw)[0] if raw else 0
                if value in (0, 0xFFFFFFFFFFFFFFFF):
                    continue
                if self.symtab_names.get(value) not in tolerated:
                    self.refuse_ctor(tag, value)

    def refuse_ctor(self, tag: str, addr: int) -> None:
        what = "destructor" if "FINI" in tag else "constructor"
        name = self.symtab_names.get(addr, f"0x{addr:x}")
        raise self.unsupported(f"has a {what} ({tag} -> {name}); the loader never runs "
                               "initialisers in the target: set state up lazily and build "
                               "with $(hotpatch cflags) (-nostartfiles)")

    # -- manifest --
    def cstring(self, vaddr: int, what: str) -> str:
        seg = next((s for s in self.segments if s.vaddr <= vaddr < s.vaddr + len(s.data)), None)
        if seg is None:
            raise self.bad(f"{what} string at 0x{vaddr:x} is outside the file's data")
        start = vaddr - seg.vaddr
        end = seg.data.find(b"\0", start, start + MAX_STRING)
        if end < 0:
            raise self.bad(f"{what} string at 0x{vaddr:x} is not NUL-terminated")
        text = seg.data[start:end].decode("ascii", errors="replace")
        if any(c not in _TARGET_CHARS for c in text):
            raise self.bad(f"{what} {text!r} contains whitespace or non-ASCII characters")
        return text

    def check_target(self, target: str, what: str) -> str:
        parts = target.split(":")
        if not target:
            raise self.bad(f"{what} has an empty target")
        if len(parts) > 2 or any(not p for p in parts):
            raise self.bad(f"{what} target {target!r} is not 'symbol' or 'object:symbol'")
        return target

    def code_addr(self, vaddr: int | None, what: str) -> int:
        if vaddr is None:
            raise self.bad(f"{what}: function pointer has no relocation")
        seg = self.segment_at(vaddr)
        if seg is None or not seg.prot & PROT_EXEC:
            raise self.bad(f"{what}: function 0x{vaddr:x} is not in an executable segment")
        return vaddr

    def var_addr(self, vaddr: int | None, what: str) -> int:
        if vaddr is None:
            raise self.bad(f"{what}: pointer variable has no relocation")
        seg = self.segment_at(vaddr, 8)
        if seg is None or not seg.prot & PROT_WRITE or self.in_relro(vaddr, 8):
            raise self.bad(f"{what}: pointer variable 0x{vaddr:x} is not in writable data")
        return vaddr

    def read_manifest(self) -> tuple[list[Replacement], list[SymbolRef], list[BuildIdPin], list[Bind32]]:
        sec = self.elf.get_section_by_name(".hotpatch")
        hint = "not a hotpatch patch: build it with hotpatch.h (HOTPATCH_REPLACE/HOTPATCH_WRAP)"
        if sec is None or sec["sh_size"] == 0:
            raise self.bad(hint)
        base, size = sec["sh_addr"], sec["sh_size"]
        if sec["sh_type"] != "SHT_PROGBITS" or size % RECORD.size:
            raise self.bad(f".hotpatch section is malformed (type {sec['sh_type']}, size {size})")
        raw = self.file_bytes(base, size)
        if raw is None:
            raise self.bad(".hotpatch section is not inside a loadable segment")
        replacements: list[Replacement] = []
        refs: list[SymbolRef] = []
        pins: list[BuildIdPin] = []
        binds: list[Bind32] = []
        clone_abi: list[str] = []
        for i in range(size // RECORD.size):
            at = base + i * RECORD.size
            magic, version, kind, *_ = RECORD.unpack_from(raw, i * RECORD.size)
            what = f".hotpatch record {i}"
            if magic != MAGIC:
                raise self.bad(f"{what} has bad magic 0x{magic:08x}")
            if version != VERSION:
                raise self.bad(f"{what} has version {version}; this tool reads version {VERSION} "
                               "(rebuild with the matching hotpatch.h)")
            tptr, a, b = (self.pointer_value(at + off) for off in (8, 16, 24))
            if tptr is None:
                raise self.bad(f"{what}: target pointer has no relocation")
            target = self.cstring(tptr, f"{what} target")
            if kind == KIND_REPLACE:
                target = self.check_target(target, f"HOTPATCH_REPLACE {what}")
                replacements.append(Replacement(target, self.code_addr(a, target), None, "replace"))
            elif kind == KIND_WRAP:
                target = self.check_target(target, f"HOTPATCH_WRAP {what}")
                replacements.append(Replacement(target, self.code_addr(a, target),
                                                self.var_addr(b, target), "wrap"))
            elif kind == KIND_SYMBOL:
                target = self.check_target(target, f"HOTPATCH_SYMBOL {what}")
                refs.append(SymbolRef(target, self.var_addr(a, target)))
            elif kind == KIND_BUILD_ID:
                pins.append(self.make_pin(target, a, what))
            elif kind == KIND_BIND32:
                target = self.check_target(target, f"bind {what}")
                binds.append(self.make_bind(target, a, what))
            elif kind == KIND_CLONE_ABI:
                clone_abi.append(self.check_target(target, f"HOTPATCH_CLONE_ABI {what}"))
            elif kind == KIND_CONSISTENCY:
                self.consistency = consistency.parse(target, f"HOTPATCH_CONSISTENCY {what}")
            else:
                raise self.bad(f"{what} has unknown kind {kind}")
        if not (replacements or refs or pins or binds):
            raise self.bad(hint)
        self.check_duplicates(replacements, refs, pins)
        dup_places = {b.place for b in binds}
        if len(dup_places) != len(binds):
            raise self.bad("two bind records name the same place")
        return self.mark_clone_abi(replacements, clone_abi), refs, pins, binds

    def make_bind(self, target: str, place: int | None, what: str) -> Bind32:
        """The place must be 4 bytes of file data (they hold the addend) that
        no dynamic relocation also writes."""
        if place is None:
            raise self.bad(f"{what}: bind place has no relocation")
        raw = self.file_bytes(place, 4)
        if raw is None:
            raise self.bad(f"{what}: bind place 0x{place:x} is not inside the file's data")
        if any(r.offset < place + 4 and place < r.offset + r.size for r in self.relocs):
            raise self.bad(f"{what}: bind place 0x{place:x} overlaps a dynamic relocation")
        return Bind32(target, place, struct.unpack("<i", raw)[0])

    def mark_clone_abi(self, reps: list[Replacement], declared: list[str]) -> list[Replacement]:
        """HOTPATCH_CLONE_ABI(t): the replacement of ``t`` was written for the
        ABI of the gcc clone ``t`` names (clones.py). It must name a clone the
        patch replaces or wraps, once."""
        replaced = {r.target for r in reps}
        seen: set[str] = set()
        for target in declared:
            if target in seen:
                raise self.bad(f"HOTPATCH_CLONE_ABI({target!r}) appears twice in the manifest")
            seen.add(target)
            if not clones.is_clone(target.rpartition(":")[2]):
                raise self.bad(f"HOTPATCH_CLONE_ABI({target!r}) does not name a gcc clone "
                               f"(.{', .'.join(clones.ABI_CHANGING)})")
            if target not in replaced:
                raise self.bad(f"HOTPATCH_CLONE_ABI({target!r}) names a target the patch "
                               "neither replaces nor wraps")
        return [dataclasses.replace(r, clone_abi=True) if r.target in seen else r for r in reps]

    def make_pin(self, obj: str, hexptr: int | None, what: str) -> BuildIdPin:
        if not obj or ":" in obj:
            raise self.bad(f"HOTPATCH_BUILD_ID {what}: object {obj!r} must be a file basename, a SONAME or 'main'")
        if hexptr is None:
            raise self.bad(f"HOTPATCH_BUILD_ID {what}: build-id pointer has no relocation")
        hexid = self.cstring(hexptr, f"HOTPATCH_BUILD_ID {what} build-id").lower()
        if not hexid or len(hexid) % 2 or set(hexid) - _HEX:
            raise self.bad(f"HOTPATCH_BUILD_ID({obj!r}, {hexid!r}): build-id must be an even "
                           "number of hex digits (see `readelf -n`)")
        return BuildIdPin(obj, hexid)

    def check_duplicates(self, reps: list[Replacement], refs: list[SymbolRef],
                         pins: list[BuildIdPin]) -> None:
        def dup(items: list, what: str) -> None:
            seen: set = set()
            for item in items:
                if item in seen:
                    shown = f"0x{item:x}" if isinstance(item, int) else repr(item)
                    raise self.bad(f"{what} {shown} appears twice in the manifest")
                seen.add(item)
        dup([r.target for r in reps], "replaced/wrapped target")
        dup([p.object for p in pins], "HOTPATCH_BUILD_ID object")
        dup([r.orig_ptr for r in reps if r.orig_ptr is not None] + [s.ptr for s in refs],
            "pointer variable at")

    # -- misc --
    def read_build_id(self) -> str | None:
        for seg in self.elf.iter_segments(type="PT_NOTE"):
            for note in seg.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID" and isinstance(note["n_desc"], str):
                    return note["n_desc"].lower()
        return None
