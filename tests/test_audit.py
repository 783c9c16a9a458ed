"""Audit trail: every change to a target (apply, prepare, cutover, abort,
revert, recover) leaves one JSON line in --log-file and one syslog record,
with who did it, to which process, with which patch, and how it ended."""
from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import HOTPATCH, assert_error, assert_ok, describe, run_hotpatch
from ksplice_py import audit


@pytest.fixture
def workers(build, spawn):
    return spawn(build.target("workers"), 2)


def records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def me() -> dict:
    return {"uid": os.getuid(), "name": pwd.getpwuid(os.getuid()).pw_name}


def test_apply_and_revert_are_logged(build, workers, tmp_path):
    patch = build.patch("compute_mul", MUL=3)
    log = tmp_path / "audit.jsonl"
    assert_ok(run_hotpatch("apply", workers.pid, patch, "--log-file", log))
    workers.wait_all_return(21)
    assert_ok(run_hotpatch("list", workers.pid))  # reading is not logged
    assert_ok(run_hotpatch("revert", workers.pid, "--log-file", log))

    applied, reverted = records(log)
    sha = hashlib.sha256(patch.read_bytes()).hexdigest()
    for rec, action in ((applied, "apply"), (reverted, "revert")):
        assert rec["action"] == action
        assert rec["result"] == "ok" and rec["exit_code"] == 0 and "error" not in rec, rec
        assert rec["pid"] == workers.pid and rec["exe"] == str(workers.exe), rec
        assert rec["target_start_time"] == int(workers.start_time()), rec
        assert rec["sha256"] == sha and rec["patch"] == str(patch), rec
        assert rec["functions"] == ["main:compute"], rec
        assert rec["edition"] == 1, rec
        assert rec["pause_us"] > 0, rec
        assert {k: rec["user"][k] for k in ("uid", "name")} == me(), rec
        assert rec["tool_pid"] != os.getpid() and rec["time"].endswith("Z"), rec
    assert os.stat(log).st_mode & 0o777 == 0o600, "the audit log is private"


def test_failures_are_logged_with_their_message(build, workers, tmp_path):
    log = tmp_path / "audit.jsonl"
    patch = build.patch("replace_named", TARGET='"no_such_function_xyz"')
    line = assert_error(run_hotpatch("apply", workers.pid, patch, "--log-file", log), 4)
    line2 = assert_error(run_hotpatch("revert", workers.pid, "--log-file", log), 2)
    first, second = records(log)
    assert first["result"] == "error" and first["exit_code"] == 4, first
    assert "hotpatch: " + first["error"] == line, (first, line)
    assert first["sha256"] == hashlib.sha256(patch.read_bytes()).hexdigest()
    assert first["functions"] == ["no_such_function_xyz"], first
    assert first["exe"] == str(workers.exe) and "edition" not in first, first
    assert second["action"] == "revert" and second["exit_code"] == 2, second
    assert "hotpatch: " + second["error"] == line2
    # a refused patch file is logged too, before any target is touched
    bad = tmp_path / "bad.so"
    bad.write_bytes(b"not elf")
    assert_error(run_hotpatch("apply", workers.pid, bad, "--log-file", log), 2)
    third = records(log)[2]
    assert third["exit_code"] == 2 and third["pid"] == workers.pid and "not an ELF" in third["error"]
    workers.assert_running()


def test_staged_cycle_and_recover_are_logged(build, workers, tmp_path):
    patch = build.patch("compute_mul", MUL=3)
    log = tmp_path / "audit.jsonl"
    for args in (("prepare", workers.pid, patch), ("abort", workers.pid),
                 ("prepare", workers.pid, patch), ("cutover", workers.pid),
                 ("recover", workers.pid)):
        assert_ok(run_hotpatch(*args, "--log-file", log))
    recs = records(log)
    assert [r["action"] for r in recs] == ["prepare", "abort", "prepare", "cutover", "recover"]
    assert all(r["result"] == "ok" and r["pid"] == workers.pid for r in recs), recs
    assert [r.get("edition") for r in recs] == [1, 1, 1, 1, None], recs
    assert recs[3]["pause_us"] > 0 and recs[3]["functions"] == ["main:compute"], recs[3]
    workers.wait_all_return(21)


def test_sudo_user_recorded(build, workers, tmp_path):
    log = tmp_path / "audit.jsonl"
    env = dict(os.environ, SUDO_USER="alice", SUDO_UID="1234")
    cp = subprocess.run([HOTPATCH, "recover", str(workers.pid), "--log-file", str(log)],
                        capture_output=True, text=True, env=env, timeout=60)
    assert cp.returncode == 0, describe(cp)
    user = records(log)[0]["user"]
    assert user["sudo_user"] == "alice" and user["sudo_uid"] == 1234, user
    assert user["uid"] == os.getuid(), user


def test_unwritable_log_refused_before_touching_target(build, workers, tmp_path):
    patch = build.patch("compute_mul", MUL=3)
    before = workers.code(), workers.maps()
    line = assert_error(run_hotpatch("apply", workers.pid, patch, "--log-file",
                                     tmp_path / "missing-dir" / "audit.jsonl"), 2)
    assert "log file" in line, line
    assert (workers.code(), workers.maps()) == before
    workers.assert_running()


def test_concurrent_writers_never_interleave(tmp_path):
    """O_APPEND + one write(2) a record: many tools, one file, whole lines."""
    log = tmp_path / "audit.jsonl"
    code = textwrap.dedent(f"""
        from ksplice_py import audit
        with audit.AuditLog({str(log)!r}, use_syslog=False) as trail:
            for i in range(200):
                r = audit.AuditRecord(action="apply", pid=i, functions=["f" * 500])
                trail.write(r)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(4)]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    recs = records(log)
    assert len(recs) == 800 and all(r["functions"] == ["f" * 500] for r in recs)


def test_syslog_without_daemon_does_not_raise():
    """No syslog daemon here (or wherever /dev/log is missing): still fine."""
    rec = audit.AuditRecord(action="apply", pid=1)
    rec.finish(4, "a failure")
    audit.AuditLog(None).write(rec)


SYSLOG_CAPTURE = r"""
import json, os, socket, sys
from ksplice_py import audit
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind("/dev/log")
sock.settimeout(5)
rec = audit.AuditRecord(action="revert", pid=4242, patch="fix.so", sha256="ab" * 32)
rec.finish(3, "no safe moment")
audit.AuditLog(None).write(rec)
print(sock.recv(65536).decode())
"""


def test_syslog_record_format():
    """Capture what reaches /dev/log, in a private mount namespace with its
    own /dev (nothing on the host changes)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private /dev")
    cp = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                         'mount -t tmpfs tmpfs /dev && exec "$0" -c "$1"', sys.executable,
                         SYSLOG_CAPTURE], capture_output=True, text=True, timeout=60)
    if cp.returncode and "mount" in cp.stderr:
        pytest.skip(f"cannot make a private /dev here: {cp.stderr[-200:]}")
    assert cp.returncode == 0, describe(cp)
    msg = cp.stdout.strip()
    # <PRI>: facility authpriv (10) * 8 + warning (4) = 84, for a failure
    assert msg.startswith("<84>"), msg
    assert "hotpatch[" in msg, msg
    body = json.loads(msg[msg.index("{"):])
    assert body["action"] == "revert" and body["exit_code"] == 3 and body["error"] == "no safe moment"
