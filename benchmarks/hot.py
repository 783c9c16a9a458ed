#!/usr/bin/env python3
"""The hot-function workload (issue #16), ours against gdb and frida.

    python benchmarks/hot.py [--runs 10] [--ns 4,64,256] [--timeout 2] [--out DIR]

A tight-loop target (benchmarks/targets/hot_target.c: N workers calling a
short leaf function back to back) in two forms: `lib` (the function in a
shared library, called through the PLT) and `exe` (in the executable). Per
form, N and tool, RUNS fresh targets: success rate (ours with --timeout),
end-to-end wall time, the tool's pause (ours), the stall (longest gap of a
heartbeat thread in the target), and targets harmed (dead, wrong results,
or a worker no longer making progress). Ours also reverts. The stop/release
floor is one stop-the-world + release of the same target, without any check
or write. Writes DIR/hot.json and DIR/hot.md (DIR: benchmarks/results).
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench.tools import Frida, Gdb, Ours, compile_bytecode  # noqa: E402

STATUS_SIZE = 64 + 8 * 1024  # struct status in hot_target.c
FIELDS = {n: 8 * i for i, n in enumerate(["magic", "ready", "errors", "max_gap_ns", "reset_req",
                                          "reset_ack", "beats", "pad"])}
CALLS = 64


def log(msg: str) -> None:
    print(f"[hot {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cc(*args: str) -> None:
    subprocess.run(["cc", *args], check=True, capture_output=True, text=True, timeout=300)


def build(work: Path, hotpatch: str) -> dict:
    t, p = HERE / "targets", HERE / "patches"
    cflags = subprocess.run([hotpatch, "cflags"], capture_output=True, text=True, check=True).stdout.split()
    cc("-O2", "-shared", "-fPIC", f"-I{t}", "-o", str(work / "libhot.so"), str(t / "hot_lib.c"))
    cc("-O2", "-pthread", f"-I{t}", "-o", str(work / "hot_exe"), str(t / "hot_target.c"))
    cc("-O2", "-pthread", f"-I{t}", "-DUSE_LIB", "-o", str(work / "hot_lib"), str(t / "hot_target.c"),
       f"-L{work}", "-lhot", f"-Wl,-rpath,{work}")
    cc("-shared", "-fPIC", "-O2", *cflags, "-o", str(work / "hot_fix.so"), str(p / "hot_fix.c"))
    cc("-shared", "-fPIC", "-O2", "-o", str(work / "peer_hot.so"), str(p / "peer_hot.c"))
    return {"exe": work / "hot_exe", "lib": work / "hot_lib", "patch": work / "hot_fix.so",
            "peer": work / "peer_hot.so"}


class HotTarget:
    def __init__(self, binary: Path, n: int, work: Path, life_s: float = 300) -> None:
        self.n = n
        self.path = work / f"status-{n}-{time.monotonic_ns()}.bin"
        self.path.write_bytes(b"\0" * STATUS_SIZE)
        with open(self.path, "r+b") as f:
            self.mem = mmap.mmap(f.fileno(), STATUS_SIZE)
        self.proc = subprocess.Popen([str(binary), str(self.path), str(n), str(int(life_s * 1000))],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 120
        while self.get("ready") != 1:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"hot target N={n} did not start")
            time.sleep(0.01)

    def get(self, name: str) -> int:
        return struct.unpack_from("<q", self.mem, FIELDS[name])[0]

    def calls(self) -> list[int]:
        return list(struct.unpack_from(f"<{self.n}q", self.mem, CALLS))

    def reset_gap(self) -> None:
        req = self.get("reset_req") + 1
        struct.pack_into("<q", self.mem, FIELDS["reset_req"], req)
        deadline = time.monotonic() + 5
        while self.get("reset_ack") != req and time.monotonic() < deadline:
            time.sleep(0.001)

    def harm(self) -> str | None:
        """None if alive, correct and every worker still progressing."""
        if self.proc.poll() is not None:
            return f"died ({self.proc.returncode})"
        if self.get("errors"):
            return f"{self.get('errors')} wrong results"
        before, deadline = self.calls(), time.monotonic() + 10
        while time.monotonic() < deadline:
            if all(a > b for a, b in zip(self.calls(), before)):
                return None
            time.sleep(0.05)
        return "a worker stopped making progress"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def floor_us(pid: int, reps: int = 5) -> float | None:
    """Stop every thread and release them, nothing else: the pause floor."""
    from ksplice_py.tracer import World
    vals = []
    for _ in range(reps):
        w = World(pid).seize()
        t0 = w.lib.kp_now_us()
        try:
            late = w.stop(0.2, realtime=True)  # as the stopped window does
        finally:
            w.release()
        if not late:
            vals.append(w.lib.kp_now_us() - t0)
        time.sleep(0.02)
    return statistics.median(vals) if vals else None


def med(vals: list) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def one_run(tool: str, ops, built: dict, form: str, n: int, work: Path, timeout: float) -> dict:
    t = HotTarget(built[form], n, work)
    out: dict = {}
    try:
        if tool == "ksplice_py":
            out["floor_us"] = floor_us(t.pid)
        for op in (["apply", "revert"] if tool == "ksplice_py" else ["apply"]):
            t.reset_gap()
            if tool == "ksplice_py":
                r = ops.apply(t.pid, built["patch"], timeout=timeout) if op == "apply" \
                    else ops.revert(t.pid, timeout=timeout)
            else:
                r = ops.apply(t.pid, built["peer"], func="hot_leaf", new="hot_leaf_v2")
            gap = t.get("max_gap_ns") / 1e3 if t.proc.poll() is None else None
            out[op] = {"ok": r.ok, "wall_s": r.wall_s, "pause_us": r.pause_us, "stall_us": gap,
                       "attempts": r.attempts, "error": r.error, "harm": t.harm()}
            if not r.ok:
                break
    finally:
        t.kill()
    return out


def summarize(runs: list[dict], op: str) -> dict:
    done = [r[op] for r in runs if op in r]
    return {"ok": sum(1 for d in done if d["ok"]), "runs": len(runs),
            "wall_s": med([d["wall_s"] for d in done if d["ok"]]),
            "pause_us": med([d["pause_us"] for d in done if d["ok"]]),
            "stall_us": med([d["stall_us"] for d in done]),
            "harmed": sum(1 for d in done if d["harm"]),
            "errors": sorted({(d["error"] or "")[:120] for d in done if not d["ok"]})}


def run_all(hotpatch: str, peers: list, work: Path, runs: int, ns: list[int], forms: list[str],
            timeout: float, out: Path | None = None, skipped: dict | None = None, bytecode: str = "?") -> list[dict]:
    """Every form x N x tool, RUNS fresh targets each; rows as in hot.json.
    ``peers``: gdb/frida tool objects (bench.tools) found available."""
    built = build(work, hotpatch)
    ours = Ours(hotpatch, work / "cache")
    tools = {"ksplice_py": ours, **{p.name: p for p in peers}}
    # warm the cache (native helper, symbols) outside the measurement
    t = HotTarget(built["exe"], 1, work)
    ours.apply(t.pid, built["patch"], timeout=30)
    t.kill()
    results = []
    for form in forms:
        for n in ns:
            for name, ops in tools.items():
                detail = []
                for i in range(runs):
                    detail.append(one_run(name, ops, built, form, n, work, timeout))
                    log(f"{form} N={n} {name} run {i + 1}: {json.dumps(detail[-1])[:300]}")
                row = {"form": form, "n": n, "tool": name, "apply": summarize(detail, "apply"),
                       "runs_detail": detail}
                if name == "ksplice_py":
                    row["revert"] = summarize(detail, "revert")
                    row["floor_us"] = med([r.get("floor_us") for r in detail])
                results.append(row)
                if out is not None:  # after each row: a long run may be cut short
                    write(out, meta(skipped or {}, bytecode), results)
    return results


def available_peers() -> tuple[list, dict]:
    peers, skipped = [], {}
    for peer in (Gdb(), Frida()):
        why = peer.available()
        if why:
            skipped[peer.name] = why
        else:
            peers.append(peer)
    return peers, skipped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--ns", default="4,64,256")
    ap.add_argument("--forms", default="lib,exe")
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    hotpatch = str(Path(sys.executable).parent / "hotpatch") if (Path(sys.executable).parent / "hotpatch").exists() \
        else shutil.which("hotpatch")
    work = Path(tempfile.mkdtemp(prefix="ksplice-hot-"))
    bytecode = compile_bytecode(hotpatch)
    peers, skipped = available_peers()
    try:
        results = run_all(hotpatch, peers, work, args.runs, [int(x) for x in args.ns.split(",")],
                          args.forms.split(","), args.timeout, args.out, skipped, bytecode)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(meta(skipped, bytecode), results))
    return 0


def meta(skipped: dict, bytecode: str) -> dict:
    return {"command": " ".join(["python", "benchmarks/hot.py", *sys.argv[1:]]),
            "loadavg_end": os.getloadavg(), "cpus": os.cpu_count(), "skipped_peers": skipped, "bytecode": bytecode,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write(out: Path, m: dict, results: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "hot.json").write_text(json.dumps({"meta": m, "results": results}, indent=1))
    (out / "hot.md").write_text(markdown(m, results))


def markdown(meta: dict, results: list[dict]) -> str:
    lines = [f"Hot-function workload — `{meta['command']}` ({meta['time']}, {meta['cpus']} CPUs, "
             f"load average at the end {' '.join(f'{x:.0f}' for x in meta['loadavg_end'])}; "
             f"ksplice_py bytecode: {meta.get('bytecode', '?')})", "", table(results)]
    if meta["skipped_peers"]:
        lines += ["", "Not measured: " + "; ".join(f"{k}: {v}" for k, v in meta["skipped_peers"].items())]
    return "\n".join(lines) + "\n"


def table(results: list[dict]) -> str:
    """One row per form, N, tool and operation; ours' pause also as a
    multiple of the floor, every wall time also against ours."""
    def f(v, unit="", scale=1.0, digits=0):
        return "-" if v is None else f"{v * scale:.{digits}f}{unit}"

    def x(a, b):
        return "-" if a is None or not b else f"{a / b:.2f}×"
    ours = {(r["form"], r["n"]): r for r in results if r["tool"] == "ksplice_py"}
    lines = ["| form | N | tool | op | applied | wall (median) | × ours | pause (median) | floor | "
             "pause ÷ floor | stall (median) | harmed |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        mine = ours.get((r["form"], r["n"]), {}).get("apply", {})
        for op in ("apply", "revert"):
            s = r.get(op)
            if not s:
                continue
            lines.append(f"| {r['form']} | {r['n']} | {r['tool']} | {op} | {s['ok']}/{s['runs']} | "
                         f"{f(s['wall_s'], ' s', 1, 2)} | {x(s['wall_s'], mine.get('wall_s'))} | "
                         f"{f(s['pause_us'], ' ms', 1e-3, 1)} | {f(r.get('floor_us'), ' ms', 1e-3, 1)} | "
                         f"{x(s['pause_us'], r.get('floor_us'))} | {f(s['stall_us'], ' ms', 1e-3, 1)} | "
                         f"{s['harmed']} |")
    return "\n".join(lines)

if __name__ == "__main__":
    sys.exit(main())
