"""/proc/PID/maps as records, grouped into the objects a process has mapped."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import NoSuchProcess, TargetGone


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str  # e.g. "r-xp"
    offset: int
    inode: int
    path: str  # "" for anonymous, "[stack]", "/usr/lib/.../libc.so.6", ...

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"

    @property
    def is_file(self) -> bool:
        return self.path.startswith("/") and self.inode != 0

    def __contains__(self, addr: int) -> bool:
        return self.start <= addr < self.end


@dataclass
class MappedFile:
    """All mappings of one file; ``name`` is what ``object:symbol`` uses."""

    path: str
    name: str
    mappings: list[Mapping] = field(default_factory=list)

    @property
    def start(self) -> int:
        return self.mappings[0].start

    @property
    def end(self) -> int:
        return self.mappings[-1].end


def parse_maps(text: str) -> list[Mapping]:
    out = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        lo, hi = parts[0].split("-")
        out.append(
            Mapping(
                start=int(lo, 16),
                end=int(hi, 16),
                perms=parts[1],
                offset=int(parts[2], 16),
                inode=int(parts[4]),
                path=parts[5].strip() if len(parts) > 5 else "",
            )
        )
    return out


def read_maps(pid: int) -> list[Mapping]:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return parse_maps(f.read())
    except FileNotFoundError:
        raise NoSuchProcess(f"no process with pid {pid}") from None
    except ProcessLookupError:
        raise TargetGone(f"process {pid} exited") from None


def exe_path(pid: int) -> str:
    """The path of the main executable as /proc/PID/maps names it."""
    try:
        link = os.readlink(f"/proc/{pid}/exe")
    except FileNotFoundError:
        raise NoSuchProcess(f"no process with pid {pid}") from None
    except OSError as e:  # kernel threads have no exe link
        raise NoSuchProcess(f"pid {pid} has no executable (kernel thread?): {e.strerror}") from None
    return link


def mapped_files(pid: int, maps: list[Mapping] | None = None) -> list[MappedFile]:
    """File-backed objects in address order. The executable is named ``main``;
    every other object by its basename (``libc.so.6``)."""
    maps = read_maps(pid) if maps is None else maps
    exe = exe_path(pid)
    by_path: dict[str, MappedFile] = {}
    for m in maps:
        if not m.is_file or m.path.startswith("/memfd:"):
            continue
        path = m.path.removesuffix(" (deleted)")
        mf = by_path.get(path)
        if mf is None:
            name = "main" if path == exe.removesuffix(" (deleted)") else os.path.basename(path)
            mf = by_path[path] = MappedFile(path=path, name=name)
        mf.mappings.append(m)
    return sorted(by_path.values(), key=lambda f: f.start)


def host_path(pid: int, path: str) -> str:
    """Where *we* can open a file the target has mapped: through the target's
    root, so objects inside another mount namespace are found too."""
    via_root = f"/proc/{pid}/root{path}"
    return via_root if os.path.exists(via_root) else path
