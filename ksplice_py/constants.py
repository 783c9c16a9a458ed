"""The kernel ABI numbers ksplice_py uses (x86-64 Linux), in one place.

What the standard library already names (mmap, os, errno) is taken from it;
the rest is copied from the kernel's uapi headers, cited beside each value.
"""
from __future__ import annotations

import errno
import mmap
import os

PAGE_SIZE = mmap.PAGESIZE  # 4096 on x86-64; patches are linked with max-page-size=4096 too

# <asm-generic/mman-common.h>, <linux/mman.h>, <linux/memfd.h>
PROT_NONE = 0
PROT_READ, PROT_WRITE, PROT_EXEC = mmap.PROT_READ, mmap.PROT_WRITE, mmap.PROT_EXEC
MAP_PRIVATE, MAP_ANONYMOUS = mmap.MAP_PRIVATE, mmap.MAP_ANONYMOUS
MAP_FIXED_NOREPLACE = 0x100000  # Linux 4.17; older kernels take it as a mere hint
MFD_CLOEXEC = os.MFD_CLOEXEC

# <asm/unistd_64.h>: the raw syscalls the tool injects into a target.
SYSCALLS = {"close": 3, "mmap": 9, "mprotect": 10, "munmap": 11, "ftruncate": 77,
            "restart_syscall": 219, "memfd_create": 319,
            "getpid": 39}  # not injected: the run-out stubs' harmless stop (runout.py)

# A raw syscall returns -errno in [-MAX_ERRNO, -1] (<linux/err.h>).
MAX_ERRNO = 4095
EEXIST, ESRCH, EFAULT = errno.EEXIST, errno.ESRCH, errno.EFAULT
# Kernel-internal restart codes a stopped syscall may show in rax (<linux/errno.h>).
ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516


def syscall_failed(ret: int) -> bool:
    """Whether a raw syscall's return value is an error (-errno)."""
    return -MAX_ERRNO <= ret < 0


def page_down(n: int) -> int:
    return n & ~(PAGE_SIZE - 1)


def page_up(n: int) -> int:
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
