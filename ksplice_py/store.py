"""The machine's store of installed patches (``hotpatch install``).

A directory, ``$KSPLICE_PY_STATE_DIR`` or ``/var/lib/ksplice_py``:

    patches/<sha256>.so     the patch's bytes, exactly as checked at install
    patches/<sha256>.json   its name, where it came from, when it was installed
    watch-status.json       what the watch service could not do yet, and why

Everything is written to a temporary name and renamed into place, so a
reader (the watch service, ``installed``) sees a patch whole or not at all;
the ``.so`` goes in before its ``.json``, and an entry counts only with
both. The store is root's (mode 0700): a patch in it is loaded again with
the same trust checks as any patch (trust.py), pinned to its sha256.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import trust
from .errors import BadInput
from .patchfile import PatchFile

DEFAULT_DIR = "/var/lib/ksplice_py"
_HEX = set("0123456789abcdef")


def state_dir() -> Path:
    return Path(os.environ.get("KSPLICE_PY_STATE_DIR") or DEFAULT_DIR)


def is_sha256(text: str) -> bool:
    return len(text) == 64 and not set(text.lower()) - _HEX


@dataclass(frozen=True)
class Entry:
    sha256: str
    name: str  # the patch's file name at install
    source: str  # the path it was installed from
    installed_at: float

    def to_dict(self) -> dict:
        return asdict(self)


class Store:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or state_dir()
        self.patches = self.root / "patches"

    def _ensure(self) -> None:
        for d in (self.root, self.patches):
            try:
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as e:
                raise BadInput(f"cannot create the patch store {d}: {e.strerror}") from None

    def _write(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    # -- changing it -------------------------------------------------------------
    def add(self, patch: PatchFile, data: bytes, source: str) -> tuple[Entry, bool]:
        """Store a checked patch (``data``: the bytes it was parsed from);
        (entry, True) if it was not there before."""
        old = self.get(patch.sha256)
        if old is not None:
            return old, False
        self._ensure()
        entry = Entry(patch.sha256, os.path.basename(source), os.path.abspath(source), time.time())
        try:
            self._write(self.patches / f"{patch.sha256}.so", data)
            self._write(self.patches / f"{patch.sha256}.json", json.dumps(entry.to_dict()).encode())
        except OSError as e:
            raise BadInput(f"cannot write to the patch store {self.patches}: {e.strerror}") from None
        return entry, True

    def remove(self, sha256: str) -> Entry | None:
        entry = self.get(sha256)
        if entry is None:
            return None
        for suffix in (".json", ".so"):  # the entry stops counting first
            try:
                (self.patches / f"{sha256}{suffix}").unlink()
            except FileNotFoundError:
                pass
        return entry

    # -- reading it --------------------------------------------------------------
    def get(self, sha256: str) -> Entry | None:
        try:
            d = json.loads((self.patches / f"{sha256}.json").read_text())
            if not (self.patches / f"{sha256}.so").is_file() or d.get("sha256") != sha256:
                return None
            return Entry(d["sha256"], d["name"], d.get("source", ""), float(d.get("installed_at", 0)))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def entries(self) -> list[Entry]:
        try:
            names = sorted(p.name for p in self.patches.iterdir())
        except OSError:
            return []
        found = [self.get(n[:-5]) for n in names if n.endswith(".json") and is_sha256(n[:-5])]
        return sorted((e for e in found if e is not None), key=lambda e: e.installed_at)

    def load(self, entry: Entry) -> PatchFile:
        """The stored patch, read with the usual trust checks and pinned to
        its sha256 (a changed file is refused)."""
        return trust.load_patch(self.patches / f"{entry.sha256}.so", trust.Policy(sha256=entry.sha256))

    def find(self, what: str) -> Entry | None:
        """An installed patch named by its sha256, or by a file with its content."""
        text = what.strip().lower()
        if is_sha256(text) and not os.path.exists(what):
            return self.get(text)
        data = trust.read_patch(what, trust.Policy(enforce=False))  # only to name it
        return self.get(hashlib.sha256(data).hexdigest())

    # -- what the watch service could not do -------------------------------------
    @property
    def status_path(self) -> Path:
        return self.root / "watch-status.json"

    def write_status(self, status: dict) -> None:
        try:
            self._ensure()
            self._write(self.status_path, json.dumps(status).encode())
        except (OSError, BadInput):
            pass  # only informative; never a reason for the service to stop

    def read_status(self) -> dict:
        try:
            return json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return {}
