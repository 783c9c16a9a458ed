# Copyright: ksplice_py contributors
# MIT License (see the repository's LICENSE / pyproject.toml)
"""Running the ``hotpatch`` command on a managed host, for the modules.

The modules are thin: every decision about a target process is the tool's.
This file only finds the command, runs it with ``--json`` and turns its
answer (a JSON document on stdout, one error line on stderr, an exit code)
into Python values.
"""
from __future__ import annotations

import hashlib
import json
import os

# Where the install role (roles/install) puts the command, besides $PATH.
SEARCH_DIRS = ["/opt/ksplice_py/bin", "/usr/local/bin"]

# Process results, as `hotpatch ... --all --json` spells them.
APPLIED, SKIPPED, FAILED = "applied", "skipped", "failed"


class Outcome(object):
    """One run of the command: exit code, parsed stdout, error line."""

    def __init__(self, cmd, rc, data, error):
        self.cmd = cmd
        self.rc = rc
        self.data = data  # the JSON document, or None
        self.error = error  # the tool's one-line error ("hotpatch: ..."), or ""

    @property
    def reason(self):
        """The error without the program name, as in the JSON ``reason``."""
        return self.error.split(": ", 1)[1] if self.error.startswith("hotpatch: ") else self.error


def find_hotpatch(module):
    """The ``hotpatch`` to run: the ``executable`` option, else $PATH and SEARCH_DIRS."""
    path = module.params.get("executable")
    if path:
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            module.fail_json(msg="executable %s is not an executable file on this host" % path)
        return path
    found = module.get_bin_path("hotpatch", required=False, opt_dirs=SEARCH_DIRS)
    if not found:
        module.fail_json(msg="hotpatch is not installed on this host (searched $PATH and %s); "
                             "install it with the ksplice_py.hotpatch.install role or set executable"
                             % ", ".join(SEARCH_DIRS))
    return found


def run(module, hotpatch, args):
    """``hotpatch ARGS --json``; never raises for a non-zero exit."""
    cmd = [hotpatch] + [str(a) for a in args] + ["--json"]
    rc, out, err = module.run_command(cmd, check_rc=False)
    try:
        data = json.loads(out) if out.strip() else None
    except ValueError:
        data = None
    lines = [line.strip() for line in err.splitlines() if line.strip()]
    error = lines[-1] if lines else ""
    if rc != 0 and not error:
        error = "hotpatch exited with status %d%s" % (rc, (": " + out.strip()[:200]) if out.strip() else "")
    return Outcome(cmd, rc, data, error)


def is_usage_error(outcome):
    """A usage error from an older ``hotpatch`` without the ``--all`` forms
    (it then wants a pid, or does not know the option)."""
    return outcome.rc == 2 and ("unrecognized arguments" in outcome.error
                                or "arguments are required" in outcome.error)


def selection(params):
    """The narrowing options (``pids``, ``exe``, ``user``) as ``hotpatch ... --all`` spells them."""
    args = []
    if params.get("pids"):
        args += ["--pids", ",".join(str(pid) for pid in params["pids"])]
    for exe in params.get("exe") or []:
        args += ["--exe", exe]
    if params.get("user"):
        args += ["--user", params["user"]]
    return args


def file_sha256(module, path):
    """sha256 of the patch file on this host: how editions are recognised."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except (IOError, OSError) as e:
        module.fail_json(msg="cannot read patch %s: %s" % (path, e.strerror or e))
    return digest.hexdigest()


def process_name(pid):
    """The command name of ``pid`` (``/proc/PID/comm``), or "?" if it is gone."""
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except (IOError, OSError):
        return "?"


def process_result(pid, result, edition=None, pause_us=None, reason="", exit_code=0):
    """One per-process entry, with the fields of ``hotpatch ... --all --json``."""
    return {"pid": pid, "name": process_name(pid), "result": result, "edition": edition,
            "pause_us": pause_us, "reason": reason, "exit_code": exit_code}


def summary(processes):
    """The counts that ``hotpatch ... --all --json`` reports beside the list."""
    return {key: sum(1 for p in processes if p["result"] == key) for key in (APPLIED, SKIPPED, FAILED)}
