"""One fleet action in one process (runs in a fleet worker, or inline in the
watch service): what apply / check / prepare / cutover / abort / revert
``--all`` do to a process, each identifying the edition by the patch's
sha256, and the per-build warm-up done once before the workers fork."""
from __future__ import annotations

from . import audit, interrupts, trampoline, x86writer
from . import editions as ed
from .cycle import HarnessChoice
from .discovery import ProcInfo, Unpatchable, Wants, proc_info
from .errors import HotpatchError, NoSuchProcess, NotQuiescent, SymbolNotFound, TargetGone, UnknownObject
from .fleet_results import Action, Outcome, ProcessResult
from .memory import RemoteMemory
from .patchfile import PatchFile
from .process import Process, attach
from .symbols import TargetSymbols


# A process with no safe moment at first gives its worker back: it is tried
# again once everything else had its turn, with the rest of its --timeout,
# so one busy process (say, inside the resolver) delays no other.
# KSPLICE_PY_FLEET_FIRST_TRY (seconds) changes how long that first try may be.
FIRST_TRY_S = 0.25
RETRY = ProcessResult(0, "", Outcome.FAILED, reason="retry later")  # a marker, never reported


class Stop(BaseException):
    """In a worker: the runner asked to undo what is under way."""


# --- the per-process work (runs in a worker) ---------------------------------

class Job:
    """What every worker needs: the action, the patch, the options."""

    def __init__(self, action: Action, patch: PatchFile | None, sha256: str, timeout: float,
                 harnesses: HarnessChoice | None, wants: Wants | None,
                 audit_log: audit.AuditLog | None) -> None:
        self.action, self.patch, self.sha256 = action, patch, sha256
        self.timeout, self.harnesses, self.wants = timeout, harnesses, wants
        self.audit_log = audit_log
        # A target named without its object ("compute") may live anywhere:
        # a process that does not define it is simply not concerned.
        self.unqualified = patch is not None and any(
            ":" not in t for t in [r.target for r in patch.replacements]
            + [s.target for s in patch.symbol_refs])

    def run(self, info: ProcInfo, budget: float | None = None, final: bool = True) -> ProcessResult | None:
        """One process: its result, or None when it is not concerned, or
        RETRY when no safe moment came within ``budget`` and ``final`` is
        False (the process was left as it was; try it again later)."""
        self.budget = self.timeout if budget is None else budget
        self.final = final
        interrupts.reset()  # one operation, one point of no return (interrupts.py)
        return self._run(info)

    def _run(self, info: ProcInfo) -> ProcessResult | None:
        def result(outcome: Outcome, **kw) -> ProcessResult:
            return ProcessResult(info.pid, info.name, outcome, **kw)

        try:
            # Each operation is audited by the library (process.py), to our log.
            with attach(info.pid, self.audit_log) as proc:
                if proc.start_time != info.start_time:
                    return result(Outcome.SKIPPED, reason=Unpatchable.GONE.value)
                return ACTIONS[self.action](self, proc, result)
        except (NoSuchProcess, TargetGone) as e:
            if isinstance(e, NoSuchProcess) and not _gone(info):
                return result(Outcome.FAILED, reason=str(e), exit_code=e.exit_code)
            return result(Outcome.SKIPPED, reason="exited during the run; nothing was done to it")
        except NotQuiescent as e:
            if not self.final:
                return RETRY
            return result(Outcome.FAILED, reason=" ".join(str(e).split()), exit_code=e.exit_code)
        except (UnknownObject, SymbolNotFound) as e:
            if self.unqualified:
                return None
            return result(Outcome.FAILED, reason=str(e), exit_code=e.exit_code)
        except HotpatchError as e:
            return result(Outcome.FAILED, reason=" ".join(str(e).split()), exit_code=e.exit_code)
        except Stop:
            return result(Outcome.FAILED, reason="interrupted; the process was left as it was",
                          exit_code=1)

    # -- actions ------------------------------------------------------------
    def _mine(self, proc: Process) -> tuple[list[ed.Edition], list[ed.Edition]]:
        """(applied, prepared) editions of this patch's content, newest first."""
        eds = [e for e in proc.editions() if e.sha256 == self.sha256]
        return ([e for e in eds if e.state == "applied"], [e for e in eds if e.state == "prepared"])

    def apply(self, proc: Process, result) -> ProcessResult:
        applied, prepared = self._mine(proc)
        if applied:
            return result(Outcome.SKIPPED, edition=applied[0].id,
                          reason=f"already applied as edition {applied[0].id}")
        if prepared:
            return result(Outcome.SKIPPED, edition=prepared[0].id,
                          reason=f"prepared as edition {prepared[0].id}; cut it over or abort it")
        e = proc.apply(self.patch, timeout=self.budget, harnesses=self.harnesses)
        return result(Outcome.APPLIED, edition=e.id, pause_us=e.pause_us)

    def check(self, proc: Process, result) -> ProcessResult:
        applied, _ = self._mine(proc)
        if applied:
            return result(Outcome.SKIPPED, edition=applied[0].id,
                          reason=f"already applied as edition {applied[0].id}")
        r = proc.check(self.patch, harnesses=self.harnesses)
        if r.safe_now:
            return result(Outcome.APPLIED, pause_us=r.pause_us, reason="fits and could be switched now")
        why = "; ".join(b.describe() for b in r.blockers)
        return result(Outcome.FAILED, pause_us=r.pause_us, reason=f"fits but would wait now: {why}",
                      exit_code=NotQuiescent.exit_code)

    def prepare(self, proc: Process, result) -> ProcessResult:
        applied, prepared = self._mine(proc)
        if applied or prepared:
            e = (applied or prepared)[0]
            return result(Outcome.SKIPPED, edition=e.id, reason=f"already {e.state} as edition {e.id}")
        e = proc.prepare(self.patch, harnesses=self.harnesses)
        return result(Outcome.APPLIED, edition=e.id)

    def cutover(self, proc: Process, result) -> ProcessResult | None:
        applied, prepared = self._mine(proc)
        if not prepared:
            return result(Outcome.SKIPPED, edition=applied[0].id,
                          reason=f"already applied as edition {applied[0].id}") if applied else None
        e = proc.cutover(prepared[0].id, timeout=self.budget)
        return result(Outcome.APPLIED, edition=e.id, pause_us=e.pause_us)

    def abort(self, proc: Process, result) -> ProcessResult | None:
        applied, prepared = self._mine(proc)
        if not prepared:
            return result(Outcome.SKIPPED, edition=applied[0].id,
                          reason=f"applied as edition {applied[0].id}, not prepared; revert it instead"
                          ) if applied else None
        e = proc.abort(prepared[0].id)
        return result(Outcome.APPLIED, edition=e.id)

    def revert(self, proc: Process, result) -> ProcessResult | None:
        applied, prepared = self._mine(proc)
        if not applied:
            return result(Outcome.SKIPPED, edition=prepared[0].id,
                          reason=f"only prepared as edition {prepared[0].id}; abort it instead"
                          ) if prepared else None
        done = [proc.revert(e.id, timeout=self.budget) for e in applied]  # newest first
        return result(Outcome.APPLIED, edition=done[0].id, pause_us=max(e.last_pause_us or 0 for e in done))


ACTIONS = {Action.APPLY: Job.apply, Action.CHECK: Job.check, Action.PREPARE: Job.prepare,
            Action.CUTOVER: Job.cutover, Action.ABORT: Job.abort, Action.REVERT: Job.revert}


def _gone(info: ProcInfo) -> bool:
    """Has the process we discovered exited (or become a zombie) since?"""
    now = proc_info(info.pid)
    return now is None or now.start_time != info.start_time or now.unpatchable is Unpatchable.ZOMBIE


# --- per-build work (in the runner, before the workers fork) ----------------

def warm(patch: PatchFile, pid: int) -> None:
    """Resolve the patch's symbols and imports in one process of a build,
    reading it only (no ptrace): the parsed objects stay in memory
    (symbols.py) for every worker forked afterwards."""
    try:
        with RemoteMemory(pid) as mem:
            syms = TargetSymbols(pid, mem)
            for rep in patch.replacements:
                sym = syms.resolve(rep.target)
                code = mem.read(sym.addr, min(sym.size, 1 << 20)) if sym.size else b""
                trampoline.check_window(trampoline.FunctionCode(sym.qualified, sym.addr, sym.size, code),
                                        x86writer.JMP_REL32_LEN)
            for ref in patch.symbol_refs:
                syms.resolve(ref.target)
            for imp in patch.imports:
                syms.bind_import(imp.name, imp.version, imp.weak)
    except HotpatchError:
        pass  # the worker meets it again, in that process, and reports it
