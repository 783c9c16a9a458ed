"""IFUNCs and the vDSO: is what a patch replaces what the process calls?

An IFUNC symbol (``libc.so.6:gettimeofday``, ``memcpy``) names a resolver
that ran once, at load or first call, and picked one implementation for this
process: the resolver itself is never called again, so replacing it changes
nothing, and replacing an implementation it did *not* pick changes nothing
either. glibc's time functions may even pick the kernel's vDSO, which we do
not patch. Each of these would be a success that does nothing, so each is
refused (exit 4) naming the implementation the process really uses.
"""
from __future__ import annotations

from collections.abc import Callable

from capstone import x86

from . import x86relocator as rel
from .errors import HotpatchError, PatchMismatch
from .symbols import Symbol, TargetSymbols

_MAX_RESOLVER = 1024  # bytes of a resolver we decode (glibc's are ~50-300)


def describe(syms: TargetSymbols, addr: int) -> str:
    """``object:function`` for an implementation's address."""
    f = syms.function_at(addr)
    if f is None:
        return f"an unnamed function at {addr:#x}"
    return f.qualified if f.addr == addr else f"{f.qualified}+{addr - f.addr:#x}"


def _in_vdso(syms: TargetSymbols, addr: int) -> bool:
    return syms.vdso is not None and syms.vdso.start <= addr < syms.vdso.end


def refuse_vdso(syms: TargetSymbols, sym: Symbol) -> None:
    if syms.vdso is not None and sym.object == syms.vdso.name:
        raise PatchMismatch(
            f"{sym.qualified} is in the vDSO, the kernel's code mapped into the process; "
            "it is not patched (patch the libc function that calls it, if there is one)")


def refuse_resolver(syms: TargetSymbols, sym: Symbol) -> None:
    """``sym`` is an IFUNC: name what it resolved to instead of patching a
    resolver nothing calls."""
    chosen = syms.ifunc_selection(sym)
    if chosen is None:
        raise PatchMismatch(
            f"{sym.qualified} is an IFUNC, and process {syms.pid} has not resolved it yet, so "
            "the implementation it will use is not known; patch the implementation by name")
    where = describe(syms, chosen)
    if _in_vdso(syms, chosen):
        raise PatchMismatch(
            f"{sym.qualified} is an IFUNC, and process {syms.pid} resolved it to {where} in "
            f"the vDSO (the kernel's code), which is not patched: its calls to {sym.name} "
            "never reach libc's own implementations")
    raise PatchMismatch(
        f"{sym.qualified} is an IFUNC, and process {syms.pid} resolved it to {where}; "
        f"patch that implementation instead (it may serve other IFUNCs too)")


ReadMemory = Callable[[int, int], bytes]


def candidates(syms: TargetSymbols, object_name: str, read: ReadMemory) -> dict[int, list[Symbol]]:
    """Implementation address -> the IFUNCs of ``object_name`` whose resolver
    may return it. Computed once per object and patch (libc: ~50 resolvers)."""
    out: dict[int, list[Symbol]] = {}
    for ifunc in syms.ifuncs_of(object_name):
        for addr in _candidates(ifunc, read):
            out.setdefault(addr, []).append(ifunc)
    return out


def refuse_unselected(syms: TargetSymbols, sym: Symbol, listed_by: list[Symbol]) -> None:
    """``sym`` is one of the implementations the IFUNCs ``listed_by`` (see
    ``candidates``) choose from, and none of them chose it in this process:
    calls through those IFUNCs never reach it."""
    chosen_instead: list[str] = []
    for ifunc in listed_by:
        chosen = syms.ifunc_selection(ifunc)
        if chosen is None or chosen == sym.addr:
            return  # not resolved yet (may still pick it), or picked it
        chosen_instead.append(f"{ifunc.name} -> {describe(syms, chosen)}"
                              + (" (vDSO)" if _in_vdso(syms, chosen) else ""))
    if chosen_instead:
        raise PatchMismatch(
            f"{sym.qualified} is an implementation IFUNC {', '.join(chosen_instead)} did not "
            f"choose in process {syms.pid}: its calls do not go through {sym.name}, so "
            "patching it would change nothing they do")


def _candidates(ifunc: Symbol, read: ReadMemory) -> set[int]:
    """Addresses an IFUNC resolver may return: the targets of its
    rip-relative ``lea``s (how gcc materialises a function's address)."""
    try:
        code = read(ifunc.addr, min(ifunc.size or _MAX_RESOLVER, _MAX_RESOLVER))
    except HotpatchError:  # an unreadable resolver: no claim about it
        return set()
    out = set()
    for insn in rel.disasm(code, ifunc.addr):
        op = rel.rip_operand(insn)
        if op is not None and insn.id == x86.X86_INS_LEA:
            out.add((insn.address + insn.size + op.mem.disp) & ((1 << 64) - 1))
    return out
