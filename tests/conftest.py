"""Shared fixtures for the acceptance tests: build real C targets and patches,
run targets as real processes, observe them through a shared status file
(tests/targets/common.h), and run the `hotpatch` command.

Helpers importable from tests (``from conftest import ...``):
    run_hotpatch(*args, timeout=30) -> CompletedProcess
    assert_error(cp, code)            exit code + exactly one stderr line
    assert_not_stopped(pid)           no thread in t/T state
    wait_until(pred, timeout, what)
    first_instruction(binary, func) / symbol_size(binary, sym)
Fixtures: build (session), spawn (factory), hotpatch_cflags (session).
"""
from __future__ import annotations

import mmap
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pytest

TESTS = Path(__file__).resolve().parent

# Never the real audit log (/var/log/ksplice_py/audit.jsonl): every hotpatch
# the tests run, and the library used in-process, append to this file instead.
AUDIT_LOG = Path(tempfile.mkdtemp(prefix="ksplice-py-tests-")) / "audit.jsonl"
os.environ["KSPLICE_PY_AUDIT_LOG"] = str(AUDIT_LOG)
TARGETS = TESTS / "targets"
PATCHES = TESTS / "patches"


# --- the command under test --------------------------------------------------

def _find_hotpatch() -> str:
    beside = Path(sys.executable).parent / "hotpatch"
    if beside.exists():
        return str(beside)
    # Not installed: leave the bare name so each test fails with a clear error.
    return shutil.which("hotpatch") or "hotpatch"


HOTPATCH = _find_hotpatch()


def run_hotpatch(*args: object, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run ``hotpatch ARGS``; never a Python traceback, whatever the outcome."""
    cp = subprocess.run([HOTPATCH, *map(str, args)], capture_output=True, text=True,
                        timeout=timeout)
    assert "Traceback" not in cp.stderr, f"hotpatch {args} printed a traceback:\n{cp.stderr}"
    assert "Traceback" not in cp.stdout, f"hotpatch {args} printed a traceback:\n{cp.stdout}"
    return cp


def describe(cp: subprocess.CompletedProcess) -> str:
    return f"exit {cp.returncode}\nstdout: {cp.stdout!r}\nstderr: {cp.stderr!r}"


def assert_ok(cp: subprocess.CompletedProcess) -> None:
    assert cp.returncode == 0, describe(cp)


def assert_error(cp: subprocess.CompletedProcess, code: int) -> str:
    """The documented exit code and exactly one non-empty line on stderr."""
    assert cp.returncode == code, describe(cp)
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"want one error line on stderr\n{describe(cp)}"
    return lines[0]


# --- small utilities ----------------------------------------------------------

def wait_until(pred: Callable[[], object], timeout: float, what: str | Callable[[], str],
               interval: float = 0.005):
    """Poll ``pred`` until truthy; fail naming ``what`` (a string, or a
    callable giving one at failure time) after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for "
                        f"{what() if callable(what) else what}")
        time.sleep(interval)


def thread_states(pid: int) -> dict[int, str]:
    """State letter of every thread of ``pid`` (R, S, D, t, T, Z, ...)."""
    states = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("State:"):
                        states[int(tid)] = line.split()[1]
        except (FileNotFoundError, ProcessLookupError):
            pass  # thread exited meanwhile (ESRCH while reading a dying task)
    return states


def assert_not_stopped(pid: int) -> None:
    stopped = {tid: s for tid, s in thread_states(pid).items() if s in ("t", "T")}
    assert not stopped, f"threads of {pid} left stopped: {stopped}"


def tracer_pid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


def read_mem(pid: int, addr: int, size: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(addr)
        return f.read(size)


INJECTOR = "/memfd:ksplice_py:injector"


def maps_lines(pid: int) -> list[str]:
    """The target's mappings, less the injector page: the one thing a target
    keeps once hotpatch has touched it (created once per process lifetime,
    since creating/removing it are the only moments a killed tool could
    hurt the target; see README)."""
    with open(f"/proc/{pid}/maps") as f:
        return [line for line in f.read().splitlines() if INJECTOR not in line]


def first_instruction(binary: Path, func: str) -> str:
    """objdump's text of the first instruction of ``func`` (AT&T syntax)."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--disassemble={func}",
                          str(binary)], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith(f"<{func}>:"))
    return lines[start + 1].split("\t", 1)[1].strip()


def disassembly(binary: Path, func: str) -> list[tuple[int, str]]:
    """[(address, instruction text)] of ``func``."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--disassemble={func}",
                          str(binary)], capture_output=True, text=True, check=True).stdout
    insns, inside = [], False
    for line in out.splitlines():
        if line.endswith(f"<{func}>:"):
            inside = True
        elif inside and ":\t" in line:
            addr, text = line.split(":\t", 1)
            insns.append((int(addr, 16), text.strip()))
        elif inside and not line.strip():
            break
    return insns


def symbol_size(binary: Path, sym: str) -> int:
    out = subprocess.run(["nm", "-S", str(binary)], capture_output=True, text=True,
                         check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[3] == sym:
            return int(parts[1], 16)
    raise KeyError(sym)


# --- status file (layout: tests/targets/common.h) -----------------------------

STATUS_SIZE = 4096
MAGIC = 0x7375746174737068
SLOTS = {name: i for i, name in enumerate([
    "addr0", "addr1", "addr2", "addr3", "errors", "eintr", "early",
    "read_bytes", "read_bad", "read_returns", "in_read",
    "epoll_bytes", "epoll_returns", "in_epoll", "timed_waits", "sleeps", "in_sleep",
    "hold_state", "hold_result", "hold_calls", "wrap_hits", "factor", "commands",
])}
_HEADER = 32
_WORKERS = 256
_WORKER_SIZE = 64


class Status:
    """Read-only view of a target's status file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), STATUS_SIZE, access=mmap.ACCESS_READ)

    def _q(self, off: int) -> int:
        return struct.unpack_from("<q", self._mm, off)[0]

    @property
    def magic(self) -> int:
        return self._q(0) & 0xFFFFFFFFFFFFFFFF

    @property
    def ready(self) -> bool:
        return self.magic == MAGIC and self._q(8) == 1

    @property
    def nworkers(self) -> int:
        return self._q(16)

    def __getitem__(self, name: str) -> int:
        return self._q(_HEADER + 8 * SLOTS[name])

    def iters(self) -> list[int]:
        return [self._q(_WORKERS + _WORKER_SIZE * i) for i in range(self.nworkers)]

    def lasts(self) -> list[int]:
        return [self._q(_WORKERS + _WORKER_SIZE * i + 8) for i in range(self.nworkers)]


# --- targets ------------------------------------------------------------------

@dataclass
class Target:
    proc: subprocess.Popen
    status: Status
    exe: Path
    log: Path
    expect_exit: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def addr(self, slot: str = "addr0") -> int:
        value = self.status[slot]
        assert value, f"target did not report {slot}"
        return value

    def code(self, slot: str = "addr0", size: int = 32) -> bytes:
        return read_mem(self.pid, self.addr(slot), size)

    def maps(self) -> list[str]:
        return maps_lines(self.pid)

    def start_time(self) -> str:
        """Field 22 of /proc/PID/stat: same pid + same start time = same process."""
        with open(f"/proc/{self.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]

    def assert_alive(self) -> None:
        assert self.alive(), f"target {self.pid} died (exit {self.proc.returncode}):\n{self.output()}"

    def assert_progress(self, timeout: float = 1.0) -> None:
        """Every worker completes more batches (is neither stopped nor stuck)."""
        before = self.status.iters()
        wait_until(lambda: all(a > b for a, b in zip(self.status.iters(), before)),
                   timeout, lambda: f"every worker of {self.pid} to make progress "
                                    f"(iters {before} -> {self.status.iters()})")

    def wait_all_return(self, value: int, timeout: float = 1.0) -> None:
        """Every worker runs a fresh batch and its last result is ``value``."""
        before = self.status.iters()
        wait_until(lambda: all(i > b for i, b in zip(self.status.iters(), before))
                   and all(v == value for v in self.status.lasts()),
                   timeout, lambda: f"all workers to return {value} "
                                    f"(last: {self.status.lasts()})")

    def assert_running(self) -> None:
        """Alive, no thread stopped, and every worker still advancing."""
        self.assert_alive()
        assert_not_stopped(self.pid)
        self.assert_progress()

    def assert_healthy(self) -> None:
        """Nothing the target counts as wrong has happened."""
        bad = {k: self.status[k] for k in ("errors", "eintr", "early") if self.status[k]}
        assert not bad, f"target {self.pid} reported {bad}"


@pytest.fixture
def spawn(tmp_path: Path):
    """spawn(exe, *args, pass_fds=(), stdin=None) -> Target, ready to use.

    argv is ``exe STATUS_FILE *args``. At teardown every target is killed; a
    target that died on its own (without ``expect_exit``) fails the test.
    """
    targets: list[Target] = []

    def _spawn(exe: Path, *args: object, pass_fds: Sequence[int] = (),
               stdin: int | None = subprocess.DEVNULL, ready_timeout: float = 5.0) -> Target:
        n = len(targets)
        status_path = tmp_path / f"status{n}.bin"
        status_path.write_bytes(b"\0" * STATUS_SIZE)
        log = tmp_path / f"target{n}.log"
        with open(log, "wb") as logf:
            proc = subprocess.Popen([str(exe), str(status_path), *map(str, args)],
                                    stdin=stdin, stdout=logf, stderr=subprocess.STDOUT,
                                    pass_fds=pass_fds)
        target = Target(proc, Status(status_path), Path(exe), log)
        targets.append(target)
        deadline = time.monotonic() + ready_timeout
        while not target.status.ready:
            if not target.alive():
                pytest.fail(f"target {exe.name} died while starting:\n{target.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"target {exe.name} not ready after {ready_timeout}s")
            time.sleep(0.005)
        return target

    yield _spawn

    died = [t for t in targets if not t.expect_exit and not t.alive()]
    for t in targets:
        if t.alive():
            t.proc.kill()
        t.proc.wait(timeout=10)
        if t.proc.stdin:
            t.proc.stdin.close()
    if died:
        pytest.fail("target died before teardown: " + "; ".join(
            f"{t.exe.name} pid {t.pid} exit {t.proc.returncode}: {t.output()[-500:]!r}"
            for t in died))


# --- building targets and patches --------------------------------------------

def get_cflags() -> list[str]:
    """Flags for building a patch, from `hotpatch cflags` (run once)."""
    if not _cflags:
        cp = run_hotpatch("cflags")
        assert cp.returncode == 0 and cp.stdout.strip(), f"`hotpatch cflags` failed: {describe(cp)}"
        _cflags.extend(shlex.split(cp.stdout))
    return list(_cflags)


_cflags: list[str] = []


@pytest.fixture(scope="session")
def hotpatch_cflags() -> list[str]:
    return get_cflags()


def _compile(cmd: list[str]) -> None:
    cp = subprocess.run(cmd, capture_output=True, text=True)
    assert cp.returncode == 0, f"compile failed: {shlex.join(cmd)}\n{cp.stderr}"


class Build:
    """Compiles (once per session) targets from tests/targets and patches
    from tests/patches into a scratch directory."""

    CFLAGS = ["-O2", "-g", "-Wall", "-Wextra"]

    def __init__(self, outdir: Path, cflags_getter: Callable[[], list[str]]) -> None:
        self.outdir = outdir
        self._cflags_getter = cflags_getter
        self._cache: dict[tuple, Path] = {}

    def _out(self, key: tuple, name: str) -> tuple[Path, bool]:
        if key in self._cache:
            return self._cache[key], True
        out = self.outdir / f"{name}-{len(self._cache)}"
        out.mkdir()
        self._cache[key] = out / name
        return out / name, False

    @staticmethod
    def _defines(defines: dict[str, object]) -> list[str]:
        return [f"-D{k}={v}" for k, v in sorted(defines.items())]

    def library(self, src: str) -> Path:
        """tests/targets/<src>.c as <src>.so (src = "libdemo")."""
        out, cached = self._out(("lib", src), f"{src}.so")
        if not cached:
            _compile(["gcc", *self.CFLAGS, "-shared", "-fPIC", "-o", str(out),
                      str(TARGETS / f"{src}.c")])
        return out

    def target(self, src: str, defines: dict[str, object] | None = None,
               libs: Sequence[str] = ()) -> Path:
        """A PIE executable from tests/targets/<src>.c, linked to our libraries
        ``libs`` (by DT_NEEDED with an rpath)."""
        defines = defines or {}
        key = ("exe", src, tuple(sorted(defines.items())), tuple(libs))
        out, cached = self._out(key, src)
        if not cached:
            cmd = ["gcc", *self.CFLAGS, "-pie", "-fPIE", "-pthread", f"-I{TARGETS}",
                   *self._defines(defines), "-o", str(out), str(TARGETS / f"{src}.c")]
            for lib in libs:
                so = self.library(lib)
                cmd += [f"-L{so.parent}", f"-l{lib.removeprefix('lib')}",
                        f"-Wl,-rpath,{so.parent}"]
            _compile(cmd)
        return out

    def patch(self, src: str, **defines: object) -> Path:
        """tests/patches/<src>.c built as the contract says:
        cc -shared -fPIC -O2 $(hotpatch cflags) -o fix.so fix.c"""
        key = ("patch", src, tuple(sorted(defines.items())))
        out, cached = self._out(key, f"{src}.so")
        if not cached:
            _compile(["gcc", "-shared", "-fPIC", "-O2", *self._cflags_getter(),
                      *self._defines(defines), "-o", str(out), str(PATCHES / f"{src}.c")])
        return out


@pytest.fixture(scope="session")
def build(tmp_path_factory) -> Build:
    # cflags are fetched lazily, so targets build even while `hotpatch cflags`
    # is broken (tests that need a patch then fail in the patch build).
    return Build(tmp_path_factory.mktemp("build"), get_cflags)
