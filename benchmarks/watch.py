#!/usr/bin/env python3
"""Watch-service benchmark (issue #12): from a process's start to its new code.

    python benchmarks/watch.py [--starts 100] [--out DIR]

With fleet_v2.so (pinned to this run's build of libfleet.so) installed in a temporary store and `hotpatch watch` running,
start the two-thread fleet target --starts times, one after another, and
time from just before its fork+exec until its worker returns the patched
value (its worker calls fleet_compute every millisecond): median and worst,
beside what the service itself reports (ms from the exec event to the
applied edition). Then the service's CPU time over an idle window (on a
shared machine other people's processes start meanwhile, and each is looked
at a few times: the number is what it costs here, not zero).

Writes DIR/watch.json and DIR/watch.md (DIR: benchmarks/results).
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fleet import STATUS_SIZE, W0_LAST, build, hotpatch, log  # noqa: E402

NEW = 21


def ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--starts", type=int, default=100)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args()
    hp = hotpatch()
    with tempfile.TemporaryDirectory(prefix="watch-bench-") as tmp:
        work = Path(tmp)
        built = build(work, hp)
        env = dict(os.environ, KSPLICE_PY_STATE_DIR=str(work / "state"))
        subprocess.run([hp, "install", str(built["pinned"])], env=env, check=True, capture_output=True)
        watch = subprocess.Popen([hp, "watch", "--json"], env=env, stdout=subprocess.PIPE, text=True)
        events: list[dict] = []
        threading.Thread(target=lambda: [events.append(json.loads(x)) for x in watch.stdout], daemon=True).start()
        try:
            while not any(e["event"] == "reconciled" for e in events):
                time.sleep(0.05)
            latencies, missed = [], 0
            for i in range(a.starts):
                path = work / f"s{i}.bin"
                path.write_bytes(b"\0" * STATUS_SIZE)
                with open(path, "r+b") as f:
                    view = mmap.mmap(f.fileno(), STATUS_SIZE)
                t0 = time.monotonic()
                p = subprocess.Popen([str(built["exe"]), str(path), "1000"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
                while struct.unpack_from("<q", view, W0_LAST)[0] != NEW:
                    if time.monotonic() - t0 > 10:
                        missed += 1
                        break
                    time.sleep(0.0005)
                else:
                    latencies.append(time.monotonic() - t0)
                p.kill()
                p.wait()
            time.sleep(2.5)  # past the last process's look-again schedule
            t = ticks(watch.pid)
            time.sleep(5.0)
            idle = (ticks(watch.pid) - t) / os.sysconf("SC_CLK_TCK") / 5.0
        finally:
            watch.terminate()
            watch.wait(timeout=30)
        after_exec = [e["after_exec_ms"] for e in events if e["event"] == "applied" and "after_exec_ms" in e]
    ms = [x * 1000 for x in latencies]
    res = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_before": os.getloadavg()[0],
           "starts": a.starts, "patched": len(latencies), "missed": missed,
           "start_to_new_code_ms": {"median": round(statistics.median(ms), 1), "worst": round(max(ms), 1),
                                     "p90": round(sorted(ms)[int(len(ms) * 0.9) - 1], 1)} if ms else None,
           "exec_event_to_applied_ms": {"median": round(statistics.median(after_exec), 1),
                                         "worst": round(max(after_exec), 1)} if after_exec else None,
           "idle_cpu_fraction": round(idle, 4)}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "watch.json").write_text(json.dumps(res, indent=2))
    s, e = res["start_to_new_code_ms"] or {}, res["exec_event_to_applied_ms"] or {}
    md = (f"Watch benchmark, {res['when']}, load average {res['load_before']:.1f}: {res['patched']} of "
          f"{res['starts']} starts patched ({res['missed']} not within 10 s).\n\n"
          "| | median | worst |\n|---|---|---|\n"
          f"| start (fork+exec) to new code running | {s.get('median')} ms | {s.get('worst')} ms |\n"
          f"| exec event to edition applied (service's own) | {e.get('median')} ms | {e.get('worst')} ms |\n\n"
          f"Service CPU while none of its processes start: {res['idle_cpu_fraction'] * 100:.2f}% of a core.\n")
    (a.out / "watch.md").write_text(md)
    log(json.dumps(res))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
