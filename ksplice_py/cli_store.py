"""`hotpatch install | uninstall | installed | watch`: patches kept applied to
every process, including those that start later (store.py, watch.py).
cli.py hands these command lines over; output as `apply --all` /
`revert --all` (cli_fleet.py) for install and uninstall.
"""
from __future__ import annotations

import argparse
import sys

from . import audit, errors, trust
from .cli_fleet import Display
from .discovery import Selector, Unpatchable, Wants, candidates, editions_of, match
from .fleet_results import Action
from .fleet_runner import fleet
from .patchfile import PatchFile
from .store import Entry, Store, is_sha256
from .watch import Watcher, printer

STORE_COMMANDS = ("install", "uninstall", "installed", "watch")


def wants(argv: list[str]) -> bool:
    return bool(argv) and argv[0] in STORE_COMMANDS


def parser(error) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hotpatch")
    p.error = error  # type: ignore[method-assign]
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.error = error  # type: ignore[method-assign]
        c.add_argument("--json", action="store_true", help="machine-readable output")
        return c

    c = cmd("install", "store a patch and apply it to every matching process, now and later")
    c.add_argument("patch")
    c.add_argument("--sha256", metavar="HEX", help="refuse the patch unless its content has this sha256")
    c.add_argument("--insecure", action="store_true",
                   help="as root, accept a patch file writable or owned by another user")
    c.add_argument("--timeout", type=str, default="5", help="seconds to wait for a safe moment, per process")
    c.add_argument("--jobs", type=str, default=None, metavar="N")
    c.add_argument("--log-file", metavar="PATH")
    c = cmd("uninstall", "remove a patch from the store and revert it everywhere")
    c.add_argument("patch", help="the patch file or its sha256")
    c.add_argument("--timeout", type=str, default="5")
    c.add_argument("--jobs", type=str, default=None, metavar="N")
    c.add_argument("--log-file", metavar="PATH")
    cmd("installed", "the installed patches, who carries them and who does not (and why)")
    c = cmd("watch", "apply installed patches to processes as they start (a service; SIGTERM stops it)")
    c.add_argument("--jobs", type=str, default=None, metavar="N", help="for the reconciling passes")
    c.add_argument("--log-file", metavar="PATH")
    return p


def do_store(a) -> tuple:
    return {"install": _install, "uninstall": _uninstall, "installed": _installed, "watch": _watch}[a.command](a)


def _fleet(a, action: Action, patch, sha: str) -> tuple[dict, list[str], int]:
    from .cli_fleet import _jobs, _timeout
    display = Display(action, a.json)
    try:
        result = fleet(action, patch, sha256=sha, timeout=_timeout(a.timeout), jobs=_jobs(a.jobs),
                       audit_log=getattr(a, "audit_log", None), on_result=display)
    finally:
        display.close()
    a.audit.fleet = {"applied": result.applied, "skipped": result.skipped, "failed": result.failed,
                     "interrupted": result.interrupted}
    rc = result.exit_code
    if rc == errors.PatchMismatch.exit_code and not result.processes:
        rc = 0  # installed for processes to come; none runs now
    if rc:
        print(f"hotpatch: {a.command}: {result.failed} of {len(result.processes)} processes failed; "
              f"{result.summary()}", file=sys.stderr)
    return result.to_dict(), [result.summary()], rc


def _install(a) -> tuple:
    pin = trust.parse_sha256(a.sha256) if a.sha256 else None
    data = trust.read_patch(a.patch, trust.Policy(a.insecure, pin))  # read once, checked
    patch = PatchFile.from_bytes(data, a.patch)
    a.audit.patch_file(patch)
    entry, new = Store().add(patch, data, a.patch)
    head = (f"installed {entry.name} ({entry.sha256})" if new
            else f"{entry.name} is already installed ({entry.sha256}); applying it where it is missing")
    if not a.json:
        print(head, flush=True)
    doc, tail, rc = _fleet(a, Action.APPLY, patch, patch.sha256)
    return doc | {"installed": entry.to_dict(), "new": new}, "\n".join(tail), rc


def _uninstall(a) -> tuple:
    store = Store()
    entry = store.find(a.patch)
    sha = entry.sha256 if entry else _sha_of(a.patch)
    a.audit.sha256 = sha
    removed = store.remove(sha) if entry else None
    head = f"uninstalled {removed.name} ({sha})" if removed else f"{sha} was not installed; reverting it anyway"
    if not a.json:
        print(head, flush=True)
    doc, tail, rc = _fleet(a, Action.REVERT, None, sha)
    return doc | {"uninstalled": removed.to_dict() if removed else None}, "\n".join(tail), rc


def _sha_of(what: str) -> str:
    if is_sha256(what.strip()):
        return what.strip().lower()
    return trust.load_patch(what, trust.Policy(enforce=False)).sha256


def _installed(a) -> tuple:
    store = Store()
    status = store.read_status().get("failing", {})
    out = []
    # A process the watch is working on right now is traced: still listed.
    infos = [i for i in candidates(Selector()) if i.unpatchable in (None, Unpatchable.TRACED)]
    for entry in store.entries():
        out.append(_report(store, entry, infos, status.get(entry.sha256, {})))
    if not out:
        return {"patches": []}, f"no patch installed in {store.patches}"
    rows = []
    for r in out:
        rows.append(f"{r['name']} ({r['sha256']}): {len(r['carried_by'])} processes carry it, "
                    f"{len(r['missing_from'])} match but do not")
        rows += [f"  pid {p['pid']} ({p['name']}): edition {p['edition']}" for p in r["carried_by"]]
        rows += [f"  pid {p['pid']} ({p['name']}): missing: {p['why']}" for p in r["missing_from"]]
    return {"patches": out}, "\n".join(rows)


def _report(store: Store, entry: Entry, infos, failing: dict) -> dict:
    carried, missing = [], []
    try:
        wanted = Wants.of(store.load(entry))
    except errors.HotpatchError as e:
        return entry.to_dict() | {"error": str(e), "carried_by": [], "missing_from": []}
    for info in infos:
        if not match(info, wanted).fits:
            continue
        eds = [e for e in editions_of(info.pid) if e.sha256 == entry.sha256]
        applied = [e for e in eds if e.state == "applied"]
        if applied:
            carried.append({"pid": info.pid, "name": info.name, "edition": applied[0].id})
            continue
        why = failing.get(str(info.pid), {}).get("reason")
        if why is None:
            why = (f"prepared as edition {eds[0].id}, not switched" if eds
                   else "not patched yet (is `hotpatch watch` running?)")
        missing.append({"pid": info.pid, "name": info.name, "why": why})
    return entry.to_dict() | {"carried_by": carried, "missing_from": missing}


def _watch(a) -> tuple:
    """Runs until SIGTERM/SIGINT; prints its own lines, so it leaves by
    SystemExit (cli.py's clean exit without a result to print)."""
    from .cli_fleet import _jobs
    # every patch it applies is audited (syslog, and the file or the default log)
    log = audit.AuditLog(a.log_file) if a.log_file else audit.AuditLog.default()
    try:
        rc = Watcher(Store(), printer(a.json), jobs=_jobs(a.jobs), audit_log=log).run()
    finally:
        log.close()
    raise SystemExit(rc)


__all__ = ["wants", "parser", "do_store"]
