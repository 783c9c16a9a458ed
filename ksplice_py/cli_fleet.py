"""`hotpatch ACTION --all PATCH` and `hotpatch list --all`: the command-line
face of fleet.py. Parsed by its own parser (cli.py hands over any argv with
``--all``), printed as one line per process plus the summary line, or one
JSON document; a progress line on stderr when it is a terminal.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import errors, trust
from .cycle import HarnessChoice
from .discovery import Selector
from .fleet_results import Action, FleetResult, Outcome, Progress, ProcessResult
from .fleet_runner import fleet, fleet_list

FLEET_COMMANDS = tuple(a.value for a in Action) + ("list",)
_DONE = {Action.APPLY: "applied", Action.CHECK: "fits, could be switched now", Action.PREPARE: "prepared",
         Action.CUTOVER: "switched", Action.ABORT: "aborted", Action.REVERT: "reverted"}


def wants(argv: list[str]) -> bool:
    """Is this a fleet command line (``--all`` with a fleet command)?"""
    return "--all" in argv and bool(argv) and argv[0] in FLEET_COMMANDS


def parser(error) -> argparse.ArgumentParser:
    """``error``: cli.py's one-line usage error (exit 2)."""
    p = argparse.ArgumentParser(prog="hotpatch", description="Patch every matching process.")
    p.error = error  # type: ignore[method-assign]
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for action in Action:
        c = sub.add_parser(action.value, help=f"{action.value} on every matching process")
        c.error = error  # type: ignore[method-assign]
        c.add_argument("patch", help="the patch .so (cutover/abort/revert: or its sha256)")
        _common(c)
        c.add_argument("--jobs", type=str, default=None, metavar="N",
                       help="processes worked on in parallel (default: the number of CPUs)")
        if action not in (Action.CHECK, Action.ABORT, Action.PREPARE):
            c.add_argument("--timeout", type=str, default="5",
                           help="seconds to wait for a safe moment, per process (default 5)")
        if action.loads_patch:
            c.add_argument("--harness", action="append", default=[], metavar="NAME")
            c.add_argument("--no-harness", action="store_true")
            c.add_argument("--force", action="store_true")
        c.add_argument("--sha256", metavar="HEX", help="refuse the patch unless its content has this sha256")
        c.add_argument("--insecure", action="store_true",
                       help="as root, accept a patch file writable or owned by another user")
        c.add_argument("--log-file", metavar="PATH",
                       help="append a JSON line per process and one for the run")
    c = sub.add_parser("list", help="every process that carries editions")
    c.error = error  # type: ignore[method-assign]
    _common(c)
    return p


def _common(c: argparse.ArgumentParser) -> None:
    c.add_argument("--all", action="store_true", required=True, help="every matching process")
    c.add_argument("--pids", metavar="PID,PID", help="only these processes")
    c.add_argument("--exe", action="append", metavar="PATH", help="only processes running it (repeatable)")
    c.add_argument("--user", action="append", metavar="NAME", help="only this user's processes (repeatable)")
    c.add_argument("--json", action="store_true", help="one JSON document")


def selector(a) -> Selector:
    return Selector.parse(a.pids, a.exe, a.user)


def _jobs(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isdigit() or not 1 <= int(text) <= 1024:
        raise errors.UsageError(f"--jobs takes a number from 1 to 1024, not {text!r}")
    return int(text)


def _patch_or_sha(a) -> tuple[object, str | None]:
    """(PatchFile or None, sha256): the edition commands accept the hash alone."""
    text = a.patch.strip().lower()
    if not Action(a.command).loads_patch and len(text) == 64 and not os.path.exists(a.patch) \
            and not set(text) - set("0123456789abcdef"):
        return None, text
    pin = trust.parse_sha256(a.sha256) if a.sha256 else None
    patch = trust.load_patch(a.patch, trust.Policy(a.insecure, pin))
    a.audit.patch_file(patch)
    return patch, patch.sha256


class Display:
    """Per-process lines on stdout (none with --json); on a terminal, a
    progress line on stderr, redrawn below them."""

    def __init__(self, action: Action, as_json: bool) -> None:
        self.action, self.as_json = action, as_json
        self.tty = sys.stderr.isatty() and not as_json

    def __call__(self, res: ProcessResult, prog: Progress) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
        if not self.as_json:
            print(line(self.action, res), flush=True)
        if self.tty:
            sys.stderr.write(f"[{prog.done}/{prog.total}] {prog.applied} {_DONE[self.action]}, "
                             f"{prog.skipped} skipped, {prog.failed} failed, {prog.elapsed_s:.1f}s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def line(action: Action, r: ProcessResult) -> str:
    head = f"pid {r.pid} ({r.name}): "
    if r.result is Outcome.APPLIED:
        what = _DONE[action] + (f" edition {r.edition}" if r.edition is not None else "")
        if r.pause_us:
            what += f", pause {r.pause_us:.0f} µs"
        return head + what
    return head + f"{r.result.value}: {r.reason}"


def do_fleet(a) -> tuple[object, str, int]:
    if a.command == "list":
        return _list(a)
    action = Action(a.command)
    sel = selector(a)
    jobs = _jobs(a.jobs)
    timeout = _timeout(getattr(a, "timeout", "5"))
    patch, sha = _patch_or_sha(a)
    choice = HarnessChoice(tuple(a.harness), a.no_harness, a.force) if action.loads_patch else None
    display = Display(action, a.json)
    try:
        result = fleet(action, patch, sha256=sha, selector=sel, timeout=timeout, jobs=jobs,
                       harnesses=choice, audit_log=getattr(a, "audit_log", None), on_result=display)
    finally:
        display.close()
    a.audit.sha256 = sha
    a.audit.fleet = {"applied": result.applied, "skipped": result.skipped, "failed": result.failed,
                     "interrupted": result.interrupted}
    rc = result.exit_code
    if rc:
        print(f"hotpatch: {action.value} --all: {_trouble(result)}", file=sys.stderr)
    if a.json:
        return result.to_dict(), "", rc
    return result.to_dict(), _summary(result), rc


def _summary(result: FleetResult) -> str:
    text = result.summary()
    if result.interrupted:
        text += " (interrupted: processes not reached were left untouched)"
    return text


def _trouble(result: FleetResult) -> str:
    if result.interrupted:
        return f"interrupted; every process is patched or untouched; {result.summary()}"
    if result.exit_code == errors.PatchMismatch.exit_code and not result.fitting:
        return "the patch fits no process (none maps its objects, of its build)"
    what = {3: "no safe moment in", 4: "the patch does not fit"}.get(result.exit_code, "failed in")
    return f"{what} {result.failed} of {len(result.processes)} processes; {result.summary()}"


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise errors.UsageError(f"--timeout takes seconds, not {text!r}") from None
    if not 0 < value <= 86400:
        raise errors.UsageError("--timeout must be between 0 and 86400 seconds")
    return value


def _list(a) -> tuple[object, str]:
    found = fleet_list(selector(a))
    data = {"processes": [p.to_dict() for p in found]}
    if not found:
        return data, "no process carries editions"
    rows = []
    for p in found:
        rows.append(f"pid {p.pid} ({p.name}) {p.exe}")
        for e in p.editions:
            pause = f"{e.pause_us:.0f}µs" if e.pause_us else "-"
            rows.append(f"  {e.id:>4}  {e.state:<10} {pause:>8}  {e.patch:<24} {e.sha256[:12]}  "
                        + ", ".join(f.symbol for f in e.functions))
    return data, "\n".join(rows)


def print_json(data) -> None:
    print(json.dumps(data, indent=2))
