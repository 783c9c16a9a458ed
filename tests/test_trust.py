"""Trust in the patch file (docs/security.md): ownership and modes of the
file and its directories as root, --insecure, --sha256 pins, and the bytes
checked being the bytes loaded. Refusals exit 2 and leave the target as it was.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time

import pytest

import ksplice_py
from conftest import HOTPATCH, assert_error, assert_ok, describe, run_hotpatch
from hardening_support import (NOBODY, assert_unchanged, mul3, needs_root, safe_copy, snapshot,
                               workers)  # noqa: F401 (fixtures)
from ksplice_py import UntrustedPatch, trust


@needs_root
@pytest.mark.parametrize("mode, who", [(0o664, "group"), (0o646, "others"), (0o666, "group and others")])
def test_writable_patch_refused(workers, mul3, tmp_path, mode, who):
    patch = safe_copy(mul3, tmp_path / "fix.so", mode)
    before = snapshot(workers)
    line = assert_error(run_hotpatch("apply", workers.pid, patch, "--timeout", 2), 2)
    assert f"writable by {who}" in line and str(patch) in line and "--insecure" in line, line
    assert_unchanged(workers, before)


@needs_root
def test_insecure_overrides_modes_and_owner(workers, mul3, tmp_path):
    patch = safe_copy(mul3, tmp_path / "fix.so", 0o666)
    os.chown(patch, NOBODY, NOBODY)
    assert_error(run_hotpatch("check", workers.pid, patch), 2)
    assert_ok(run_hotpatch("apply", workers.pid, patch, "--insecure"))
    workers.wait_all_return(21)
    assert_ok(run_hotpatch("revert", workers.pid))


@needs_root
def test_patch_owned_by_other_user_refused(workers, mul3, tmp_path):
    patch = safe_copy(mul3, tmp_path / "fix.so")
    os.chown(patch, NOBODY, NOBODY)
    before = snapshot(workers)
    line = assert_error(run_hotpatch("apply", workers.pid, patch), 2)
    assert "owned by" in line and "not root" in line, line
    assert_unchanged(workers, before)


@needs_root
def test_unsafe_directory_refused(workers, mul3, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    patch = safe_copy(mul3, shared / "fix.so")
    os.chmod(shared, 0o777)  # anyone could have swapped fix.so
    line = assert_error(run_hotpatch("apply", workers.pid, patch), 2)
    assert f"directory {shared}" in line and "writable" in line, line
    os.chmod(shared, 0o1777)  # sticky, root-owned (like /tmp): entries are safe
    assert_ok(run_hotpatch("check", workers.pid, patch))
    os.chown(shared, NOBODY, NOBODY)  # sticky, but its owner may replace anything
    line = assert_error(run_hotpatch("check", workers.pid, patch), 2)
    assert "owned by" in line, line
    os.chmod(shared, 0o755)  # owned by someone else even without write bits
    assert_error(run_hotpatch("check", workers.pid, patch), 2)
    workers.assert_running()


@needs_root
def test_symlink_through_unsafe_directory_refused(workers, mul3, tmp_path):
    """The file itself is safe, but the symlink naming it sits where anyone
    could point it elsewhere."""
    safe = safe_copy(mul3, tmp_path / "fix.so")
    unsafe = tmp_path / "drop"
    unsafe.mkdir(mode=0o777)
    os.chmod(unsafe, 0o777)
    (unsafe / "link.so").symlink_to(safe)
    line = assert_error(run_hotpatch("check", workers.pid, unsafe / "link.so"), 2)
    assert str(unsafe) in line, line
    # ...and a safe symlink to a file in an unsafe directory is refused too
    bad = safe_copy(mul3, unsafe / "real.so")
    (tmp_path / "ok-link.so").symlink_to(bad)
    assert_error(run_hotpatch("check", workers.pid, tmp_path / "ok-link.so"), 2)


def test_sha256_pin(workers, mul3, tmp_path):
    patch = safe_copy(mul3, tmp_path / "fix.so")
    good = hashlib.sha256(patch.read_bytes()).hexdigest()
    line = assert_error(run_hotpatch("apply", workers.pid, patch, "--sha256", "0" * 64), 2)
    assert good in line and "--sha256" in line, line
    line = assert_error(run_hotpatch("info", patch, "--sha256", "0" * 64), 2)
    assert_error(run_hotpatch("apply", workers.pid, patch, "--sha256", "xyz"), 2)
    # --insecure never skips the pin
    assert_error(run_hotpatch("apply", workers.pid, patch, "--sha256", "f" * 64, "--insecure"), 2)
    workers.assert_running()
    assert set(workers.status.lasts()) == {14}
    assert_ok(run_hotpatch("apply", workers.pid, patch, "--sha256", good.upper()))
    workers.wait_all_return(21)


def test_fifo_or_directory_refused_without_hang(workers, tmp_path):
    fifo = tmp_path / "fix.so"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    line = assert_error(run_hotpatch("apply", workers.pid, fifo, timeout=10), 2)
    assert "FIFO" in line and time.monotonic() - t0 < 10, line
    line = assert_error(run_hotpatch("info", tmp_path), 2)
    assert "directory" in line, line
    workers.assert_running()


def test_patch_read_once_end_to_end(workers, mul3, tmp_path):
    """strace the real command: the patch path is opened exactly once, and
    never again (no re-open by path between checking and loading)."""
    strace = shutil.which("strace")
    if not strace:
        pytest.skip("strace not installed")
    patch = safe_copy(mul3, tmp_path / "once.so")
    log = tmp_path / "strace.log"
    cp = subprocess.run([strace, "-f", "-qq", "-o", str(log), "-e",
                         "trace=open,openat,openat2,creat,execve,truncate,rename,renameat,renameat2",
                         HOTPATCH, "apply", str(workers.pid), str(patch), "--timeout", "5"],
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, describe(cp)
    opens = [line for line in log.read_text().splitlines()
             if str(patch) in line and "execve" not in line]
    assert len(opens) == 1, "\n".join(opens)
    assert "O_RDONLY" in opens[0] and "O_CREAT" not in opens[0], opens[0]
    workers.wait_all_return(21)


def test_loaded_bytes_are_the_checked_bytes(workers, build, tmp_path):
    """Library level: what is applied is what was read, whatever happens to
    the path afterwards."""
    patch = safe_copy(build.patch("compute_mul", MUL=3), tmp_path / "fix.so")
    first = patch.read_bytes()
    loaded = trust.load_patch(patch)
    patch.write_bytes(build.patch("compute_mul", MUL=5).read_bytes())  # swapped after the read
    with ksplice_py.attach(workers.pid) as proc:
        edition = proc.apply(loaded, timeout=5)
    assert edition.sha256 == hashlib.sha256(first).hexdigest()
    workers.wait_all_return(21)  # 7 * 3, not 7 * 5


def test_trust_policy_unit(tmp_path, mul3):
    """The rules themselves, whoever runs the tests (enforce=True)."""
    policy = trust.Policy(enforce=True)
    patch = safe_copy(mul3, tmp_path / "p.so")
    os.chmod(tmp_path, 0o700)
    assert trust.read_patch(patch, policy) == mul3.read_bytes()
    os.chmod(patch, 0o620)
    with pytest.raises(UntrustedPatch, match="writable by group"):
        trust.read_patch(patch, policy)
    assert trust.read_patch(patch, trust.Policy(insecure=True, enforce=True))
    assert trust.read_patch(patch, trust.Policy(enforce=False))
    with pytest.raises(UntrustedPatch, match="sha256"):
        trust.read_patch(patch, trust.Policy(insecure=True, sha256="0" * 64))
    with pytest.raises(ksplice_py.BadInput):
        trust.parse_sha256("abc")
