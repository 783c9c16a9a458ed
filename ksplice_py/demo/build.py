"""Build the demo server and its patches with the system C compiler.

Outputs go to a cache directory keyed by a hash of the sources, the flags
and the compiler's identity, so a second run builds nothing. Each output is
compiled under a temporary name and renamed into place: concurrent runs
never see a half-written binary.
"""
from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import HotpatchError
from ..resources import cache_dir
from ..patchfile import cflags
from .. import resources

DEMO_SRC = resources.csrc() / "demo"
SERVER_SRC = DEMO_SRC / "dnsserver.c"
ZONE = DEMO_SRC / "zone.txt"
PATCH_SRC = DEMO_SRC / "patches"
PATCHES = ("fix_parse", "limit_response")

# -fstack-protector-strong makes the parser's overflow a deterministic abort
# (canary check on return) instead of whatever the smashed frame does next.
SERVER_CFLAGS = ("-O2", "-g", "-pie", "-fPIE", "-pthread", "-fstack-protector-strong", "-Wall")
SERVER_LIBS = ("-lresolv",)  # res_* live in libc.so.6 since glibc 2.34; older ones need it


@dataclass(frozen=True)
class Artifacts:
    server: Path
    zone: Path
    patches: dict[str, Path]  # "fix_parse" -> .so


def compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise HotpatchError("no C compiler found: install gcc (apt-get install gcc) or set CC")
    return cc


def _cc_identity(cc: str) -> str:
    try:
        return subprocess.run([*shlex.split(cc), "--version"], capture_output=True, text=True,
                              timeout=30).stdout
    except OSError as e:
        raise HotpatchError(f"C compiler {cc!r} cannot run: {e}; install gcc or set CC") from None


def _compile(cmd: list[str], out: Path) -> None:
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    cp = subprocess.run([*cmd, "-o", str(tmp)], capture_output=True, text=True, timeout=120)
    if cp.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = (cp.stderr.strip().splitlines() or ["(no output)"])[0]
        raise HotpatchError(f"building {out.name} failed: {first}")
    os.replace(tmp, out)


def build(outdir: Path | None = None) -> Artifacts:
    """Compile (or find in the cache) the server and both patches."""
    cc = compiler()
    patch_flags = shlex.split(cflags())
    sources = [SERVER_SRC, *(PATCH_SRC / f"{n}.c" for n in PATCHES)]
    h = hashlib.sha256()
    for part in (cc, _cc_identity(cc), *SERVER_CFLAGS, *SERVER_LIBS, *patch_flags):
        h.update(part.encode() + b"\0")
    for src in sources:
        h.update(src.read_bytes())
    out = (outdir or cache_dir() / "demo") / h.hexdigest()[:16]
    out.mkdir(parents=True, exist_ok=True)

    server = out / "dnsserver"
    if not server.exists():
        _compile([*shlex.split(cc), *SERVER_CFLAGS, str(SERVER_SRC), *SERVER_LIBS], server)
    patches = {}
    for name in PATCHES:
        so = out / f"{name}.so"
        if not so.exists():
            _compile([*shlex.split(cc), "-shared", "-fPIC", "-O2", "-Wall", *patch_flags,
                      str(PATCH_SRC / f"{name}.c")], so)
        patches[name] = so
    return Artifacts(server=server, zone=ZONE, patches=patches)
