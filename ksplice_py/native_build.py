"""How the C helpers of csrc/native are compiled: the ONE list of their sources.

Used twice: by setup.py (``cffi_modules``) when the package is built, so a
wheel or ``pip install`` carries the compiled module and nothing needs a
compiler at run time; and by native.py in a development checkout whose C
sources changed after it was installed (see native.py). cffi's setuptools
hook executes this file by path, outside the package, so it imports nothing
from ksplice_py.

Adding a C file: append it to SOURCES (and its header to HEADERS if Python
calls into it).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from cffi import FFI

SOURCES = ("kp_native.c", "kp_advance.c")
HEADERS = ("kp_native.h", "kp_advance.h")  # also the cdef: plain declarations cffi can parse
MODULE = "ksplice_py._kp_native"
# cffi's setuptools hook runs this file as "ksplice_py/native_build.py":
# relative, as setuptools wants every source path to be.
REPO_SRC = Path(__file__).parent.parent / "csrc" / "native"


def source_hash(src_dir: Path) -> str:
    """Identifies the C code a module was built from (stale-build check)."""
    h = hashlib.sha256()
    for name in (*HEADERS, *SOURCES):
        h.update(name.encode() + b"\0" + (src_dir / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _cdef(src_dir: Path) -> str:
    text = "\n".join((src_dir / h).read_text() for h in HEADERS)
    return "\n".join(ln for ln in text.splitlines() if not ln.startswith("#include"))


def ffibuilder_for(src_dir: Path, module: str = MODULE) -> FFI:
    """An FFI ready to compile the helpers in src_dir as ``module``; the
    module answers kp_source_hash() with the hash of what it was built from."""
    ffi = FFI()
    ffi.cdef(_cdef(src_dir) + "\nconst char *kp_source_hash(void);\n")
    includes = "".join(f'#include "{h}"\n' for h in HEADERS)
    ffi.set_source(
        module,
        includes + f'static const char *kp_source_hash(void) {{ return "{source_hash(src_dir)}"; }}\n',
        sources=[str(src_dir / s) for s in SOURCES],
        include_dirs=[str(src_dir)],
        extra_compile_args=["-O2", "-Wall"],
    )
    return ffi


# setup.py: cffi_modules=["ksplice_py/native_build.py:ffibuilder"]
ffibuilder = ffibuilder_for(REPO_SRC) if REPO_SRC.is_dir() else None
