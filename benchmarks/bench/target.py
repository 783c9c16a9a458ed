"""A running bench_target and the status file it shares with us.

The layout mirrors `struct status` in targets/bench_target.c.  Every target
is SIGKILLed by `Target.kill_all()` (the runner calls it on every exit path);
besides, each target exits by itself after its time limit and when the
runner dies (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import mmap
import os
import signal
import struct
import subprocess
import time
from pathlib import Path
from typing import ClassVar

STATUS_SIZE = 128 * 1024
FIELDS = {name: 8 * i for i, name in enumerate(
    ["magic", "ready", "pid", "nworkers", "reset_req", "reset_ack", "max_gap_ns",
     "beats", "rt", "errors", "windows", "window_ns", "variant",
     "reset_ack_main", "max_gap_main_ns", "beats_main"])}
RATE_OFF, RING = 256, 128
REF_OFF = RATE_OFF + 8 * RING
WORKER_OFF, WORKER_STRIDE = 256 + 16 * RING, 64


class TargetDied(RuntimeError):
    pass


class Target:
    live: ClassVar[dict[int, "Target"]] = {}

    def __init__(self, binary: Path, mode: str, nworkers: int, work: Path,
                 exit_after_s: float, ready_timeout: float = 30.0, spin: int | None = None) -> None:
        self.mode, self.nworkers = mode, nworkers
        self.status_path = work / f"status-{os.getpid()}-{mode}-{nworkers}-{time.monotonic_ns()}.bin"
        self.status_path.write_bytes(b"\0" * STATUS_SIZE)
        with open(self.status_path, "r+b") as f:
            self.mem = mmap.mmap(f.fileno(), STATUS_SIZE)
        self.log = open(work / "targets.log", "ab")
        # Own session: an own scheduler autogroup, so 64 spinning workers do
        # not starve the tools (which run in the runner's group).
        self.proc = subprocess.Popen(
            [str(binary), mode, str(self.status_path), str(nworkers), str(int(exit_after_s * 1000)),
             *([str(spin)] if spin is not None else [])],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, start_new_session=True)
        self.pid = self.proc.pid
        Target.live[self.pid] = self
        try:
            self._wait(lambda: self.get("ready") == 1, ready_timeout, "ready")
        except BaseException:
            self.kill()
            raise

    # -- status file -----------------------------------------------------------
    def get(self, name: str) -> int:
        return struct.unpack_from("<q", self.mem, FIELDS[name])[0]

    def set(self, name: str, value: int) -> None:
        struct.pack_into("<q", self.mem, FIELDS[name], value)

    def iters(self) -> list[int]:
        return [struct.unpack_from("<q", self.mem, WORKER_OFF + i * WORKER_STRIDE)[0]
                for i in range(self.nworkers)]

    def rate(self, window: int) -> tuple[int, int]:
        """(compute() calls/s, compute_ref() calls/s) of one window."""
        off = 8 * (window % RING)
        return (struct.unpack_from("<q", self.mem, RATE_OFF + off)[0],
                struct.unpack_from("<q", self.mem, REF_OFF + off)[0])

    # -- state -------------------------------------------------------------------
    def alive(self) -> bool:
        return self.proc.poll() is None

    def death(self) -> str | None:
        rc = self.proc.poll()
        if rc is None:
            return None
        return f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited {rc}"

    def _wait(self, pred, timeout: float, what: str, interval: float = 0.0005) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if not self.alive():
                raise TargetDied(f"target {self.pid} ({self.mode}) {self.death()} waiting for {what}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"target {self.pid} ({self.mode}): no {what} after {timeout} s")
            time.sleep(interval)

    # -- heartbeat -----------------------------------------------------------------
    # Two heartbeats: a thread of its own and the main thread.
    def reset_gap(self) -> None:
        """Zero both heartbeats' max gap; returns once both did it."""
        want = self.get("reset_req") + 1
        self.set("reset_req", want)
        self._wait(lambda: self.get("reset_ack") == want and self.get("reset_ack_main") == want,
                   5.0, "heartbeat reset")

    def gaps_us(self) -> tuple[float, float]:
        """Longest gap of (heartbeat thread, main thread) since reset_gap(),
        once both have beaten again (a stop's gap is only seen on resuming)."""
        b, m = self.get("beats"), self.get("beats_main")
        self._wait(lambda: self.get("beats") >= b + 2 and self.get("beats_main") >= m + 2,
                   5.0, "heartbeat")
        return self.get("max_gap_ns") / 1000.0, self.get("max_gap_main_ns") / 1000.0

    def gap_us(self) -> float:
        """The stall: the longest gap either heartbeat saw."""
        return max(self.gaps_us())

    # -- checks ----------------------------------------------------------------------
    def progressing(self, dt: float = 0.5) -> bool:
        """Every worker made progress within dt (a hung or looping worker did not)."""
        before = self.iters()
        deadline = time.monotonic() + max(dt, 5.0)
        time.sleep(dt)
        while True:
            after = self.iters()
            if all(a > b for a, b in zip(after, before)):
                return True
            if time.monotonic() > deadline or not self.alive():
                return False
            time.sleep(0.05)

    def variant(self, timeout: float = 2.0) -> int:
        """Which compute() answers now: 2 original, 3 patched (0: no call seen)."""
        self.set("variant", 0)
        try:
            self._wait(lambda: self.get("variant") != 0, timeout, "call of compute()", 0.001)
        except TimeoutError:
            return 0
        return self.get("variant")

    def threads(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/task"))
        except FileNotFoundError:
            return 0

    # -- cleanup -----------------------------------------------------------------------
    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        Target.live.pop(self.pid, None)
        self.mem.close()
        self.log.close()
        self.status_path.unlink(missing_ok=True)

    def __enter__(self) -> "Target":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

    @classmethod
    def kill_all(cls) -> None:
        for t in list(cls.live.values()):
            t.kill()
