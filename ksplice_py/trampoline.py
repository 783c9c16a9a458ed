"""Validate and plan the redirect of a function (the "interceptor" level).

A redirect overwrites the instructions covering the first 5 bytes of a function
with `jmp rel32` (padded with int3 up to the instruction boundary). It is safe
only if those bytes are whole instructions and nothing jumps into them, so we
decode the whole function with capstone and refuse, naming the reason, rather
than guess.

What is NOT checked (cannot be, from the function's bytes alone):
- indirect jumps into the window: jump tables, computed gotos, `jmp reg`;
- branches from *other* functions into the window (e.g. a tail call to f+2
  from a sibling, or hand-written asm with shared entry points);
- a thread currently executing inside the window: that is quiescence's job.
Nor is CET/IBT handled: an `endbr64` at the entry is overwritten like any
other instruction (Linux user space does not enforce IBT on these systems).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import x86relocator as rel
from . import x86writer as w
from .errors import TrampolineError


@dataclass(frozen=True)
class FunctionCode:
    name: str
    addr: int
    size: int
    code: bytes  # the function's bytes, [addr, addr + size)


@dataclass(frozen=True)
class Redirect:
    func: str
    addr: int
    old: bytes  # original bytes at addr, kept for revert
    new: bytes  # bytes to write at addr; len(new) == len(old)
    stub_addr: int | None  # near stub holding an absolute jmp, when dest is far
    stub: bytes


def _where(fn: FunctionCode, addr: int) -> str:
    return f"{fn.name}+{addr - fn.addr:#x}"


def _covered_len(fn: FunctionCode, window: int) -> int:
    """Validate `fn` for overwriting its first `window` bytes; return the length
    actually overwritten (the window rounded up to an instruction boundary)."""
    def refuse(reason: str) -> TrampolineError:
        return TrampolineError(f"cannot redirect {fn.name}: {reason}", func=fn.name)

    if fn.size == 0:
        raise refuse("its size is unknown (the symbol has no size), so the jump "
                     "cannot be checked")
    if fn.size < window:
        raise refuse(f"function is {fn.size} bytes, a jump needs {window}")
    if len(fn.code) < fn.size:
        raise refuse(f"only {len(fn.code)} of its {fn.size} bytes were read")

    insns = rel.disasm(fn.code[:fn.size], fn.addr)
    decoded = sum(i.size for i in insns)
    if decoded < fn.size:
        bad = fn.addr + decoded
        if decoded < window:
            raise refuse(f"cannot decode the instruction at {_where(fn, bad)}, "
                         f"inside the first {window} bytes")
        raise refuse(f"cannot decode the instruction at {_where(fn, bad)}, so "
                     f"branches into the first {window} bytes cannot be ruled out")

    covered = 0
    for insn in insns:
        if covered >= window:
            break
        covered += insn.size

    for insn in insns:
        target = rel.direct_target(insn)
        if target is not None and fn.addr < target < fn.addr + covered:
            raise refuse(f"instruction at {_where(fn, insn.address)} jumps into the "
                         f"first {covered} bytes (to {_where(fn, target)})")
    return covered


def check_window(fn: FunctionCode, window: int) -> None:
    """Raise TrampolineError, with the reason, if the first `window` bytes of
    `fn` cannot be overwritten safely."""
    _covered_len(fn, window)


def plan_redirect(fn: FunctionCode, dest: int, near_stub: int | None = None) -> Redirect:
    """The bytes that send every call of `fn` to `dest`. When `dest` is out of
    rel32 reach, jump to `near_stub` instead, which must then hold `stub`."""
    covered = _covered_len(fn, w.JMP_REL32_LEN)
    stub_addr: int | None = None
    stub = b""
    target = dest
    if not w.fits_rel32(fn.addr + w.JMP_REL32_LEN, dest):
        if near_stub is None:
            raise TrampolineError(
                f"cannot redirect {fn.name}: its replacement at {dest:#x} is more than "
                f"2 GiB away and no near stub page could be placed", func=fn.name)
        if not w.fits_rel32(fn.addr + w.JMP_REL32_LEN, near_stub):
            raise TrampolineError(
                f"cannot redirect {fn.name}: the near stub at {near_stub:#x} is more "
                f"than 2 GiB away too", func=fn.name)
        stub_addr, stub, target = near_stub, w.jmp_abs(dest), near_stub
    jmp = w.jmp_rel32(fn.addr, target)
    new = jmp + bytes([w.INT3]) * (covered - len(jmp))
    return Redirect(func=fn.name, addr=fn.addr, old=bytes(fn.code[:covered]), new=new,
                    stub_addr=stub_addr, stub=stub)


def _refuse_reentry(fn: FunctionCode, covered: int) -> None:
    """A jmp/jcc from the body back to the entry would, once `fn` is redirected,
    enter the wrapper again instead of looping in the original: refuse to wrap.
    (A *call* to the entry is real recursion and rightly goes through the wrapper;
    branches from inside the window are refused by the relocator.)"""
    for insn in rel.disasm(fn.code[:fn.size], fn.addr):
        if insn.address < fn.addr + covered or rel.is_call(insn):
            continue
        if rel.direct_target(insn) == fn.addr:
            raise TrampolineError(
                f"cannot wrap {fn.name}: instruction at {_where(fn, insn.address)} "
                f"jumps back to its entry, which would re-enter the wrapper",
                func=fn.name)


def plan_call_original(fn: FunctionCode, stub_addr: int) -> bytes:
    """The WRAP "call original" stub for `stub_addr`: the displaced prologue,
    relocated, then a jump back to the rest of the original."""
    covered = _covered_len(fn, w.JMP_REL32_LEN)
    _refuse_reentry(fn, covered)
    try:
        moved = rel.relocate(fn.code[:fn.size], fn.addr, stub_addr, w.JMP_REL32_LEN)
    except TrampolineError as e:
        insn_addr = fn.addr if e.insn_addr is None else e.insn_addr
        text = e.text or "instruction"
        raise TrampolineError(
            f"cannot wrap {fn.name}: `{text}` at {_where(fn, insn_addr)} cannot be "
            f"moved to the call-original stub: {e.reason or e}",
            func=fn.name) from e
    assert moved.consumed == covered
    back = w.jmp_best(stub_addr + len(moved.code), fn.addr + moved.consumed)
    return moved.code + back


def call_original_size_bound(fn: FunctionCode) -> int:
    """Upper bound of len(plan_call_original(fn, any_addr)), to reserve space
    before the stub's address is known. Validates the window like plan_redirect."""
    _covered_len(fn, w.JMP_REL32_LEN)
    return rel.relocated_size_bound(fn.code[:fn.size], fn.addr,
                                    w.JMP_REL32_LEN) + w.JMP_ABS_LEN
