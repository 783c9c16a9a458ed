"""Remote memory: read with process_vm_readv, write through /proc/PID/mem
(which writes read-only text too, copy-on-write, only in that process)."""
from __future__ import annotations

import ctypes
import os

from .constants import EFAULT, ESRCH, PAGE_SIZE
from .errors import AccessDenied, RemoteError, TargetGone

_libc = ctypes.CDLL(None, use_errno=True)


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc.process_vm_readv.argtypes = [
    ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
    ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong,
]
_libc.process_vm_readv.restype = ctypes.c_ssize_t


class RemoteMemory:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._mem_fd: int | None = None

    # -- reading ----------------------------------------------------------
    def read(self, addr: int, size: int) -> bytes:
        """Read exactly ``size`` bytes or raise RemoteError."""
        if size == 0:
            return b""
        buf = ctypes.create_string_buffer(size)
        local = _IoVec(ctypes.cast(buf, ctypes.c_void_p), size)
        remote = _IoVec(ctypes.c_void_p(addr), size)
        n = _libc.process_vm_readv(self.pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if n == size:
            return buf.raw
        err = ctypes.get_errno()
        if err == ESRCH:
            raise TargetGone(f"process {self.pid} exited")
        if n > 0 or err in (EFAULT, 0):  # partial: fall back to /proc/PID/mem
            return self._pread(addr, size)
        raise RemoteError(f"cannot read {size} bytes at {addr:#x} in {self.pid}: {os.strerror(err)}")

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def read_cstring(self, addr: int, limit: int = PAGE_SIZE) -> bytes:
        out = b""
        while len(out) < limit:
            chunk = self.read(addr + len(out), min(256, PAGE_SIZE - (addr + len(out)) % PAGE_SIZE))
            nul = chunk.find(b"\0")
            if nul >= 0:
                return out + chunk[:nul]
            out += chunk
        return out

    # -- writing ----------------------------------------------------------
    def write(self, addr: int, data: bytes) -> None:
        fd = self._fd()
        try:
            n = os.pwrite(fd, data, addr)
        except ProcessLookupError:
            raise TargetGone(f"process {self.pid} exited") from None
        except OSError as e:
            raise RemoteError(f"cannot write {len(data)} bytes at {addr:#x} in {self.pid}: {e.strerror}") from None
        if n != len(data):
            raise RemoteError(f"short write at {addr:#x} in {self.pid} ({n} of {len(data)} bytes)")

    def mem_fd(self) -> int:
        """The /proc/PID/mem descriptor, for C helpers that write in the hot window."""
        return self._fd()

    def _pread(self, addr: int, size: int) -> bytes:
        try:
            data = os.pread(self._fd(), size, addr)
        except OSError as e:
            raise RemoteError(f"cannot read {size} bytes at {addr:#x} in {self.pid}: {e.strerror}") from None
        if len(data) != size:
            raise RemoteError(f"cannot read {size} bytes at {addr:#x} in {self.pid}: unmapped")
        return data

    def _fd(self) -> int:
        if self._mem_fd is None:
            try:
                self._mem_fd = os.open(f"/proc/{self.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                raise TargetGone(f"process {self.pid} exited") from None
            except PermissionError:
                raise AccessDenied(f"not allowed to write the memory of process {self.pid} (run as root?)") from None
        return self._mem_fd

    def close(self) -> None:
        if self._mem_fd is not None:
            os.close(self._mem_fd)
            self._mem_fd = None

    def __enter__(self) -> "RemoteMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
