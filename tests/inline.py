"""Helpers for tests whose targets and patches are C sources inline in the
test: compile them, run a target that answers one line per line it reads."""
from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import get_cflags


def gcc(*args: object) -> None:
    cp = subprocess.run(["gcc", *map(str, args)], capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr


def patch(d: Path, name: str, source: str) -> Path:
    """``source`` built as the contract says: cc -shared -fPIC -O2 $(hotpatch cflags)."""
    (d / f"{name}.c").write_text(source)
    gcc("-shared", "-fPIC", "-O2", *get_cflags(), "-o", d / f"{name}.so", d / f"{name}.c")
    return d / f"{name}.so"


def program(d: Path, name: str, source: str, *flags: object) -> Path:
    (d / f"{name}.c").write_text(source)
    gcc(*flags, "-o", d / name, d / f"{name}.c")
    return d / name


class Proc:
    """A target that prints "ready", then one line for each line it reads."""

    def __init__(self, argv: list[str], env: dict | None = None) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self.pid = self.proc.pid
        line = self.proc.stdout.readline().strip()
        assert line == "ready", f"target said {line!r}"

    def ask(self, line: str = "x") -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> "Proc":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
