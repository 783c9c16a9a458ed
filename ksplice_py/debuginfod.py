"""Debug files by build-id from debuginfod servers (``DEBUGINFOD_URLS``).

Distributions ship programs stripped and serve their debug files (with the
``.symtab`` that names static functions) through debuginfod. We follow the
elfutils client's conventions: ``DEBUGINFOD_URLS`` is a space-separated list
of servers, asked in order for ``/buildid/<hex>/debuginfo``;
``DEBUGINFOD_TIMEOUT`` bounds the wait (seconds; here it bounds the whole
look-up, 10 s unless set), ``DEBUGINFOD_MAXSIZE`` the size of a download.

A file is kept under the project's cache dir (``<cache>/debuginfod/<hex>.debug``)
only when it is an ELF file whose build-id is the one asked for: a server is
not trusted to answer the right question. Fetching happens while symbols are
resolved (prepare), never while the target is stopped.
"""
from __future__ import annotations

import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from elftools.elf.elffile import ELFFile

from .resources import cache_dir

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAXSIZE = 2 << 30
_CHUNK = 1 << 20


def urls() -> list[str]:
    return os.environ.get("DEBUGINFOD_URLS", "").split()


def timeout() -> float:
    return _positive("DEBUGINFOD_TIMEOUT", DEFAULT_TIMEOUT, float)


def _maxsize() -> int:
    return _positive("DEBUGINFOD_MAXSIZE", DEFAULT_MAXSIZE, int)


def _positive(name: str, default, kind):
    """A positive number from the environment; ``default`` if unset or not one."""
    try:
        value = kind(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


def cache_file(build_id: str) -> Path:
    return cache_dir() / "debuginfod" / f"{build_id}.debug"


def cached(build_id: str) -> str | None:
    """A debug file fetched before: ours, else the elfutils client's cache."""
    elfutils = Path(os.environ.get("DEBUGINFOD_CACHE_PATH")
                    or Path.home() / ".cache" / "debuginfod_client") / build_id / "debuginfo"
    for path in (cache_file(build_id), elfutils):
        if path.is_file():
            return str(path)
    return None


def fetch(build_id: str, deadline: float) -> str | None:
    """Ask each server in turn, until ``deadline`` (time.monotonic());
    the cached path of the debug file, or None."""
    for url in urls():
        left = deadline - time.monotonic()
        if left <= 0:
            break
        path = _download(f"{url.rstrip('/')}/buildid/{build_id}/debuginfo", build_id, left)
        if path is not None:
            return path
    return None


def _download(url: str, build_id: str, left: float) -> str | None:
    dest = cache_file(build_id)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-", suffix=".debug")
    except OSError:
        return None
    try:
        with os.fdopen(fd, "wb") as out:
            if not _copy(url, out, left):
                return None
        if _build_id(tmp) != build_id:
            return None
        os.replace(tmp, dest)
        return str(dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _copy(url: str, out, left: float) -> bool:
    """Stream ``url`` into ``out`` within ``left`` seconds and the size cap."""
    deadline = time.monotonic() + left
    limit = _maxsize()
    try:
        with urllib.request.urlopen(url, timeout=left) as r:  # noqa: S310 (http(s) from the admin's env)
            length = int(r.headers.get("Content-Length") or 0)
            if length > limit:
                return False
            copied = 0
            while chunk := r.read(_CHUNK):
                copied += len(chunk)
                if copied > limit or time.monotonic() > deadline:
                    return False
                out.write(chunk)
            return copied > 0
    except (OSError, urllib.error.URLError, ValueError):  # refused, 404, timeout, bad URL
        return False


def _build_id(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            for sec in ELFFile(f).iter_sections("SHT_NOTE"):
                for note in sec.iter_notes():
                    if note["n_type"] == "NT_GNU_BUILD_ID":
                        return str(note["n_desc"]).lower()
    except Exception:  # not an ELF file, or a malformed one
        return None
    return None

