"""`hotpatch`: a thin layer that parses, calls the library, and prints.

Exit codes (design.md): 0 done, 2 bad usage/input, 3 no safe moment,
4 patch does not fit, 1 anything else. Errors are one line on stderr.

Hardening (docs/security.md): patch files are read once through trust.py
(as root: ownership and modes checked, ``--insecure`` to skip; ``--sha256``
pins the content); every command that changes a target is recorded by
audit.py in syslog and, with ``--log-file``, as a JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Callable

from . import audit, errors, harness, trust
from .consistency import Consistency
from .cycle import HarnessChoice
from .patchfile import PatchFile, cflags
from .process import Process, attach


class _Usage(errors.BadInput):
    pass


class Interrupted(BaseException):
    """SIGTERM/SIGINT: unwind through every cleanup path, then exit 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise _Usage(f"{message} (see hotpatch --help)")


def _pid(text: str) -> int:
    if not text.isdigit():
        raise _Usage(f"pid must be a number, not {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _Usage(f"--timeout takes seconds, not {text!r}") from None
    if not 0 < value <= 86400:
        raise _Usage("--timeout must be between 0 and 86400 seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hotpatch", description="Replace functions in a running process.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.error = p.error  # type: ignore[method-assign]
        c.add_argument("--json", action="store_true", help="machine-readable output")
        return c

    c = cmd("apply", "run the whole patch cycle on a live process")
    c.add_argument("pid", type=str)
    c.add_argument("patch")
    _timeout_option(c)
    _harness_options(c)
    _trust_options(c)
    _log_option(c)
    c = cmd("check", "would the patch apply now? (prepare, finalize, one probe, abort)")
    c.add_argument("pid", type=str)
    c.add_argument("patch")
    _harness_options(c)
    _trust_options(c)
    c = cmd("list", "the editions applied to a process, newest first")
    c.add_argument("pid", type=str)
    c = cmd("revert", "undo the newest (or the given) edition")
    c.add_argument("pid", type=str)
    c.add_argument("id", nargs="?", type=str)
    _timeout_option(c)
    _log_option(c)
    c = cmd("prepare", "stage a patch: mapped and linked, not switched (see cutover)")
    c.add_argument("pid", type=str)
    c.add_argument("patch")
    _harness_options(c)
    _trust_options(c)
    _log_option(c)
    c = cmd("cutover", "switch a prepared edition (the newest by default)")
    c.add_argument("pid", type=str)
    c.add_argument("id", nargs="?", type=str)
    _timeout_option(c)
    _log_option(c)
    c = cmd("abort", "discard a prepared edition (the newest by default)")
    c.add_argument("pid", type=str)
    c.add_argument("id", nargs="?", type=str)
    _log_option(c)
    c = cmd("recover", "finish or undo what an interrupted hotpatch left behind")
    c.add_argument("pid", type=str)
    _log_option(c)
    c = cmd("info", "what a patch replaces, wraps and needs")
    c.add_argument("patch")
    c.add_argument("--sha256", metavar="HEX", help="refuse the patch unless its content has this sha256")
    cmd("cflags", "compiler flags for building patches")
    cmd("harnesses", "the quiescence harnesses installed")
    sub.add_parser("demo", help="the live DNS-server demo (hotpatch demo --help)", add_help=False)
    return p


def _timeout_option(c: argparse.ArgumentParser) -> None:
    c.add_argument("--timeout", type=str, default="5", help="seconds to wait for a safe moment (default 5)")


def _harness_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("--harness", action="append", default=[], metavar="NAME",
                   help="apply this harness too (repeatable)")
    c.add_argument("--no-harness", action="store_true", help="skip harnesses (needs --force)")
    c.add_argument("--force", action="store_true", help="allow --no-harness on governed objects")


def _trust_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("--sha256", metavar="HEX", help="refuse the patch unless its content has this sha256")
    c.add_argument("--insecure", action="store_true",
                   help="as root, accept a patch file (or directory) writable or owned by another user")


def _log_option(c: argparse.ArgumentParser) -> None:
    c.add_argument("--log-file", metavar="PATH",
                   help="append a JSON line recording this change (it also goes to syslog)")


def _choice(a) -> HarnessChoice:
    return HarnessChoice(tuple(a.harness), a.no_harness, a.force)


def _patch(a) -> PatchFile:
    """The patch, read once (trust.py); every later step uses these bytes."""
    pin = trust.parse_sha256(a.sha256) if getattr(a, "sha256", None) else None
    # `info` only reads: ownership is not checked there, a pinned hash is.
    enforce = None if a.command != "info" else False
    patch = trust.load_patch(a.patch, trust.Policy(getattr(a, "insecure", False), pin, enforce))
    a.audit.patch_file(patch)
    return patch


def _attach(a) -> Process:
    proc = attach(_pid(a.pid))
    a.audit.target(proc)
    return proc


# -- commands ---------------------------------------------------------------

def _attempts(e) -> str:
    if e.attempts <= 1:
        return "1 attempt"
    return (f"{e.attempts} attempts; longest stop {e.longest_pause_us or 0:.0f} µs, "
            f"all stops {e.stopped_us or 0:.0f} µs")


def do_apply(a) -> tuple[dict, str]:
    timeout, patch = _seconds(a.timeout), _patch(a)
    with _attach(a) as proc:
        e = proc.apply(patch, timeout=timeout, harnesses=_choice(a))
    a.audit.edition_done(e)
    text = (f"edition {e.id} applied to pid {a.pid}: {_summary(e)}; "
            f"pause {e.pause_us:.0f} µs ({_attempts(e)})")
    return e.to_dict() | {"pid": int(a.pid)}, text


def do_check(a) -> tuple[dict, str]:
    patch = _patch(a)
    with _attach(a) as proc:
        r = proc.check(patch, harnesses=_choice(a))
    funcs = ", ".join(f["symbol"] for f in r.functions)
    if r.safe_now:
        text = f"{r.patch} fits pid {r.pid} ({funcs}) and could be switched now (probe pause {r.pause_us:.0f} µs)"
    else:
        why = "; ".join(b.describe() for b in r.blockers)
        text = f"{r.patch} fits pid {r.pid} ({funcs}) but would wait now: {why}"
        return r.to_dict(), text, errors.NotQuiescent.exit_code  # scripts: 3 = not now
    return r.to_dict(), text


def do_list(a) -> tuple[list, str]:
    with _attach(a) as proc:
        eds = proc.editions()
    if not eds:
        return [], f"no editions in pid {a.pid}"
    rows = [f"{'ID':>4}  {'STATE':<10} {'PAUSE':>8}  {'PATCH':<24} FUNCTIONS"]
    for e in eds:
        pause = f"{e.pause_us:.0f}µs" if e.pause_us else "-"
        rows.append(f"{e.id:>4}  {e.state:<10} {pause:>8}  {e.patch:<24} "
                    + ", ".join(f.symbol for f in e.functions) + _consistency_note(e.consistency))
    return [e.to_dict() for e in eds], "\n".join(rows)


def _edition_id(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isdigit():
        raise _Usage(f"edition id must be a number, not {text!r}")
    return int(text)


def _summary(e) -> str:
    return ", ".join(f.symbol + (" (wrapped)" if f.kind == "wrap" else "") for f in e.functions)


def _edition_command(a, act, done: str, with_timeout: bool = True) -> tuple[dict, str]:
    """revert / cutover / abort: act on one edition, audit it, report it."""
    eid = _edition_id(a.id)
    timeout = _seconds(a.timeout) if with_timeout else None
    with _attach(a) as proc:
        e = act(proc, eid, timeout)
    a.audit.edition_done(e)
    pause = f"; pause {e.pause_us:.0f} µs" if with_timeout else ""
    return e.to_dict() | {"pid": int(a.pid)}, f"edition {e.id} {done.format(pid=a.pid, what=_summary(e))}{pause}"


def do_revert(a) -> tuple[dict, str]:
    return _edition_command(a, lambda p, i, t: p.revert(i, timeout=t), "reverted in pid {pid}: {what} restored")


def do_cutover(a) -> tuple[dict, str]:
    return _edition_command(a, lambda p, i, t: p.cutover(i, timeout=t), "switched in pid {pid}: {what}")


def do_abort(a) -> tuple[dict, str]:
    return _edition_command(a, lambda p, i, t: p.abort(i), "aborted in pid {pid}; its memory is gone",
                            with_timeout=False)


def do_prepare(a) -> tuple[dict, str]:
    patch = _patch(a)
    with _attach(a) as proc:
        e = proc.prepare(patch, harnesses=_choice(a))
    a.audit.edition_done(e)
    return e.to_dict() | {"pid": int(a.pid)}, (
        f"edition {e.id} prepared in pid {a.pid}: {_summary(e)}; switch it with: hotpatch cutover {a.pid} {e.id}")


def do_recover(a) -> tuple[list, str]:
    with _attach(a) as proc:
        done = proc.recover()
    return done, "\n".join(done) if done else f"nothing to recover in pid {a.pid}"


def do_info(a) -> tuple[dict, str]:
    d = _patch(a).to_dict()
    lines = [f"{a.patch}: sha256 {d.get('sha256', '?')}"]
    for key, label in (("replaces", "replaces"), ("wraps", "wraps"), ("symbols", "needs symbol"),
                       ("pins", "pinned to"), ("imports", "imports")):
        for item in d.get(key, []):
            lines.append(f"  {label:<13} {_fmt(item)}")
    lines.append(f"  {'consistency':<13} {Consistency(d['consistency']).describe}")
    return d, "\n".join(lines)


def _consistency_note(value: str) -> str:
    """`list`: name the weaker mode plainly where it was used (issue #16)."""
    c = Consistency(value) if value in {m.value for m in Consistency} else None
    return f"  [consistency: {c.describe}]" if c is Consistency.NEW_CALLS else ""


def _fmt(item) -> str:
    if isinstance(item, dict):
        return "  ".join(f"{v}" for v in item.values() if v not in (None, ""))
    return str(item)


def do_harnesses(a) -> tuple[list, str]:
    hs = sorted(harness.discover().values(), key=lambda h: h.name)
    rows = [f"{h.name:<16} {', '.join(h.objects):<28} {h.description}" for h in hs]
    return [h.to_dict() for h in hs], "\n".join(rows) or "no harnesses installed"


def do_cflags(a) -> tuple[str, str]:
    flags = cflags()
    return flags, flags


COMMANDS: dict[str, Callable] = {
    "apply": do_apply, "check": do_check, "list": do_list, "info": do_info, "cflags": do_cflags,
    "revert": do_revert, "prepare": do_prepare, "cutover": do_cutover, "abort": do_abort,
    "recover": do_recover, "harnesses": do_harnesses,
}


# -- entry point --------------------------------------------------------------

def _on_signal(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # its own options, progress display and Ctrl-C handling
        from . import demo
        return demo.main(argv[1:])
    # `hotpatch <pid> <patch.so>` is `hotpatch apply <pid> <patch.so>`
    positional = [x for x in argv if not x.startswith("-")]
    if positional and positional[0].isdigit():
        argv.insert(0, "apply")
    as_json = "--json" in argv
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    session = _Session()
    rc, error, details = _run(argv, as_json, session)
    if session.trail is not None:  # one audit record, whatever the outcome
        session.record.finish(rc, error and " ".join(error.split()))
        try:
            session.trail.write(session.record)
        except Interrupted:  # a second SIGTERM/SIGINT: the write is one syscall, done or not
            pass
        session.trail.close()
    return rc if error is None else _fail(error, rc, as_json, details)


class _Session:
    """What the audit trail needs to know about this invocation."""

    def __init__(self) -> None:
        self.record = audit.AuditRecord(action="?")
        self.trail: audit.AuditLog | None = None


def _run(argv: list[str], as_json: bool, session: _Session) -> tuple[int, str | None, dict | None]:
    """(exit code, error line or None, details for --json)."""
    try:
        args = build_parser().parse_args(argv)
        if not args.command:
            raise _Usage("no command given")
        session.record.action = args.command
        args.audit = session.record
        if args.command in audit.AUDITED:
            if args.pid.isdigit():
                session.record.pid = int(args.pid)
            session.trail = audit.AuditLog(args.log_file)  # opened before the target is touched
        data, text, *code = COMMANDS[args.command](args)
        print(json.dumps(data, indent=2) if as_json else text)
        return (code[0] if code else 0), None, None
    except errors.HotpatchError as e:
        return e.exit_code, str(e), e.details
    except Interrupted as e:
        return 1, f"interrupted by {e}; the target was left running and unchanged", None
    except SystemExit as e:  # --help
        return int(e.code or 0), None, None
    except Exception as e:  # a bug: still one line, still exit 1
        if os.environ.get("KSPLICE_PY_DEBUG"):
            raise
        return 1, f"internal error: {type(e).__name__}: {e} (set KSPLICE_PY_DEBUG=1 for details)", None


def _fail(message: str, code: int, as_json: bool, details: dict | None = None) -> int:
    message = " ".join(message.split())  # one line, whatever was inside
    print(f"hotpatch: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps({"error": message, "exit_code": code, **(details or {})}))
    return code


if __name__ == "__main__":
    sys.exit(main())
