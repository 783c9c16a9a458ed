"""`hotpatch build`: a live patch from a source tree and a diff.

1. copy the tree twice, apply the diff to one copy (the tree itself is only
   read), build both with the project's command through our compiler
   wrapper (tree.py, ccwrap.py);
2. compare the objects per function and variable (objdiff.py), refusing
   what cannot be a live patch;
3. check that the "before" build reproduces the running object's code for
   everything replaced (baseline.py);
4. write the patch: changed and new code, new constant data, references to
   everything else bound to the running originals (emit.py).
"""
from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BuildInputError, NotLivePatchable
from . import baseline, emit, objdiff, sourcediff, tree
from .running import RunningObject


@dataclass
class BuildResult:
    patch: Path
    object: str  # "main" or the library's basename
    build_id: str | None
    replaced: list[dict] = field(default_factory=list)  # {"function", "file", "why"}
    inlined: list[dict] = field(default_factory=list)  # replaced only because a helper was inlined
    added: list[dict] = field(default_factory=list)
    new_data: list[dict] = field(default_factory=list)  # new (or replaced file-local) constants, new variables
    inline_only: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"patch": str(self.patch), "object": self.object, "build_id": self.build_id,
                "replaced": self.replaced, "inlined": self.inlined, "added": self.added,
                "new_data": self.new_data, "inline_only": self.inline_only}


def default_output(diff: Path) -> Path:
    return diff.with_suffix(".so")


def build_patch(src: Path, diff: Path, relpath: str, out: Path | None = None, make: str = "make",
                binary: Path | None = None) -> BuildResult:
    src, diff = Path(src), Path(diff)
    tree.check_inputs(src, diff)
    running = RunningObject(_reference(src, relpath, binary))
    out = Path(out) if out else default_output(diff)
    with tempfile.TemporaryDirectory(prefix="hotpatch-build-") as tmp:
        work = Path(tmp)
        bindir = work / "bin"
        tree.install_wrapper(bindir)
        tree.copy_tree(src, work / "before", relpath)
        tree.copy_tree(src, work / "after", relpath)
        strip = tree.apply_diff(diff, work / "after")
        changes = sourcediff.parse(diff, strip)
        with ThreadPoolExecutor(2) as pool:  # two independent builds (subprocesses)
            jobs = [pool.submit(tree.run_build, work / label, make, bindir, relpath, label)
                    for label in ("before", "after")]
            before, after = (job.result() for job in jobs)
        cmp = objdiff.compare(before.objects, after.objects, before.assembly | after.assembly, changes,
                              running.why_not_in_place)
        if cmp.refusals:
            raise NotLivePatchable(cmp.refusals)
        reasons = baseline.check(cmp.units, running)
        if reasons:
            raise NotLivePatchable(reasons)
        reasons = emit.write(cmp.units, running, work, out)
        if reasons:
            raise NotLivePatchable(reasons)
    return _result(out, running, cmp)


def _reference(src: Path, relpath: str, binary: Path | None) -> Path:
    """What runs: --binary, else RELPATH as built in the tree."""
    path = Path(binary) if binary else src / relpath
    if not path.is_file():
        hint = "" if binary else " (build the tree first, or give --binary with the installed copy)"
        raise BuildInputError(f"{path}: no such file{hint}")
    return path


def _result(out: Path, running: RunningObject, cmp: objdiff.Comparison) -> BuildResult:
    res = BuildResult(out, running.patch_name, running.build_id, inline_only=cmp.inline_only)
    for u in cmp.units:
        for name, why in sorted(u.replace.items()):
            row = {"function": name, "file": u.source, "why": why}
            (res.inlined if name in u.inlined_via else res.replaced).append(row)
        for name, why in sorted(u.add.items()):
            res.added.append({"function": name, "file": u.source, "why": why})
        for name in sorted(u.new_vars):
            sec = u.after.section_of(u.after.variables[name])
            res.new_data.append({"name": name, "file": u.source,
                                 "kind": "variable" if sec.writable else "constant"})
    return res
