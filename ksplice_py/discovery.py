"""Which processes on the machine a patch concerns: read-only, no ptrace.

Everything here reads /proc only (stat, status, exe, maps): a process that
is not a match is never attached to, stopped or written. Two questions:

* ``candidates(selector)``: the processes the user's filters (``--pids``,
  ``--exe``, ``--user``) allow, each as a ``ProcInfo`` snapshot (pid, start
  time, command name, owner, executable, tracer) — or why it can never be
  patched (the tool itself, a kernel thread, a zombie, one already traced);
* ``match(info, wants)``: does it map every object the patch targets, and
  the build its build-id pins name? The answer names each mapped build by
  the file's identity, so the fleet runner can do per-build work once.
"""
from __future__ import annotations

import os
import pwd
from dataclasses import dataclass, field
from enum import Enum

from . import editions as ed
from .errors import BadInput, HotpatchError
from .maps import Mapping, host_path, parse_maps
from .memory import RemoteMemory
from .patchfile import PatchFile
from .symbols import build_id_of


class Unpatchable(str, Enum):
    """Why a process can never be patched (a skip reason)."""

    SELF = "the hotpatch tool itself"
    KERNEL_THREAD = "a kernel thread"
    ZOMBIE = "a zombie (exited, waiting for its parent)"
    TRACED = "already traced by another process (a debugger?)"
    GONE = "exited before it was reached"


@dataclass(frozen=True)
class Selector:
    """The user's filters; empty means every process on the machine."""

    pids: frozenset[int] = frozenset()
    exes: tuple[str, ...] = ()  # resolved paths of executables
    uids: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, pids: str | None = None, exes: list[str] | None = None,
              users: list[str] | None = None) -> "Selector":
        """From the CLI's spellings: ``--pids 1,2,3``, ``--exe PATH`` (repeatable),
        ``--user NAME`` (a name or a uid; repeatable). BadInput when malformed."""
        out_pids: set[int] = set()
        for part in (pids or "").split(","):
            part = part.strip()
            if not part:
                continue
            if not part.isdigit() or int(part) <= 0:
                raise BadInput(f"--pids takes a comma-separated list of pids, not {pids!r}")
            out_pids.add(int(part))
        if pids is not None and not out_pids:
            raise BadInput("--pids names no process")
        paths = []
        for exe in exes or ():
            if not os.path.exists(exe):
                raise BadInput(f"--exe {exe}: no such file")
            paths.append(os.path.realpath(exe))
        return cls(frozenset(out_pids), tuple(paths), frozenset(_uid(u) for u in users or ()))

    def allows(self, info: "ProcInfo") -> bool:
        if self.pids and info.pid not in self.pids:
            return False
        if self.exes and info.exe not in self.exes:
            return False
        return not self.uids or info.uid in self.uids


def _uid(user: str) -> int:
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise BadInput(f"--user {user}: no such user") from None


@dataclass(frozen=True)
class ProcInfo:
    """One process as /proc showed it at discovery."""

    pid: int
    start_time: int  # with the pid, names this process for the machine's life
    name: str  # comm
    uid: int
    exe: str  # resolved path ("" for kernel threads)
    unpatchable: Unpatchable | None = None


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except (OSError, ProcessLookupError):
        return None


def proc_info(pid: int) -> ProcInfo | None:
    """A snapshot of ``pid``; None when there is no such process."""
    stat, status = _read(f"/proc/{pid}/stat"), _read(f"/proc/{pid}/status")
    if stat is None or status is None or ")" not in stat:
        return None
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    rest = stat.rsplit(")", 1)[1].split()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    try:
        exe = os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        exe = ""
    uid = int(fields.get("Uid", "0").split()[0])
    why = None
    if pid == os.getpid():
        why = Unpatchable.SELF
    elif rest[0] in ("Z", "X"):
        why = Unpatchable.ZOMBIE
    elif "VmSize" not in fields:
        why = Unpatchable.KERNEL_THREAD
    elif int(fields.get("TracerPid", "0").strip() or 0) not in (0, os.getpid()):
        why = Unpatchable.TRACED
    return ProcInfo(pid, int(rest[19]), name, uid, exe, why)


def all_pids() -> list[int]:
    return sorted(int(d) for d in os.listdir("/proc") if d.isdigit())


def candidates(selector: Selector) -> list[ProcInfo]:
    """Every process the filters allow, in pid order (kernel threads and
    zombies included, marked: the caller decides whether they are worth a line)."""
    pids = sorted(selector.pids) if selector.pids else all_pids()
    out = []
    for pid in pids:
        info = proc_info(pid)
        if info is not None and selector.allows(info):
            out.append(info)
    return out


def read_maps_of(pid: int) -> list[Mapping] | None:
    text = _read(f"/proc/{pid}/maps")
    return None if text is None else parse_maps(text)


# --- matching a patch --------------------------------------------------------

@dataclass(frozen=True)
class Wants:
    """What a patch needs a process to map: objects by name (``main`` is
    the executable) and, for some, an exact build-id."""

    objects: frozenset[str]
    pins: dict[str, str] = field(default_factory=dict)
    sha256: str = ""

    @classmethod
    def of(cls, patch: PatchFile) -> "Wants":
        names = {t.rpartition(":")[0] for t in
                 [r.target for r in patch.replacements] + [s.target for s in patch.symbol_refs]}
        names |= {p.object for p in patch.pins}
        names.discard("")  # unqualified targets: any object may define them
        return cls(frozenset(names), {p.object: p.build_id for p in patch.pins}, patch.sha256)


@dataclass(frozen=True)
class Match:
    """``fits``: maps every wanted object, of the pinned build. ``reason``:
    why it does not, when it maps them all but of another build (worth a
    skip line); None when it does not map them at all (not concerned)."""

    fits: bool
    builds: tuple[tuple[str, int, int], ...] = ()  # (object, st_dev, st_ino) of each wanted object
    reason: str | None = None


def match(info: ProcInfo, wants: Wants, maps: list[Mapping] | None = None) -> Match:
    maps = read_maps_of(info.pid) if maps is None else maps
    if maps is None:
        return Match(False)
    by_name: dict[str, Mapping] = {}
    for m in maps:
        if not m.is_file or m.path.startswith("/memfd:"):
            continue
        path = m.path.removesuffix(" (deleted)")
        name = "main" if path == info.exe else os.path.basename(path)
        if name in wants.objects and m.offset == 0:
            by_name.setdefault(name, m)
    if set(by_name) != set(wants.objects):
        return Match(False)
    builds = []
    for name, m in sorted(by_name.items()):
        path = _open_path(info.pid, m)
        try:
            st = os.stat(path)
        except OSError:
            return Match(False)
        builds.append((name, st.st_dev, st.st_ino))
        pin = wants.pins.get(name)
        if pin is not None:
            actual = build_id_of(path)
            if actual != pin:
                return Match(False, reason=f"maps {name} build-id {actual or 'none'}, "
                                           f"the patch is for build-id {pin}")
    return Match(True, tuple(builds))


def _open_path(pid: int, m: Mapping) -> str:
    """The mapped file itself (map_files: right even if replaced on disk)."""
    via_kernel = f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}"
    return via_kernel if os.path.exists(via_kernel) else host_path(pid, m.path.removesuffix(" (deleted)"))


def carries_editions(pid: int, maps: list[Mapping] | None = None) -> bool:
    """Does the process hold any edition region (cheap: names in its maps)?"""
    maps = read_maps_of(pid) if maps is None else maps
    return bool(maps) and bool(ed.regions_in(maps))


def editions_of(pid: int) -> list[ed.Edition]:
    """The editions a process carries, read from its memory without ptrace
    (process_vm_readv): a process can be asked while another tool traces it,
    and one that carries none is never attached to."""
    maps = read_maps_of(pid)
    if not maps or not ed.regions_in(maps):
        return []
    try:
        with RemoteMemory(pid) as mem:
            return ed.list_editions(mem, maps)[0]
    except HotpatchError:
        return []


def carries_patch(pid: int, sha256: str) -> bool:
    """Does the process hold an edition of this patch content?"""
    return any(e.sha256 == sha256 for e in editions_of(pid))
