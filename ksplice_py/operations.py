"""The edition operations, each once, on a Target: cutover and revert (one
transition, two directions), abort, cleanup, and recover, which finishes or
undoes what a killed tool left (lifecycle.py has the states and moves).

Callers hold the per-target lock (process.py); these functions assume no
other live tool is working on the target.
"""
from __future__ import annotations

from . import editions as ed
from . import runout
from .errors import BadInput, NotQuiescent, RemoteError
from .lifecycle import Direction, State
from .target import Target
from .transition import Transition


def find(target: Target, edition_id: int | None, state: State) -> ed.Edition:
    """The edition ``edition_id`` (the newest in ``state`` by default),
    refused unless it is in ``state``."""
    eds = target.editions()
    if edition_id is None:
        cands = [e for e in eds if e.state == state]
        if not cands:
            raise BadInput(f"process {target.pid} has no {state} edition")
        return cands[0]
    for e in eds:
        if e.id == edition_id:
            if e.state != state:
                raise BadInput(f"edition {edition_id} of process {target.pid} is {e.state}, not {state}")
            return e
    raise BadInput(f"process {target.pid} has no edition {edition_id} (see hotpatch list)")


def switch(target: Target, edition: ed.Edition, direction: Direction, timeout: float,
           functions: list[ed.FunctionSwitch] | None = None) -> Transition:
    """Run one transition to its end (retried until ``timeout``): the one
    path of a cutover, a revert and the recovery of either. A revert ends
    with the cleanup."""
    t = Transition(target, edition, direction, functions)
    target.verify(direction.during)  # the last check before the first write
    t.start(timeout)
    if direction is Direction.UNPATCH:
        cleanup(target, edition)
    return t


def cutover(target: Target, edition: ed.Edition, timeout: float) -> Transition:
    """Switch a prepared edition in: prepared -> switching -> applied."""
    return switch(target, edition, Direction.PATCH, timeout)


def revert(target: Target, edition: ed.Edition, timeout: float) -> Transition:
    """Switch an applied edition out (quiescence checked against its code),
    then free its memory: applied -> reverting -> (cleanup)."""
    return switch(target, edition, Direction.UNPATCH, timeout)


def abort(target: Target, regions: list[tuple[int, int]], edition: ed.Edition | None = None) -> None:
    """Before any cutover: unmap an edition's memory (and with it, its
    record); the target is exactly as before it was prepared. Not while a
    killed tool's run-out copy in it may still hold a thread."""
    target.verify("aborting")  # that memory went with our process: never unmap in another
    if edition is not None and runout.leftovers(runout.areas(target.mem, [edition])) \
            and not runout.remove_leftovers(target.pid, target.mem, [edition]):
        raise NotQuiescent(f"edition {edition.id}: a thread may still be finishing old code in the run-out "
                           f"copy an interrupted tool left; retry later (hotpatch recover {target.pid})")
    unmap_regions(target, regions)


def cleanup(target: Target, edition: ed.Edition) -> None:
    """After a revert: no trampoline points into the edition any more;
    unmap its memory (the record goes with it)."""
    unmap_regions(target, edition.regions)


def unmap_regions(target: Target, regions: list[tuple[int, int]]) -> None:
    """Remove an edition's memory (and with it, its record): with the last
    edition gone, nothing of ours is left in the target (tracer.Injector
    keeps no page of its own)."""
    with target.injector() as inj:
        for start, size in regions:
            if start:
                inj("munmap", start, size)


# -- recovery ------------------------------------------------------------------
def recover(target: Target, timeout: float = 5.0) -> list[str]:
    """Finish or undo whatever an interrupted tool left behind. Called under
    the lock, so anything unstable was left by a tool that died."""
    target.verify()
    maps = target.maps()
    eds, orphans = ed.list_editions(target.mem, maps)
    done: list[str] = []
    regions = ed.regions_in(maps)
    leaked = ed.leaked_descriptors(target.pid)
    if leaked:
        with target.injector() as inj:
            for fd in leaked:
                inj("close", fd)
        done.append(f"closed {len(leaked)} descriptor(s) an interrupted tool left open")
    if runout.remove_leftovers(target.pid, target.mem, eds, timeout):
        done.append("removed the run-out copy of an interrupted hot-function switch")
    for eid in orphans:  # killed before its record was complete
        abort(target, [(m.start, m.end - m.start) for m in regions[eid]])
        done.append(f"removed the memory of edition {eid}, interrupted while preparing")
    for e in eds:
        if e.state == State.PREPARING or (e.state == State.PREPARED and not e.staged):
            abort(target, e.regions, e)
            done.append(f"removed edition {e.id} ({e.patch}), left {e.state} by an interrupted tool")
        elif e.state in (State.SWITCHING, State.REVERTING):
            done.append(_finish_transition(target, e, timeout))
    return done


def _finish_transition(target: Target, e: ed.Edition, timeout: float) -> str:
    """A switch interrupted between its writes: look at which trampolines
    are in, then complete the interrupted direction."""
    current = {f.addr: target.mem.read(f.addr, len(bytes.fromhex(f.new_bytes))) for f in e.functions}
    still_old = [f for f in e.functions if current[f.addr] == bytes.fromhex(f.old_bytes)]
    still_new = [f for f in e.functions if current[f.addr] == bytes.fromhex(f.new_bytes)]
    if len(still_old) + len(still_new) != len(e.functions):
        raise RemoteError(f"edition {e.id}: code of process {target.pid} matches neither old nor new bytes; "
                          "not touching it")
    if e.state == State.SWITCHING:
        if still_old:
            switch(target, e, Direction.PATCH, timeout, functions=still_old)
        else:  # every trampoline is in: only the final state write was lost
            target.mem.write(*e.move_to(State.APPLIED))
        return f"completed the interrupted switch of edition {e.id} ({e.patch})"
    if still_new:
        switch(target, e, Direction.UNPATCH, timeout, functions=still_new)
    else:
        cleanup(target, e)
    return f"completed the interrupted revert of edition {e.id} ({e.patch})"
