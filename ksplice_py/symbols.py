"""Symbols of a running target.

Every ELF the target has mapped becomes an ``ObjectInfo`` (load bias,
build-id, address range), listed in the dynamic linker's search order. Symbols
come from ``.dynsym`` (with GNU versions), ``.symtab`` and the build-id debug
file, and are looked up two ways:

* ``resolve("object:sym")`` -- how users name a function or variable to patch;
  static functions and variables included, ambiguity is an error;
* ``bind_import(name, version, weak)`` -- how the dynamic linker would bind a
  patch's undefined symbol: search order, versions, IFUNCs bound to the
  implementation the target already uses.

Parsing libc with its debug file costs about half a second, so per-file
symbol data is pickled in a cache keyed by build-id, and objects are parsed
only when a lookup needs them.
"""
from __future__ import annotations

import bisect
import os
import pickle
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerDefSection, GNUVerNeedSection, GNUVerSymSection
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import SymbolTableSection

from . import maps as _maps
from .constants import page_down
from .errors import (
    AmbiguousSymbol,
    BadInput,
    RemoteError,
    SymbolNotFound,
    UnknownObject,
    UnsupportedPatch,
)
from .memory import RemoteMemory
from .resources import cache_dir

# Bump when _FileData (or how it is computed) changes: old cache files are ignored.
FORMAT_VERSION = 1
DEBUG_ROOT = "/usr/lib/debug/.build-id"

_KIND = {"STT_FUNC": "func", "STT_LOOS": "ifunc",  # STT_GNU_IFUNC == STT_LOOS
         "STT_OBJECT": "object", "STT_COMMON": "object", "STT_NOTYPE": "other"}
_BIND = {"STB_GLOBAL": "global", "STB_WEAK": "weak", "STB_LOCAL": "local",
         "STB_LOOS": "global"}  # STB_GNU_UNIQUE == STB_LOOS: a global to the linker
_STRENGTH = {"global": 2, "weak": 1, "local": 0}
_SKIP_SHNDX = ("SHN_UNDEF", "SHN_ABS", "SHN_COMMON")

R_X86_64_GLOB_DAT = 6
R_X86_64_JUMP_SLOT = 7
R_X86_64_IRELATIVE = 37
DT_NULL, DT_DEBUG = 0, 21


# --- public records ------------------------------------------------------
@dataclass(frozen=True)
class Symbol:
    name: str  # without @version
    object: str  # MappedFile.name: "main" or a basename like "libc.so.6"
    addr: int  # absolute address in the target
    size: int
    kind: str  # "func" | "ifunc" | "object" | "other"
    binding: str  # "global" | "weak" | "local"
    version: str | None  # e.g. "GLIBC_2.2.5"; None if unversioned
    default_version: bool  # True for name@@VER (or unversioned)

    @property
    def qualified(self) -> str:
        return f"{self.object}:{self.name}"


@dataclass
class ObjectInfo:
    name: str
    path: str
    host_path: str  # where *we* can open it
    bias: int  # absolute address = bias + st_value
    build_id: str | None  # lowercase hex of NT_GNU_BUILD_ID
    start: int
    end: int


# --- per-file data (what the cache holds; independent of the load address) --
class _Def(NamedTuple):
    """One symbol definition, at its link-time address."""

    name: str
    value: int
    size: int
    kind: str
    binding: str
    version: str | None
    default_version: bool
    exported: bool  # visible to the dynamic linker (.dynsym, not hidden/local)


@dataclass
class _FileData:
    build_id: str | None
    debug_file: tuple[str, int, int] | None  # (path, size, mtime_ns) merged in, if any
    # one entry per (name, address, version), all tables merged; for resolve()
    by_name: dict[str, list[_Def]] = field(default_factory=dict)
    # .dynsym definitions only, every version separately; for bind_import()
    dynamic: dict[str, list[_Def]] = field(default_factory=dict)
    irelative: dict[int, int] = field(default_factory=dict)  # addend -> GOT slot
    slots: dict[str, list[tuple[int, str | None]]] = field(default_factory=dict)  # GLOB_DAT/JUMP_SLOT
    plt: list[tuple[int, int]] = field(default_factory=list)  # [lo, hi) of .plt*


class _Header(NamedTuple):
    first_load: tuple[int, int]  # (p_offset, p_vaddr) of the first PT_LOAD
    dynamic: tuple[int, int] | None  # (p_vaddr, p_memsz) of PT_DYNAMIC
    build_id: str | None


class _Malformed(Exception):
    """Internal: an ELF that pyelftools cannot read. Never leaves this module."""


# --- reading one ELF file ------------------------------------------------
def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _read_header(path: str) -> _Header:
    """Program headers and build-id only: cheap, done for every mapped object."""
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            if elf.elfclass != 64 or elf["e_machine"] != "EM_X86_64":
                raise _Malformed(f"not an x86-64 ELF ({elf['e_machine']}, {elf.elfclass}-bit)")
            first_load = dynamic = build_id = None
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_LOAD" and first_load is None:
                    first_load = (seg["p_offset"], seg["p_vaddr"])
                elif seg["p_type"] == "PT_DYNAMIC":
                    dynamic = (seg["p_vaddr"], seg["p_memsz"])
                elif seg["p_type"] == "PT_NOTE" and build_id is None:
                    for note in seg.iter_notes():
                        if note["n_type"] == "NT_GNU_BUILD_ID":
                            build_id = str(note["n_desc"]).lower()
            if first_load is None:
                raise _Malformed("no PT_LOAD segment")
            return _Header(first_load, dynamic, build_id)
    except _Malformed:
        raise
    except Exception as e:  # pyelftools raises many types on malformed input
        raise _Malformed(f"{type(e).__name__}: {e}") from None


def _version_names(elf: ELFFile) -> dict[int, str | None]:
    """Version index (as in .gnu.version) -> version name; the base version
    (the soname, index 1) counts as unversioned."""
    names: dict[int, str | None] = {0: None, 1: None}
    for sec in elf.iter_sections():
        if isinstance(sec, GNUVerDefSection):
            for verdef, aux in sec.iter_versions():
                first = next(aux, None)
                base = verdef["vd_flags"] & 0x1  # VER_FLG_BASE
                names[verdef["vd_ndx"]] = None if base or first is None else first.name
        elif isinstance(sec, GNUVerNeedSection):
            for _verneed, aux in sec.iter_versions():
                for vernaux in aux:
                    names[vernaux["vna_other"]] = vernaux.name
    return names


def _versym_of(elf: ELFFile) -> list[int]:
    for sec in elf.iter_sections():
        if isinstance(sec, GNUVerSymSection):
            out = []
            for s in sec.iter_symbols():
                ndx = s["ndx"]
                out.append({"VER_NDX_LOCAL": 0, "VER_NDX_GLOBAL": 1}.get(ndx, ndx) if isinstance(ndx, str) else ndx)
            return out
    return []


def _split_version(name: str) -> tuple[str, str | None, bool]:
    """.symtab spells versions into names: ``memcpy@@GLIBC_2.14``, ``memcpy@GLIBC_2.2.5``."""
    if "@@" in name:
        base, ver = name.split("@@", 1)
        return base, ver, True
    if "@" in name:
        base, ver = name.split("@", 1)
        return base, ver, False
    return name, None, True


def _iter_defs(table: SymbolTableSection, dyn_versions: list[str | None] | None,
               dyn_hidden: list[bool] | None):
    """Defined, addressable symbols of one table as _Def records."""
    for i, sym in enumerate(table.iter_symbols()):
        kind = _KIND.get(sym["st_info"]["type"])
        if kind is None or not sym.name or sym["st_shndx"] in _SKIP_SHNDX:
            continue  # section/file/TLS symbols, undefined, absolute
        binding = _BIND.get(sym["st_info"]["bind"], "global")
        if dyn_versions is not None:  # .dynsym: versions come from .gnu.version
            name = sym.name
            version = dyn_versions[i] if i < len(dyn_versions) else None
            default = not (dyn_hidden[i] if i < len(dyn_hidden) else False)
            exported = binding != "local" and sym["st_other"]["visibility"] not in ("STV_HIDDEN", "STV_INTERNAL")
        else:
            name, version, default = _split_version(sym.name)
            exported = False
        yield _Def(name, sym["st_value"], sym["st_size"], kind, binding, version, default, exported)


def _merge(by_name: dict[str, list[_Def]], d: _Def) -> None:
    """Add ``d`` unless the same symbol (name, address, version) is known:
    .dynsym, .symtab and the debug file describe one symbol three times."""
    entries = by_name.setdefault(d.name, [])
    for i, e in enumerate(entries):
        if e.value == d.value and (e.version == d.version or d.version is None):
            entries[i] = e._replace(
                binding=max(e.binding, d.binding, key=_STRENGTH.__getitem__),
                size=e.size or d.size,
                exported=e.exported or d.exported,
            )
            return
    entries.append(d)


def _debug_file(build_id: str | None) -> str | None:
    if not build_id or len(build_id) < 3:
        return None
    path = f"{DEBUG_ROOT}/{build_id[:2]}/{build_id[2:]}.debug"
    return path if os.path.isfile(path) else None


def _file_identity(path: str | None) -> tuple[str, int, int] | None:
    if path is None:
        return None
    st = os.stat(path)
    return (path, st.st_size, st.st_mtime_ns)


def _parse_symbols(elf: ELFFile, data: _FileData, with_dynamic: bool) -> None:
    dyn_names: list[str] = []
    dyn_versions: list[str | None] = []
    if with_dynamic:
        names = _version_names(elf)
        versym = _versym_of(elf)
        dyn_hidden = [bool(v & 0x8000) for v in versym]
        dyn_versions = [names.get(v & 0x7FFF) for v in versym]
        for sec in elf.iter_sections():
            if sec["sh_type"] == "SHT_DYNSYM":
                dyn_names = [s.name for s in sec.iter_symbols()]
                for d in _iter_defs(sec, dyn_versions, dyn_hidden):
                    _merge(data.by_name, d)
                    if d.exported:
                        data.dynamic.setdefault(d.name, []).append(d)
    for sec in elf.iter_sections():
        if sec["sh_type"] == "SHT_SYMTAB":
            for d in _iter_defs(sec, None, None):
                _merge(data.by_name, d)
    if with_dynamic:
        _parse_relocations(elf, data, dyn_names, dyn_versions)


def _parse_relocations(elf: ELFFile, data: _FileData, dyn_names: list[str],
                       dyn_versions: list[str | None]) -> None:
    for sec in elf.iter_sections():
        if sec.name in (".plt", ".plt.sec", ".plt.got"):
            data.plt.append((sec["sh_addr"], sec["sh_addr"] + sec["sh_size"]))
        if not isinstance(sec, RelocationSection) or sec["sh_type"] == "SHT_NOBITS":
            continue
        for rel in sec.iter_relocations():
            rtype = rel["r_info_type"]
            if rtype == R_X86_64_IRELATIVE and sec.is_RELA():
                data.irelative[rel["r_addend"]] = rel["r_offset"]
            elif rtype in (R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT):
                i = rel["r_info_sym"]
                if 0 < i < len(dyn_names):
                    version = dyn_versions[i] if i < len(dyn_versions) else None
                    data.slots.setdefault(dyn_names[i], []).append((rel["r_offset"], version))


def _parse_file(host_path: str, build_id: str | None) -> _FileData:
    """Everything symbol lookups need from one file and its debug file.
    (A module-level function so tests can count calls.)"""
    data = _FileData(build_id=build_id, debug_file=None)
    try:
        with open(host_path, "rb") as f:
            _parse_symbols(ELFFile(f), data, with_dynamic=True)
    except Exception as e:  # pyelftools raises many types on malformed input
        raise _Malformed(f"{type(e).__name__}: {e}") from None
    debug = _debug_file(build_id)
    if debug is not None:
        try:
            identity = _file_identity(debug)
            with open(debug, "rb") as f:
                _parse_symbols(ELFFile(f), data, with_dynamic=False)
            data.debug_file = identity
        except Exception:  # a broken debug file only costs the static symbols
            pass
    return data


# --- the cache -------------------------------------------------------------
def cache_path(build_id: str) -> Path:
    return cache_dir() / f"{build_id}.{FORMAT_VERSION}.pickle"


def _cache_load(build_id: str) -> _FileData | None:
    path = cache_path(build_id)
    try:
        st = path.stat()
        # We often run as root: never unpickle a file someone else could have written.
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return None
        with open(path, "rb") as f:
            data = pickle.load(f)
        if not isinstance(data, _FileData) or data.build_id != build_id:
            return None
        if data.debug_file != _file_identity(_debug_file(build_id)):
            return None  # debug package installed, removed or changed since
        return data
    except Exception:  # missing or corrupt: rebuild
        return None


def _cache_store(data: _FileData) -> None:
    if not data.build_id:
        return
    path = cache_path(data.build_id)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pickle")
        try:
            with os.fdopen(fd, "wb") as f:
                pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)  # atomic: readers see the old file or the new one
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass  # a cache we cannot write only costs time


# --- lookups within one object ---------------------------------------------
def _rank(d: _Def) -> tuple:
    """Best description of an address first: global, exported, default version."""
    return (-_STRENGTH[d.binding], not d.exported, not d.default_version)


def _pick(defs: list[_Def], version: str | None) -> list[_Def]:
    """The distinct definitions a name denotes in one object: one per address.
    Globals win over same-address locals; among globals at different
    addresses (name@VER1, name@@VER2) the default version wins."""
    if version is not None:
        defs = [d for d in defs if d.version == version]
    globals_ = [d for d in defs if d.binding != "local"]
    global_addrs = {d.value for d in globals_}
    if version is None and len(global_addrs) > 1:
        defaults = [d for d in globals_ if d.default_version]
        if len({d.value for d in defaults}) == 1:
            globals_ = defaults
    locals_ = [d for d in defs if d.binding == "local" and d.value not in global_addrs]
    best: dict[int, _Def] = {}
    for d in sorted(globals_ + locals_, key=_rank):
        best.setdefault(d.value, d)
    return list(best.values())


def _split_target(target: str) -> tuple[str | None, str, str | None]:
    obj, sep, sym = target.rpartition(":")
    if not sep:
        obj = None
    sym, _, ver = sym.partition("@")
    ver = ver.lstrip("@") or None
    if not sym or obj == "":
        raise BadInput(f"bad symbol name {target!r}: use 'symbol' or 'object:symbol'")
    return obj, sym, ver


# --- the target ----------------------------------------------------------
class TargetSymbols:
    """Objects and symbols of process ``pid``. Objects are listed eagerly
    (headers only); symbols are parsed, or loaded from the cache, on demand."""

    def __init__(self, pid: int, mem: RemoteMemory, maps: list[_maps.Mapping] | None = None) -> None:
        self.pid = pid
        self.mem = mem
        self.skipped: list[tuple[str, str]] = []  # (path, why) of mapped ELFs we cannot read
        self._dynamic: dict[str, tuple[int, int]] = {}  # path -> PT_DYNAMIC (vaddr, memsz)
        self._data: dict[str, _FileData | str] = {}  # path -> data, or why it is unreadable
        self._funcs: dict[str, tuple[list[int], list[_Def], int]] = {}  # path -> function index
        found = [o for o in map(self._object_info, _maps.mapped_files(pid, maps)) if o is not None]
        self.objects: list[ObjectInfo] = self._search_order(found)
        self._by_name: dict[str, ObjectInfo] = {}
        for o in self.objects:
            self._by_name.setdefault(o.name, o)  # two files, one basename: the first

    # -- objects ----------------------------------------------------------
    def _open_path(self, mf: _maps.MappedFile) -> str:
        """host_path(), unless the file there is not the one mapped (replaced
        on disk, e.g. by a package upgrade): then the kernel's own handle."""
        path = _maps.host_path(self.pid, mf.path)
        first = mf.mappings[0]
        try:
            if os.stat(path).st_ino == first.inode:
                return path
        except OSError:
            pass
        via_kernel = f"/proc/{self.pid}/map_files/{first.start:x}-{first.end:x}"
        return via_kernel if os.path.exists(via_kernel) else path

    def _object_info(self, mf: _maps.MappedFile) -> ObjectInfo | None:
        path = self._open_path(mf)
        if not _is_elf(path):
            return None  # locale-archive, caches, data files
        try:
            hdr = _read_header(path)
        except _Malformed as e:
            self.skipped.append((mf.path, str(e)))
            return None
        # The first PT_LOAD is mapped at the page holding its file offset.
        off, vaddr = hdr.first_load
        page_off = page_down(off)
        starts = [m.start for m in mf.mappings if m.offset == page_off]
        if not starts:
            self.skipped.append((mf.path, "its first PT_LOAD segment is not mapped"))
            return None
        bias = min(starts) - page_down(vaddr)
        if hdr.dynamic:
            self._dynamic[mf.path] = hdr.dynamic
        return ObjectInfo(mf.name, mf.path, path, bias, hdr.build_id, mf.start, mf.end)

    def _search_order(self, objs: list[ObjectInfo]) -> list[ObjectInfo]:
        """The dynamic linker's global search order (its link_map chain), then
        anything it does not list; address order with main first without one."""
        main = [o for o in objs if o.name == "main"]
        ordered: list[ObjectInfo] = []
        try:
            chain = self._link_map(main[0]) if main else []
        except RemoteError:
            chain = []
        for l_addr, l_name in chain:
            obj = self._match_link(objs, main, l_addr, l_name)
            if obj is not None and obj not in ordered:
                ordered.append(obj)
        rest = main + [o for o in objs if o.name != "main"]
        return ordered + [o for o in rest if o not in ordered]

    @staticmethod
    def _match_link(objs: list[ObjectInfo], main: list[ObjectInfo], l_addr: int,
                    l_name: str) -> ObjectInfo | None:
        """The mapped object a link_map entry describes: by load bias (paths
        differ: /lib vs /usr/lib), by basename when biases tie."""
        if not l_name:
            return main[0] if main else None
        same_bias = [o for o in objs if o.bias == l_addr and o.name != "main"]
        if len(same_bias) == 1:
            return same_bias[0]
        base = os.path.basename(l_name)
        named = [o for o in (same_bias or objs) if os.path.basename(o.path) == base]
        return named[0] if len(named) == 1 else None  # vdso and unknowns: no file

    def _link_map(self, main: ObjectInfo) -> list[tuple[int, str]]:
        """(l_addr, l_name) of every loaded object, read from the target:
        main's DT_DEBUG -> r_debug -> r_map -> l_next (and r_next namespaces)."""
        dyn = self._dynamic.get(main.path)
        if dyn is None:
            return []  # static executable
        vaddr, memsz = dyn
        r_debug = 0
        raw = self.mem.read(main.bias + vaddr, memsz - memsz % 16)
        for tag, val in struct.iter_unpack("<qQ", raw):
            if tag == DT_NULL:
                break
            if tag == DT_DEBUG:
                r_debug = val
        out: list[tuple[int, str]] = []
        seen: set[int] = set()  # a corrupt chain must not loop forever
        while r_debug and r_debug not in seen and len(seen) < 65536:
            seen.add(r_debug)
            # struct r_debug{_extended}: int r_version; link_map *r_map; ...; r_debug *r_next @40
            r_version, r_map = struct.unpack("<i4xQ", self.mem.read(r_debug, 16))
            lm = r_map
            while lm and lm not in seen and len(seen) < 65536:
                seen.add(lm)
                # struct link_map: l_addr, l_name, l_ld, l_next, l_prev
                l_addr, l_name, _l_ld, l_next = struct.unpack("<4Q", self.mem.read(lm, 32))
                name = self.mem.read_cstring(l_name).decode(errors="replace") if l_name else ""
                out.append((l_addr, name))
                lm = l_next
            r_debug = self.mem.read_u64(r_debug + 40) if r_version >= 2 else 0
        return out

    def object(self, name: str) -> ObjectInfo:
        obj = self._by_name.get(name)
        if obj is None:
            names = ", ".join(o.name for o in self.objects)
            raise UnknownObject(
                f"process {self.pid} has no object named {name!r} mapped "
                f"(available: {names}); use 'main' or a library's file name",
                object=name, available=[o.name for o in self.objects])
        return obj

    def build_id(self, object_name: str) -> str | None:
        return self.object(object_name).build_id

    # -- symbol data ------------------------------------------------------
    def _load(self, obj: ObjectInfo, strict: bool = False) -> _FileData | None:
        """Symbol data of ``obj``: cache, else parse. None (or BadInput when
        ``strict``) if the file is not a readable ELF."""
        data = self._data.get(obj.path)
        if data is None:
            data = _cache_load(obj.build_id) if obj.build_id else None
            if data is None:
                try:
                    data = _parse_file(obj.host_path, obj.build_id)
                    _cache_store(data)
                except _Malformed as e:
                    data = str(e)
            self._data[obj.path] = data
        if isinstance(data, str):
            if strict:
                raise BadInput(f"cannot read the symbols of {obj.name} ({obj.path}): malformed ELF ({data})")
            return None
        return data

    def _symbol(self, obj: ObjectInfo, d: _Def) -> Symbol:
        return Symbol(d.name, obj.name, obj.bias + d.value, d.size, d.kind, d.binding,
                      d.version, d.default_version)

    # -- resolve ----------------------------------------------------------
    def resolve(self, target: str) -> Symbol:
        """``"sym"``, ``"object:sym"`` (or ``sym@VERSION``) -> the one symbol it names."""
        obj_name, name, version = _split_target(target)
        shown = name + (f"@{version}" if version else "")
        if obj_name is not None:
            obj = self.object(obj_name)
            data = self._load(obj, strict=True)
            found = [(obj, d) for d in _pick(data.by_name.get(name, []), version)]
            if not found:
                raise SymbolNotFound(
                    f"{obj_name} in process {self.pid} has no symbol {shown!r} "
                    f"(check the name, or install its debug symbols for static functions)",
                    object=obj_name, symbol=name)
        else:
            found = []
            for obj in self.objects:
                data = self._load(obj)
                if data is not None:
                    found += [(obj, d) for d in _pick(data.by_name.get(name, []), version)]
            if not found:
                raise SymbolNotFound(f"no object in process {self.pid} defines symbol {shown!r}", symbol=name)
        if len(found) > 1:
            cands = [f"{o.name}:{name} ({d.binding} {d.kind} at {o.bias + d.value:#x})" for o, d in found]
            if len({o.name for o, _ in found}) > 1:
                hint = "qualify it as object:symbol"
            else:
                hint = "these are distinct local symbols of one object, which cannot be told apart by name"
            raise AmbiguousSymbol(
                f"symbol {shown!r} is defined {len(found)} times in process {self.pid}: "
                f"{', '.join(cands)}; {hint}",
                symbol=name, candidates=[f"{o.name}:{name}" for o, _ in found])
        obj, d = found[0]
        return self._symbol(obj, d)

    # -- bind_import ------------------------------------------------------
    def bind_import(self, name: str, version: str | None, weak: bool) -> int | None:
        """Absolute address the dynamic linker would bind ``name`` (``@version``)
        to for a newly loaded object; None for a missing weak symbol."""
        for obj in self.objects:
            data = self._load(obj)
            if data is None:
                continue
            d = self._dynamic_match(data.dynamic.get(name, []), version)
            if d is None:
                continue
            if d.kind == "ifunc":
                return self._ifunc_target(obj, data, d)
            return obj.bias + d.value
        if weak:
            return None
        shown = name + (f"@{version}" if version else "")
        raise SymbolNotFound(f"patch needs symbol {shown} which no object in process {self.pid} defines",
                             symbol=name, version=version)

    @staticmethod
    def _dynamic_match(defs: list[_Def], version: str | None) -> _Def | None:
        """ld.so's check_match: a versioned reference takes that version (hidden
        or not) or an unversioned definition; an unversioned one the default."""
        if version is not None:
            exact = [d for d in defs if d.version == version]
            return (exact or [d for d in defs if d.version is None] or [None])[0]
        return next((d for d in defs if d.default_version), None)

    def _ifunc_target(self, obj: ObjectInfo, data: _FileData, d: _Def) -> int:
        """The implementation an IFUNC resolved to *in this process*: the
        defining object's own IRELATIVE slot, else any already-bound GOT slot."""
        slot = data.irelative.get(d.value)
        if slot is not None:
            return self.mem.read_u64(obj.bias + slot)
        for other in self.objects:
            odata = self._load(other)
            if odata is None:
                continue
            for off, ver in odata.slots.get(d.name, []):
                if ver is not None and d.version is not None and ver != d.version:
                    continue
                value = self.mem.read_u64(other.bias + off)
                in_plt = any(other.bias + lo <= value < other.bias + hi for lo, hi in odata.plt)
                if value and not in_plt and obj.start <= value < obj.end:
                    return value
        shown = d.name + (f"@{d.version}" if d.version else "")
        raise UnsupportedPatch(
            f"cannot bind IFUNC {shown} from {obj.name}: process {self.pid} has no resolved "
            f"GOT slot for it yet; call it once in the target or avoid it in the patch",
            symbol=d.name)

    # -- function_at ------------------------------------------------------
    def function_at(self, addr: int) -> Symbol | None:
        """The function symbol containing ``addr`` (for backtraces)."""
        obj = next((o for o in self.objects if o.start <= addr < o.end), None)
        if obj is None:
            return None
        data = self._load(obj)
        if data is None:
            return None
        values, defs, max_size = self._function_index(obj, data)
        rel = addr - obj.bias
        i = bisect.bisect_right(values, rel) - 1
        while i >= 0 and values[i] + max_size > rel:
            d = defs[i]
            if d.value <= rel < d.value + max(d.size, 1):
                return self._symbol(obj, d)
            i -= 1
        return None

    def functions_of(self, object_name: str) -> list[Symbol]:
        """Every function of one object (one name per address), e.g. for a
        harness's critical-function patterns."""
        obj = self.object(object_name)
        data = self._load(obj, strict=True)
        return [self._symbol(obj, d) for d in self._function_index(obj, data)[1]]

    def _function_index(self, obj: ObjectInfo, data: _FileData):
        idx = self._funcs.get(obj.path)
        if idx is None:
            best: dict[int, _Def] = {}
            for d in sorted((d for ds in data.by_name.values() for d in ds if d.kind in ("func", "ifunc")),
                            key=_rank):
                best.setdefault(d.value, d)  # one name per address, the global one
            defs = sorted(best.values(), key=lambda d: d.value)
            idx = ([d.value for d in defs], defs, max((max(d.size, 1) for d in defs), default=1))
            self._funcs[obj.path] = idx
        return idx

