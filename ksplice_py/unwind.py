"""Precise stack unwinding of a stopped thread in another process.

Rules come from DWARF call frame information (``.eh_frame``, then
``.debug_frame``) parsed with pyelftools; the stack is read remotely. This runs
inside the cutover's stop window, so per-object tables are cached across
Unwinder instances (keyed by the file's identity) and parsed lazily: the FDE
index comes from ``.eh_frame_hdr``'s sorted search table (no full parse), and
only the FDEs actually hit are parsed and decoded.

Anything unexpected (no CFI, unsupported rule, unreadable stack, a CFA that
does not move toward the callers) ends the walk with ``complete=False`` so the
caller falls back to the conservative scan; nothing about the target's stack
raises (only TargetGone, if the process exits under us).
"""
from __future__ import annotations

import io
import os
import struct
from array import array
from bisect import bisect_right
from dataclasses import dataclass
from typing import IO, Callable

from elftools.dwarf.callframe import FDE, CallFrameInfo, CFARule, RegisterRule
from elftools.dwarf.dwarf_expr import DWARFExprOp, DWARFExprParser
from elftools.dwarf.structs import DWARFStructs
from elftools.elf.elffile import ELFFile

from .constants import PAGE_SIZE
from .errors import RemoteError
from .maps import Mapping, MappedFile, host_path, mapped_files
from .memory import RemoteMemory

# DWARF register numbers of x86-64 (psABI figure 3.36); 16 is the return address.
_DWARF_REGS = ("rax", "rdx", "rcx", "rbx", "rsi", "rdi", "rbp", "rsp",
               "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip")
_RSP, _RIP = 7, 16
_MASK = (1 << 64) - 1

_STRUCTS = DWARFStructs(little_endian=True, dwarf_format=32, address_size=8)
_EXPR_PARSER = DWARFExprParser(_STRUCTS)


@dataclass(frozen=True)
class Frame:
    pc: int  # frame 0: rip; callers: the return address
    cfa: int | None  # None when no CFI covers pc
    sp: int


class _Unsupported(Exception):
    """A rule or expression we do not evaluate: the walk ends incomplete."""


class _PageReader:
    """Remote reads for one walk, a page at a time: a stack walk touches a
    few pages many times (a signal frame alone restores 17 registers), and
    one 4 KiB process_vm_readv costs about what an 8-byte one does. Valid only
    while the thread stays stopped, hence one per unwind() call."""

    def __init__(self, mem: RemoteMemory) -> None:
        self._mem = mem
        self._pages: dict[int, bytes] = {}

    def read(self, addr: int, size: int) -> bytes:
        if addr < 0 or addr + size > _MASK:
            raise RemoteError(f"address {addr:#x} out of range")
        out = b""
        while size:
            page = addr & ~(PAGE_SIZE - 1)
            data = self._pages.get(page)
            if data is None:
                data = self._pages[page] = self._mem.read(page, PAGE_SIZE)
            chunk = data[addr - page: addr - page + size]
            out += chunk
            addr += len(chunk)
            size -= len(chunk)
        return out

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")


# --------------------------------------------------------------------------
# Per-object CFI tables (link-time addresses)
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Row:
    """The unwind rules in effect at one pc."""

    cfa: CFARule
    rules: dict[int, RegisterRule]
    signal: bool  # CIE augmentation 'S': a signal trampoline


class _FdeIndex:
    """FDEs of one CFI section as sorted start addresses; FDEs are parsed on
    first use, their decoded tables cached with a per-FDE pc array."""

    def __init__(self, cfi: CallFrameInfo | None, starts: list[int], offsets: list[int],
                 fdes: list[FDE] | None = None) -> None:
        self._cfi = cfi
        self._starts = starts
        self._offsets = offsets
        self._fdes: list[FDE | None] = fdes if fdes is not None else [None] * len(starts)
        self._tables: dict[int, tuple[list[int], list[_Row]]] = {}

    @classmethod
    def from_eh_frame(cls, data: bytes, addr: int, hdr: bytes | None, hdr_addr: int) -> "_FdeIndex":
        cfi = CallFrameInfo(io.BytesIO(data), len(data), addr, _STRUCTS, for_eh_frame=True)
        index = _hdr_search_table(hdr, hdr_addr, addr) if hdr else None
        if index is None:
            return cls.from_all_entries(cfi)
        return cls(cfi, *index)

    @classmethod
    def from_all_entries(cls, cfi: CallFrameInfo) -> "_FdeIndex":
        """Full parse: only when there is no usable .eh_frame_hdr (slow for libc)."""
        fdes = sorted((e for e in cfi.get_entries() if isinstance(e, FDE)),
                      key=lambda f: f["initial_location"])
        return cls(cfi, [f["initial_location"] for f in fdes], [f.offset for f in fdes], fdes)

    def row(self, vaddr: int) -> _Row | None:
        try:
            return self._row(vaddr)
        except Exception as e:  # pyelftools on a malformed FDE (foreign data)
            raise _Unsupported(f"cannot parse CFI at {vaddr:#x}: {e}") from None

    def _row(self, vaddr: int) -> _Row | None:
        i = bisect_right(self._starts, vaddr) - 1
        if i < 0:
            return None
        fde = self._fdes[i]
        if fde is None:
            # pyelftools has no public "parse the entry at offset"; the private
            # one is what get_entries() itself uses, and keeps this lazy.
            fde = self._cfi._parse_entry_at(self._offsets[i])
            if not isinstance(fde, FDE):
                return None
            self._fdes[i] = fde
        start = fde["initial_location"]
        if not start <= vaddr < start + fde["address_range"]:
            return None
        pcs, rows = self._tables.get(fde.offset) or self._decode(fde)
        j = bisect_right(pcs, vaddr) - 1
        return rows[j] if j >= 0 else None

    def _decode(self, fde: FDE) -> tuple[list[int], list[_Row]]:
        signal = b"S" in (fde.cie.header.get("augmentation") or b"")
        lines = fde.get_decoded().table
        pcs = [line["pc"] for line in lines]
        rows = [_Row(line["cfa"], {k: v for k, v in line.items() if isinstance(k, int)}, signal)
                for line in lines]
        self._tables[fde.offset] = (pcs, rows)
        return pcs, rows


def _hdr_search_table(hdr: bytes, hdr_addr: int, eh_addr: int) -> tuple[list[int], list[int]] | None:
    """The sorted (initial_location, FDE) table of .eh_frame_hdr (LSB 3.0
    'eh_frame_hdr'), which pyelftools does not read. Only the encoding every
    GNU linker emits is accepted; anything else means a full parse."""
    if len(hdr) < 4:
        return None
    version, ptr_enc, count_enc, table_enc = hdr[:4]
    ptr_size = {0x03: 4, 0x0B: 4, 0x1B: 4, 0x00: 8, 0x04: 8, 0x0C: 8, 0x1C: 8}.get(ptr_enc)
    # fde_count udata4, table datarel|sdata4 (relative to the start of .eh_frame_hdr)
    if version != 1 or ptr_size is None or count_enc != 0x03 or table_enc != 0x3B:
        return None
    pos = 4 + ptr_size
    (count,) = struct.unpack_from("<I", hdr, pos)
    raw = hdr[pos + 4: pos + 4 + 8 * count]
    if len(raw) != 8 * count:
        return None
    table = array("i", raw)
    starts = [hdr_addr + v for v in table[0::2]]
    offsets = [hdr_addr + v - eh_addr for v in table[1::2]]
    if any(a > b for a, b in zip(starts, starts[1:])):
        return None
    return starts, offsets


class _ObjectCfi:
    """CFI of one ELF image (a file, or the vdso read from the target)."""

    def __init__(self, open_image: Callable[[], IO[bytes]]) -> None:
        self._open = open_image
        with open_image() as f:
            elf = ELFFile(f)
            self.loads = [(s["p_vaddr"], s["p_offset"], s["p_filesz"])
                          for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
            eh = elf.get_section_by_name(".eh_frame")
            hdr = elf.get_section_by_name(".eh_frame_hdr")
            self._eh = None
            if eh is not None and eh["sh_type"] != "SHT_NOBITS":
                self._eh = _FdeIndex.from_eh_frame(
                    eh.data(), eh["sh_addr"], hdr.data() if hdr is not None else None,
                    hdr["sh_addr"] if hdr is not None else 0)
            self._has_debug_frame = elf.get_section_by_name(".debug_frame") is not None
        self._debug: _FdeIndex | None = None

    def row(self, vaddr: int) -> _Row | None:
        row = self._eh.row(vaddr) if self._eh is not None else None
        if row is None and self._has_debug_frame:
            row = self._debug_index().row(vaddr)
        return row

    def _debug_index(self) -> _FdeIndex:
        if self._debug is None:
            try:
                with self._open() as f:
                    sec = ELFFile(f).get_section_by_name(".debug_frame")
                    data = sec.data()
                cfi = CallFrameInfo(io.BytesIO(data), len(data), sec["sh_addr"], _STRUCTS)
                self._debug = _FdeIndex.from_all_entries(cfi)
            except Exception:  # malformed or vanished file: no .debug_frame after all
                self._debug = _FdeIndex(None, [], [])
        return self._debug

    def bias(self, mappings: list[Mapping]) -> int | None:
        """Load bias from the file offset of a mapping and the PT_LOAD holding it."""
        for m in mappings:
            for vaddr, off, filesz in self.loads:
                if off - off % PAGE_SIZE <= m.offset < max(off + filesz, off - off % PAGE_SIZE + 1):
                    return m.start - (vaddr - off + m.offset)
        return None


# Shared by every Unwinder: parsing is what costs, files rarely change.
# Key: (st_dev, st_ino, st_size, st_mtime_ns) or ("vdso", image bytes).
_CACHE: dict[tuple, _ObjectCfi | None] = {}


def _load(key: tuple, open_image: Callable[[], IO[bytes]]) -> _ObjectCfi | None:
    if key not in _CACHE:
        try:
            _CACHE[key] = _ObjectCfi(open_image)
        except Exception:  # a foreign, possibly malformed ELF: no CFI, not a crash
            _CACHE[key] = None
    return _CACHE[key]


def clear_cache() -> None:
    _CACHE.clear()


# --------------------------------------------------------------------------
# The unwinder
# --------------------------------------------------------------------------
class Unwinder:
    def __init__(self, pid: int, mem: RemoteMemory, maps: list[Mapping]) -> None:
        self.pid = pid
        self.mem = mem
        self._maps = sorted(maps, key=lambda m: m.start)
        self._starts = [m.start for m in self._maps]
        self._files = {mf.path: mf for mf in mapped_files(pid, self._maps)}
        # per mapped path: (tables, load bias), resolved on first pc inside it
        self._objects: dict[str, tuple[_ObjectCfi, int] | None] = {}

    def preload(self) -> None:
        """Parse the CFI index of every executable mapping now, so that a
        later unwind() inside a stop window finds the cache warm."""
        for m in self._maps:
            if m.executable and m.path not in self._objects:
                self._objects[m.path] = self._resolve(m)

    def unwind(self, regs: dict[str, int], max_frames: int = 256) -> tuple[list[Frame], bool]:
        """Walk the stack of a stopped thread from its registers. Returns the
        frames and whether the walk ended at the outermost frame; False means
        it stopped early (no CFI, unreadable or corrupt stack, max_frames) and
        the caller must not rely on having seen every return address."""
        cur = {n: regs[name] & _MASK for n, name in enumerate(_DWARF_REGS) if name in regs}
        frames: list[Frame] = []
        exact = True  # frame 0, and frames a signal interrupted, hold an exact pc
        seen: set[tuple[int, int]] = set()
        mem = _PageReader(self.mem)
        try:
            while len(frames) < max_frames:
                pc, sp = cur.get(_RIP), cur.get(_RSP)
                if pc is None or sp is None:
                    return frames, False
                # a return address may point past a noreturn call: look up the call
                row = self._row(pc if exact else pc - 1)
                if row is None:
                    frames.append(Frame(pc, None, sp))
                    return frames, False
                cfa = self._cfa(row.cfa, cur, mem)
                frames.append(Frame(pc, cfa, sp))
                ra = row.rules.get(_RIP)
                if ra is None:
                    return frames, False
                if ra.type == RegisterRule.UNDEFINED:
                    return frames, True  # outermost frame (_start, clone3's child)
                if not row.signal and cfa <= sp:
                    return frames, False  # callers live above: the stack is corrupt
                cur = self._caller_regs(row, cur, cfa, mem)
                npc = cur.get(_RIP)
                if npc == 0:
                    return frames, True
                key = (npc, cur.get(_RSP, 0))
                if npc is None or key in seen:
                    return frames, False
                seen.add(key)
                exact = row.signal
            return frames, False
        except (RemoteError, _Unsupported):
            return frames, False

    # -- rules ---------------------------------------------------------------
    @staticmethod
    def _cfa(rule: CFARule, regs: dict[int, int], mem: _PageReader) -> int:
        if rule.expr is not None:
            return _eval(rule.expr, regs, mem)
        if rule.reg is None or rule.reg not in regs:
            raise _Unsupported(f"CFA rule {rule}")
        return (regs[rule.reg] + rule.offset) & _MASK

    @staticmethod
    def _caller_regs(row: _Row, cur: dict[int, int], cfa: int, mem: _PageReader) -> dict[int, int]:
        # Registers without a rule keep their value (libgcc's convention);
        # the caller's rsp is the CFA unless a rule says otherwise.
        nxt = dict(cur)
        nxt[_RSP] = cfa
        saved = _read_saved(row, cfa, mem)
        for reg, rule in row.rules.items():
            if reg > _RIP:
                continue
            kind = rule.type
            if kind == RegisterRule.OFFSET:
                nxt[reg] = saved[rule.arg]
            elif kind == RegisterRule.VAL_OFFSET:
                nxt[reg] = (cfa + rule.arg) & _MASK
            elif kind == RegisterRule.REGISTER:
                if rule.arg not in cur:
                    raise _Unsupported(f"register rule r{reg}=r{rule.arg} (unknown)")
                nxt[reg] = cur[rule.arg]
            elif kind == RegisterRule.SAME_VALUE:
                pass
            elif kind == RegisterRule.UNDEFINED:
                nxt.pop(reg, None)
            elif kind == RegisterRule.EXPRESSION:
                nxt[reg] = mem.read_u64(_eval(rule.arg, cur, mem, cfa))
            elif kind == RegisterRule.VAL_EXPRESSION:
                nxt[reg] = _eval(rule.arg, cur, mem, cfa)
            else:
                raise _Unsupported(f"register rule {rule}")
        return nxt

    # -- objects -------------------------------------------------------------
    def _row(self, pc: int) -> _Row | None:
        i = bisect_right(self._starts, pc) - 1
        if i < 0 or pc not in self._maps[i]:
            return None
        m = self._maps[i]
        if m.path not in self._objects:
            self._objects[m.path] = self._resolve(m)
        obj = self._objects[m.path]
        if obj is None:
            return None
        cfi, bias = obj
        return cfi.row(pc - bias)

    def _resolve(self, m: Mapping) -> tuple[_ObjectCfi, int] | None:
        if m.path == "[vdso]":
            mappings = [m]
            try:
                image = self.mem.read(m.start, m.end - m.start)
            except RemoteError:
                return None
            cfi = _load(("vdso", image), lambda: io.BytesIO(image))
        else:
            mf = self._files.get(m.path.removesuffix(" (deleted)"))
            if mf is None:
                return None  # anonymous code (JIT, patch code): no CFI
            mappings = mf.mappings
            cfi = self._file_cfi(mf, m)
        if cfi is None:
            return None
        bias = cfi.bias(mappings)
        return None if bias is None else (cfi, bias)

    def _file_cfi(self, mf: MappedFile, m: Mapping) -> _ObjectCfi | None:
        # Prefer the path (cache hits across processes); if the file on disk
        # is not the one mapped (replaced, deleted), open the mapped one.
        candidates = [host_path(self.pid, mf.path), f"/proc/{self.pid}/map_files/{m.start:x}-{m.end:x}"]
        for path in candidates:
            try:
                st = os.stat(path)
            except OSError:
                continue
            if st.st_ino != m.inode:
                continue
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            return _load(key, lambda p=path: open(p, "rb"))
        return None


# --------------------------------------------------------------------------
# DWARF expressions
# --------------------------------------------------------------------------
_PARSED: dict[tuple[int, ...], list[DWARFExprOp]] = {}


def _parse_expr(expr: tuple[int, ...]) -> list[DWARFExprOp]:
    ops = _PARSED.get(expr)
    if ops is None:
        try:
            ops = _PARSED[expr] = _EXPR_PARSER.parse_expr(expr)
        except Exception as e:  # malformed bytes from a foreign file
            raise _Unsupported(f"bad DWARF expression: {e}") from None
    return ops


def _read_saved(row: _Row, cfa: int, mem: _PageReader) -> dict[int, int]:
    """Every 'saved at CFA+N' slot of a row, in one remote read."""
    offs = [r.arg for k, r in row.rules.items() if k <= _RIP and r.type == RegisterRule.OFFSET]
    if not offs:
        return {}
    lo, hi = min(offs), max(offs) + 8
    if hi - lo > PAGE_SIZE:
        return {o: mem.read_u64((cfa + o) & _MASK) for o in offs}
    data = mem.read((cfa + lo) & _MASK, hi - lo)
    return {o: int.from_bytes(data[o - lo: o - lo + 8], "little") for o in offs}


def _eval(expr: list[int], regs: dict[int, int], mem: _PageReader, push: int | None = None) -> int:
    """A DWARF expression of the kinds CFI uses (PLT CFA, signal frames)."""
    stack = [] if push is None else [push]
    for op in _parse_expr(tuple(expr)):
        _step(op, stack, regs, mem)
    if not stack:
        raise _Unsupported("empty DWARF expression")
    return stack[-1] & _MASK


def _signed(v: int) -> int:
    v &= _MASK
    return v - (1 << 64) if v >> 63 else v


_BINARY: dict[str, Callable[[int, int], int]] = {
    "DW_OP_plus": lambda a, b: a + b,
    "DW_OP_minus": lambda a, b: a - b,
    "DW_OP_mul": lambda a, b: a * b,
    "DW_OP_and": lambda a, b: a & b,
    "DW_OP_or": lambda a, b: a | b,
    "DW_OP_xor": lambda a, b: a ^ b,
    "DW_OP_shl": lambda a, b: a << b if b < 64 else 0,
    "DW_OP_shr": lambda a, b: a >> b,
    "DW_OP_ge": lambda a, b: int(_signed(a) >= _signed(b)),
    "DW_OP_gt": lambda a, b: int(_signed(a) > _signed(b)),
    "DW_OP_le": lambda a, b: int(_signed(a) <= _signed(b)),
    "DW_OP_lt": lambda a, b: int(_signed(a) < _signed(b)),
    "DW_OP_eq": lambda a, b: int(a == b),
    "DW_OP_ne": lambda a, b: int(a != b),
}


def _step(op: DWARFExprOp, stack: list[int], regs: dict[int, int], mem: _PageReader) -> None:
    name, args = op.op_name, op.args
    try:
        if name.startswith("DW_OP_breg") and name != "DW_OP_bregx":
            stack.append((regs[int(name[10:])] + args[0]) & _MASK)
        elif name == "DW_OP_bregx":
            stack.append((regs[args[0]] + args[1]) & _MASK)
        elif name.startswith("DW_OP_lit"):
            stack.append(int(name[9:]))
        elif name.startswith("DW_OP_const"):
            stack.append(args[0] & _MASK)
        elif name == "DW_OP_plus_uconst":
            stack.append((stack.pop() + args[0]) & _MASK)
        elif name == "DW_OP_deref":
            stack.append(mem.read_u64(stack.pop()))
        elif name == "DW_OP_dup":
            stack.append(stack[-1])
        elif name == "DW_OP_drop":
            stack.pop()
        elif name == "DW_OP_swap":
            stack[-1], stack[-2] = stack[-2], stack[-1]
        elif name == "DW_OP_over":
            stack.append(stack[-2])
        elif name == "DW_OP_neg":
            stack.append(-stack.pop() & _MASK)
        elif name == "DW_OP_not":
            stack.append(~stack.pop() & _MASK)
        elif name in _BINARY:
            b, a = stack.pop(), stack.pop()
            stack.append(_BINARY[name](a, b) & _MASK)
        else:
            raise _Unsupported(f"DWARF op {name}")
    except (KeyError, IndexError):
        raise _Unsupported(f"cannot evaluate {name} (unknown register or empty stack)") from None
