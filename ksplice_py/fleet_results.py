"""What a fleet run (``--all``) reports: the action, and one record per
process (applied / skipped / failed, edition, pause, reason, exit code), and
the run's summary and exit status."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

from .errors import NotQuiescent, PatchMismatch


class Action(str, Enum):
    APPLY = "apply"
    CHECK = "check"
    PREPARE = "prepare"
    CUTOVER = "cutover"
    ABORT = "abort"
    REVERT = "revert"

    @property
    def loads_patch(self) -> bool:
        """Needs the patch's code and a process that maps its objects; the
        others act on editions a process already carries (by sha256)."""
        return self in (Action.APPLY, Action.CHECK, Action.PREPARE)

    @property
    def audited(self) -> bool:
        return self is not Action.CHECK


class Outcome(str, Enum):
    APPLIED = "applied"  # the action was done in this process
    SKIPPED = "skipped"  # nothing to do, or cannot be done; reason says why
    FAILED = "failed"  # tried and failed; the process is left as it was


@dataclass
class ProcessResult:
    pid: int
    name: str
    result: Outcome
    edition: int | None = None
    pause_us: float | None = None
    reason: str | None = None
    exit_code: int = 0

    def to_dict(self) -> dict:
        return {"pid": self.pid, "name": self.name, "result": self.result.value,
                "edition": self.edition,
                "pause_us": None if self.pause_us is None else round(self.pause_us, 1),
                "reason": self.reason, "exit_code": self.exit_code}

    @classmethod
    def from_dict(cls, d: dict) -> "ProcessResult":
        return cls(d["pid"], d["name"], Outcome(d["result"]), d.get("edition"), d.get("pause_us"),
                   d.get("reason"), d.get("exit_code", 0))


@dataclass
class FleetResult:
    action: Action
    sha256: str
    processes: list[ProcessResult] = field(default_factory=list)
    fitting: int = 0  # processes that map the patch's objects, of its build
    interrupted: bool = False
    elapsed_s: float = 0.0
    discovery_s: float = 0.0  # of elapsed_s: finding the processes, per-build work

    def count(self, outcome: Outcome) -> int:
        return sum(1 for p in self.processes if p.result is outcome)

    @property
    def applied(self) -> int:
        return self.count(Outcome.APPLIED)

    @property
    def skipped(self) -> int:
        return self.count(Outcome.SKIPPED)

    @property
    def failed(self) -> int:
        return self.count(Outcome.FAILED)

    def summary(self) -> str:
        return f"processes: {self.applied} applied, {self.skipped} skipped, {self.failed} failed"

    @property
    def exit_code(self) -> int:
        """0 nothing failed; 3 only "no safe moment"; 4 the patch fits no
        process; 1 otherwise (an interrupted run included)."""
        codes = {p.exit_code for p in self.processes if p.result is Outcome.FAILED}
        if self.interrupted:
            return 1
        if self.action.loads_patch and not self.fitting and not codes - {PatchMismatch.exit_code}:
            return PatchMismatch.exit_code
        if not codes:
            return 0
        if codes == {NotQuiescent.exit_code}:
            return NotQuiescent.exit_code
        if codes == {PatchMismatch.exit_code} and not self.applied and not self._already():
            return PatchMismatch.exit_code
        return 1

    def _already(self) -> bool:
        return any(p.result is Outcome.SKIPPED and p.edition is not None for p in self.processes)

    def to_dict(self) -> dict:
        return {"action": self.action.value, "sha256": self.sha256,
                "processes": [p.to_dict() for p in sorted(self.processes, key=lambda p: p.pid)],
                "applied": self.applied, "skipped": self.skipped, "failed": self.failed,
                "interrupted": self.interrupted, "elapsed_s": round(self.elapsed_s, 3),
                "discovery_s": round(self.discovery_s, 3),
                "exit_code": self.exit_code}


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    applied: int
    skipped: int
    failed: int
    elapsed_s: float


OnResult = Callable[[ProcessResult, Progress], None]
