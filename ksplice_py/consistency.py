"""Consistency models: what must hold for a switch to be written.

``strict`` (the default) is quiescence.py's rule: no thread executes, or
will return into, code the switch retires. A thread that is merely *in* a
short retired function is moved out of it (runout.py); others are waited for.

``new-calls`` is weaker, and a patch asks for it explicitly with
``HOTPATCH_CONSISTENCY("new-calls")``: only the bytes being overwritten
must be free of threads. Threads already inside a replaced function finish
its *old* body (and return through it); calls made after the switch run the
new code. It exists for functions that are never left — an event loop that
never returns, a syscall wrapper threads sit blocked in all day — which the
strict rule can never switch. The risk is the patch author's to judge: for a
while old and new code of the same function run side by side, so a fix that
changes a data structure's layout, a lock protocol or an invariant shared
between the two bodies is unsafe in this mode. See docs/hot-functions.md.
"""
from __future__ import annotations

from enum import Enum

from . import x86relocator as rel
from .errors import BadPatchFile, TrampolineError
from .quiescence import CodeRange


class Consistency(str, Enum):
    STRICT = "strict"
    NEW_CALLS = "new-calls"

    @property
    def describe(self) -> str:
        if self is Consistency.NEW_CALLS:
            return ("new-calls (weaker: threads already inside a replaced function "
                    "finish its old body)")
        return "strict"


def parse(text: str, where: str) -> Consistency:
    try:
        return Consistency(text)
    except ValueError:
        choices = ", ".join(repr(c.value) for c in Consistency)
        raise BadPatchFile(f"{where}: unknown consistency {text!r} (one of {choices})") from None


def overwritten(addr: int, size: int, symbol: str) -> CodeRange:
    """The only code a new-calls switch must find free of threads."""
    return CodeRange(addr, addr + size, f"{symbol} (the bytes being overwritten)")


def check_no_reentry(name: str, addr: int, code: bytes, window: int) -> None:
    """new-calls: a thread left in the old body must never branch into the
    overwritten bytes (a loop back to the entry would enter the new code
    with the old body's state). A *call* to the entry is a new call: fine."""
    for insn in rel.disasm(code, addr):
        target = rel.direct_target(insn)
        if target is not None and not rel.is_call(insn) and addr <= target < addr + window \
                and insn.address >= addr + window:
            raise TrampolineError(
                f"cannot switch {name} with new-calls consistency: the instruction at "
                f"{insn.address:#x} branches back into the overwritten bytes; use strict consistency",
                func=name)
