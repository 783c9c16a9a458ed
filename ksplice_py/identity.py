"""The right process: hold the target from the first moment and notice when
the pid we were given no longer names it.

A pid is only a number; the kernel hands it to a new process once the old
one has been reaped. So at attach we take:

* a pidfd (``os.pidfd_open``): it refers to *that* process for as long as we
  hold it, and becomes readable the moment it exits, whatever happens to the
  number afterwards;
* its start time (field 22 of ``/proc/PID/stat``, clock ticks since boot): a
  process that reuses the pid starts later, so ``pid + start time`` names
  one process for the life of the machine;
* the identity of its executable (device and inode behind ``/proc/PID/exe``),
  so an ``execve`` in the middle of an operation is noticed too.

``verify()`` re-checks all three; through ``Target.verify`` the cycle and the
operations call it before every step that writes into the target, and the
Process once more at the end. Writes also go through a ``/proc/PID/mem``
descriptor opened at attach, which is bound to the original address
space: they can never land in another process.

``check_architecture`` refuses what the loader cannot patch (32-bit, x32,
non-x86-64 programs) by the ELF header of ``/proc/PID/exe``.
"""
from __future__ import annotations

import errno
import os
import select

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from .errors import AccessDenied, NoSuchProcess, PidReused, TargetGone, UnsupportedTarget


def read_start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat (``starttime``, clock ticks after boot).
    The command name (field 2) may hold spaces and parentheses: split after
    the last ')'."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat.rsplit(b")", 1)[1].split()[19])


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0].decode()


def status_field(path: str, key: str) -> int | None:
    """One integer field (``Tgid``, ``TracerPid``...) of a /proc status file."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _tgid(pid: int) -> int | None:
    return status_field(f"/proc/{pid}/status", "Tgid")


def _exe_identity(pid: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/exe")  # follows the magic link, any mount namespace
    except OSError:
        return None
    return st.st_dev, st.st_ino


class TargetHandle:
    """A pidfd plus the start time and executable seen at attach."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self.fd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            raise NoSuchProcess(f"no process with pid {pid}") from None
        except OSError as e:
            if e.errno != errno.ENOSYS:
                # EINVAL (< 6.9) / ENOENT (>= 6.9): not a thread-group leader, or gone
                tgid = _tgid(pid)
                if tgid and tgid != pid:
                    raise NoSuchProcess(f"{pid} is a thread of process {tgid}, not a process; "
                                        f"give the process id ({tgid})") from None
                raise NoSuchProcess(f"no process with pid {pid}") from None
            # Kernels older than 5.3 have no pidfd: the start time alone guards us.
            self.fd = None
        try:
            self.start_time = read_start_time(pid)
            state = _state(pid)
        except (FileNotFoundError, ProcessLookupError):
            self.close()
            raise NoSuchProcess(f"no process with pid {pid}") from None
        if state in ("Z", "X") or not self.alive():
            self.close()
            raise NoSuchProcess(f"process {pid} has exited (zombie); nothing to patch")
        self.exe_id = _exe_identity(pid)

    def alive(self) -> bool:
        """False once the process we opened has exited (even before it is
        reaped, and whoever has its pid now)."""
        if self.fd is None:
            return os.path.exists(f"/proc/{self.pid}")
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return not poller.poll(0)

    def verify(self, doing: str = "") -> None:
        """Raise TargetGone / PidReused unless the pid still names the
        process we attached to, running the program it ran then."""
        during = f" while {doing}" if doing else ""
        if not self.alive():
            raise TargetGone(f"process {self.pid} exited{during}; nothing more was done to it")
        try:
            now = read_start_time(self.pid)
        except (FileNotFoundError, ProcessLookupError):
            raise TargetGone(f"process {self.pid} exited{during}; nothing more was done to it") from None
        if now != self.start_time:
            raise PidReused(f"process {self.pid} exited{during} and its pid now belongs to another "
                            f"process (started at tick {now}, not {self.start_time}); refusing to touch it")
        exe = _exe_identity(self.pid)
        if exe is None and self.exe_id is not None:
            # An exiting process loses its exe link before its pidfd reports the exit.
            raise TargetGone(f"process {self.pid} exited{during}; nothing more was done to it")
        if exe != self.exe_id:
            raise TargetGone(f"process {self.pid} executed a new program{during}; "
                             "nothing more was done to it (run hotpatch again for the new program)")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# --- architecture -------------------------------------------------------------
_MACHINE_NAMES = {"EM_386": "32-bit x86 (i386)", "EM_AARCH64": "arm64", "EM_ARM": "32-bit arm"}


def check_architecture(pid: int) -> None:
    """Refuse a target whose executable is not a 64-bit x86-64 ELF program:
    the loader, trampolines and register handling are x86-64 only."""
    path = f"/proc/{pid}/exe"
    try:
        with open(path, "rb") as f:
            header = ELFFile(f).header
            elfclass = 64 if header["e_ident"]["EI_CLASS"] == "ELFCLASS64" else 32
            machine = header["e_machine"]
    except FileNotFoundError:
        raise NoSuchProcess(f"pid {pid} has no executable (exited, or a kernel thread?)") from None
    except PermissionError:
        raise AccessDenied(f"not allowed to read the executable of process {pid} (run as root?)") from None
    except (ELFError, OSError, KeyError, ValueError) as e:
        raise UnsupportedTarget(f"process {pid} does not run an ELF program ({e}); "
                                "only x86-64 Linux processes can be patched") from None
    if machine == "EM_X86_64" and elfclass == 64:
        return
    what = "x32 (32-bit x86-64 ABI)" if machine == "EM_X86_64" else \
        _MACHINE_NAMES.get(str(machine), str(machine))
    raise UnsupportedTarget(f"process {pid} runs a {what} program ({_exe_name(pid)}); "
                            "hotpatch patches 64-bit x86-64 processes only")


def _exe_name(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return "?"
