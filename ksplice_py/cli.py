"""`hotpatch`: a thin layer that parses, calls the library, and prints.

Exit codes (docs/design.md): 0 done, 2 bad usage/input, 3 no safe moment,
4 patch does not fit, 1 anything else, 130/143 interrupted before the switch.
Errors are one line on stderr. The outcome is decided before anything is
printed, so a failing stdout never changes it (docs/automation.md).

Hardening (docs/security.md): patch files are read once through trust.py
(as root: ownership and modes checked, ``--insecure`` to skip; ``--sha256``
pins the content); every command that changes a target is recorded by the
library (audit.py: syslog and a JSON-lines file, ``--log-file`` to move it).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sys
from typing import Callable

from . import __version__, audit, cli_fleet, cli_store, errors, harness, interrupts, trust
from .consistency import Consistency
from .cycle import HarnessChoice
from .patchfile import PatchFile, cflags
from .process import Process, attach


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise errors.UsageError(f"{message} (see hotpatch --help)")


def _pid(text: str) -> int:
    if not text.isdigit():
        raise errors.UsageError(f"pid must be a number, not {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise errors.UsageError(f"--timeout takes seconds, not {text!r}") from None
    if not 0 <= value <= 86400:  # 0: try once
        raise errors.UsageError("--timeout takes 0 (try once) to 86400 seconds")
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
    c.add_argument("--again", action="store_true",
                   help="apply even if the same patch (by sha256) is already applied: stack another copy")
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
    _build_command(cmd)
    cmd("cflags", "compiler flags for building patches")
    cmd("harnesses", "the quiescence harnesses installed")
    sub.add_parser("demo", help="the live DNS-server demo (hotpatch demo --help)", add_help=False)
    # Parsed by cli_store.py; listed here for --help. (`--all` forms: cli_fleet.py.)
    for name, text in (("install", "store a patch; apply it to every matching process, now and later"),
                       ("uninstall", "remove an installed patch and revert it everywhere"),
                       ("installed", "installed patches, who carries them, who does not and why"),
                       ("watch", "service: apply installed patches to processes as they start")):
        sub.add_parser(name, help=text, add_help=False)
    _conventions(p)
    return p


# -- what every command-line tool is expected to have ------------------------------

USAGE = """hotpatch PID PATCH [--timeout S] [apply options]   (short for: hotpatch apply PID PATCH)
       hotpatch COMMAND [--json] [options] ...             (hotpatch COMMAND --help)
       hotpatch --version | --print-completion {bash,zsh} | --print-man-page"""

EXIT_CODES = """exit status:
  0    done (also: already applied, nothing to do)
  1    anything else (the target went away, an internal error)
  2    bad usage or bad input (options, pid, patch file)
  3    no safe moment within --timeout; the target is untouched
  4    the patch does not fit this target (missing symbol, build-id, trampoline)
  130  interrupted by SIGINT before the switch; the target is untouched (143: SIGTERM)

errors are one line on stderr; with --json the result (or the error) is JSON on stdout."""

# Help for positional arguments, wherever a command declares them without it.
ARG_HELP = {
    "pid": "process id of the target",
    "patch": "the patch .so, built with: cc -shared -fPIC -O2 $(hotpatch cflags)",
    "id": "edition id (see hotpatch list); default: the newest in the right state",
}


def _conventions(p: argparse.ArgumentParser) -> None:
    """--version, completion and man page; the short form and the exit codes
    in --help; help text for every argument of every command."""
    import shtab

    p.usage, p.epilog = USAGE, EXIT_CODES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--version", action="version", version=f"hotpatch (ksplice_py) {__version__}")
    shtab.add_argument_to(p, ["--print-completion"], help="print a bash or zsh completion script")
    p._option_string_actions["--print-completion"].choices = ("bash", "zsh")  # the ones tested
    p.add_argument("--print-man-page", action=_ManPage, help="print the manual page (roff)")
    for action in _subcommand_actions(p):
        if action.help is None and action.dest in ARG_HELP:
            action.help = ARG_HELP[action.dest]
        if action.dest == "patch":
            action.complete = shtab.FILE  # type: ignore[attr-defined]


def _subcommand_actions(p: argparse.ArgumentParser):
    for group in p._subparsers._group_actions if p._subparsers else ():
        for sub in group.choices.values():
            yield from sub._actions


class _ManPage(argparse.Action):
    def __init__(self, option_strings, dest, help=None):
        super().__init__(option_strings, dest, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from argparse_manpage.manpage import Manpage

        page = Manpage(parser)
        page.description = "replace functions in a running x86-64 Linux process"
        forms = [line.strip().split("  (")[0].split(None, 1) for line in USAGE.splitlines()]
        page.add_section("synopsis", "=", "\n.br\n".join(
            f".B {prog}\n" + rest.strip().replace("-", "\\-") for prog, rest in forms))
        print(str(page))
        parser.exit(0)


def _timeout_option(c: argparse.ArgumentParser) -> None:
    c.add_argument("--timeout", type=str, default="5", metavar="S",
                   help="seconds to wait for a safe moment (default 5; 0: try once)")


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
                   help=f"append the JSON audit record of this change here instead of "
                        f"${audit.LOG_ENV} or {audit.DEFAULT_LOG} (it also goes to syslog)")


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
    proc = attach(_pid(a.pid), audit_log=a.audit_log)
    a.audit.target(proc.target)
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
        e = proc.apply(patch, timeout=timeout, harnesses=_choice(a), again=a.again)
    if e.already_applied:
        text = (f"{os.path.basename(patch.name)} is already applied to pid {a.pid} as edition {e.id}; "
                "nothing done (--again stacks another copy)")
    else:
        text = (f"edition {e.id} applied to pid {a.pid}: {_summary(e)}; "
                f"pause {e.pause_us:.0f} µs ({_attempts(e)})")
    return e.to_dict() | {"pid": int(a.pid)}, text


def do_check(a) -> tuple[dict, str] | tuple[dict, str, int]:
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
    items = [e.to_dict() | {"pid": int(a.pid)} for e in eds]
    if not eds:
        return items, f"no editions in pid {a.pid}"
    width = max(10, *(len(_state(e)) for e in eds))
    rows = [f"{'ID':>4}  {'STATE':<{width}} {'PAUSE':>8}  {'PATCH':<24} FUNCTIONS"]
    for e in eds:
        pause = f"{e.pause_us:.0f}µs" if e.pause_us else "-"
        rows.append(f"{e.id:>4}  {_state(e):<{width}} {pause:>8}  {os.path.basename(e.patch):<24} "
                    + ", ".join(f.symbol for f in e.functions) + _consistency_note(e.consistency))
    if any(e.orphaned for e in eds):
        rows.append(f"orphaned: left half-way by a hotpatch that was killed; "
                    f"hotpatch recover {a.pid} finishes or removes it")
    return items, "\n".join(rows)


def _state(e) -> str:
    """prepared on purpose (hotpatch prepare) or left by a killed tool?"""
    if e.orphaned:
        return f"{e.state} (orphaned)"
    return "prepared (staged)" if e.state == "prepared" and e.staged else e.state


def _consistency_note(value: str) -> str:
    """`list`: name the weaker mode plainly where it was used (issue #16)."""
    c = Consistency(value) if value in {m.value for m in Consistency} else None
    return f"  [consistency: {c.describe}]" if c is Consistency.NEW_CALLS else ""


def _edition_id(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isdigit():
        raise errors.UsageError(f"edition id must be a number, not {text!r}")
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
    pause = f"; pause {e.last_pause_us:.0f} µs" if with_timeout else ""
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
    for key, label, fields in _INFO_LINES:
        for item in d.get(key, []):
            lines.append(f"  {label:<13} " + "  ".join(
                (name if item[k] is True else f"{name} {item[k]}") if name else str(item[k])
                for k, name in fields if item.get(k) not in (None, "", False)))
    lines.append(f"  {'consistency':<13} {Consistency(d['consistency']).describe}")
    return d, "\n".join(lines)


# (key in PatchFile.to_dict(), label, [(field, its label; "" for the first)]): every column named
_INFO_LINES = (
    ("replaces", "replaces", (("target", ""), ("func_name", "with"))),
    ("wraps", "wraps", (("target", ""), ("func_name", "with"), ("orig_ptr_name", "original-in"))),
    ("symbols", "needs symbol", (("target", ""), ("ptr_name", "address-in"))),
    ("pins", "pinned to", (("object", ""), ("build_id", "build-id"))),
    ("imports", "imports", (("name", ""), ("version", "version"), ("weak", "weak"))),
    ("binds", "binds", (("target", ""), ("place", "at"), ("addend", "addend"))),
)


def do_harnesses(a) -> tuple[list, str]:
    hs = sorted(harness.discover().values(), key=lambda h: h.name)
    rows = [f"{h.name:<16} {', '.join(h.objects):<28} {h.description}" for h in hs]
    return [h.to_dict() for h in hs], "\n".join(rows) or "no harnesses installed"


def do_cflags(a) -> tuple[str, str]:
    flags = cflags()
    return flags, flags


# -- hotpatch build (issue #14) ------------------------------------------------

def _build_command(cmd: Callable[[str, str], argparse.ArgumentParser]) -> None:
    c = cmd("build", "a live patch from a source tree and a diff (docs/build.md)")
    c.add_argument("--src", required=True, metavar="DIR", help="the source tree the running program was built from")
    c.add_argument("--diff", required=True, metavar="FIX.diff", help="unified diff (-p1 as git diff writes it, or -p0)")
    c.add_argument("--object", required=True, metavar="RELPATH", help="the executable or library in the tree to patch")
    c.add_argument("-o", "--output", metavar="OUT.so", help="the patch to write (default: FIX.so beside the diff)")
    c.add_argument("--make", default="make", metavar="CMD", help="the build command (default: make)")
    c.add_argument("--binary", metavar="PATH", help="the installed copy that runs (default: DIR/RELPATH)")


def do_build(a) -> tuple[dict, str]:
    from .build import build_patch  # the builder is only loaded for this command
    r = build_patch(a.src, a.diff, a.object, a.output, a.make, a.binary)
    lines = [f"{r.patch}: live patch for {r.object} (build-id {r.build_id or 'none'})"]
    for key, label in (("replaced", "replaces"), ("inlined", "replaces"), ("added", "adds")):
        for row in getattr(r, key):
            lines.append(f"  {label:<9} {row['function']:<24} {row['file']}: {row['why']}")
    for row in r.new_data:
        what = "new variable, starts at its initial value" if row["kind"] == "variable" else "constant data"
        lines.append(f"  {'carries':<9} {row['name']:<24} {row['file']}: {what}")
    for helper, into in sorted(r.inline_only.items()):
        lines.append(f"  {'inlined':<9} {helper:<24} no copy of its own: changed inside {', '.join(into)}")
    return r.to_dict(), "\n".join(lines)


COMMANDS: dict[str, Callable] = {
    "apply": do_apply, "check": do_check, "list": do_list, "info": do_info, "cflags": do_cflags,
    "revert": do_revert, "prepare": do_prepare, "cutover": do_cutover, "abort": do_abort,
    "recover": do_recover, "harnesses": do_harnesses, "build": do_build,
}


# -- fleet and store: ACTION --all PATCH, list --all, install... (own parsers) --

def _parse(argv: list[str]) -> argparse.Namespace:
    """--all command lines go to cli_fleet.py; install, uninstall, installed
    and watch to cli_store.py; the rest to build_parser()."""
    for module, handler in ((cli_fleet, cli_fleet.do_fleet), (cli_store, cli_store.do_store)):
        if module.wants(argv):
            args = module.parser(_Parser(prog="hotpatch").error).parse_args(argv)
            args.pid, args.handler = "", handler  # no single pid: one record per process
            return args
    return build_parser().parse_args(argv)


# -- entry point --------------------------------------------------------------

def _on_signal(signum, frame):
    """Before the switch: unwind (the target ends as it was). After it: the
    change is made, so the command completes and says what it did."""
    if interrupts.committed():
        return
    raise errors.Interrupted(signum)


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
    interrupts.reset()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    session = _Session()
    outcome = _run(argv, as_json, session)
    session.audit_unless_done(outcome)
    return _report(outcome, as_json)


class _Session:
    """What the audit trail needs to know about this invocation. The library
    records every operation it runs; this record is for a command that
    failed before reaching one (a bad patch file, no such process)."""

    def __init__(self) -> None:
        self.record = audit.AuditRecord(action="?")
        self.trail: audit.AuditLog | None = None

    def audit_unless_done(self, outcome: "_Outcome") -> None:
        if self.trail is None:
            return
        if not self.trail.written:
            self.record.finish(outcome.code, outcome.error and " ".join(outcome.error.split()))
            with interrupts.held():  # the write is one syscall: done or not, never torn
                self.trail.write(self.record)
        self.trail.close()


class _Outcome:
    """What happened, decided before anything is printed: an output failure
    (a closed pipe, a full disk) never changes it."""

    def __init__(self, code: int, output: str | None = None, error: str | None = None,
                 details: dict | None = None) -> None:
        self.code, self.output, self.error, self.details = code, output, error, details


def _run(argv: list[str], as_json: bool, session: _Session) -> _Outcome:
    help_text = io.StringIO()
    try:
        with contextlib.redirect_stdout(help_text):  # --help, --version: printed by _report
            args = _parse(argv)
        if not args.command:
            raise errors.UsageError("no command given")
        session.record.action = args.command
        args.audit = session.record
        args.audit_log = None
        if args.command in audit.AUDITED:
            if args.pid.isdigit():
                session.record.pid = int(args.pid)
            # opened before the target is touched: a bad --log-file is refused up front
            session.trail = audit.AuditLog(args.log_file) if args.log_file else audit.AuditLog.default()
            args.audit_log = session.trail
        data, text, *code = (getattr(args, "handler", None) or COMMANDS[args.command])(args)
        return _Outcome(code[0] if code else 0, json.dumps(data, indent=2) if as_json else text)
    except errors.HotpatchError as e:
        return _Outcome(e.exit_code, error=str(e), details=e.to_dict())
    except errors.Interrupted as e:
        return _Outcome(e.exit_code, error=str(e))
    except SystemExit as e:  # --help, --version, --print-completion
        return _Outcome(int(e.code or 0), help_text.getvalue().rstrip("\n") or None)
    except Exception as e:  # a bug: still one line, still exit 1
        if os.environ.get("KSPLICE_PY_DEBUG"):
            raise
        return _Outcome(1, error=f"internal error: {type(e).__name__}: {e} (set KSPLICE_PY_DEBUG=1 for details)")


def _report(outcome: _Outcome, as_json: bool) -> int:
    """Print the outcome; the exit status is the outcome's, whatever printing does."""
    output = outcome.output
    if outcome.error is not None:
        message = " ".join(outcome.error.split())  # one line, whatever was inside
        _stderr(f"hotpatch: {message}")
        for line in (outcome.details or {}).get("lines", []):  # e.g. each reason a build is refused
            _stderr(f"  {line}")
        if as_json:
            output = json.dumps({"error": message, "exit_code": outcome.code, **(outcome.details or {})})
    if output is not None:
        try:
            sys.stdout.write(output + "\n")
            sys.stdout.flush()
        except (OSError, ValueError, AttributeError) as e:  # EPIPE, ENOSPC, closed stdout
            _discard_stdout()
            reason = getattr(e, "strerror", None) or type(e).__name__
            _stderr(f"hotpatch: could not write the output ({reason}); "
                    f"the exit status ({outcome.code}) still says what happened")
    return outcome.code


def _stderr(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError, AttributeError):
        pass  # nowhere left to say it: the exit status still does


def _discard_stdout() -> None:
    """Whatever is still buffered goes nowhere, so the interpreter's final
    flush cannot fail too (and print a second complaint)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        sys.stdout = open(os.devnull, "w")


if __name__ == "__main__":
    sys.exit(main())
