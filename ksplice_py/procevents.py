"""Event sources for the watch service: no polling of /proc.

* ``ExecEvents``: the kernel's process-events connector (netlink,
  ``NETLINK_CONNECTOR``/``CN_IDX_PROC``), which reports every ``execve`` on
  the machine the moment it happens, with the process id. This is the
  primary source: it names the new process, where file events (below) only
  say that *someone* opened a file. Needs root (CAP_NET_ADMIN). If the
  kernel drops events (the socket's buffer overran: ``ENOBUFS``),
  ``Overrun`` is raised and the caller rescans once instead of trusting a
  stream with holes.
* ``Inotify``: file events, through a few libc calls (the standard library
  has no binding). Used for the patch store (re-read when a patch is
  installed or removed) and for the objects installed patches target
  (an ``IN_OPEN`` of one may be a ``dlopen`` in a process started long ago).
"""
from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct

NETLINK_CONNECTOR = 11
CN_IDX_PROC = CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN, PROC_CN_MCAST_IGNORE = 1, 2
PROC_EVENT_EXEC = 0x00000002
NLMSG_DONE = 3
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CNMSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_EVENT = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
_EXEC = struct.Struct("=ii")  # process_pid (the thread), process_tgid


class Overrun(Exception):
    """The kernel dropped process events: rescan once."""


class ExecEvents:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                  NETLINK_CONNECTOR)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            self.sock.bind((0, CN_IDX_PROC))
            self._control(PROC_CN_MCAST_LISTEN)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)

    def _control(self, op: int) -> None:
        payload = struct.pack("=I", op)
        cn = _CNMSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0) + payload
        self.sock.send(_NLMSG.pack(_NLMSG.size + len(cn), NLMSG_DONE, 0, 0, 0) + cn)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[int]:
        """Process ids (tgids) that called execve since the last read."""
        out: list[int] = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    raise Overrun() from None
                raise
            out += _exec_tgids(data)

    def close(self) -> None:
        try:
            self._control(PROC_CN_MCAST_IGNORE)
        except OSError:
            pass
        self.sock.close()


def _exec_tgids(data: bytes) -> list[int]:
    out = []
    off = 0
    while off + _NLMSG.size <= len(data):
        length = _NLMSG.unpack_from(data, off)[0]
        body = off + _NLMSG.size + _CNMSG.size
        if length < _NLMSG.size or body + _EVENT.size + _EXEC.size > len(data):
            break
        what = _EVENT.unpack_from(data, body)[0]
        if what == PROC_EVENT_EXEC:
            out.append(_EXEC.unpack_from(data, body + _EVENT.size)[1])
        off += (length + 3) & ~3  # NLMSG_ALIGN
    return out


# --- inotify ---------------------------------------------------------------------

IN_OPEN = 0x00000020
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_DELETE = 0x00000200
IN_CREATE = 0x00000100
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT_HDR = struct.Struct("iIII")  # wd, mask, cookie, len

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]


class Inotify:
    def __init__(self) -> None:
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.paths: dict[int, str] = {}  # watch descriptor -> path

    def fileno(self) -> int:
        return self.fd

    def watch(self, path: str, mask: int) -> int | None:
        """Add a watch; None if the path cannot be watched (gone, no access)."""
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            return None
        self.paths[wd] = path
        return wd

    def read(self) -> list[tuple[str, int, str]]:
        """(watched path, mask, name) of every pending event."""
        out = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            off = 0
            while off + _EVENT_HDR.size <= len(data):
                wd, mask, _cookie, n = _EVENT_HDR.unpack_from(data, off)
                name = data[off + _EVENT_HDR.size:off + _EVENT_HDR.size + n].rstrip(b"\0")
                out.append((self.paths.get(wd, ""), mask, os.fsdecode(name)))
                off += _EVENT_HDR.size + n

    def close(self) -> None:
        os.close(self.fd)
