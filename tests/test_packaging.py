"""No compiler at run time: the C helpers are compiled when the package is
built (setup.py's cffi_modules), so an installed tool and a wheel work on a
machine without gcc or python3-dev."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HOTPATCH, describe

REPO = Path(__file__).resolve().parent.parent
WORKERS = 2


def no_compiler_env(tmp_path: Path) -> dict[str, str]:
    """PATH holds no compiler, CC fails loudly, and the cache is empty."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    cc = bin_dir / "failing-cc"
    cc.write_text("#!/bin/sh\necho 'a compiler was called' >&2\nexit 1\n")
    cc.chmod(0o755)
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CFLAGS", "LDSHARED")}
    env.update(PATH=str(bin_dir), CC=str(cc), LDSHARED=str(cc), KSPLICE_PY_CACHE=str(cache))
    return env


def apply_and_check(cmd: list[str], env: dict, target, patch: Path, cwd: Path) -> None:
    cp = subprocess.run([*cmd, "apply", str(target.pid), str(patch)], capture_output=True,
                        text=True, env=env, cwd=cwd, timeout=120)
    assert cp.returncode == 0, describe(cp)
    assert "compiler" not in cp.stderr and "Traceback" not in cp.stderr, describe(cp)
    target.wait_all_return(21)
    target.assert_running()


def test_installed_tool_needs_no_compiler(build, spawn, tmp_path):
    patch = build.patch("compute_mul", MUL=3)
    target = spawn(build.target("workers"), WORKERS)
    apply_and_check([HOTPATCH], no_compiler_env(tmp_path), target, patch, tmp_path)
    assert not list((tmp_path / "cache").rglob("*.so")), "something was compiled at run time"


def test_wheel_carries_the_compiled_helpers(build, spawn, tmp_path):
    """Build a wheel (as pip would, in an isolated build environment),
    install it into a fresh directory and patch with it, with no compiler."""
    wheels = tmp_path / "wheels"
    cp = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels),
                         str(REPO)], capture_output=True, text=True, timeout=600)
    if cp.returncode and "Could not find a version" in cp.stderr:
        pytest.skip(f"no package index reachable for the build requirements: {cp.stderr[-300:]}")
    assert cp.returncode == 0, describe(cp)
    (wheel,) = wheels.glob("ksplice_py-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    assert list((site / "ksplice_py").glob("_kp_native*.so")), "the wheel has no compiled helpers"

    patch = build.patch("compute_mul", MUL=3)
    target = spawn(build.target("workers"), WORKERS)
    env = no_compiler_env(tmp_path)
    # The installed copy first on the path (its dependencies come from this
    # venv); -P keeps the working directory off sys.path.
    env["PYTHONPATH"] = str(site)
    run = [sys.executable, "-P", "-c", "import sys, ksplice_py.cli as c; "
           f"assert c.__file__.startswith({str(site)!r}), c.__file__; sys.exit(c.main())"]
    apply_and_check(run, env, target, patch, tmp_path)
