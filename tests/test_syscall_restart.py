"""Acceptance: threads parked in read(), epoll_wait() and nanosleep() are not
disturbed by being patched: no EINTR, no early or spurious wakeup, no lost or
reordered data. The patches replace compute(), which none of them is in.
"""
from __future__ import annotations

import os

from conftest import assert_ok, run_hotpatch, wait_until

INPUT = 7
CHUNK = 1500  # < PIPE_BUF: each chunk is written atomically


def pattern(start: int, n: int) -> bytes:
    return bytes((start + i) % 251 for i in range(n))


def test_blocked_syscalls_survive_repeated_patching(build, spawn):
    exe = build.target("syscalls")
    patches = [build.patch("compute_mul", MUL=m) for m in (3, 4, 5)]
    data_r, data_w = os.pipe()
    event_r, event_w = os.pipe()
    target = spawn(exe, 2, data_r, event_r, pass_fds=(data_r, event_r))
    os.close(data_r)
    os.close(event_r)
    st = target.status
    try:
        wait_until(lambda: st["in_read"] == 1 and st["in_epoll"] == 1 and st["in_sleep"] == 1,
                   1.0, "the threads to block")
        sent = events = 0
        for n, patch in enumerate(patches):
            read_returns, epoll_returns = st["read_returns"], st["epoll_returns"]

            assert_ok(run_hotpatch("apply", target.pid, patch, "--timeout", 5))
            target.wait_all_return(INPUT * (3 + n), timeout=1.0)

            # Patched while blocked: nobody woke up, nobody saw EINTR.
            state = {k: st[k] for k in ("eintr", "early", "errors", "read_returns",
                                        "epoll_returns", "in_read", "in_epoll")}
            assert st["read_returns"] == read_returns and st["in_read"] == 1, \
                f"read() returned while patch {n + 1} was applied: {state}"
            assert st["epoll_returns"] == epoll_returns and st["in_epoll"] == 1, \
                f"epoll_wait() returned while patch {n + 1} was applied: {state}"
            target.assert_healthy()

            # Now feed them: every byte arrives, in order, exactly once.
            os.write(data_w, pattern(sent, CHUNK))
            os.write(event_w, b"e" * (n + 1))
            sent += CHUNK
            events += n + 1
            wait_until(lambda: st["read_bytes"] == sent and st["in_read"] == 1, 1.0,
                       lambda: f"the reader to get {sent} bytes (has {st['read_bytes']})")
            wait_until(lambda: st["epoll_bytes"] == events and st["in_epoll"] == 1, 1.0,
                       lambda: f"the poller to drain {events} bytes (has {st['epoll_bytes']})")

        # nanosleep(1 s) and epoll_wait(300 ms) kept completing at full length.
        wait_until(lambda: st["sleeps"] >= 2, 2.0, "two full nanosleeps")
        assert st["timed_waits"] >= 3
        assert st["read_bad"] == 0, "bytes arrived out of order or corrupted"
        target.assert_healthy()
        target.assert_running()
    finally:
        os.close(data_w)
        os.close(event_w)
