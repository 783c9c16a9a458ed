"""The three ways of patching a live process that the benchmarks compare.

Each operation runs as its own process, timed from the runner (end-to-end:
interpreter start-up, attach, everything, detach), and returns an OpResult.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # benchmarks/
OP_TIMEOUT = 120.0


def compile_bytecode(hotpatch: str) -> str:
    """Byte-compile ksplice_py with the tool's own interpreter, as a wheel
    install does: an editable checkout under PYTHONDONTWRITEBYTECODE=1
    recompiles every module on every run (0.4 s of a 0.5 s apply)."""
    python = Path(hotpatch).read_text().splitlines()[0].removeprefix("#!").strip()
    cp = subprocess.run([python, "-c", "import ksplice_py, compileall, os; "
                         "print(compileall.compile_dir(os.path.dirname(ksplice_py.__file__), quiet=1))"],
                        capture_output=True, text=True, timeout=300)
    return "compiled" if cp.returncode == 0 and cp.stdout.strip() == "True" else f"not compiled: {cp.stderr[-200:]}"


@dataclass
class OpResult:
    tool: str
    op: str
    ok: bool
    wall_s: float
    pause_us: float | None = None   # the tool's own report (ours only)
    attempts: int | None = None
    gap_us: float | None = None     # longest heartbeat gap around the op
    rc: int | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, {})}


def _run(cmd: list[str], env: dict | None = None, timeout: float = OP_TIMEOUT):
    t0 = time.perf_counter()
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        return None, time.perf_counter() - t0, f"timed out after {timeout} s: {(e.stderr or b'')[-300:]!r}"
    return cp, time.perf_counter() - t0, None


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


class Ours:
    name = "ksplice_py"

    def __init__(self, hotpatch: str, cache: Path) -> None:
        self.hotpatch, self.cache = hotpatch, cache

    def _env(self, cache: Path | None) -> dict:
        return os.environ | {"KSPLICE_PY_CACHE": str(cache or self.cache)}

    def _op(self, op: str, args: list[str], cache: Path | None) -> OpResult:
        cp, wall, err = _run([self.hotpatch, op, *args, "--json"], env=self._env(cache))
        if cp is None:
            return OpResult(self.name, op, False, wall, error=err)
        try:
            data = json.loads(cp.stdout)
        except json.JSONDecodeError:
            data = {}
        if cp.returncode != 0:
            return OpResult(self.name, op, False, wall, rc=cp.returncode,
                            error=_last_line(cp.stderr) or data.get("error"))
        pause = data.get("revert_pause_us") if op == "revert" else data.get("pause_us")
        return OpResult(self.name, op, True, wall, pause_us=pause,
                        attempts=data.get("attempts"), rc=0,
                        extra={"functions": len(data.get("functions", []))})

    def apply(self, pid: int, patch: Path, cache: Path | None = None, timeout: float = 10) -> OpResult:
        return self._op("apply", [str(pid), str(patch), "--timeout", str(timeout)], cache)

    def revert(self, pid: int, cache: Path | None = None, timeout: float = 10) -> OpResult:
        return self._op("revert", [str(pid), "--timeout", str(timeout)], cache)


class Floor:
    """benchmarks/floor/floor.c: seize, interrupt, wait for, write one word
    into and release every thread of the target (the least a ptrace tool
    that switches code can do; its pause is the physical floor of ours)."""
    name = "floor"

    def __init__(self, binary: Path) -> None:
        self.binary = binary

    def apply(self, pid: int) -> OpResult:
        addr = _first_code_address(pid)
        cp, wall, err = _run([str(self.binary), str(pid), hex(addr)])
        if cp is None or cp.returncode != 0:
            return OpResult(self.name, "apply", False, wall, error=err or _last_line(cp.stderr))
        data = json.loads(_last_line(cp.stdout))
        return OpResult(self.name, "apply", True, wall, pause_us=data["pause_us"], rc=0)


def _first_code_address(pid: int) -> int:
    """Start of the target's first executable mapping (the word written back)."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            if fields[1][2] == "x":
                return int(fields[0].split("-")[0], 16)
    raise RuntimeError(f"process {pid} has no executable mapping")


class Gdb:
    """`gdb -p PID -batch`: call dlopen, then write a jump over compute()."""
    name = "gdb"

    def __init__(self) -> None:
        self.path = shutil.which("gdb")

    def available(self) -> str | None:
        return None if self.path else "gdb is not installed"

    def version(self) -> str:
        cp, _, _ = _run([self.path, "--version"], timeout=30)
        return cp.stdout.splitlines()[0] if cp and cp.stdout else "?"

    def apply(self, pid: int, lib: Path, func: str = "compute", new: str = "compute_v3") -> OpResult:
        cmd = [self.path, "-nx", "-batch", "-p", str(pid),
               "-iex", "set debuginfod enabled off",
               "-ex", f"py LIB={str(lib)!r}; FUNC={func!r}; NEW={new!r}",
               "-x", str(HERE / "peers" / "gdb_patch.py")]
        cp, wall, err = _run(cmd)
        if cp is None:
            return OpResult(self.name, "apply", False, wall, error=err)
        ok = cp.returncode == 0 and "PATCHED" in cp.stdout
        error = None if ok else (_last_line(cp.stderr) or _last_line(cp.stdout))
        return OpResult(self.name, "apply", ok, wall, rc=cp.returncode, error=error)


class Frida:
    """frida.attach + Module.load + Interceptor.replace + eternalize + detach."""
    name = "frida"

    def __init__(self) -> None:
        self._why = None
        try:
            import frida  # noqa: F401
            self._version = frida.__version__
        except Exception as e:  # not installable or broken here: say so, never fake
            self._why = f"frida python package unavailable: {type(e).__name__}: {e}"
            self._version = None

    def available(self) -> str | None:
        return self._why

    def version(self) -> str:
        return self._version or "-"

    def apply(self, pid: int, lib: Path, func: str = "compute", new: str = "compute_v3") -> OpResult:
        cmd = [sys.executable, str(HERE / "peers" / "frida_patch.py"), str(pid), str(lib), func, new]
        cp, wall, err = _run(cmd)
        if cp is None:
            return OpResult(self.name, "apply", False, wall, error=err)
        try:
            data = json.loads(_last_line(cp.stdout))
        except json.JSONDecodeError:
            data = {"ok": False, "error": _last_line(cp.stderr)}
        ok = cp.returncode == 0 and data.get("ok", False)
        extra = {k: data[k] for k in ("attach_s", "script_s") if k in data}
        return OpResult(self.name, "apply", ok, wall, rc=cp.returncode,
                        error=None if ok else str(data.get("error"))[:300], extra=extra)
