"""What the hardening tests share (docs/security.md): the target they patch,
the patch, and the check that a refused operation left the target as it was."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import assert_ok, run_hotpatch, tracer_pid

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root")
NOBODY = 65534


def gcc(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(["gcc", *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def workers(build, spawn):
    return spawn(build.target("workers"), 2)


@pytest.fixture
def mul3(build) -> Path:
    return build.patch("compute_mul", MUL=3)


INJECTOR = "/memfd:ksplice_py:injector"  # the tracer's syscall page, kept once created


def snapshot(target) -> tuple:
    return target.code("addr0"), [m for m in target.maps() if INJECTOR not in m]


def assert_unchanged(target, before: tuple) -> None:
    target.assert_alive()
    assert snapshot(target) == before, "the target's code or mappings changed"
    assert tracer_pid(target.pid) == 0
    target.assert_running()
    assert set(target.status.lasts()) == {14}


def editions_of(pid: int) -> list[dict]:
    cp = run_hotpatch("list", pid, "--json")
    assert_ok(cp)
    return json.loads(cp.stdout)


def safe_copy(src: Path, dst: Path, mode: int = 0o644) -> Path:
    shutil.copyfile(src, dst)
    os.chmod(dst, mode)
    return dst
