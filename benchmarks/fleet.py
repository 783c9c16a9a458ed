#!/usr/bin/env python3
"""Fleet benchmark (issue #11): N processes, one `hotpatch apply --all`.

    python benchmarks/fleet.py [--sizes 10,100,1000] [--jobs N] [--loop-sample 50] [--out DIR]

For each N: start N copies of a small two-thread target (tests/targets/
fleet_target.c: a worker calling libfleet.so's fleet_compute, a heartbeat
thread timing its own sleeps), then

* noise floor: the heartbeats' longest lateness over an idle window as long
  as the apply will take (what the machine does to them without us);
* ``hotpatch apply --all fleet_v2.so --exe TARGET --json``: wall time (the
  whole command, Python start-up included), per process, the tool's own
  longest and median ``pause_us``, and the heartbeats' longest lateness
  while it ran (the stall felt inside any target);
* none harmed: every target alive, no thread stopped or traced, its worker
  returning the new value, no wrong result counted;
* the same for ``revert --all``;
* the comparison, in the same run: a shell loop of single ``hotpatch apply
  PID`` over the first --loop-sample targets (per process, and that rate
  times N, marked as extrapolated when the sample is smaller than N).

Writes DIR/fleet.json and DIR/fleet.md (DIR: benchmarks/results). The
targets are ours alone (libfleet.so exists only here) and --exe narrows
every run to them; all are killed at the end, however it ends.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import resource
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
STATUS_SIZE = 4096
ERRORS, EINTR = 32 + 8 * 4, 32 + 8 * 5  # status slots (tests/targets/common.h)
W0_ITERS, W0_LAST, HB_ITERS, HB_LATE = 256, 264, 320, 328
# Heartbeat and worker period: 2 wake-ups a period a process. At 100 ms, 1000
# targets (20k wake-ups/s) kept this VM's two cores busy on their own (their
# heartbeats were 70 ms late while idle), so the period grows with N: mostly
# idle processes, as on a real machine.
def period_us(n: int) -> int:
    return max(100_000, n * 1000)


def log(msg: str) -> None:
    print(f"[fleet-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def hotpatch() -> str:
    from run import _hotpatch  # benchmarks/run.py: beside this Python, or on PATH
    return _hotpatch()


def build(work: Path, hp: str) -> dict[str, Path]:
    t = TESTS / "targets"
    cflags = subprocess.run([hp, "cflags"], capture_output=True, text=True, check=True).stdout.split()
    steps = [["gcc", "-O2", "-g", "-shared", "-fPIC", "-o", "libfleet.so", str(t / "libfleet.c")],
             ["gcc", "-O2", "-g", "-pie", "-fPIE", "-pthread", f"-I{t}", "-o", "fleet_target",
              str(t / "fleet_target.c"), f"-L{work}", "-lfleet", f"-Wl,-rpath,{work}"],
             ["gcc", "-shared", "-fPIC", "-O2", *cflags, "-o", "fleet_v2.so",
              str(TESTS / "patches" / "fleet_v2.c")]]
    for cmd in steps:
        subprocess.run(cmd, cwd=work, check=True)
    # Pinned to this build of libfleet.so (its debug info holds this run's
    # paths): a machine-wide install (watch.py) reaches no one else's copy.
    pin = f'-DPIN="{build_id(work / "libfleet.so")}"'
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", *cflags, pin, "-o", "fleet_v2_pinned.so",
                    str(TESTS / "patches" / "fleet_v2.c")], cwd=work, check=True)
    return {"exe": work / "fleet_target", "patch": work / "fleet_v2.so", "pinned": work / "fleet_v2_pinned.so"}


def build_id(path: Path) -> str:
    from ksplice_py.symbols import build_id_of  # the library's own reader
    bid = build_id_of(str(path))
    if not bid:
        raise RuntimeError(f"{path} has no build-id")
    return bid


class Fleet:
    """N running targets and a shared view of their status files."""

    def __init__(self, exe: Path, n: int, work: Path) -> None:
        self.procs: list[subprocess.Popen] = []
        self.views: list[mmap.mmap] = []
        for i in range(n):
            path = work / f"status{i}.bin"
            path.write_bytes(b"\0" * STATUS_SIZE)
            self.procs.append(subprocess.Popen([str(exe), str(path), str(period_us(n))],
                                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL))
            with open(path, "r+b") as f:
                self.views.append(mmap.mmap(f.fileno(), STATUS_SIZE))
        deadline = time.monotonic() + 60 + n * 0.05
        while not all(self.q(v, 8) == 1 for v in self.views):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError("targets did not start")
            time.sleep(0.05)

    @staticmethod
    def q(v: mmap.mmap, off: int) -> int:
        return struct.unpack_from("<q", v, off)[0]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def reset_late(self) -> None:
        for v in self.views:  # the file is shared: the heartbeat restarts its maximum
            struct.pack_into("<q", v, HB_LATE, 0)

    def latest(self) -> list[int]:
        return [self.q(v, HB_LATE) for v in self.views]

    def wait_value(self, value: int, timeout: float) -> int:
        """How many workers return ``value`` within timeout."""
        deadline = time.monotonic() + timeout
        while True:
            ok = sum(1 for v in self.views if self.q(v, W0_LAST) == value)
            if ok == len(self.views) or time.monotonic() > deadline:
                return ok
            time.sleep(0.02)

    def harmed(self) -> list[str]:
        bad = []
        for p, v in zip(self.procs, self.views):
            if p.poll() is not None:
                bad.append(f"{p.pid} died ({p.returncode})")
                continue
            if self.q(v, ERRORS) or self.q(v, EINTR):
                bad.append(f"{p.pid} counted {self.q(v, ERRORS)} wrong results, {self.q(v, EINTR)} EINTR")
            for tid in os.listdir(f"/proc/{p.pid}/task"):
                try:
                    with open(f"/proc/{p.pid}/task/{tid}/status") as f:
                        st = {k: v.split() for k, v in (line.split(":", 1) for line in f if ":" in line)}
                except OSError:
                    continue
                if st["State"][0] in "tT" or st["TracerPid"][0] != "0":
                    bad.append(f"{p.pid}/{tid} left {st['State'][0]}, tracer {st['TracerPid'][0]}")
        return bad

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()


def run_fleet(hp: str, action: str, patch: Path, exe: Path, jobs: int | None, fl: Fleet,
              expect: int) -> dict:
    fl.reset_late()
    cmd = [hp, action, "--all", str(patch), "--exe", str(exe), "--json"]
    if jobs:
        cmd += ["--jobs", str(jobs)]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command and its workers (reaped by it)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    late = fl.latest()
    doc = json.loads(cp.stdout) if cp.stdout.strip().startswith("{") else {}
    pauses = [p["pause_us"] for p in doc.get("processes", []) if p.get("pause_us")]
    n = len(fl.procs)
    return {"exit": cp.returncode, "stderr": cp.stderr.strip()[-300:], "wall_s": round(wall, 3),
            "inner_s": doc.get("elapsed_s"), "cpu_s": round(cpu, 3), "discovery_s": doc.get("discovery_s"), "per_process_ms": round(wall / n * 1000, 2),
            "applied": doc.get("applied"), "skipped": doc.get("skipped"), "failed": doc.get("failed"),
            "pause_us_max": max(pauses, default=None),
            "pause_us_median": statistics.median(pauses) if pauses else None,
            "stall_us_max": max(late), "stall_us_median": statistics.median(late),
            "new_code_running": fl.wait_value(expect, 5.0), "harmed": fl.harmed(),
            "failures": [p for p in doc.get("processes", []) if p["result"] == "failed"][:20]}


def noise(fl: Fleet, seconds: float) -> dict:
    fl.reset_late()
    time.sleep(seconds)
    late = fl.latest()
    return {"window_s": round(seconds, 2), "stall_us_max": max(late), "stall_us_median": statistics.median(late)}


def shell_loop(hp: str, patch: Path, pids: list[int]) -> dict:
    script = f'for p in {" ".join(map(str, pids))}; do "{hp}" apply $p "{patch}" >/dev/null || echo fail; done'
    t0 = time.monotonic()
    cp = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - t0
    return {"sample": len(pids), "wall_s": round(wall, 3), "per_process_ms": round(wall / len(pids) * 1000, 1),
            "failures": cp.stdout.count("fail")}


def one_size(hp: str, built: dict, n: int, jobs: int | None, loop_sample: int, work: Path) -> dict:
    log(f"N={n}: starting targets")
    fl = Fleet(built["exe"], n, work)
    try:
        time.sleep(1.0)
        row: dict = {"n": n}
        row["noise_before"] = noise(fl, max(0.5, 0.004 * n))
        log(f"N={n}: apply --all")
        row["apply"] = run_fleet(hp, "apply", built["patch"], built["exe"], jobs, fl, 21)
        log(f"N={n}: revert --all")
        row["revert"] = run_fleet(hp, "revert", built["patch"], built["exe"], jobs, fl, 15)
        sample = fl.pids[:min(n, loop_sample)]
        log(f"N={n}: shell loop of single applies over {len(sample)}")
        loop = shell_loop(hp, built["patch"], sample)
        loop["extrapolated_wall_s"] = round(loop["per_process_ms"] * n / 1000, 2)
        loop["extrapolated"] = len(sample) < n
        row["shell_loop"] = loop
        subprocess.run([hp, "revert", "--all", str(built["patch"]), "--exe", str(built["exe"])],
                       capture_output=True, timeout=3600)
        row["load_after"] = os.getloadavg()[0]
        return row
    finally:
        fl.kill()


def markdown(res: dict) -> str:
    out = [f"Fleet benchmark, {res['when']}: {res['machine']}; jobs {res['jobs']}; "
           f"load average at start {res['load_before']:.1f}.", "",
           "| N | apply --all wall | per process | its CPU time | revert --all wall | tool pause max / median | "
           "stall inside any target (max) | idle noise (max) | all harmed? | shell loop per process | "
           "shell loop for N |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        a, v, lp = r["apply"], r["revert"], r["shell_loop"]
        harmed = "none" if not a["harmed"] and not v["harmed"] and a["new_code_running"] == r["n"] \
            and v["new_code_running"] == r["n"] else f"{len(a['harmed']) + len(v['harmed'])} problems"
        out.append(f"| {r['n']} | {a['wall_s']:.2f} s | {a['per_process_ms']:.1f} ms | {a['cpu_s']:.2f} s | "
                   f"{v['wall_s']:.2f} s | "
                   f"{(a['pause_us_max'] or 0) / 1000:.1f} / {(a['pause_us_median'] or 0) / 1000:.2f} ms | "
                   f"{a['stall_us_max'] / 1000:.1f} ms | {r['noise_before']['stall_us_max'] / 1000:.1f} ms | "
                   f"{harmed} | {lp['per_process_ms']:.0f} ms | "
                   f"{'~' if lp['extrapolated'] else ''}{lp['extrapolated_wall_s']:.1f} s |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--loop-sample", type=int, default=50)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args()
    hp = hotpatch()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        work = Path(tmp)
        built = build(work, hp)
        res = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "machine": f"{os.cpu_count()} cores, Linux {platform.release()}",
               "jobs": a.jobs or "default (CPUs)", "load_before": os.getloadavg()[0], "rows": []}
        for n in (int(x) for x in a.sizes.split(",")):
            res["rows"].append(one_size(hp, built, n, a.jobs, a.loop_sample, work))
            log(json.dumps(res["rows"][-1]))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "fleet.json").write_text(json.dumps(res, indent=2))
    (a.out / "fleet.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
