"""A target inside other namespaces (pid, mount): patched from the host."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import STATUS_SIZE, Status, assert_ok, run_hotpatch, thread_states, wait_until
from hardening_support import editions_of, mul3, needs_root  # noqa: F401 (fixtures)


@needs_root
def test_container_target(build, mul3, tmp_path):
    """A target in its own pid and mount namespaces, with a fresh tmpfs on
    /tmp, so neither the patch nor (by path) its own executable are visible
    inside: patched, listed and reverted by its host pid."""
    if not shutil.which("unshare"):
        pytest.skip("unshare not installed")
    exe = build.target("workers")
    status_path = tmp_path / "status.bin"
    status_path.write_bytes(b"\0" * STATUS_SIZE)
    script = ('exec 3<"$1" 4<>"$2"; mount -t tmpfs tmpfs /tmp || exit 97; '
              'exec /proc/self/fd/3 /proc/self/fd/4 2')
    outer = subprocess.Popen(["unshare", "--fork", "--kill-child", "--pid", "--mount", "--mount-proc",
                              "--propagation", "private", "sh", "-c", script, "sh", str(exe),
                              str(status_path)], stderr=subprocess.PIPE)
    try:
        status = Status(status_path)
        deadline = time.monotonic() + 10
        while not status.ready:
            if outer.poll() is not None:
                pytest.skip(f"cannot create namespaces here: {outer.stderr.read()[-300:]!r}")
            assert time.monotonic() < deadline, "the container target did not start"
            time.sleep(0.01)
        pid = int(Path(f"/proc/{outer.pid}/task/{outer.pid}/children").read_text().split()[0])
        nspid = [line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                 if line.startswith("NSpid:")][0].split()[1:]
        assert len(nspid) == 2 and nspid[1] == "1", f"premise: pid 1 in its own namespace: {nspid}"
        assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        assert not os.path.exists(f"/proc/{pid}/root{mul3}"), "premise: patch invisible inside"
        assert not os.path.exists(f"/proc/{pid}/root{exe}"), "premise: exe invisible by path"

        assert_ok(run_hotpatch("apply", pid, mul3))
        wait_until(lambda: set(status.lasts()) == {21}, 2, lambda: f"21 from {status.lasts()}")
        eds = editions_of(pid)
        assert [e["state"] for e in eds] == ["applied"], eds
        assert_ok(run_hotpatch("revert", pid))
        wait_until(lambda: set(status.lasts()) == {14}, 2, lambda: f"14 from {status.lasts()}")
        assert editions_of(pid) == []
        assert not any(s in "tT" for s in thread_states(pid).values())
    finally:
        outer.kill()  # --kill-child: the namespace's init (our target) dies with it
        outer.wait()
