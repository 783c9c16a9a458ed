"""The C helpers of csrc/native, built through cffi on first use.

Built once per source hash into a cache directory (the package may live in a
read-only site-packages); later imports only load the compiled module."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

from . import resources

NATIVE_SRC = resources.csrc() / "native"
# Each C source with its header (the header doubles as cffi's cdef).
MODULES = ("kp_native", "kp_advance")


def cache_dir() -> Path:
    base = os.environ.get("KSPLICE_PY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ksplice_py"
    )
    return Path(base)


def _cdef(header: str) -> str:
    # cffi's parser takes plain declarations; the header is written for that.
    lines = [ln for ln in header.splitlines() if not ln.startswith("#include")]
    return "\n".join(lines)


@lru_cache(maxsize=1)
def load():
    """Return (ffi, lib) of the compiled helpers, compiling them if needed."""
    header = "\n".join((NATIVE_SRC / f"{m}.h").read_text() for m in MODULES)
    source = "\n".join((NATIVE_SRC / f"{m}.c").read_text() for m in MODULES)
    tag = hashlib.sha256((header + source + sys.version).encode()).hexdigest()[:16]
    modname = f"_kp_native_{tag}"
    outdir = cache_dir() / "native"
    outdir.mkdir(parents=True, exist_ok=True)
    found = list(outdir.glob(f"{modname}*.so"))
    if not found:
        found = [_build(modname, header, outdir)]
    spec = importlib.util.spec_from_file_location(modname, found[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ffi, mod.lib


def _build(modname: str, header: str, outdir: Path) -> Path:
    from cffi import FFI

    ffi = FFI()
    ffi.cdef(_cdef(header))
    ffi.set_source(
        modname,
        "".join(f'#include "{m}.h"\n' for m in MODULES),
        sources=[str(NATIVE_SRC / f"{m}.c") for m in MODULES],
        include_dirs=[str(NATIVE_SRC)],
        extra_compile_args=["-O2", "-Wall"],
    )
    # Build in a private temp dir, then move into place atomically so that
    # concurrent first runs do not load a half-written module.
    with tempfile.TemporaryDirectory(dir=outdir) as tmp:
        built = Path(ffi.compile(tmpdir=tmp, verbose=False))
        dest = outdir / built.name
        os.replace(built, dest)
    return dest
