"""SIGINT and SIGTERM around the point of no return.

Before a switch writes into the target, an interrupt unwinds every cleanup
path and the target ends as it was. Once the switch has written, the change
is made: the command must complete and report it, not die half-way or claim
that nothing happened. The transition marks that moment (``commit``) inside a
window where both signals are held back (``held``), so no interrupt can fall
between the write and the mark; the CLI's handler consults ``committed``.

Signals are process-wide, and so is this state: one command per process.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

SIGNALS = {signal.SIGINT, signal.SIGTERM}
_committed = False


@contextmanager
def held():
    """Block SIGINT/SIGTERM for the block; one that arrives meanwhile is
    delivered when it ends. Python runs handlers in the main thread only, so
    other threads need no blocking."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def commit() -> None:
    """The target has been changed: from now on the command must complete."""
    global _committed
    _committed = True


def committed() -> bool:
    return _committed


def reset() -> None:
    """A new command begins (the CLI calls this once per invocation)."""
    global _committed
    _committed = False
