"""Where one end-to-end `hotpatch apply` spends its time (run as a script).

    python phases.py PID PATCH

Runs the real CLI entry point (`ksplice_py.cli.main`) in this fresh
interpreter, with the library's phases wrapped by an exclusive timer (time
in a nested phase is not counted again in the outer one), and prints JSON:
seconds per phase, plus the script's own span. The runner subtracts that
span from the process's wall time to get interpreter start-up and exit.
"""
from __future__ import annotations

import time

T_START = time.perf_counter()

import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

_spent: dict[str, float] = {}
_stack: list[list] = []  # [phase, started]


def _timed(phase: str, fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        now = time.perf_counter()
        if _stack:  # pause the enclosing phase
            outer = _stack[-1]
            _spent[outer[0]] = _spent.get(outer[0], 0.0) + now - outer[1]
        _stack.append([phase, now])
        try:
            return fn(*a, **kw)
        finally:
            end = time.perf_counter()
            _spent[phase] = _spent.get(phase, 0.0) + end - _stack.pop()[1]
            if _stack:
                _stack[-1][1] = end
    return wrapper


def _wrap(obj, name: str, phase: str) -> None:
    setattr(obj, name, _timed(phase, getattr(obj, name)))


def main() -> None:
    pid, patch = sys.argv[1], sys.argv[2]
    t = time.perf_counter()
    from ksplice_py import cli, process, symbols, tracer, transition, trust
    imports = time.perf_counter() - t
    _wrap(trust, "load_patch", "read and parse the patch")
    _wrap(process.Process, "__init__", "attach (pidfd, checks)")
    for name in ("__init__", "resolve", "bind_import", "build_id", "functions_of", "function_at"):
        _wrap(symbols.TargetSymbols, name, "symbols (cached)")
    for name in ("__enter__", "__exit__", "__call__"):
        _wrap(tracer.Injector, name, "injected syscalls (borrow, stub, put back)")
    _wrap(transition.Transition, "__init__", "cutover planning")
    _wrap(transition.Transition, "try_complete", "cutover (seize + stopped window)")
    _wrap(cli, "main", "the rest (CLI, linking, planning, records)")
    rc = cli.main(["apply", pid, patch, "--json"])
    print(json.dumps({"rc": rc, "imports_s": imports, "phases_s": _spent,
                      "script_s": time.perf_counter() - T_START}), file=sys.stderr)


if __name__ == "__main__":
    main()
