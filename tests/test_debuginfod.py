"""Stripped programs and debuginfod (issue #15 item 12): a static function of
a stripped program is patched with its symbols fetched by build-id from a
real debuginfod server, cached, and the fetch is bounded in time.

The server (Debian package ``debuginfod``) cannot be told which address to
listen on, so it runs in a network namespace of its own, where only its
loopback exists; the hotpatch commands that talk to it enter that namespace
(ptrace does not care about network namespaces)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import HOTPATCH, assert_error, assert_ok, describe, run_hotpatch
from inline import Proc, gcc, patch

PROG_C = r"""
#include <stdio.h>
#include <stdlib.h>
static __attribute__((noinline)) int secret(int x) { return x * 3 + 1; }
int main(void)
{
    char line[64];
    printf("ready\n"); fflush(stdout);
    while (fgets(line, sizeof line, stdin)) { printf("%d\n", secret(atoi(line))); fflush(stdout); }
    return 0;
}
"""

SECRET_PATCH = r"""
#include <hotpatch.h>
static int secret_v2(int x) { return x * 100; }
HOTPATCH_REPLACE("main:secret", secret_v2);
"""

PORT = 8002  # inside the server's own network namespace: never taken


def _missing() -> str | None:
    for tool in ("debuginfod", "unshare", "nsenter", "ip", "objcopy"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install debuginfod iproute2 util-linux binutils)"
    if os.geteuid() != 0:
        return "needs root for a network namespace"
    return None


def _in_netns(server: subprocess.Popen, *argv: object, env: dict | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net=/proc/{server.pid}/ns/net", *map(str, argv)],
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def stripped(tmp_path_factory) -> tuple[Path, Path, str]:
    """(stripped program, directory holding only its debug file, build-id)."""
    d = tmp_path_factory.mktemp("stripped")
    (d / "prog.c").write_text(PROG_C)
    gcc("-O2", "-g", "-o", d / "prog.full", d / "prog.c")
    debug_dir = d / "debug"
    debug_dir.mkdir()
    subprocess.run(["objcopy", "--only-keep-debug", d / "prog.full", debug_dir / "prog.debug"], check=True)
    subprocess.run(["objcopy", "--strip-all", d / "prog.full", d / "prog"], check=True)
    syms = subprocess.run(["nm", d / "prog"], capture_output=True, text=True).stdout + \
        subprocess.run(["nm", "-D", d / "prog"], capture_output=True, text=True).stdout
    assert "secret" not in syms, "the stripped program still names secret()"
    note = subprocess.run(["readelf", "-n", d / "prog"], capture_output=True, text=True, check=True).stdout
    build_id = note.split("Build ID:")[1].split()[0]
    return d / "prog", debug_dir, build_id


@pytest.fixture(scope="module")
def server(stripped, tmp_path_factory):
    why = _missing()
    if why:
        pytest.skip(why)
    _, debug_dir, build_id = stripped
    db = tmp_path_factory.mktemp("debuginfod") / "db.sqlite"
    proc = subprocess.Popen(
        ["unshare", "--net", "--", "sh", "-c",
         f"ip link set lo up && exec debuginfod -F -p {PORT} -d {db} -t 0 -g 0 {debug_dir}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    probe = ("import sys, urllib.request; "
             f"urllib.request.urlopen('http://127.0.0.1:{PORT}/buildid/{build_id}/debuginfo', timeout=2)")
    deadline = time.monotonic() + 30
    while True:
        time.sleep(0.2)
        if proc.poll() is not None:
            pytest.fail(f"debuginfod exited: {proc.stderr.read().decode()[-500:]}")
        if os.path.exists(f"/proc/{proc.pid}/ns/net") and \
                _in_netns(proc, "python3", "-c", probe, timeout=10).returncode == 0:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("debuginfod did not serve the debug file within 30 s")
    yield proc
    proc.kill()
    proc.wait()


def _env(cache: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEBUGINFOD_")}
    return {**env, "KSPLICE_PY_CACHE": str(cache), **extra}


def test_static_function_of_stripped_program_patched_via_debuginfod(stripped, server, tmp_path):
    prog, _, build_id = stripped
    fix = patch(tmp_path, "fix", SECRET_PATCH)
    cache = tmp_path / "cache"
    with Proc([str(prog)]) as t:
        assert t.ask("5") == "16"
        # without a server: the static function cannot be named
        no_server = subprocess.run([HOTPATCH, "check", str(t.pid), str(fix)], capture_output=True,
                                   text=True, env=_env(cache))
        assert_error(no_server, 4)
        assert "secret" in no_server.stderr
        cp = _in_netns(server, HOTPATCH, "apply", t.pid, fix,
                       env=_env(cache, DEBUGINFOD_URLS=f"http://127.0.0.1:{PORT}"))
        assert_ok(cp)
        assert "main:secret" in cp.stdout, describe(cp)
        assert t.ask("5") == "500"
        # kept under the project's cache dir, by build-id
        assert (cache / "debuginfod" / f"{build_id}.debug").is_file()
        assert_ok(run_hotpatch("revert", t.pid))
        # the cache serves the next command without any server
        assert_ok(subprocess.run([HOTPATCH, "check", str(t.pid), str(fix)], capture_output=True,
                                 text=True, env=_env(cache)))


def test_silent_server_bounded_by_debuginfod_timeout(stripped, tmp_path):
    """A server that accepts and never answers costs DEBUGINFOD_TIMEOUT, not a hang."""
    prog, _, _ = stripped
    fix = patch(tmp_path, "fix", SECRET_PATCH)
    with socket.socket() as silent, Proc([str(prog)]) as t:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody ever replies
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"

        def check(**env: str) -> float:
            t0 = time.monotonic()
            cp = subprocess.run([HOTPATCH, "check", str(t.pid), str(fix)], capture_output=True,
                                text=True, env=_env(tmp_path / "cache", **env), timeout=60)
            assert_error(cp, 4)
            return time.monotonic() - t0

        without = check()  # the same refusal with no server: start-up, symbols (warm cache)
        silent_server = check(DEBUGINFOD_URLS=url, DEBUGINFOD_TIMEOUT="1")
        assert silent_server - without < 5, \
            f"{silent_server:.1f} s with a silent server and DEBUGINFOD_TIMEOUT=1, {without:.1f} s without"
        assert t.ask("5") == "16"
