"""GCC's clones of local functions, by name.

At -O2 gcc may replace a local function by a specialised copy whose ABI is
not the source's: ``f.constprop.0`` has constant arguments folded in (and
dropped from its parameter list), ``f.isra.0`` passes parts of aggregates
instead of the aggregate (or drops unused ones), ``f.part.0`` is the outlined
tail of a partially inlined ``f``. A replacement written to ``f``'s source
signature is wrong for any of them, silently. So a clone is only patched when
the patch declares it was written for the clone's ABI
(``HOTPATCH_CLONE_ABI``), and a missing ``f`` is reported with its clones.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import CloneAbiMismatch

# The suffixes that change a function's calling convention. (.cold is the
# unlikely half of a split function, not a callable entry; .lto_priv and
# .localalias keep the ABI.)
ABI_CHANGING = ("constprop", "isra", "part")
_CLONE = re.compile(r"\.(%s)\.\d+" % "|".join(ABI_CHANGING))


def clone_kinds(name: str) -> list[str]:
    """The ABI-changing clone suffixes in a symbol name, in order
    (``f.isra.0.constprop.0`` -> ["isra", "constprop"]); [] for none."""
    return [m.group(1) for m in _CLONE.finditer(name)]


def is_clone(name: str) -> bool:
    return bool(_CLONE.search(name))


def origin(name: str) -> str:
    """The source function a clone was made from: ``f.constprop.0`` -> ``f``."""
    m = _CLONE.search(name)
    return name[:m.start()] if m else name


def clones_of(name: str, names: Iterable[str]) -> list[str]:
    """The ABI-changing clones of function ``name`` among ``names``, sorted."""
    return sorted(n for n in names if n != name and is_clone(n) and origin(n) == name)


def describe(name: str) -> str:
    """Why a clone's ABI may differ, for refusals."""
    what = {"constprop": "constant arguments folded in and dropped",
            "isra": "arguments split, passed by value or dropped",
            "part": "the outlined part of a partially inlined function, with its own arguments"}
    return "; ".join(what[k] for k in dict.fromkeys(clone_kinds(name)))


def refuse_undeclared(qualified: str, target: str, declared: bool) -> None:
    """Raise CloneAbiMismatch (exit 4) when ``qualified`` is a clone and the
    patch did not declare it was written for the clone's ABI."""
    name = qualified.rpartition(":")[2]
    if is_clone(name) and not declared:
        raise CloneAbiMismatch(
            f"{qualified} is a gcc clone of {origin(name)} ({describe(name)}), so a replacement "
            f"written to {origin(name)}'s source signature would be called with other "
            f"arguments; if yours was written for the clone's ABI, add "
            f'HOTPATCH_CLONE_ABI("{target}")', symbol=qualified)
