"""The target as the engine sees it: one process, held by identity.

``Target`` is what the patch cycle, transitions, recovery and harness hooks
receive: the pid, the identity handle that notices a dead or reused pid
(identity.py), the target's memory, its symbols, its editions and the
mappings they live in. It is typed and small on purpose: a lower layer never
needs (nor gets) the ``Process`` facade.
"""
from __future__ import annotations

from . import editions as ed
from .errors import HotpatchError
from .identity import TargetHandle, check_architecture
from .maps import Mapping, exe_path, read_maps
from .memory import RemoteMemory
from .symbols import TargetSymbols
from .tracer import Injector, check_target


class Target:
    """A running process, held from attach (pidfd) to close."""

    def __init__(self, pid: int) -> None:
        self.handle = TargetHandle(pid)  # first: from here on it is *this* process
        try:
            check_target(pid)
            check_architecture(pid)
            self.pid = pid
            self.exe = exe_path(pid)
            self.mem = RemoteMemory(pid)
            try:  # bound to this address space: writes never reach another process
                self.mem.mem_fd()
            except HotpatchError:
                pass  # not writable (read-only use): opened, and refused, when needed
            self.handle.verify()
        except BaseException:
            self.handle.close()
            raise
        self._symbols: TargetSymbols | None = None

    # -- identity ---------------------------------------------------------------
    def verify(self, doing: str = "") -> None:
        """Raise TargetGone (PidReused) unless the pid still names the process
        attached to, running the same program."""
        self.handle.verify(doing)

    def same_process(self) -> bool:
        try:
            self.handle.verify()
        except HotpatchError:
            return False
        return True

    # -- what is in it ------------------------------------------------------------
    @property
    def symbols(self) -> TargetSymbols:
        if self._symbols is None:
            self._symbols = TargetSymbols(self.pid, self.mem)
        return self._symbols

    def maps(self) -> list[Mapping]:
        return read_maps(self.pid)

    def editions(self) -> list[ed.Edition]:
        """Editions applied or prepared in the target, newest first."""
        self.verify()
        eds = ed.list_editions(self.mem, self.maps())[0]
        self.verify("reading its editions")  # what we read was this process's
        return eds

    def symbolize(self, addr: int) -> str:
        """``object:function+0xoff`` for an address in the target."""
        try:
            sym = self.symbols.function_at(addr)
        except HotpatchError:
            sym = None
        return f"{sym.qualified}+{addr - sym.addr:#x}" if sym else hex(addr)

    def injector(self) -> Injector:
        """One thread borrowed for raw syscalls (a context manager)."""
        return Injector(self.pid, self.mem)

    def close(self) -> None:
        self.mem.close()
        self.handle.close()
