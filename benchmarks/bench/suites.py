"""The measurements.  Each suite returns plain data for results.json.

stall     per worker count N: ours (apply and revert: pause_us + heartbeat gap)
          beside an idle baseline and the peers (fresh target per peer run)
cache     end-to-end `hotpatch apply` with an empty, a cold and a warm cache
cutover   one cutover switching k = 1, 10, 100, 1000 functions
steady    calls/s of compute() before and after the patch, measured in the target
survival  64 busy workers; how often each tool leaves the target dead or broken
hot       the hot-function workload (benchmarks/hot.py): N workers calling a short
          leaf back to back; success with --timeout 2, wall, pause vs floor, stall
"""
from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .build import MANY_KS, Built
from .target import Target, TargetDied
from .tools import Floor, Frida, Gdb, OpResult, Ours
from .tools import _run as _run_cmd

STALL_TARGET_LIFE = 600.0  # seconds: far beyond any suite, still bounded
PEER_TARGET_LIFE = 120.0


@dataclass
class Config:
    quick: bool
    reps: int
    ns: list[int]
    peer_ns: list[int]
    survival_ours: int
    survival_peers: int
    rate_windows: int
    work: Path
    built: Built
    ours: Ours
    peers: list = field(default_factory=list)  # available peer tools
    skipped_peers: dict = field(default_factory=dict)  # name -> why not measured


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def summary(values: list[float | None]) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def ratio(a: dict | None, b: dict | None, key: str = "median") -> float | None:
    if not a or not b or not b[key]:
        return None
    return a[key] / b[key]


def measured(t: Target, op: Callable[[], OpResult]) -> OpResult:
    """Run op with the heartbeat's max gap reset just before it."""
    t.reset_gap()
    r = op()
    if t.alive():
        thread_gap, main_gap = t.gaps_us()
        r.gap_us = max(thread_gap, main_gap)
        r.extra |= {"gap_thread_us": thread_gap, "gap_main_us": main_gap}
    return r


def baseline_gap(t: Target, seconds: float) -> float:
    """The heartbeat's longest gap over an idle window as long as an op."""
    t.reset_gap()
    time.sleep(seconds)
    return t.gap_us()


def _fail_note(r: OpResult, t: Target) -> str | None:
    if not t.alive():
        return f"target {t.death()}"
    if not r.ok:
        return f"exit {r.rc}: {r.error}"
    return None


# -- stall -------------------------------------------------------------------------

def stall(cfg: Config) -> list[dict]:
    rows = []
    for n in cfg.ns:
        row: dict = {"n": n}
        applies, reverts, base, failures, floors = [], [], [], [], []
        with Target(cfg.built.target, "stall", n, cfg.work, STALL_TARGET_LIFE) as t:
            row["heartbeat_sched_fifo"] = bool(t.get("rt"))
            row["threads"] = t.threads()
            for _ in range(cfg.reps):
                a = measured(t, lambda: cfg.ours.apply(t.pid, cfg.built.patch))
                if a.ok and t.variant() != 3:
                    a.ok, a.error = False, "applied, but compute() still answers the old way"
                applies.append(a)
                rv = measured(t, lambda: cfg.ours.revert(t.pid)) if a.ok else None
                if rv is not None:
                    if rv.ok and t.variant() != 2:
                        rv.ok, rv.error = False, "reverted, but compute() still answers the new way"
                    reverts.append(rv)
                base.append(baseline_gap(t, a.wall_s))
                floors.append(measured(t, lambda: Floor(cfg.built.floor).apply(t.pid)))
                for r in (a, rv, floors[-1]):
                    if r is not None and (note := _fail_note(r, t)):
                        failures.append(f"{r.tool} {r.op}: {note}")
                if not t.alive():
                    break
        ok_a = [r for r in applies if r.ok]
        ok_r = [r for r in reverts if r.ok]
        row["ours"] = {
            "runs": len(applies), "ok": len(ok_a),
            "pause_us": summary([r.pause_us for r in ok_a]),
            "gap_us": summary([r.gap_us for r in ok_a]),
            "gap_main_us": summary([r.extra.get("gap_main_us") for r in ok_a]),
            "gap_thread_us": summary([r.extra.get("gap_thread_us") for r in ok_a]),
            "wall_s": summary([r.wall_s for r in ok_a]),
            "attempts": summary([r.attempts for r in ok_a]),
            "revert_pause_us": summary([r.pause_us for r in ok_r]),
            "revert_gap_us": summary([r.gap_us for r in ok_r]),
            "revert_wall_s": summary([r.wall_s for r in ok_r]),
        }
        row["baseline_gap_us"] = summary(base)
        row["floor"] = _floor_row(floors, row["ours"])
        log(f"stall N={n}: ours pause {_fmt(row['ours']['pause_us'])} µs, "
            f"gap {_fmt(row['ours']['gap_us'])} µs, idle gap {_fmt(row['baseline_gap_us'])} µs; "
            f"floor pause {_fmt(row['floor']['pause_us'])} µs, gap {_fmt(row['floor']['gap_us'])} µs")
        if n in cfg.peer_ns:
            for peer in cfg.peers:
                row[peer.name] = _peer_stall(cfg, peer, n, row["ours"], failures)
                log(f"stall N={n}: {peer.name} gap {_fmt(row[peer.name]['gap_us'])} µs, "
                    f"wall {_fmt(row[peer.name]['wall_s'], 's')}")
        row["failures"] = failures
        rows.append(row)
    return rows


def _floor_row(runs: list[OpResult], ours: dict) -> dict:
    """The floor program's pause and stall, and ours as a multiple of them
    (median over median, same target, same run)."""
    ok = [r for r in runs if r.ok]
    out = {"runs": len(runs), "ok": len(ok),
           "pause_us": summary([r.pause_us for r in ok]),
           "gap_us": summary([r.gap_us for r in ok]),
           "gap_thread_us": summary([r.extra.get("gap_thread_us") for r in ok])}
    out["ours_pause_ratio"] = ratio(ours["pause_us"], out["pause_us"])
    out["ours_gap_ratio"] = ratio(ours["gap_us"], out["gap_us"])
    out["ours_gap_thread_ratio"] = ratio(ours["gap_thread_us"], out["gap_thread_us"])
    return out


def _peer_stall(cfg: Config, peer, n: int, ours: dict, failures: list) -> dict:
    """A fresh target per run: a peer's patch cannot be undone."""
    runs = []
    for _ in range(cfg.reps):
        with Target(cfg.built.target, "stall", n, cfg.work, PEER_TARGET_LIFE) as t:
            try:
                r = measured(t, lambda: peer.apply(t.pid, cfg.built.peer_lib))
            except TargetDied as e:  # the peer killed the target: a result, not a crash
                failures.append(f"{peer.name}: {e}")
                runs.append(OpResult(peer.name, "apply", False, 0.0, error=f"target died: {e}"))
                continue
            if r.ok and t.alive() and t.variant() != 3:
                r.ok, r.error = False, "reported success, but compute() still answers the old way"
            if note := _fail_note(r, t):
                failures.append(f"{peer.name}: {note}")
                r.ok = False
            runs.append(r)
    ok = [r for r in runs if r.ok]
    out = {"runs": len(runs), "ok": len(ok),
           "gap_us": summary([r.gap_us for r in ok]),
           "gap_main_us": summary([r.extra.get("gap_main_us") for r in ok]),
           "gap_thread_us": summary([r.extra.get("gap_thread_us") for r in ok]),
           "wall_s": summary([r.wall_s for r in ok])}
    out["gap_ratio_to_ours"] = ratio(out["gap_us"], ours["gap_us"])
    out["wall_ratio_to_ours"] = ratio(out["wall_s"], ours["wall_s"])
    return out


def _fmt(s: dict | None, unit: str = "") -> str:
    if not s:
        return "n/a"
    f = (lambda v: f"{v:.3g}") if unit == "s" else (lambda v: f"{v:.0f}")
    return f"median {f(s['median'])} max {f(s['max'])}"


# -- cache -----------------------------------------------------------------------------

def cache(cfg: Config) -> dict:
    """End-to-end `hotpatch apply` wall time (N=8) by cache state.

    empty: KSPLICE_PY_CACHE is a fresh empty directory: the first use on a
           machine (builds the native helper, parses symbols of every object)
    cold:  fresh directory holding only the built native helper: the symbol
           cache is cold (a new build of the target or its libraries)
    warm:  the same directory again: everything cached
    """
    warm = cfg.ours.cache
    native = warm / "native"
    out: dict = {"n": 8}
    runs = {"empty": 1 if cfg.quick else 3, "cold": cfg.reps, "warm": cfg.reps}
    with Target(cfg.built.target, "stall", 8, cfg.work, STALL_TARGET_LIFE) as t:
        for state, reps in runs.items():
            results = []
            for _ in range(reps):
                with tempfile.TemporaryDirectory(dir=cfg.work, prefix=f"cache-{state}-") as d:
                    cdir = Path(d)
                    if state == "cold" and native.exists():
                        shutil.copytree(native, cdir / "native")
                    if state == "warm":
                        cdir = warm
                    r = measured(t, lambda: cfg.ours.apply(t.pid, cfg.built.patch, cache=cdir))
                    results.append(r)
                    if r.ok:
                        cfg.ours.revert(t.pid, cache=cdir)
            ok = [r for r in results if r.ok]
            out[state] = {"runs": len(results), "ok": len(ok),
                          "wall_s": summary([r.wall_s for r in ok]),
                          "pause_us": summary([r.pause_us for r in ok]),
                          "gap_us": summary([r.gap_us for r in ok]),
                          "errors": [r.error for r in results if not r.ok]}
            log(f"cache {state}: wall {_fmt(out[state]['wall_s'], 's')} s")
        out["breakdown"] = _breakdown(cfg, t)
    return out


def _breakdown(cfg: Config, t: Target) -> dict:
    """Where a warm `hotpatch apply` spends its time: the same interpreter
    doing nothing (start-up + exit), then bench/phases.py running the CLI's
    apply with the library's phases timed (medians over the runs)."""
    python = Path(cfg.ours.hotpatch).read_text().splitlines()[0].removeprefix("#!").strip()
    starts, runs = [], []
    for _ in range(cfg.reps):
        cp, wall, _ = _run_cmd([python, "-c", "pass"])
        starts.append(wall)
        cp, wall, err = _run_cmd([python, str(Path(__file__).parent / "phases.py"), str(t.pid),
                                  str(cfg.built.patch)], env=cfg.ours._env(None))
        if cp is None or cp.returncode != 0:
            continue
        data = json.loads(cp.stderr.strip().splitlines()[-1])
        data["wall_s"] = wall
        runs.append(data)
        cfg.ours.revert(t.pid)
    if not runs:
        return {}
    med = statistics.median
    phases = {k: med(r["phases_s"].get(k, 0.0) for r in runs) for k in runs[0]["phases_s"]}
    out = {"runs": len(runs), "wall_s": med(r["wall_s"] for r in runs),
           "interpreter_s": med(starts),
           "imports_s": med(r["imports_s"] for r in runs), "phases_s": phases}
    log(f"breakdown: wall {out['wall_s']:.3f} s = interpreter {out['interpreter_s']:.3f} + imports "
        f"{out['imports_s']:.3f} + " + " + ".join(f"{k} {v:.3f}" for k, v in phases.items()))
    return out


# -- cutover size -------------------------------------------------------------------------

def cutover(cfg: Config) -> list[dict]:
    rows = []
    with Target(cfg.built.many, "many", 8, cfg.work, STALL_TARGET_LIFE) as t:
        for k in MANY_KS:
            patch = cfg.built.many_patches[k]
            applies, reverts, failures = [], [], []
            for _ in range(cfg.reps):
                a = measured(t, lambda: cfg.ours.apply(t.pid, patch, timeout=20))
                if a.ok and a.extra.get("functions") != k:
                    a.ok, a.error = False, f"switched {a.extra.get('functions')} functions, not {k}"
                applies.append(a)
                rv = measured(t, lambda: cfg.ours.revert(t.pid, timeout=20)) if a.ok else None
                if rv is not None:
                    reverts.append(rv)
                for r in (a, rv):
                    if r is not None and (note := _fail_note(r, t)):
                        failures.append(f"{r.op}: {note}")
                if not t.alive():
                    break
            if t.get("errors"):
                failures.append(f"{t.get('errors')} calls returned a wrong value")
            ok_a, ok_r = [r for r in applies if r.ok], [r for r in reverts if r.ok]
            row = {"functions": k, "runs": len(applies), "ok": len(ok_a),
                   "pause_us": summary([r.pause_us for r in ok_a]),
                   "gap_us": summary([r.gap_us for r in ok_a]),
                   "wall_s": summary([r.wall_s for r in ok_a]),
                   "attempts": summary([r.attempts for r in ok_a]),
                   "revert_pause_us": summary([r.pause_us for r in ok_r]),
                   "failures": sorted(set(failures))}
            log(f"cutover k={k}: pause {_fmt(row['pause_us'])} µs, gap {_fmt(row['gap_us'])} µs")
            rows.append(row)
            if not t.alive():
                break
    return rows


# -- steady state ------------------------------------------------------------------------------

def steady(cfg: Config) -> list[dict]:
    """Cost of a patched call: in the target, one thread alternates chunks of
    calls to compute() and to compute_ref() (its untouched twin) and
    publishes the best chunk's calls/s of each per 100 ms window.  We compare
    W windows before the patch with W windows after it: plainly (calls/s
    after / before) and paired (compute/compute_ref after / before), which
    cancels a shared machine's drift."""
    ops: list[tuple[str, Callable[[Target], OpResult] | None]] = [
        ("none (control)", None),
        (cfg.ours.name, lambda t: cfg.ours.apply(t.pid, cfg.built.patch)),
    ]
    ops += [(p.name, lambda t, p=p: p.apply(t.pid, cfg.built.peer_lib)) for p in cfg.peers]
    rows = []
    for name, op in ops:
        rows.append(_steady_one(cfg, name, op))
        log(f"steady {name}: paired after/before = {rows[-1].get('paired_ratio')}, "
            f"plain = {rows[-1].get('ratio')}")
    return rows


def _windows(t: Target, skip: int, count: int) -> list[tuple[int, int]]:
    first = t.get("windows") + skip
    t._wait(lambda: t.get("windows") >= first + count, 10 + count * 0.5, "rate windows", 0.01)
    return [t.rate(i) for i in range(first, first + count)]


def _steady_one(cfg: Config, name: str, op) -> dict:
    w = cfg.rate_windows
    with Target(cfg.built.target, "rate", 1, cfg.work, PEER_TARGET_LIFE) as t:
        before = _windows(t, 1, w)
        r = op(t) if op else None
        after = _windows(t, 1, w) if t.alive() else []  # skips the window the op ran in
        med = statistics.median
        row = {"tool": name, "windows": w, "window_ms": t.get("window_ns") / 1e6,
               "before_calls_per_s": med(c for c, _ in before),
               "before_ref_calls_per_s": med(x for _, x in before),
               "after_calls_per_s": med(c for c, _ in after) if after else None,
               "after_ref_calls_per_s": med(x for _, x in after) if after else None,
               "variant_after": t.get("variant"), "ratio": None, "paired_ratio": None}
        if after:
            row["ratio"] = row["after_calls_per_s"] / row["before_calls_per_s"]
            row["paired_ratio"] = (med(c / x for c, x in after) / med(c / x for c, x in before))
        if r is not None and not (r.ok and row["variant_after"] == 3):
            row["error"] = r.error or "compute() not replaced"
            row["ratio"] = row["paired_ratio"] = None
        return row


# -- survival ------------------------------------------------------------------------------------

OUTCOMES = ("ok", "died", "hung", "wrong_results", "not_patched", "tool_failed")


def _judge(t: Target, r: OpResult, expect: int) -> tuple[str, str | None]:
    time.sleep(0.05)
    if not t.alive():
        return "died", t.death()
    if t.get("errors"):
        return "wrong_results", f"{t.get('errors')} wrong results"
    if not t.progressing(0.3):
        time.sleep(0.2)  # a process being killed by a signal is not hung
        if not t.alive():
            return "died", t.death()
        return "hung", "a worker stopped making progress"
    if not r.ok:
        return "tool_failed", f"exit {r.rc}: {r.error}"
    if t.variant() != expect:
        return "not_patched", f"compute() answers {t.get('variant')}, want {expect}"
    return "ok", None


# Loop work of the 64 workers between two calls (see bench_target.c): with
# 100, typically 0-2 of them are caught inside compute() at any moment.
SURVIVAL_SPIN = 100


def survival(cfg: Config) -> list[dict]:
    """A fresh target per run; one apply each (ours with --timeout 10)."""
    rows = [_survival_tool(cfg, cfg.ours.name, cfg.survival_ours,
                           lambda cfg, t: _judge(t, cfg.ours.apply(t.pid, cfg.built.patch), 3))]
    for p in cfg.peers:
        rows.append(_survival_tool(cfg, p.name, cfg.survival_peers,
                                   lambda cfg, t, p=p: _judge(t, p.apply(t.pid, cfg.built.peer_lib), 3)))
    return rows


def _survival_tool(cfg: Config, name: str, runs: int, cycle) -> dict:
    counts = dict.fromkeys(OUTCOMES, 0)
    notes: list[str] = []
    t0 = time.monotonic()
    for _ in range(runs):
        try:
            with Target(cfg.built.target, "tight", 64, cfg.work, PEER_TARGET_LIFE,
                        spin=SURVIVAL_SPIN) as t:
                outcome, note = cycle(cfg, t)
        except Exception as e:  # the harness itself failed: count it, say it
            outcome, note = "tool_failed", f"{type(e).__name__}: {e}"
        counts[outcome] += 1
        if note:
            notes.append(note[:200])
    row = {"tool": name, "workers": 64, "spin": SURVIVAL_SPIN, "runs": runs, **counts,
           "seconds": round(time.monotonic() - t0, 1),
           "notes": sorted(set(notes))[:10]}
    log(f"survival {name}: {runs} runs, died {counts['died']}, hung {counts['hung']}, "
        f"wrong {counts['wrong_results']}, tool failed {counts['tool_failed']}")
    return row


# -- hot functions -------------------------------------------------------------------------------
def hot(cfg: Config) -> list[dict]:
    """benchmarks/hot.py's workload, with the peers found for the other suites."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import hot as hot_bench  # benchmarks/hot.py
    work = Path(tempfile.mkdtemp(prefix="ksplice-hot-", dir=cfg.work))
    try:
        return hot_bench.run_all(cfg.ours.hotpatch, cfg.peers, work, 3 if cfg.quick else 10,
                                 [4, 64, 256], ["lib", "exe"], 2.0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
