"""The two builds of `hotpatch build`: copies of the source tree before and
after the diff, built with the project's own command through our compiler
wrapper (ccwrap.py). The user's tree is only read."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BuildInputError, HotpatchError

BUILD_TIMEOUT = 1800  # seconds per build
WRAPPED = ("cc", "gcc")
LOG_TAIL = 12  # lines of a failing build shown to the user


@dataclass
class Build:
    """One built copy: its root, the object of interest, and the objects
    that went into it, by source path relative to the root."""

    root: Path
    target: Path
    objects: dict[str, Path] = field(default_factory=dict)  # "src/a.c" -> a.o
    assembly: set[str] = field(default_factory=set)  # sources that are .s/.S


def check_inputs(src: Path, diff: Path) -> None:
    if not src.is_dir():
        raise BuildInputError(f"--src {src}: no such directory")
    if not diff.is_file():
        raise BuildInputError(f"--diff {diff}: no such file")


def copy_tree(src: Path, dest: Path, relpath: str) -> None:
    """A copy to build in, without the objects and the target already built
    there (so that every object is rebuilt through the wrapper)."""
    try:
        shutil.copytree(src, dest, symlinks=True)
    except (OSError, shutil.Error) as e:
        first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise BuildInputError(f"cannot copy {src} to build in: {first}") from None
    for path in dest.rglob("*.o"):
        if path.is_file():
            path.unlink()
    (dest / relpath).unlink(missing_ok=True)


def apply_diff(diff: Path, tree: Path) -> int:
    """Apply a unified diff (`git diff`, `diff -u`): -p1 first, then -p0.
    Returns the strip level used."""
    if shutil.which("patch") is None:
        raise HotpatchError("hotpatch build needs the 'patch' program: apt-get install patch")
    last = ""
    for strip in (1, 0):
        base = ["patch", f"-p{strip}", "--batch", "--forward", "--silent", "-d", str(tree),
                "-i", str(diff.resolve())]
        dry = subprocess.run([*base, "--dry-run"], capture_output=True, text=True, timeout=120)
        if dry.returncode == 0:
            real = subprocess.run(base, capture_output=True, text=True, timeout=120)
            if real.returncode == 0:
                return strip
            dry = real
        last = (dry.stdout + dry.stderr).strip().splitlines()[-1:] or ["(no output)"]
        last = last[0]
    raise BuildInputError(f"--diff {diff} does not apply to the tree with -p1 or -p0: {last}")


def install_wrapper(bindir: Path) -> None:
    bindir.mkdir(parents=True, exist_ok=True)
    script = (Path(__file__).parent / "ccwrap.py").read_text()
    for name in WRAPPED:
        path = bindir / name
        path.write_text(f"#!{sys.executable} -S\n{script}")
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def run_build(root: Path, command: str, bindir: Path, relpath: str, label: str) -> Build:
    log = root.parent / f"{root.name}.buildlog"
    log.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update(HOTPATCH_BUILD_LOG=str(log), HOTPATCH_BUILD_PATH=env.get("PATH", ""),
               PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", CC=str(bindir / "cc"))
    try:
        cp = subprocess.run(command, shell=True, cwd=root, env=env, capture_output=True, text=True,
                            timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise BuildInputError(f"the {label} build ({command!r}) ran over {BUILD_TIMEOUT} s") from None
    if cp.returncode != 0:
        tail = (cp.stdout + cp.stderr).strip().splitlines()[-LOG_TAIL:]
        raise BuildInputError(f"the {label} build ({command!r}) failed with exit {cp.returncode}; "
                              "its last lines:", lines=tail)
    target = root / relpath
    if not target.is_file():
        raise BuildInputError(f"the {label} build ({command!r}) did not produce {relpath}")
    return _collect(root, target, log)


def _collect(root: Path, target: Path, log: Path) -> Build:
    steps = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    compiled = {Path(s["object"]).resolve(): Path(s["source"]) for s in steps if s["step"] == "compile"}
    links = [s for s in steps if s["step"] == "link" and Path(s["output"]).resolve() == target.resolve()]
    wanted = set(compiled)
    if links and not any(i.endswith(".a") for i in links[-1]["inputs"]):
        wanted = {Path(i).resolve() for i in links[-1]["inputs"]} & set(compiled)
    build = Build(root, target)
    for obj in sorted(wanted):
        src = compiled[obj]
        try:
            rel = str(src.resolve().relative_to(root.resolve()))
        except ValueError:
            continue  # a source outside the tree (generated elsewhere): not ours to patch
        build.objects[rel] = obj
        if src.suffix in (".s", ".S"):
            build.assembly.add(rel)
    if not build.objects:
        raise BuildInputError(f"the build compiled no C objects into {target.name} through cc/gcc "
                              "(does it honour CC or call cc from PATH?)")
    return build
