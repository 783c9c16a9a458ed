"""One hotpatch at a time per target: ``/run/lock/ksplice_py.PID.lock``.

Two tools interleaving trampoline writes could leave a mix, so every
command that changes a target holds an exclusive flock on this file. The
file is removed when the command ends (an afternoon of work must not leave
a hundred of them), and removing a lock file is racy unless done in order:
the holder unlinks the path *while it still holds the lock*; a tool that
opened the old file just before and then wins the flock finds the path gone
or naming another file (fstat against stat), and starts again on the path's
current file. So the inode a tool locks is always the one the path names,
and two tools never hold the lock at once.

The directory may be world-writable (sticky): the file is opened with
O_NOFOLLOW, so root is never led through someone's symlink.
"""
from __future__ import annotations

import fcntl
import os
import tempfile

from .errors import AccessDenied

_RETRIES = 100  # each retry means another tool removed the file meanwhile


def lock_dir() -> str:
    for d in ("/run/lock", tempfile.gettempdir()):
        if os.access(d, os.W_OK):
            return d
    return tempfile.gettempdir()


class TargetLock:
    """The lock of one target process. ``with TargetLock(pid):`` or
    ``busy()`` to ask whether another tool holds it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.path = os.path.join(lock_dir(), f"ksplice_py.{pid}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock now or raise AccessDenied (another tool has it)."""
        for _ in range(_RETRIES):
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise AccessDenied(
                    f"another hotpatch is working on process {self.pid}; wait for it to finish") from None
            if self._names(fd):
                self._fd = fd
                return
            os.close(fd)  # removed by its holder before we got it: take the current file
        raise AccessDenied(f"cannot take the lock file {self.path}: it keeps being replaced")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still held: see the module's docstring
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def busy(self) -> bool:
        """Is a tool at work on the target right now? Read from /proc/locks,
        without taking the lock: a `list` must never make a concurrent
        apply find the target busy."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False  # removed by its last holder: nobody holds it
        key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        try:
            with open("/proc/locks") as f:
                return any(line.split()[1:2] == ["FLOCK"] and key in line.split() for line in f)
        except OSError:
            return True  # cannot tell: assume someone is at work

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise AccessDenied(f"cannot open the lock file {self.path}: {e.strerror}; "
                               "remove it if stale") from None

    def _names(self, fd: int) -> bool:
        """Does the path still name the file behind fd?"""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def __enter__(self) -> "TargetLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
