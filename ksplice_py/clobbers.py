"""Which call-clobbered registers a function really leaves intact.

At -O2, gcc's interprocedural register allocation (-fipa-ra) lets the
callers of a function whose body it knows (one that binds locally: static,
hidden, or in the executable) keep values in call-clobbered registers the
callee is known not to write. A replacement that follows the ABI but writes
such a register corrupts those callers. This module computes, with capstone:

* ``preserved_by(...)``: the call-clobbered registers the original function,
  and everything it calls transitively, never writes -- what callers may
  rely on. Over-approximating it is the safe direction (we then save more),
  so code we cannot see (a call without a symbol, a jump table) is ignored;
  an indirect call or a call through the PLT means gcc assumed every
  register clobbered, so nothing is relied on.
* ``written_by(...)``: the call-clobbered registers a replacement may write,
  by recursive descent over the patch's code. Here over-approximating is
  safe too: anything we cannot follow (an import, an indirect branch) counts
  as writing every register.
* ``takes_stack_arguments(...)``: whether the original reads its caller's
  frame (arguments passed on the stack); a register-saving thunk moves the
  stack, so it can only stand in front of a function that does not.

Tracked: the nine call-clobbered general registers and xmm0-15 (their low
128 bits). Upper halves of ymm/zmm, xmm16-31, mask and x87 registers are
not: gcc only keeps values there across calls in AVX/AVX-512/x87 code.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import capstone
from capstone import x86

from . import x86relocator as rel

GPRS = ("rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11")
XMMS = tuple(f"xmm{i}" for i in range(16))
CALL_CLOBBERED = frozenset(GPRS + XMMS)

_FAMILY: dict[str, str] = {}
for _r64, _subs in (("rax", "eax ax al ah"), ("rcx", "ecx cx cl ch"), ("rdx", "edx dx dl dh"),
                    ("rsi", "esi si sil"), ("rdi", "edi di dil")):
    for _n in (_r64, *_subs.split()):
        _FAMILY[_n] = _r64
for _i in range(8, 12):
    for _n in (f"r{_i}", f"r{_i}d", f"r{_i}w", f"r{_i}b"):
        _FAMILY[_n] = f"r{_i}"
for _i in range(16):
    for _n in (f"xmm{_i}", f"ymm{_i}", f"zmm{_i}"):
        _FAMILY[_n] = f"xmm{_i}"

# Writes capstone's tables omit (checked against the SDM).
_IMPLICIT_WRITES = {
    x86.X86_INS_SYSCALL: {"rax", "rcx", "r11"},
    x86.X86_INS_INT: {"rax"},
    x86.X86_INS_CMPXCHG: {"rax"},
    x86.X86_INS_FXRSTOR: set(XMMS), x86.X86_INS_FXRSTOR64: set(XMMS),
    x86.X86_INS_XRSTOR: set(XMMS), x86.X86_INS_XRSTOR64: set(XMMS),
    x86.X86_INS_XRSTORS: set(XMMS), x86.X86_INS_XRSTORS64: set(XMMS),
}
# vzeroupper clears only the upper halves, which we do not track.
_NO_TRACKED_WRITES = {x86.X86_INS_VZEROUPPER}
_STOPS = {x86.X86_INS_RET, x86.X86_INS_HLT, x86.X86_INS_UD2, x86.X86_INS_INT3}
_MAX_FUNCTIONS = 512  # transitive callees looked at; stopping early only saves more
_MAX_INSNS = 200_000

ReadCode = Callable[[int, int], bytes]


def written(insn: capstone.CsInsn) -> set[str]:
    """The tracked registers one instruction writes (implicit ones included)."""
    if insn.id in _NO_TRACKED_WRITES:
        return set()
    out = {f for r in insn.regs_access()[1] if (f := _FAMILY.get(insn.reg_name(r)))}
    return out | _IMPLICIT_WRITES.get(insn.id, set())


def _is_jump(insn: capstone.CsInsn) -> bool:
    return insn.group(capstone.CS_GRP_JUMP)


def _indirect(insn: capstone.CsInsn) -> bool:
    return (rel.is_call(insn) or _is_jump(insn)) and rel.direct_target(insn) is None


# --- the original ----------------------------------------------------------------
def preserved_by(entry: int, extent_of: Callable[[int], tuple[int, bytes] | None],
                 is_import: Callable[[int], bool]) -> frozenset[str]:
    """Call-clobbered registers that the function at ``entry`` and its callees
    never write. ``extent_of(addr)`` gives (start, code) of the function
    holding ``addr`` (None if unknown); ``is_import(addr)``: a PLT entry."""
    seen: set[int] = set()
    todo = [entry]
    clobbered: set[str] = set()
    while todo and len(seen) < _MAX_FUNCTIONS:
        found = extent_of(todo.pop())
        if found is None or found[0] in seen:
            continue  # code without a symbol: ignored (saves more, never less)
        start, code = found
        seen.add(start)
        for insn in rel.disasm(code, start):
            clobbered |= written(insn)
            target = rel.direct_target(insn)
            if rel.is_call(insn) and target is None:
                return frozenset()  # an unknown callee: gcc assumed everything clobbered
            if target is None or start <= target < start + len(code):
                continue
            if is_import(target):
                return frozenset()
            if rel.is_call(insn) or _is_jump(insn):  # a callee, a tail call, a .cold part
                todo.append(target)
    return frozenset(CALL_CLOBBERED - clobbered)


# --- the replacement -------------------------------------------------------------
def written_by(entry: int, read: ReadCode, code_range: tuple[int, int]) -> frozenset[str]:
    """Call-clobbered registers the code reachable from ``entry`` (inside
    ``code_range``, read with ``read``) may write; every one of them when
    it leaves what we can follow."""
    lo, hi = code_range
    seen: set[int] = set()
    todo = [entry]
    out: set[str] = set()
    while todo:
        addr = todo.pop()
        while addr not in seen:
            if not lo <= addr < hi or len(seen) > _MAX_INSNS:
                return CALL_CLOBBERED
            insns = rel.disasm(read(addr, min(16, hi - addr)), addr)
            if not insns:
                return CALL_CLOBBERED  # undecodable
            insn = insns[0]
            seen.add(addr)
            out |= written(insn)
            if _indirect(insn):
                return CALL_CLOBBERED  # an import through the PLT, a pointer, a jump table
            if insn.id in _STOPS:
                break
            target = rel.direct_target(insn)
            if target is not None:
                todo.append(target)
                if insn.id == x86.X86_INS_JMP:
                    break
            addr = insn.address + insn.size
    return frozenset(out)


# --- stack arguments -------------------------------------------------------------
def takes_stack_arguments(code: bytes, addr: int) -> str | None:
    """None when the function provably never touches its caller's frame
    (the stack arguments, above its return address); else why it may."""
    insns = {i.address: i for i in rel.disasm(code, addr)}
    seen: set[int] = set()
    # (address, bytes pushed since entry, rbp's distance below the entry rsp or None)
    todo: list[tuple[int, int, int | None]] = [(addr, 0, None)]
    while todo:
        at, depth, rbp = todo.pop()
        while at not in seen:
            insn = insns.get(at)
            if insn is None:
                return f"its code at {at:#x} cannot be followed"
            seen.add(at)
            why = _reads_caller_frame(insn, depth, rbp)
            if why:
                return why
            if _indirect(insn) and not rel.is_call(insn):
                return f"`{rel.insn_text(insn)}` at {at:#x} jumps to code that cannot be followed"
            step = _stack_effect(insn, depth, rbp)
            if step is None:
                return f"`{rel.insn_text(insn)}` at {at:#x} moves the stack pointer in a way not tracked"
            depth, rbp = step
            if insn.id in _STOPS:
                break
            target = rel.direct_target(insn)
            if target is not None and not rel.is_call(insn):
                if addr <= target < addr + len(code):
                    todo.append((target, depth, rbp))
                if insn.id == x86.X86_INS_JMP:
                    break  # a tail call: arguments are read by the callee, checked below
            at = insn.address + insn.size
    return None


def _reads_caller_frame(insn: capstone.CsInsn, depth: int, rbp: int | None) -> str | None:
    """An operand addressing entry_rsp + 8 or above (the first stack argument)."""
    for op in insn.operands:
        if op.type != x86.X86_OP_MEM:
            continue
        base, disp = op.mem.base, op.mem.disp
        if base == x86.X86_REG_RSP:
            offset = disp - depth
        elif base == x86.X86_REG_RBP and rbp is not None:
            offset = disp - rbp
        else:
            continue
        if offset >= 8 or (op.mem.index != x86.X86_REG_INVALID and offset >= 0):
            return f"`{rel.insn_text(insn)}` at {insn.address:#x} reads its caller's frame"
    return None


def _stack_effect(insn: capstone.CsInsn, depth: int, rbp: int | None) -> tuple[int, int | None] | None:
    """(depth, rbp) after ``insn``; None when rsp changes in a way we do not track."""
    iid, ops = insn.id, insn.operands
    if iid == x86.X86_INS_PUSH:
        return depth + 8, rbp
    if iid == x86.X86_INS_POP:
        popped = ops[0].reg if ops and ops[0].type == x86.X86_OP_REG else None
        return depth - 8, (None if popped == x86.X86_REG_RBP else rbp)
    if iid in (x86.X86_INS_SUB, x86.X86_INS_ADD) and _is_reg(ops, 0, x86.X86_REG_RSP):
        if len(ops) == 2 and ops[1].type == x86.X86_OP_IMM:
            return depth + (ops[1].imm if iid == x86.X86_INS_SUB else -ops[1].imm), rbp
        return None
    if iid == x86.X86_INS_MOV and _is_reg(ops, 0, x86.X86_REG_RBP) and _is_reg(ops, 1, x86.X86_REG_RSP):
        return depth, depth  # frame pointer set up: rbp = entry_rsp - depth
    if iid == x86.X86_INS_MOV and _is_reg(ops, 0, x86.X86_REG_RSP) and _is_reg(ops, 1, x86.X86_REG_RBP):
        return (rbp, rbp) if rbp is not None else None
    if iid == x86.X86_INS_LEAVE:
        return (rbp - 8, None) if rbp is not None else None
    if iid in (x86.X86_INS_CALL, x86.X86_INS_RET):
        return depth, rbp  # balanced / path ends
    rsp_written = any(insn.reg_name(r) in ("rsp", "esp", "sp") for r in insn.regs_access()[1])
    if rsp_written:
        return None
    if rbp is not None and any(insn.reg_name(r) in ("rbp", "ebp") for r in insn.regs_access()[1]):
        return depth, None  # rbp reused as a general register
    return depth, rbp


def _is_reg(ops: Iterable, i: int, reg: int) -> bool:
    ops = list(ops)
    return len(ops) > i and ops[i].type == x86.X86_OP_REG and ops[i].reg == reg


def describe(regs: Iterable[str]) -> str:
    order = {r: i for i, r in enumerate(GPRS + XMMS)}
    return ", ".join(sorted(regs, key=order.__getitem__))
