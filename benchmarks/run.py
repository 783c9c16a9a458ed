#!/usr/bin/env python3
"""Run every ksplice_py benchmark, with its peers, in one go.

    python benchmarks/run.py [--quick] [--out DIR]

Writes DIR/results.json, DIR/results.md and DIR/stall.png (DIR defaults to
benchmarks/results).  Needs gcc, gdb, the `hotpatch` command (beside this
Python, or on PATH), and for the full picture the `frida` and `matplotlib`
Python packages (pip install '.[bench]'); a missing peer is reported as not
measured, never estimated.  Every target it starts exits on its own within
minutes, and all are killed when the run ends, however it ends.
"""
from __future__ import annotations

import argparse
import atexit
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import build, report, suites  # noqa: E402
from bench.target import Target  # noqa: E402
from bench.tools import Frida, Gdb, Ours, compile_bytecode  # noqa: E402


def _hotpatch() -> str:
    beside = Path(sys.executable).parent / "hotpatch"
    found = str(beside) if beside.exists() else shutil.which("hotpatch")
    if not found:
        sys.exit("benchmarks: the `hotpatch` command is not installed (pip install -e .)")
    return found


def _machine() -> str:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}"


def _ksplice_version() -> str:
    try:
        from importlib.metadata import version
        return version("ksplice_py")
    except Exception:
        return "?"


def _git_rev() -> str:
    try:
        cp = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return cp.stdout.strip() + ("+dirty" if dirty else "")
    except Exception:
        return "?"


def _loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _warm_up(cfg: suites.Config) -> None:
    """Fill the warm cache (native helper, symbols) outside any measurement."""
    with Target(cfg.built.target, "stall", 1, cfg.work, 60) as t:
        r = cfg.ours.apply(t.pid, cfg.built.patch)
        if not r.ok:
            sys.exit(f"benchmarks: hotpatch cannot patch the benchmark target: {r.error}")
        cfg.ours.revert(t.pid)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs and peer points (a few minutes)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--reps", type=int, help="runs per point (default 5, 2 with --quick)")
    ap.add_argument("--only", action="append", choices=["stall", "cache", "cutover", "steady", "survival", "hot"],
                    help="run only this suite (repeatable; for development)")
    a = ap.parse_args()
    if os.geteuid() != 0 and open("/proc/sys/kernel/yama/ptrace_scope").read().strip() != "0":
        print("benchmarks: warning: not root and ptrace_scope != 0: attaching may fail", file=sys.stderr)

    # SIGTERM/SIGINT: unwind through the finally below so targets are killed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    atexit.register(Target.kill_all)

    work = HERE / ".work"
    work.mkdir(exist_ok=True)
    hotpatch = _hotpatch()
    t_start = time.monotonic()
    suites.log("building targets and patches")
    built = build.build(work, hotpatch)
    warm_cache = work / "cache-warm"  # kept across runs: keyed by sources and build-ids
    quick = a.quick
    cfg = suites.Config(
        quick=quick, reps=a.reps or (2 if quick else 5),
        ns=[1, 8, 64, 256, 1024],
        peer_ns=[1, 1024] if quick else [1, 8, 64, 256, 1024],
        survival_ours=6 if quick else 50, survival_peers=3 if quick else 20,
        rate_windows=5 if quick else 10,
        work=work, built=built, ours=Ours(hotpatch, warm_cache))
    for peer in (Gdb(), Frida()):
        why = peer.available()
        if why:
            cfg.skipped_peers[peer.name] = why
        else:
            cfg.peers.append(peer)

    res: dict = {"meta": {
        "command": "python benchmarks/run.py" + (" --quick" if quick else ""),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": _machine(), "quick": quick,
        "reps": cfg.reps, "worker_counts": cfg.ns, "peer_worker_counts": cfg.peer_ns,
        "versions": {"ksplice_py": f"{_ksplice_version()} ({_git_rev()})",
                     **{p.name: p.version() for p in cfg.peers}},
        "skipped_peers": cfg.skipped_peers,
        "loadavg_start": _loadavg(),
    }}
    res["meta"]["bytecode"] = compile_bytecode(hotpatch)
    try:
        suites.log("warming the cache")
        _warm_up(cfg)
        for name in ("stall", "cache", "cutover", "steady", "survival", "hot"):
            if a.only and name not in a.only:
                continue
            res[name] = getattr(suites, name)(cfg)
    finally:
        Target.kill_all()
    for name, empty in (("stall", []), ("cache", {}), ("cutover", []), ("steady", []), ("survival", []),
                        ("hot", [])):
        res.setdefault(name, empty)
    res["meta"]["duration_s"] = time.monotonic() - t_start
    res["meta"]["loadavg_end"] = _loadavg()
    report.write(res, a.out)
    suites.log(f"done in {res['meta']['duration_s']:.0f} s: {a.out}/results.md, results.json, stall.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
