"""Audit trail: who changed which process, with what, and how it ended.

Every command that changes a target (apply, prepare, cutover, abort, revert,
recover) leaves one record, whatever its outcome:

* in syslog: ident ``hotpatch``, facility LOG_AUTHPRIV (the "who did what as
  root" log, like sudo's), NOTICE when it succeeded and WARNING when not;
  the message is the record as JSON. Without a syslog daemon the libc call
  drops it silently, and any error there is ignored: logging must never be
  the reason a patch fails or is left half-done;
* in a JSON-lines file, one line a record appended with a single write(2)
  on an O_APPEND descriptor, so concurrent tools never interleave lines:
  /var/log/ksplice_py/audit.jsonl by default (many machines have no syslog
  daemon), ``$KSPLICE_PY_AUDIT_LOG`` or ``--log-file PATH`` instead (empty:
  none). A path given explicitly is opened *before* the target is touched,
  so a bad one is refused (exit 2) up front rather than discovered after a
  change; the default one is best effort, like syslog.

The library writes the records (process.py), so a program using it is
audited exactly like the CLI; the CLI adds one only for a command that failed
before reaching the library (a bad patch file, no such process).
"""
from __future__ import annotations

import json
import os
import pwd
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .errors import BadInput

if TYPE_CHECKING:
    from .editions import Edition
    from .patchfile import PatchFile
    from .target import Target

try:  # not every Python build ships it; never a reason to fail
    import syslog
except ImportError:  # pragma: no cover
    syslog = None  # type: ignore[assignment]

SYSLOG_IDENT = "hotpatch"
AUDITED = ("apply", "prepare", "cutover", "abort", "revert", "recover", "install", "uninstall")
DEFAULT_LOG = "/var/log/ksplice_py/audit.jsonl"
LOG_ENV = "KSPLICE_PY_AUDIT_LOG"  # another path, or empty for no file


def invoking_user() -> dict:
    """uid and name of who ran us, and who they were before sudo."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = None
    user = {"uid": uid, "euid": os.geteuid(), "name": name}
    if os.environ.get("SUDO_USER"):
        user["sudo_user"] = os.environ["SUDO_USER"]
        if os.environ.get("SUDO_UID", "").isdigit():
            user["sudo_uid"] = int(os.environ["SUDO_UID"])
    return user


@dataclass
class AuditRecord:
    """Filled in as the command proceeds, so a failure still says as much
    as was known (target, patch) when it happened."""

    action: str
    pid: int | None = None
    target_start_time: int | None = None  # with pid: names one process for the machine's life
    exe: str | None = None
    patch: str | None = None
    sha256: str | None = None
    functions: list[str] = field(default_factory=list)
    edition: int | None = None
    result: str = "ok"  # "ok" | "error"
    exit_code: int = 0
    error: str | None = None
    pause_us: float | None = None
    fleet: dict | None = None  # --all, install, uninstall: the run's counts (the summary record)
    consistency: str | None = None  # what the switch required (consistency.py)
    already_applied: bool | None = None  # apply found the same content applied: nothing done
    user: dict = field(default_factory=invoking_user)
    time: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    tool_pid: int = field(default_factory=os.getpid)

    # -- filled in by the CLI as it learns things ---------------------------------
    def target(self, target: Target) -> None:
        self.pid, self.exe = target.pid, target.exe
        self.target_start_time = target.handle.start_time

    def patch_file(self, patch: PatchFile) -> None:
        self.patch, self.sha256 = os.path.abspath(patch.name), patch.sha256
        self.functions = [r.target for r in patch.replacements]
        self.consistency = patch.consistency.value

    def edition_done(self, e: Edition) -> None:
        """What the command did to edition ``e``. Every action names the
        patch as the edition's record does (its absolute path), so an apply
        and its revert read alike."""
        self.edition = e.id
        if e.patch:
            self.patch = e.patch
        self.sha256 = e.sha256 or self.sha256
        self.functions = [f.symbol for f in e.functions] or self.functions
        pause = e.last_pause_us
        if e.already_applied:
            pause = None  # nothing was stopped this time
        self.pause_us = round(pause, 1) if pause else None
        self.already_applied = e.already_applied or None
        self.consistency = e.consistency

    def finish(self, exit_code: int, error: str | None = None) -> None:
        self.exit_code = exit_code
        self.result = "ok" if exit_code == 0 else "error"
        self.error = error

    def to_json(self) -> str:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        return json.dumps(d, sort_keys=False, ensure_ascii=True)


def default_log_path() -> str | None:
    """The persistent log: $KSPLICE_PY_AUDIT_LOG (empty: none) or DEFAULT_LOG."""
    path = os.environ.get(LOG_ENV, DEFAULT_LOG)
    return path or None


class AuditLog:
    """Where records go: syslog (best effort) and a JSON-lines file. Open it
    before touching the target."""

    def __init__(self, path: str | None = None, use_syslog: bool = True) -> None:
        self.path = path
        self.use_syslog = use_syslog and syslog is not None
        self.written = 0  # records written: the CLI adds its own only when 0
        self._fd: int | None = None
        if path:
            try:
                self._fd = self._open(path)
            except OSError as e:
                raise BadInput(f"cannot open log file {path}: {e.strerror or e}") from None

    @classmethod
    def default(cls) -> "AuditLog":
        """syslog plus the persistent log of default_log_path(). Its
        directory is created (0700) if missing; where that is impossible (a
        user without rights to /var/log) the file is skipped, as syslog is
        without a daemon: logging never fails an operation."""
        log = cls(None)
        path = default_log_path()
        if path:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
                log._fd, log.path = cls._open(path), path
            except OSError:
                pass
        return log

    @staticmethod
    def _open(path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY, 0o600)

    def write(self, record: AuditRecord) -> None:
        self.written += 1
        line = record.to_json()
        if self.use_syslog:
            self._syslog(record, line)
        if self._fd is not None:
            data = (line + "\n").encode()
            try:
                n = os.write(self._fd, data)
                if n != len(data):
                    raise OSError(0, f"short write ({n} of {len(data)} bytes)")
            except OSError as e:
                # The change is done (or refused) already: say so, do not fail it.
                print(f"hotpatch: warning: could not write audit log {self.path}: {e.strerror or e}",
                      file=sys.stderr)

    @staticmethod
    def _syslog(record: AuditRecord, line: str) -> None:
        try:
            syslog.openlog(SYSLOG_IDENT, syslog.LOG_PID, syslog.LOG_AUTHPRIV)
            prio = syslog.LOG_NOTICE if record.result == "ok" else syslog.LOG_WARNING
            syslog.syslog(prio, line)
            syslog.closelog()
        except Exception:  # no /dev/log, odd build: the file log is the record then
            pass

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "AuditLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
