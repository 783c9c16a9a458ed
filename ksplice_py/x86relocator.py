"""Copy whole x86-64 instructions to a new address, fixing what is position dependent.

Two things in a prologue depend on where it runs: RIP-relative memory operands
(their disp32 is relative to the next instruction) and relative branches
(jmp/jcc/call rel8/rel32). Everything else is copied byte for byte. Decoding is
capstone's (detail mode); encoding of branches is x86writer's.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import capstone
from capstone import x86

from . import x86writer as w
from .errors import TrampolineError

_U64 = (1 << 64) - 1

_CS = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_CS.detail = True

# The 4-bit condition code of each jcc, as in the 0x70+cc / 0x0f 0x80+cc opcodes.
_JCC_CC = {
    x86.X86_INS_JO: 0x0, x86.X86_INS_JNO: 0x1, x86.X86_INS_JB: 0x2, x86.X86_INS_JAE: 0x3,
    x86.X86_INS_JE: 0x4, x86.X86_INS_JNE: 0x5, x86.X86_INS_JBE: 0x6, x86.X86_INS_JA: 0x7,
    x86.X86_INS_JS: 0x8, x86.X86_INS_JNS: 0x9, x86.X86_INS_JP: 0xA, x86.X86_INS_JNP: 0xB,
    x86.X86_INS_JL: 0xC, x86.X86_INS_JGE: 0xD, x86.X86_INS_JLE: 0xE, x86.X86_INS_JG: 0xF,
}


@dataclass(frozen=True)
class Relocated:
    code: bytes
    consumed: int  # bytes of the original covered by the copied instructions


def disasm(code: bytes, addr: int) -> list[capstone.CsInsn]:
    """Linear decode of `code` at `addr`; stops at the first byte capstone cannot decode."""
    return list(_CS.disasm(code, addr))


def insn_text(insn: capstone.CsInsn) -> str:
    return f"{insn.mnemonic} {insn.op_str}".strip()


def direct_target(insn: capstone.CsInsn) -> int | None:
    """The target of a direct (immediate) branch, call, loop or xbegin; None otherwise."""
    if not insn.group(capstone.CS_GRP_BRANCH_RELATIVE):
        return None
    ops = insn.operands
    if len(ops) != 1 or ops[0].type != x86.X86_OP_IMM:
        return None
    return ops[0].imm & _U64


def condition_code(insn: capstone.CsInsn) -> int | None:
    """The 4-bit condition code of a jcc, None for anything else."""
    return _JCC_CC.get(insn.id)


def jump_destination(code: bytes, addr: int) -> int | None:
    """Where the direct ``jmp`` at ``addr`` goes, if ``code`` starts with one
    (a trampoline, ours or another tool's)."""
    first = next(_CS.disasm(code[:16], addr, 1), None)
    if first is None or first.id != x86.X86_INS_JMP:
        return None
    return direct_target(first)


def is_call(insn: capstone.CsInsn) -> bool:
    return insn.id == x86.X86_INS_CALL


def rip_operand(insn: capstone.CsInsn):
    """The RIP-relative memory operand of `insn`, if any (an instruction has at most one)."""
    for op in insn.operands:
        if op.type == x86.X86_OP_MEM and op.mem.base == x86.X86_REG_RIP:
            return op
    return None


def decode_covering(code: bytes, src: int, min_len: int) -> list[capstone.CsInsn]:
    """The fewest whole instructions at the start of `code` covering >= min_len bytes."""
    out: list[capstone.CsInsn] = []
    covered = 0
    for insn in _CS.disasm(code, src):
        out.append(insn)
        covered += insn.size
        if covered >= min_len:
            return out
    if covered == len(code):
        reason = f"the code ends after {covered} bytes, {min_len} are needed"
        raise TrampolineError(f"cannot relocate at {src:#x}: {reason}",
                              insn_addr=src + covered, reason=reason, text="")
    bad = code[covered:covered + 15].hex(" ")
    reason = f"capstone cannot decode it (bytes {bad})"
    raise TrampolineError(f"cannot relocate the instruction at {src + covered:#x}: {reason}",
                          insn_addr=src + covered, reason=reason, text="")


def _refuse(insn: capstone.CsInsn, reason: str) -> TrampolineError:
    return TrampolineError(
        f"cannot relocate `{insn_text(insn)}` at {insn.address:#x}: {reason}",
        insn_addr=insn.address, reason=reason, text=insn_text(insn))


def _relocate_branch(insn: capstone.CsInsn, target: int, at: int,
                     copied: range) -> bytes:
    if 0x66 in insn.prefix:
        # 16-bit branch forms: Intel and AMD disagree on what they do.
        raise _refuse(insn, "an operand-size prefixed branch cannot be relocated")
    if target in copied:
        # It would have to land in the copy, whose layout changes as branches grow.
        raise _refuse(insn, f"it branches into the relocated bytes (to {target:#x})")
    # Prefixes (bnd, branch hints) are dropped: they do not change where it goes.
    if insn.id == x86.X86_INS_JMP:
        return w.jmp_best(at, target)
    if insn.id == x86.X86_INS_CALL:
        # Same target, returning into the copy (the next copied instruction).
        return w.call_best(at, target)
    cc = _JCC_CC.get(insn.id)
    if cc is not None:
        return w.jcc_best(cc, at, target)
    # loop*, jrcxz/jecxz, xbegin: rel8-only or with side effects, no far form.
    raise _refuse(insn, "this branch has no relocatable form")


def _relocate_rip(insn: capstone.CsInsn, op, at: int) -> bytes:
    target = (insn.address + insn.size + op.mem.disp) & _U64
    new_disp = w.rel32(at + insn.size, target)
    if new_disp is None:
        raise _refuse(insn, f"its RIP-relative operand (to {target:#x}) is out of "
                            f"±2 GiB reach from {at:#x}")
    raw = bytearray(insn.bytes)
    off = insn.disp_offset
    # RIP-relative operands always carry a disp32; capstone under-reports
    # disp_size for some SSE forms (movdqa: 2), so check the bytes instead.
    if off == 0 or off + 4 > len(raw) or struct.unpack_from("<i", raw, off)[0] != op.mem.disp:
        raise _refuse(insn, "capstone reports no disp32 field for its RIP-relative operand")
    raw[off:off + 4] = struct.pack("<i", new_disp)
    return bytes(raw)


def relocate_one(insn: capstone.CsInsn, at: int, copied: range) -> bytes:
    """`insn` re-encoded to run at `at`. `copied` = original addresses being moved."""
    target = direct_target(insn)
    if target is not None:
        return _relocate_branch(insn, target, at, copied)
    if insn.group(capstone.CS_GRP_BRANCH_RELATIVE):
        raise _refuse(insn, "relative branch with an unexpected operand")
    op = rip_operand(insn)
    if op is not None:
        return _relocate_rip(insn, op, at)
    return bytes(insn.bytes)


def relocate(code: bytes, src: int, dst: int, min_len: int) -> Relocated:
    """Copy the fewest whole instructions of `code` (at `src`) covering >= min_len
    bytes, re-encoded to run at `dst`. Does not append the jump back."""
    insns = decode_covering(code, src, min_len)
    consumed = sum(i.size for i in insns)
    copied = range(src, src + consumed)
    out = bytearray()
    for insn in insns:
        out += relocate_one(insn, dst + len(out), copied)
    return Relocated(bytes(out), consumed)


def relocated_size_bound(code: bytes, src: int, min_len: int) -> int:
    """Upper bound of len(relocate(code, src, dst, min_len).code) for any dst."""
    bound = 0
    for insn in decode_covering(code, src, min_len):
        if direct_target(insn) is None:
            bound += insn.size  # RIP-relative ones keep their size (or are refused)
        elif insn.id == x86.X86_INS_JMP:
            bound += w.JMP_ABS_LEN
        elif insn.id == x86.X86_INS_CALL:
            bound += w.CALL_ABS_LEN
        else:
            bound += w.JCC_ABS_LEN
    return bound
