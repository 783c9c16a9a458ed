"""Where the files we ship next to the code live: the C sources (helpers,
hotpatch.h, the demo) and the built-in harnesses. Both are mapped into the
package by pyproject's package-dir, so the same lookup works from a source
checkout, an editable install and a wheel."""
from __future__ import annotations

import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=None)
def _find(package: str, repo_dir: str) -> Path:
    try:
        path = Path(str(resources.files(package)))
        if path.is_dir():
            return path
    except (ModuleNotFoundError, TypeError):
        pass
    return _REPO / repo_dir  # running from a checkout without installing


def csrc() -> Path:
    return _find("ksplice_py._csrc", "csrc")


def harnesses_dir() -> Path:
    return _find("ksplice_py._harnesses", "harnesses")


def cache_dir() -> Path:
    """Where built helpers, symbol tables and demo builds are kept:
    $KSPLICE_PY_CACHE, else $XDG_CACHE_HOME/ksplice_py, else ~/.cache/ksplice_py."""
    env = os.environ.get("KSPLICE_PY_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "ksplice_py" if xdg else Path.home() / ".cache" / "ksplice_py"
