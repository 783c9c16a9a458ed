"""Harnesses: what must be idle in a library before its code is switched.

A harness is plain data plus optional Python: the objects it governs, their
critical functions (no thread may be inside one at cutover), and optional
checks run in the stopped window and hooks run around the cutover. A harness
applies whenever a patch replaces or wraps a function in an object it
governs. Harnesses are found in the ``harnesses/`` directory (each module
defines ``HARNESS`` or ``HARNESSES``), in ``$KSPLICE_PY_HARNESS_PATH``
(``:``-separated directories), and through the ``ksplice_py.harnesses``
entry-point group, so users add their own without touching the core.
"""
from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .errors import BadInput, HotpatchError
from . import resources
from .quiescence import CodeRange

if TYPE_CHECKING:
    from .editions import Edition
    from .memory import RemoteMemory
    from .symbols import TargetSymbols
    from .target import Target

BUILTIN_DIR = resources.harnesses_dir()


@dataclass(frozen=True)
class StoppedThread:
    tid: int
    regs: dict[str, int]


@dataclass(frozen=True)
class StoppedView:
    """What a harness check sees inside the stopped window."""

    pid: int
    mem: RemoteMemory
    threads: list[StoppedThread]


# check(view) -> [(tid, reason), ...]: threads that must not be switched now.
Check = Callable[[StoppedView], list[tuple[int, str]]]
Hook = Callable[["Target", "Edition"], None]  # outside the window: symbols, memory, editions


@dataclass(frozen=True)
class Harness:
    name: str
    description: str
    objects: tuple[str, ...]  # sonames it governs: "libc.so.6"
    critical: tuple[str, ...] = ()  # symbol names or fnmatch patterns
    build_ids: tuple[str, ...] = ()  # empty: any build
    check: Check | None = None
    before_cutover: Hook | None = None
    after_cutover: Hook | None = None
    source: str = field(default="", compare=False)

    def governs(self, obj: str, build_id: str | None) -> bool:
        return obj in self.objects and (not self.build_ids or build_id in self.build_ids)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "objects": list(self.objects),
                "critical": list(self.critical), "build_ids": list(self.build_ids),
                "check": self.check is not None, "source": self.source}


def _from_module(path: Path) -> list[Harness]:
    spec = importlib.util.spec_from_file_location(f"ksplice_py_harness_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # a broken plugin must not break every command
        raise HotpatchError(f"harness file {path} failed to load: {type(e).__name__}: {e}") from None
    return _collect(getattr(mod, "HARNESSES", None) or [getattr(mod, "HARNESS", None)], str(path))


def _collect(items: Iterable[Any], source: str) -> list[Harness]:
    out = []
    for h in items:
        if isinstance(h, Harness):
            out.append(Harness(**{**h.__dict__, "source": source}))
    return out


@lru_cache(maxsize=1)
def discover() -> dict[str, Harness]:
    """Every harness we can find, by name (later sources override earlier)."""
    dirs = [BUILTIN_DIR] + [Path(p) for p in os.environ.get("KSPLICE_PY_HARNESS_PATH", "").split(":") if p]
    found: dict[str, Harness] = {}
    for d in dirs:
        for path in sorted(d.glob("*.py")) if d.is_dir() else []:
            if not path.name.startswith("_"):
                for h in _from_module(path):
                    found[h.name] = h
    from importlib import metadata  # slow to import; only needed here

    for ep in metadata.entry_points(group="ksplice_py.harnesses"):
        try:
            obj = ep.load()
        except Exception as e:
            raise HotpatchError(f"harness entry point {ep.name} failed to load: {e}") from None
        items = obj() if callable(obj) and not isinstance(obj, Harness) else obj
        for h in _collect(items if isinstance(items, (list, tuple)) else [items], f"entry point {ep.value}"):
            found[h.name] = h
    return found


def select(touched: dict[str, str | None], names: list[str] | None = None,
           disabled: bool = False, force: bool = False) -> list[Harness]:
    """Harnesses for a patch touching ``touched`` (object -> build-id).

    ``names`` forces harnesses by name; ``disabled`` (--no-harness) is refused
    for a governed object unless ``force``: skipping a harness is how a
    patch switches code under a thread that is in the middle of it."""
    all_h = discover()
    chosen = [h for h in all_h.values() if any(h.governs(o, b) for o, b in touched.items())]
    if disabled:
        if chosen and not force:
            raise BadInput(
                f"{', '.join(sorted({o for h in chosen for o in h.objects if o in touched}))} "
                f"has harness {', '.join(h.name for h in chosen)}; --no-harness needs --force")
        chosen = []
    for name in names or []:
        if name not in all_h:
            raise BadInput(f"no harness named {name!r} (see hotpatch harnesses)")
        if all_h[name] not in chosen:
            chosen.append(all_h[name])
    return chosen


def by_names(names: Iterable[str]) -> list[Harness]:
    """The harnesses an edition recorded (a missing one is an error: we
    must not revert governed code without its harness)."""
    all_h = discover()
    missing = [n for n in names if n not in all_h]
    if missing:
        raise BadInput(f"harness {', '.join(missing)} used by this edition is not installed")
    return [all_h[n] for n in names]


def critical_ranges(harnesses: list[Harness], symbols: TargetSymbols) -> list[CodeRange]:
    """Code ranges of every critical function the harnesses name. Names not
    present in this build (internal functions without debug symbols) are
    skipped; patterns match every function of the governed objects."""
    out: list[CodeRange] = []
    for h in harnesses:
        for obj in h.objects:
            try:
                funcs = symbols.functions_of(obj)
            except HotpatchError:
                continue  # object not loaded in this process
            matches = _matcher(tuple(h.critical))
            for sym in funcs:
                if sym.size and matches(sym.name):
                    out.append(CodeRange(sym.addr, sym.addr + sym.size, f"{h.name}: {sym.qualified}"))
    return out


@lru_cache(maxsize=64)
def _matcher(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    """fnmatchcase against any of ``patterns``, as one compiled regex: a
    harness of ~100 patterns over libc's ~3,700 functions costs 10 ms this
    way and 0.3-0.7 s with a fnmatchcase call per pair."""
    if not patterns:
        return lambda name: False
    rx = re.compile("|".join(fnmatch.translate(p) for p in patterns))
    return lambda name: rx.match(name) is not None
