"""Trust in the patch file: read it once, from a file only root could have
written, and (optionally) with the content the user pinned.

A patch runs as code inside the target; as root, the target may be any
process on the machine. So before a patch file's bytes are believed, the
same rules as ssh's StrictModes and sudo's sudoers checks apply:

* the file is a regular file (no FIFO that hangs us, no device);
* it is owned by root or by the invoking user, and not writable by group
  or others;
* every directory on its path (as given, and as resolved to the file we
  actually opened) is owned by root or the invoking user and not writable
  by group or others, unless the directory is sticky (like /tmp): there,
  nobody can rename or remove an entry they do not own.

``--insecure`` skips the ownership and mode checks (never the sha256 pin).
``--sha256 HEX`` pins the exact content: anything else is refused.

The file is opened once; checks run on that descriptor (fstat, and the path
the kernel reports for it), and the bytes read from it are the only bytes
parsed, checked, hashed and loaded: nothing re-opens the path afterwards.
"""
from __future__ import annotations

import hashlib
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput, BadPatchFile, UntrustedPatch
from .patchfile import PatchFile

MAX_PATCH_BYTES = 512 << 20  # far above any real patch; bounds memory on a hostile file
_HEX = set("0123456789abcdef")


@dataclass(frozen=True)
class Policy:
    """How much to check. ``enforce=None``: check ownership and modes when
    running as root (euid 0), as ssh and sudo do."""

    insecure: bool = False
    sha256: str | None = None  # lowercase hex of the expected content
    enforce: bool | None = None

    @property
    def checks_owner(self) -> bool:
        if self.insecure:
            return False
        return os.geteuid() == 0 if self.enforce is None else self.enforce


def parse_sha256(text: str) -> str:
    """The hex digest given to --sha256, normalised; BadInput if malformed."""
    hexd = text.strip().lower()
    if len(hexd) != 64 or set(hexd) - _HEX:
        raise BadInput(f"--sha256 takes 64 hex digits (see `sha256sum PATCH`), not {text!r}")
    return hexd


def read_patch(path: str | os.PathLike, policy: Policy = Policy()) -> bytes:
    """The patch's bytes, read once from one descriptor, after the checks."""
    path = os.fspath(path)
    try:
        # O_NONBLOCK: a FIFO must not hang us in open(); we refuse it below.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        raise BadPatchFile(f"cannot read patch {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadPatchFile(f"patch {path} is not a regular file ({_kind(st.st_mode)}); "
                               "give the path of the patch .so")
        if st.st_size > MAX_PATCH_BYTES:
            raise BadPatchFile(f"patch {path} is {st.st_size} bytes; a patch is a small .so")
        if policy.checks_owner:
            _check_file(path, st)
            _check_dirs(path, fd)
        data = _read_all(fd, path)
    finally:
        os.close(fd)
    if policy.sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != policy.sha256:
            raise UntrustedPatch(f"patch {path} has sha256 {actual}, not the {policy.sha256} "
                                 "given with --sha256; refusing it")
    return data


def load_patch(path: str | os.PathLike, policy: Policy = Policy()) -> PatchFile:
    """Read (once, checked) and parse a patch file."""
    return PatchFile.from_bytes(read_patch(path, policy), os.fspath(path))


# --- checks --------------------------------------------------------------------

def _trusted_uids() -> set[int]:
    return {0, os.geteuid()}


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _hint(what: str) -> str:
    return f"{what}, or pass --insecure if you trust it anyway"


def _check_file(path: str, st: os.stat_result) -> None:
    if st.st_uid not in _trusted_uids():
        raise UntrustedPatch(f"patch {path} is owned by {_user(st.st_uid)}, not root; "
                             + _hint("have root own it (chown root)"))
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedPatch(f"patch {path} is writable by {_who(st.st_mode)} "
                             f"(mode {stat.S_IMODE(st.st_mode):04o}); " + _hint(f"chmod go-w {path}"))


def _who(mode: int) -> str:
    both = mode & stat.S_IWGRP and mode & stat.S_IWOTH
    return "group and others" if both else "group" if mode & stat.S_IWGRP else "others"


def _check_dirs(path: str, fd: int) -> None:
    """Directories of the path as given (symlinks on it are only as safe as
    the directories holding them) and of the file actually opened."""
    opened = os.readlink(f"/proc/self/fd/{fd}")
    if not opened.startswith("/") or opened.endswith(" (deleted)"):
        raise UntrustedPatch(f"patch {path} was removed or moved out of reach while being opened; "
                             "try again")
    dirs: list[Path] = []
    for p in (Path(os.path.abspath(path)), Path(opened)):
        for d in p.parents:
            if d not in dirs:
                dirs.append(d)
    for d in dirs:
        try:
            st = os.stat(d)
        except OSError as e:
            raise UntrustedPatch(f"cannot check directory {d} of patch {path}: {e.strerror}") from None
        if st.st_uid not in _trusted_uids():
            raise UntrustedPatch(f"directory {d} holding patch {path} is owned by {_user(st.st_uid)}; "
                                 + _hint("keep patches in a directory only root can change"))
        sticky = st.st_mode & stat.S_ISVTX
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky:
            raise UntrustedPatch(f"directory {d} holding patch {path} is writable by {_who(st.st_mode)} "
                                 f"(mode {stat.S_IMODE(st.st_mode):04o}); "
                                 + _hint(f"chmod go-w {d}"))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _read_all(fd: int, path: str) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except OSError as e:
            raise BadPatchFile(f"cannot read patch {path}: {e.strerror or e}") from None
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > MAX_PATCH_BYTES:
            raise BadPatchFile(f"patch {path} grew past {MAX_PATCH_BYTES} bytes while being read")
        chunks.append(chunk)
