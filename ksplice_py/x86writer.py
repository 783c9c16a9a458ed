"""Emit the few x86-64 instructions the patcher needs: branches, and the
handful the syscall-injection stub is made of (stub.py).

We use a small encoder of our own rather than keystone: every form we emit is
a fixed byte template with one little-endian field (rel32, disp32 or an
absolute .quad), so an assembler would add a native dependency and a text
round trip for no gain, and keystone cannot express "rel32 relative to an
address the code will live at" without assembling at that address anyway.
Each template is tested by decoding it back with capstone (tests/test_x86.py).
"""
from __future__ import annotations

import struct

JMP_REL32_LEN = 5
JMP_ABS_LEN = 14  # jmp qword [rip+0]; .quad dest
CALL_REL32_LEN = 5
CALL_ABS_LEN = 16  # call qword [rip+2]; jmp +8; .quad dest
JCC_REL32_LEN = 6
JCC_ABS_LEN = 2 + JMP_ABS_LEN  # inverted jcc rel8 over an absolute jmp

INT3 = 0xCC

_REL32_MIN = -(1 << 31)
_REL32_MAX = (1 << 31) - 1
_U64 = (1 << 64) - 1


def rel32(src_next: int, dest: int) -> int | None:
    """The rel32 that reaches `dest` from an instruction ending at `src_next`, or None."""
    delta = dest - src_next
    return delta if _REL32_MIN <= delta <= _REL32_MAX else None


def fits_rel32(src_next: int, dest: int) -> bool:
    return rel32(src_next, dest) is not None


def _rel32_or_raise(what: str, src_next: int, dest: int) -> int:
    delta = rel32(src_next, dest)
    if delta is None:
        raise ValueError(
            f"{what} to {dest:#x} from {src_next:#x} is out of rel32 range (±2 GiB)")
    return delta


def _quad(dest: int) -> bytes:
    if not 0 <= dest <= _U64:
        raise ValueError(f"address {dest:#x} is not a 64-bit address")
    return struct.pack("<Q", dest)


def jmp_rel32(at: int, dest: int) -> bytes:
    """`jmp rel32` placed at `at`. ValueError when `dest` is out of range."""
    return b"\xe9" + struct.pack("<i", _rel32_or_raise("jmp", at + JMP_REL32_LEN, dest))


def jmp_abs(dest: int) -> bytes:
    """`jmp qword [rip+0]; .quad dest`: reaches anywhere, valid at any address."""
    return b"\xff\x25\x00\x00\x00\x00" + _quad(dest)


def jmp_best(at: int, dest: int) -> bytes:
    """The short form when it reaches, else the absolute one."""
    if fits_rel32(at + JMP_REL32_LEN, dest):
        return jmp_rel32(at, dest)
    return jmp_abs(dest)


def call_rel32(at: int, dest: int) -> bytes:
    return b"\xe8" + struct.pack("<i", _rel32_or_raise("call", at + CALL_REL32_LEN, dest))


def call_abs(dest: int) -> bytes:
    """`call qword [rip+2]; jmp +8; .quad dest`: returns to the `jmp +8`, which skips the quad."""
    return b"\xff\x15\x02\x00\x00\x00" + b"\xeb\x08" + _quad(dest)


def call_best(at: int, dest: int) -> bytes:
    if fits_rel32(at + CALL_REL32_LEN, dest):
        return call_rel32(at, dest)
    return call_abs(dest)


def jcc_rel32(cc: int, at: int, dest: int) -> bytes:
    """`j<cc> rel32` (0f 80+cc). `cc` is the 4-bit condition code (4 = e/z)."""
    _check_cc(cc)
    return bytes((0x0F, 0x80 | cc)) + struct.pack(
        "<i", _rel32_or_raise("jcc", at + JCC_REL32_LEN, dest))


def jcc_abs(cc: int, dest: int) -> bytes:
    """`j<!cc> +14; jmp qword [rip+0]; .quad dest`: taken iff `cc` holds, valid anywhere."""
    _check_cc(cc)
    return bytes((0x70 | (cc ^ 1), JMP_ABS_LEN)) + jmp_abs(dest)


def jcc_best(cc: int, at: int, dest: int) -> bytes:
    if fits_rel32(at + JCC_REL32_LEN, dest):
        return jcc_rel32(cc, at, dest)
    return jcc_abs(cc, dest)


def _check_cc(cc: int) -> None:
    if not 0 <= cc <= 0xF:
        raise ValueError(f"condition code {cc} is not 0..15")


# -- the injection stub's instructions (stub.py) ----------------------------

SYSCALL = b"\x0f\x05"
POPFQ = b"\x9d"


def ret_imm16(skip: int) -> bytes:
    """`ret imm16`: rip := [rsp], then rsp += 8 + skip, in one instruction."""
    if not 0 <= skip <= 0xFFFF:
        raise ValueError(f"ret operand {skip} is not 0..65535")
    return b"\xc2" + struct.pack("<H", skip)


# --- a register-preserving thunk (gcc -fipa-ra; see clobbers.py) -------------------
RET = 0xC3
_GPR_NUM = {"rax": 0, "rcx": 1, "rdx": 2, "rbx": 3, "rsp": 4, "rbp": 5, "rsi": 6, "rdi": 7,
            **{f"r{i}": i for i in range(8, 16)}}
_XMM_SLOT = 16


def push(reg: str) -> bytes:
    n = _GPR_NUM[reg]
    return (b"\x41" if n >= 8 else b"") + bytes([0x50 + (n & 7)])


def pop(reg: str) -> bytes:
    """`pop <reg>` (58+r, REX.B for r8..r15). Not rsp: pop rsp is not a
    restore a stub may do half-way."""
    if reg not in _GPR_NUM or reg == "rsp":
        raise ValueError(f"cannot pop {reg!r}")
    n = _GPR_NUM[reg]
    return (b"\x41" if n >= 8 else b"") + bytes([0x58 + (n & 7)])


def add_rsp(imm: int) -> bytes:
    """`add rsp, imm32` (negative: a sub)."""
    return b"\x48\x81\xc4" + struct.pack("<i", imm)


def movdqu_to_stack(xmm: int, disp: int) -> bytes:
    """`movdqu [rsp+disp32], xmmN`."""
    return _movdqu(0x7F, xmm, disp)


def movdqu_from_stack(xmm: int, disp: int) -> bytes:
    """`movdqu xmmN, [rsp+disp32]`."""
    return _movdqu(0x6F, xmm, disp)


def _movdqu(op: int, xmm: int, disp: int) -> bytes:
    rex = b"\x44" if xmm >= 8 else b""  # REX.R extends the xmm number
    modrm = 0x84 | ((xmm & 7) << 3)  # mod=10 (disp32), rm=100 (SIB follows)
    return b"\xf3" + rex + bytes([0x0F, op, modrm, 0x24]) + struct.pack("<i", disp)


def preserving_thunk_bound(ngprs: int, nxmms: int) -> int:
    """Upper bound of len(preserving_thunk(...)) for these register counts."""
    return 2 * (2 * ngprs + 7 + 10 * nxmms) + CALL_ABS_LEN + 1


def preserving_thunk(at: int, dest: int, gprs: list[str], xmms: list[int]) -> bytes:
    """Code at `at` that saves `gprs` and `xmmN` (N in `xmms`, low 128 bits),
    calls `dest` with every argument register as it got them, restores the
    saved registers and returns. Only registers the replaced function never
    writes may be listed (clobbers.py), so no result is overwritten. `dest`
    sees the caller's rsp alignment (rsp = 8 mod 16 at its entry whenever the
    thunk had it), but its return address is further from any stack
    arguments: only for functions that take none."""
    xmm_area = _XMM_SLOT * len(xmms) + (0 if len(gprs) % 2 else 8)  # keeps rsp % 16
    code = b"".join(push(r) for r in gprs)
    code += add_rsp(-xmm_area) if xmm_area else b""
    code += b"".join(movdqu_to_stack(x, _XMM_SLOT * i) for i, x in enumerate(xmms))
    code += call_best(at + len(code), dest)
    code += b"".join(movdqu_from_stack(x, _XMM_SLOT * i) for i, x in enumerate(xmms))
    code += add_rsp(xmm_area) if xmm_area else b""
    code += b"".join(pop(r) for r in reversed(gprs))
    return code + bytes([RET])
