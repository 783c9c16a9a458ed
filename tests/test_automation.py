"""Safe to drive from scripts (issue #15): results never lie, an interrupt
never leaves a lie or a traceback, apply is idempotent, lock files go away,
every change is audited the same way from the CLI and the library, and the
command-line conventions an admin expects are there."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import ksplice_py
from conftest import (HOTPATCH, assert_error, assert_ok, describe, run_hotpatch, tracer_pid,
                      wait_until)
from ksplice_py import audit
from ksplice_py.locking import TargetLock
from test_safety import blocker  # noqa: F401  (fixture)

INPUT = 7  # workers call compute(7); compute_mul makes it 7 * MUL


@pytest.fixture
def workers(build, spawn):
    return spawn(build.target("workers"), 2)


@pytest.fixture
def mul3(build):
    return build.patch("compute_mul", MUL=3)


def records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def editions(pid: int) -> list[dict]:
    cp = run_hotpatch("list", "--json", pid)
    assert_ok(cp)
    return json.loads(cp.stdout)


def run_with_stdout(args: list, stdout, **kw) -> subprocess.CompletedProcess:
    cp = subprocess.run([HOTPATCH, *map(str, args)], stdout=stdout, stderr=subprocess.PIPE,
                        text=True, timeout=60, **kw)
    assert "Traceback" not in cp.stderr, cp.stderr
    return cp


def closed_pipe() -> int:
    """The write end of a pipe nobody reads: `hotpatch ... | true`."""
    r, w = os.pipe()
    os.close(r)
    return w


def one_line(cp) -> str:
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1, f"want one line on stderr: {cp.stderr!r}"
    return lines[0]


# --- 1. the outcome is what happened to the target, whatever printing does ------------

@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["text", "json"])
@pytest.mark.parametrize("sink", ["closed-pipe", "dev-full"])
def test_output_failure_never_changes_the_outcome(workers, mul3, tmp_path, sink, json_flag):
    log = tmp_path / "audit.jsonl"
    out = closed_pipe() if sink == "closed-pipe" else os.open("/dev/full", os.O_WRONLY)
    try:
        cp = run_with_stdout(["apply", *json_flag, workers.pid, mul3, "--log-file", log], out)
    finally:
        os.close(out)
    assert cp.returncode == 0, describe(cp)
    line = one_line(cp)
    assert "could not write the output" in line and "exit status (0)" in line, line
    (rec,) = records(log)
    assert rec["result"] == "ok" and rec["exit_code"] == 0 and rec["edition"] == 1, rec
    workers.wait_all_return(INPUT * 3)
    # A retry (what a script does after a "failure") stacks nothing.
    assert_ok(run_hotpatch("apply", workers.pid, mul3))
    assert [e["state"] for e in editions(workers.pid)] == ["applied"]


def test_output_failure_keeps_an_error_exit_code(workers, build, tmp_path):
    """A refused patch stays exit 4 when its --json error cannot be printed."""
    patch = build.patch("replace_named", TARGET='"no_such_function_xyz"')
    out = closed_pipe()
    try:
        cp = run_with_stdout(["apply", "--json", workers.pid, patch], out)
    finally:
        os.close(out)
    assert cp.returncode == 4, describe(cp)
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 2 and "no_such_function_xyz" in lines[0] and "could not write" in lines[1], lines


def test_help_into_a_closed_pipe():
    out = closed_pipe()
    try:
        cp = run_with_stdout(["--help"], out)
    finally:
        os.close(out)
    assert cp.returncode == 0 and "could not write the output" in one_line(cp), describe(cp)


# --- 2. SIGINT ------------------------------------------------------------------------

def sigcgt(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return int(line.split()[1], 16)
    return 0


def test_sigint_during_start_up(workers):
    """From the moment the tool's own handlers are up (the first thing its
    entry point does, before the library is imported): exit 130, one line."""
    tool = subprocess.Popen([HOTPATCH, "list", str(workers.pid)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    term_bit = 1 << (signal.SIGTERM - 1)  # Python does not catch SIGTERM by default
    wait_until(lambda: tool.poll() is not None or sigcgt(tool.pid) & term_bit, 10,
               "the tool to install its signal handlers", interval=0.0005)
    tool.send_signal(signal.SIGINT)
    out, err = tool.communicate(timeout=30)
    assert "Traceback" not in err, err
    assert tool.returncode == 130, (tool.returncode, out, err)
    assert err.strip() == ("hotpatch: interrupted by SIGINT; the target was left running "
                           "and unchanged"), err
    workers.assert_running()


def test_sigint_before_the_switch_leaves_the_target_untouched(build, blocker, tmp_path):
    """A real wait for a safe moment (a thread inside hold()), interrupted."""
    target = blocker
    patch = build.patch("hold_v2")
    code, maps = target.code("addr0"), target.maps()
    log = tmp_path / "audit.jsonl"
    tool = subprocess.Popen([HOTPATCH, "apply", str(target.pid), str(patch), "--timeout", "30",
                             "--log-file", str(log)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_until(lambda: any("ksplice_py:ed1" in m for m in target.maps()), 20,
               "the tool to map the edition")
    time.sleep(0.3)  # into the retry loop
    tool.send_signal(signal.SIGINT)
    out, err = tool.communicate(timeout=30)
    assert tool.returncode == 130 and "Traceback" not in err, (tool.returncode, err)
    assert err.strip() == ("hotpatch: interrupted by SIGINT; the target was left running "
                           "and unchanged"), err
    assert target.code("addr0") == code and target.maps() == maps
    assert tracer_pid(target.pid) == 0
    target.assert_running()
    (rec,) = records(log)
    assert rec["exit_code"] == 130 and rec["result"] == "error", rec


SIGNALLING_HARNESS = '''
import os, signal
from ksplice_py.harness import Harness

def interrupt(proc, edition):
    os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C, at exactly this moment

HARNESS = Harness(name="ctrl-c-{when}", description="SIGINT to the tool {when} the switch",
                  objects=("main",), {when}_cutover=interrupt)
'''


def with_harness(tmp_path: Path, when: str) -> dict:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / f"ctrl_c_{when}.py").write_text(SIGNALLING_HARNESS.format(when=when))
    return dict(os.environ, KSPLICE_PY_HARNESS_PATH=str(plugins))


def test_sigint_just_after_the_switch_completes_and_tells_the_truth(workers, mul3, tmp_path):
    log = tmp_path / "audit.jsonl"
    cp = subprocess.run([HOTPATCH, "apply", str(workers.pid), str(mul3), "--log-file", str(log)],
                        capture_output=True, text=True, timeout=60, env=with_harness(tmp_path, "after"))
    assert cp.returncode == 0 and "edition 1 applied" in cp.stdout, describe(cp)
    assert "Traceback" not in cp.stderr
    workers.wait_all_return(INPUT * 3)
    assert [e["state"] for e in editions(workers.pid)] == ["applied"]
    (rec,) = records(log)
    assert rec["result"] == "ok" and rec["edition"] == 1, rec
    workers.assert_running()


def test_library_keyboard_interrupt_after_the_switch_keeps_the_new_code(workers, mul3, tmp_path,
                                                                         monkeypatch):
    """A program using the library with Python's own Ctrl-C handling: the
    KeyboardInterrupt reaches it after the attempt, and the edition that was
    switched stays (unmapping it would crash the target)."""
    from ksplice_py import harness
    monkeypatch.setenv("KSPLICE_PY_HARNESS_PATH", with_harness(tmp_path, "after")["KSPLICE_PY_HARNESS_PATH"])
    harness.discover.cache_clear()
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with ksplice_py.attach(workers.pid) as proc:
            with pytest.raises(KeyboardInterrupt):
                proc.apply(str(mul3))
            assert [e.state for e in proc.editions()] == ["applied"]
    finally:
        signal.signal(signal.SIGINT, old)
        harness.discover.cache_clear()
    workers.wait_all_return(INPUT * 3)
    workers.assert_running()


def test_sigint_just_before_the_switch_unwinds(workers, mul3, tmp_path):
    maps = workers.maps()
    cp = subprocess.run([HOTPATCH, "apply", str(workers.pid), str(mul3)], capture_output=True,
                        text=True, timeout=60, env=with_harness(tmp_path, "before"))
    assert cp.returncode == 130 and "interrupted by SIGINT" in one_line(cp), describe(cp)
    assert workers.maps() == maps and editions(workers.pid) == []
    workers.wait_all_return(INPUT * 2)


# --- 3. idempotent by content -----------------------------------------------------------

def test_same_patch_twice_is_already_applied(workers, mul3, tmp_path):
    log = tmp_path / "audit.jsonl"
    assert_ok(run_hotpatch("apply", workers.pid, mul3, "--log-file", log))
    cp = run_hotpatch("apply", workers.pid, mul3, "--log-file", log)
    assert_ok(cp)
    assert "already applied" in cp.stdout and "as edition 1" in cp.stdout, cp.stdout
    cp = run_hotpatch("apply", "--json", workers.pid, mul3)
    assert_ok(cp)
    d = json.loads(cp.stdout)
    assert d["already_applied"] is True and d["id"] == 1 and d["pid"] == workers.pid, d
    assert len(editions(workers.pid)) == 1
    second = records(log)[1]
    assert second["already_applied"] is True and second["edition"] == 1, second
    assert "pause_us" not in second and second["result"] == "ok", second
    # --again stacks a second copy, deliberately
    assert_ok(run_hotpatch("apply", workers.pid, mul3, "--again"))
    assert [e["id"] for e in editions(workers.pid)] == [2, 1]
    workers.wait_all_return(INPUT * 3)


def test_idempotence_is_in_the_library(workers, mul3, build):
    mul5 = build.patch("compute_mul", MUL=5)
    with ksplice_py.attach(workers.pid) as proc:
        first = proc.apply(str(mul3))
        again = proc.apply(str(mul3))
        assert again.already_applied and again.id == first.id
        # overridden by a newer edition: no longer in force, so it applies again
        proc.apply(str(mul5))
        third = proc.apply(str(mul3))
        assert not third.already_applied and third.id == 3
        assert [e.id for e in proc.editions()] == [3, 2, 1]
    workers.wait_all_return(INPUT * 3)


# --- 9. conventions -------------------------------------------------------------------------

def test_version():
    cp = run_hotpatch("--version")
    assert_ok(cp)
    assert cp.stdout.strip() == f"hotpatch (ksplice_py) {ksplice_py.__version__}"


def test_help_shows_short_form_exit_codes_and_every_argument():
    cp = run_hotpatch("--help")
    assert_ok(cp)
    assert "hotpatch PID PATCH" in cp.stdout
    for code in ("0", "1", "2", "3", "4", "130"):
        assert re.search(rf"^\s+{code}\s+\S", cp.stdout, re.M), f"exit code {code} missing"
    from ksplice_py.cli import _subcommand_actions, build_parser
    undocumented = [a.dest for a in _subcommand_actions(build_parser())
                    if not a.help and a.dest != "help"]
    assert not undocumented, f"arguments without help: {undocumented}"


def test_man_page_is_generated_from_the_parser(tmp_path):
    cp = run_hotpatch("--print-man-page")
    assert_ok(cp)
    assert cp.stdout.startswith(".TH HOTPATCH")
    for word in ("apply", "revert", "--timeout", "--again"):
        assert word.replace("-", r"\-") in cp.stdout, word
    if shutil.which("man"):
        page = tmp_path / "hotpatch.1"
        page.write_text(cp.stdout)
        shown = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True,
                               env=dict(os.environ, MANWIDTH="100"))
        text = re.sub(".\b", "", shown.stdout)  # no overstrike bold
        assert shown.returncode == 0 and "hotpatch PID PATCH" in text, shown.stderr


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_scripts(shell, tmp_path):
    cp = run_hotpatch("--print-completion", shell)
    assert_ok(cp)
    assert "revert" in cp.stdout and "--timeout" in cp.stdout
    if not shutil.which(shell):
        pytest.skip(f"{shell} is not installed: script generated but not syntax-checked")
    script = tmp_path / f"hotpatch.{shell}"
    script.write_text(cp.stdout)
    check = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_timeout_zero_means_try_once(workers, mul3, build, blocker):
    assert_ok(run_hotpatch("apply", workers.pid, mul3, "--timeout", "0"))
    workers.wait_all_return(INPUT * 3)
    started = time.monotonic()
    line = assert_error(run_hotpatch("apply", blocker.pid, build.patch("hold_v2"), "--timeout", "0"), 3)
    assert time.monotonic() - started < 10
    assert "no safe moment" in line, line
    assert "between 0" not in assert_error(run_hotpatch("apply", workers.pid, mul3, "--timeout", "-1"), 2)


# --- 10. list / revert / info / not a patch -----------------------------------------------------

def test_list_tells_orphans_from_staged_editions(build, blocker, workers, mul3):
    # a tool killed while it waited for a safe moment leaves a prepared edition
    tool = subprocess.Popen([HOTPATCH, "apply", str(blocker.pid), str(build.patch("hold_v2")),
                             "--timeout", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: any("ksplice_py:ed1" in m for m in blocker.maps()), 20, "the edition to be mapped")
    time.sleep(0.3)
    tool.kill()
    tool.wait()
    (orphan,) = editions(blocker.pid)
    assert orphan["orphaned"] is True and orphan["pid"] == blocker.pid, orphan
    cp = run_hotpatch("list", blocker.pid)
    assert_ok(cp)
    assert "(orphaned)" in cp.stdout and f"hotpatch recover {blocker.pid}" in cp.stdout, cp.stdout
    # while another tool holds the target's lock, nobody can tell: not marked
    with TargetLock(blocker.pid):
        assert editions(blocker.pid)[0]["orphaned"] is False
    # prepared on purpose
    assert_ok(run_hotpatch("prepare", workers.pid, mul3))
    (staged,) = editions(workers.pid)
    assert staged["orphaned"] is False and staged["staged"] is True, staged
    assert "prepared (staged)" in run_hotpatch("list", workers.pid).stdout


def test_revert_keeps_the_apply_pause(workers, mul3):
    applied = json.loads(run_hotpatch("apply", "--json", workers.pid, mul3).stdout)
    cp = run_hotpatch("revert", "--json", workers.pid)
    assert_ok(cp)
    reverted = json.loads(cp.stdout)
    assert reverted["state"] == "reverted" and reverted["pause_us"] == applied["pause_us"], reverted
    assert reverted["reverted_at"] >= applied["applied_at"] and reverted["revert_pause_us"] > 0, reverted
    workers.wait_all_return(INPUT * 2)


def test_info_labels_its_columns(mul3):
    cp = run_hotpatch("info", mul3)
    assert_ok(cp)
    assert re.search(r"replaces\s+compute\s+with compute_new$", cp.stdout, re.M), cp.stdout


@pytest.mark.parametrize("what", ["library", "program"])
def test_a_non_patch_elf_is_not_a_hotpatch_patch(workers, what):
    elf = "/lib/x86_64-linux-gnu/libc.so.6" if what == "library" else str(workers.exe)
    maps = workers.maps()
    for cmd in (("info", elf), ("apply", workers.pid, elf), ("check", workers.pid, elf)):
        line = assert_error(run_hotpatch(*cmd), 2)
        assert "not a hotpatch patch" in line, (cmd, line)
    assert workers.maps() == maps


# --- 11. lock files -----------------------------------------------------------------------

def test_lock_file_removed_when_the_command_ends(workers, mul3, build):
    lock = Path(TargetLock(workers.pid).path)
    for args in (("apply", workers.pid, mul3), ("list", workers.pid), ("revert", workers.pid),
                 ("check", workers.pid, mul3), ("recover", workers.pid)):
        assert_ok(run_hotpatch(*args))
        assert not lock.exists(), f"{args[0]} left {lock}"
    assert_error(run_hotpatch("apply", workers.pid, build.patch("replace_named", TARGET='"nope_xyz"')), 4)
    assert not lock.exists()


def test_lock_held_refuses_a_second_tool(workers, mul3):
    with TargetLock(workers.pid):
        line = assert_error(run_hotpatch("apply", workers.pid, mul3), 2)
        assert "another hotpatch is working" in line
    assert_ok(run_hotpatch("apply", workers.pid, mul3))


LOCK_RACER = textwrap.dedent("""
    import os, sys
    from ksplice_py.errors import AccessDenied
    from ksplice_py.locking import TargetLock
    pid, inside, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    won = 0
    for _ in range(rounds):
        lock = TargetLock(pid)
        try:
            lock.acquire()
        except AccessDenied:
            continue
        try:  # the critical section: nobody else may be in it
            fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
            os.unlink(inside)
            won += 1
        finally:
            lock.release()
    print(won)
""")


def test_removing_lock_files_keeps_mutual_exclusion(tmp_path):
    """Holders unlink the lock file; four processes race for it 3000 times
    each: never two inside at once (O_EXCL on a marker file would fail)."""
    pid = 4_000_000 + os.getpid()  # no such process: only the lock file matters
    inside = tmp_path / "inside"
    racers = [subprocess.Popen([sys.executable, "-c", LOCK_RACER, str(pid), str(inside), "3000"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(4)]
    results = [r.communicate(timeout=300) for r in racers]
    for r, (out, err) in zip(racers, results):
        assert r.returncode == 0, err[-2000:]
    assert sum(int(out) for out, _ in results) > 100, results
    assert not Path(TargetLock(pid).path).exists()


# --- 13. audit ------------------------------------------------------------------------------

def test_library_operations_are_audited(workers, mul3, tmp_path, monkeypatch):
    log = tmp_path / "default.jsonl"
    monkeypatch.setenv(audit.LOG_ENV, str(log))
    with ksplice_py.attach(workers.pid) as proc:
        e = proc.apply(str(mul3))
        proc.revert(e.id)
        with pytest.raises(ksplice_py.BadInput):
            proc.revert()
    applied, reverted, failed = records(log)
    assert [r["action"] for r in (applied, reverted, failed)] == ["apply", "revert", "revert"]
    assert applied["result"] == reverted["result"] == "ok" and failed["exit_code"] == 2
    assert applied["patch"] == reverted["patch"] == str(mul3) and applied["sha256"] == reverted["sha256"]
    assert applied["tool_pid"] == os.getpid() and applied["pid"] == workers.pid


def test_apply_and_revert_name_the_patch_alike(workers, mul3, tmp_path):
    """Given by a relative path: both records carry the same absolute path."""
    log = tmp_path / "audit.jsonl"
    for args in (("apply", workers.pid, mul3.name), ("revert", workers.pid)):
        cp = subprocess.run([HOTPATCH, *map(str, args), "--log-file", str(log)], cwd=mul3.parent,
                            capture_output=True, text=True, timeout=60)
        assert cp.returncode == 0, describe(cp)
    applied, reverted = records(log)
    assert applied["patch"] == reverted["patch"] == str(mul3), (applied, reverted)


def test_default_persistent_log(workers, mul3, tmp_path):
    log = tmp_path / "var-log" / "ksplice_py" / "audit.jsonl"  # directory created on demand
    env = dict(os.environ, **{audit.LOG_ENV: str(log)})
    for args in (("apply", workers.pid, mul3), ("list", workers.pid), ("revert", workers.pid)):
        cp = subprocess.run([HOTPATCH, *map(str, args)], capture_output=True, text=True, env=env,
                            timeout=60)
        assert cp.returncode == 0, describe(cp)
    assert [r["action"] for r in records(log)] == ["apply", "revert"]
    assert os.stat(log).st_mode & 0o777 == 0o600 and os.stat(log.parent).st_mode & 0o777 == 0o700


def test_default_log_location(monkeypatch):
    monkeypatch.delenv(audit.LOG_ENV, raising=False)
    assert audit.default_log_path() == "/var/log/ksplice_py/audit.jsonl"
    monkeypatch.setenv(audit.LOG_ENV, "")
    assert audit.default_log_path() is None  # empty: syslog only
