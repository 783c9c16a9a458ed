"""The edition state machine: every state an edition's record can hold, and
the moves between them. The operations that make the moves (cutover,
revert, abort, cleanup, recover) are in operations.py; each move is written
into the target's record (editions.py) before or with the bytes it stands
for, so a tool killed at any instant leaves a state ``recover`` can finish
or undo.

    PREPARING --finalize--> PREPARED --cutover--> SWITCHING --> APPLIED
        |                      |                                   |
        +---- abort/recover ---+                              revert (Direction.UNPATCH)
          (memory unmapped:                                        v
           the record goes with it)               REVERTED <-- REVERTING
                                                  (cleanup: memory unmapped)

A cutover and a revert are one object, a transition (transition.py), run in
one of two directions, as Linux livepatch's __klp_enable_patch and
__klp_disable_patch mirror each other.
"""
from __future__ import annotations

from enum import Enum, StrEnum


class State(StrEnum):
    """What an edition's record says (its 16-byte state field)."""

    PREPARING = "preparing"  # mapped, record being written; no code can reach it
    PREPARED = "prepared"  # linked and complete; unreachable until the cutover
    SWITCHING = "switching"  # the cutover's writes are under way
    APPLIED = "applied"  # every trampoline points at the edition
    REVERTING = "reverting"  # the revert's writes are under way
    REVERTED = "reverted"  # its memory is unmapped: never read back from a target
    UNREADABLE = "unreadable"  # a record another version wrote, or damaged: never touched

    @classmethod
    def parse(cls, text: str) -> "State":
        """A state read from a record; one this version does not know is unreadable."""
        try:
            return cls(text)
        except ValueError:
            return cls.UNREADABLE


# Allowed moves; an abort, a recovery or a cleanup removes the record instead.
MOVES: dict[State, frozenset[State]] = {
    State.PREPARING: frozenset({State.PREPARED}),
    State.PREPARED: frozenset({State.SWITCHING}),
    State.SWITCHING: frozenset({State.APPLIED}),
    State.APPLIED: frozenset({State.REVERTING}),
    State.REVERTING: frozenset({State.REVERTED}),
    State.REVERTED: frozenset(),
    State.UNREADABLE: frozenset(),
}


def can_move(frm: State, to: State) -> bool:
    return to in MOVES[frm]


# States an interrupted tool may leave behind, and what recovery does with each.
UNSTABLE = frozenset({State.PREPARING, State.SWITCHING, State.REVERTING})


class Direction(Enum):
    """Which way a transition switches an edition's trampolines."""

    PATCH = "patch"  # cutover: the old code -> the edition's code
    UNPATCH = "unpatch"  # revert: the edition's code -> the code below it

    @property
    def origin(self) -> State:
        """The state an edition must be in for this transition to start."""
        return State.PREPARED if self is Direction.PATCH else State.APPLIED

    @property
    def during(self) -> State:
        """The state recorded while the trampolines are being written."""
        return State.SWITCHING if self is Direction.PATCH else State.REVERTING

    @property
    def outcome(self) -> State:
        return State.APPLIED if self is Direction.PATCH else State.REVERTED

    @property
    def verb(self) -> str:
        return "switch" if self is Direction.PATCH else "revert"
