"""The C helpers of csrc/native, compiled when the package is built.

setup.py compiles them through cffi (native_build.py) into
``ksplice_py._kp_native``, so an installed tool needs no compiler. Only a
development checkout whose C sources changed since it was installed builds
them again, once per source hash, into a cache directory."""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import tempfile
from functools import lru_cache
from pathlib import Path

from . import native_build, resources
from .errors import HotpatchError
from .resources import cache_dir

NATIVE_SRC = resources.csrc() / "native"


@lru_cache(maxsize=1)
def header_constants() -> dict[str, int]:
    """The header's integer ``#define KP_*`` (verdicts, thread states,
    options): the numbers cffi gives the compiled module, read from the text
    so that a caller needs no compiler (cffi's parser costs 0.3 s)."""
    text = (NATIVE_SRC / "kp_native.h").read_text()
    return {m[1]: int(m[2], 0) for m in re.finditer(r"^#define\s+(KP_\w+)\s+(\w+)", text, re.M)}


@lru_cache(maxsize=1)
def load():
    """Return (ffi, lib) of the compiled helpers."""
    want = native_build.source_hash(NATIVE_SRC) if NATIVE_SRC.is_dir() else None
    try:
        mod = importlib.import_module(native_build.MODULE)
    except ImportError:
        mod = None
    if mod is not None and (want is None or _built_from(mod) == want):
        return mod.ffi, mod.lib
    if want is None:
        raise HotpatchError("the C helpers of ksplice_py are missing; reinstall the package")
    mod = _dev_build(want)
    return mod.ffi, mod.lib


def _built_from(mod) -> str:
    return mod.ffi.string(mod.lib.kp_source_hash()).decode()


def _dev_build(tag: str):
    """A checkout whose C sources are newer than its build: compile them
    (this is the only path that needs a compiler)."""
    modname = f"_kp_native_{tag}"
    outdir = cache_dir() / "native"
    outdir.mkdir(parents=True, exist_ok=True)
    found = list(outdir.glob(f"{modname}.*so"))
    if not found:
        found = [_compile(modname, outdir)]
    spec = importlib.util.spec_from_file_location(modname, found[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _compile(modname: str, outdir: Path) -> Path:
    from cffi import CDefError, VerificationError

    ffi = native_build.ffibuilder_for(NATIVE_SRC, modname)
    # Build in a private temp dir, then move into place atomically so that
    # concurrent first runs do not load a half-written module.
    with tempfile.TemporaryDirectory(dir=outdir) as tmp:
        try:
            built = Path(ffi.compile(tmpdir=tmp, verbose=False))
        except (CDefError, VerificationError) as e:
            raise HotpatchError(f"cannot build the C helpers of this checkout ({e}); "
                                "reinstall it with pip install -e .") from None
        dest = outdir / built.name
        os.replace(built, dest)
    return dest
