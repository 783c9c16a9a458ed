"""Where injected syscalls run, without a page of their own.

A borrowed thread runs each raw syscall from a *self-restoring stub*:
``syscall``, pop every register from a save area, ``popfq``, ``ret 256``.
If the tool dies at any instant, the thread finishes the syscall and puts
itself back exactly where it was (registers, flags, rsp, rip) by itself.

Nothing is created or removed in the target for this:

* the stub is written into the **tail padding of an executable file
  mapping**: the bytes of its last page past the end of its PT_LOAD segment,
  which the target never executes (no code is there). Its bytes are always
  the same, so a stub a killed tool left behind is the stub we write;
* the save area (and a scratch area for syscall arguments such as a memfd's
  name) lies on the borrowed thread's **own stack, below its red zone**,
  where the thread keeps nothing while it is stopped: rsp during the
  injected syscall points at the save area, and the layout is such that the
  final ``ret 256`` loads the saved rip and lands rsp exactly on the saved
  rsp, in one instruction (no moment with rsp restored but rip not yet,
  where a signal frame could overwrite a slot still to be read).

Both areas are read first and written back afterwards, so a command leaves
no byte changed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

from . import x86writer as x86
from .constants import ERESTART_RESTARTBLOCK, ERESTARTNOHAND, ERESTARTNOINTR, ERESTARTSYS, SYSCALLS
from .errors import RemoteError
from .maps import Mapping, host_path, mapped_files

RED_ZONE = 128  # the SysV ABI's: a leaf function keeps data below rsp
RET_SKIP = 256  # `ret RET_SKIP`: >= RED_ZONE, so every slot lies below the red zone
# Save-area slots, lowest address first: the stub pops them in this order.
POPPED = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp",
          "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SLOTS = (*POPPED, "eflags", "rip")  # rsp is implied: rip slot + 8 + RET_SKIP
SCRATCH = 512  # below the save area: syscall arguments (a memfd's name)

_ERESTART = (-ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND)


@lru_cache(maxsize=1)
def code() -> bytes:
    """The stub: identical bytes every time (no address or value baked in)."""
    return (x86.SYSCALL + b"".join(x86.pop(r) for r in POPPED)
            + x86.POPFQ + x86.ret_imm16(RET_SKIP))


@dataclass(frozen=True)
class StackBlock:
    """The part of a stopped thread's stack we borrow: [lo, hi), below the
    red zone of rsp ``sp``."""

    sp: int

    @property
    def save(self) -> int:
        """Address of the first slot (rax): rsp while the syscall runs."""
        return self.sp - RET_SKIP - 8 * len(SLOTS)

    @property
    def lo(self) -> int:
        return self.save - SCRATCH

    @property
    def hi(self) -> int:
        return self.sp - RET_SKIP

    @property
    def scratch(self) -> int:
        return self.lo

    def fits(self, maps: list[Mapping]) -> bool:
        """Inside the writable mapping that holds rsp (a write never grows
        or creates a mapping)."""
        return any(m.writable and m.start <= self.lo and self.sp <= m.end for m in maps)


def save_area(regs) -> bytes:
    """The registers the thread resumes with if it must restore itself, the
    kernel's syscall-restart rule already applied (an interrupted read or
    futex restarts; nanosleep through restart_syscall), in slot order."""
    r = {k: getattr(regs, k) for k in (*SLOTS, "orig_rax")}
    rax = r["rax"] - (1 << 64) if r["rax"] >= 1 << 63 else r["rax"]
    if r["orig_rax"] < 1 << 63 and rax in _ERESTART:
        r["rax"], r["rip"] = r["orig_rax"], r["rip"] - 2
    elif r["orig_rax"] < 1 << 63 and rax == -ERESTART_RESTARTBLOCK:
        r["rax"], r["rip"] = SYSCALLS["restart_syscall"], r["rip"] - 2
    r["eflags"] &= ~0x10100  # never resume with TF/RF set
    return b"".join(r[k].to_bytes(8, "little") for k in SLOTS)


@dataclass(frozen=True)
class Padding:
    """Bytes of an executable mapping past the end of its segment."""

    addr: int
    size: int
    path: str  # where we can read the file's own bytes
    file_offset: int

    def file_bytes(self, n: int) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.file_offset)
                data = f.read(n)
        except OSError:
            return None
        return data.ljust(n, b"\0")  # past the file's end the kernel maps zeros


def find_padding(pid: int, maps: list[Mapping], need: int, read) -> Padding:
    """The first executable file mapping (in address order) with ``need``
    bytes between its segment's end and the mapping's end, whose bytes there
    are the file's own (or a stub a killed tool left): a file replaced on
    disk since it was mapped can never make us write over live code."""
    from elftools.elf.elffile import ELFFile  # only when injecting

    for mf in mapped_files(pid, maps):
        execs = [m for m in mf.mappings if m.executable and m.readable]
        if not execs:
            continue
        path = _mapped_file(pid, mf.path, execs[0])
        try:
            with open(path, "rb") as f:
                segs = [(s["p_offset"], s["p_memsz"]) for s in ELFFile(f).iter_segments()
                        if s["p_type"] == "PT_LOAD" and s["p_flags"] & 1]
        except Exception:  # not an ELF we can read: try the next object
            continue
        for m in execs:
            for off, memsz in segs:
                if off & ~0xFFF != m.offset:
                    continue
                end = m.start + (off & 0xFFF) + memsz  # the segment's last byte + 1
                if not (m.start < end and m.end - end >= need):
                    continue
                pad = Padding(end, m.end - end, path, m.offset + (end - m.start))
                if read(end, need) in (pad.file_bytes(need), code()):
                    return pad
    raise RemoteError(f"no executable mapping of process {pid} has {need} bytes of padding "
                      "for the syscall stub")


def _mapped_file(pid: int, path: str, m: Mapping) -> str:
    """The file as mapped: through the target's root, unless the file there
    is another one (replaced on disk); then the kernel's own handle."""
    host = host_path(pid, path)
    try:
        if os.stat(host).st_ino == m.inode:
            return host
    except OSError:
        pass
    return f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}"
