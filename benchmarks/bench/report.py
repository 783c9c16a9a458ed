"""results.json -> results.md (tables) and stall.png (the stall against N)."""
from __future__ import annotations

import json
from pathlib import Path


def _m(s: dict | None, scale: float = 1.0, fmt: str = "{:.0f}") -> str:
    """'median / max' of a summary, or n/a."""
    if not s:
        return "n/a"
    return f"{fmt.format(s['median'] * scale)} / {fmt.format(s['max'] * scale)}"


def _med(s: dict | None, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    return fmt.format(s["median"] * scale) if s else "n/a"


def _x(v: float | None) -> str:
    return f"{v:.3g}×" if v is not None else "n/a"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def markdown(res: dict) -> str:
    meta = res["meta"]
    peers = [p for p in ("gdb", "frida") if p not in meta["skipped_peers"]]
    L = [f"# ksplice_py benchmarks{' (--quick)' if meta['quick'] else ''}", "",
         f"`{meta['command']}` — {meta['date']}, {meta['machine']}, "
         f"{meta['reps']} runs per point, {meta['duration_s']:.0f} s in all. Load average "
         f"{meta.get('loadavg_start', '?')} at start, {meta.get('loadavg_end', '?')} at end "
         "(2 cores: anything above ~2 is other work sharing the machine, which shows in the "
         "idle column and in every wall time). ksplice_py's bytecode: "
         f"{meta.get('bytecode', '?')}.", "",
         f"Tools: ksplice_py {meta['versions'].get('ksplice_py')}, "
         + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if k != "ksplice_py") + ".", ""]
    for name, why in meta["skipped_peers"].items():
        L += [f"**{name} was not measured: {why}**", ""]

    L += ["## Stall while patching (N workers calling `compute`)", "",
          "*pause*: the tool's own `pause_us` (all threads stopped). *stall*: the longest gap "
          "two heartbeats inside the target saw over the whole operation (a thread of its own "
          "and the main thread, the one a tool attaching to the pid hijacks; SCHED_FIFO, sleep "
          "loops of 20 and 50 µs). *idle*: the same over an idle window as long as our apply: the noise floor of "
          "this machine. Cells are median / max over the runs, in µs; ×ours compares medians "
          "of the stall. Peers get a fresh target per run (their patch cannot be undone).", ""]
    head = ["N", "ours pause", "ours stall", "idle", "revert pause", "revert stall"]
    for p in peers:
        head += [f"{p} stall", f"{p} ×ours"]
    rows = []
    for r in res["stall"]:
        o = r["ours"]
        row = [str(r["n"]), _m(o["pause_us"]), _m(o["gap_us"]), _m(r["baseline_gap_us"]),
               _m(o["revert_pause_us"]), _m(o["revert_gap_us"])]
        for p in peers:
            pr = r.get(p)
            row += [_m(pr["gap_us"]), _x(pr["gap_ratio_to_ours"])] if pr else ["-", "-"]
        rows.append(row)
    L += _table(head, rows)

    L += ["## Against the physical floor", "",
          "*floor*: `benchmarks/floor/floor.c` on the same target in the same run: seize every "
          "thread, interrupt them, wait for each stop, write one word through /proc/PID/mem, "
          "release them (the least any ptrace tool can do). ×floor divides medians: our pause "
          "by the floor's, our stall by the floor's stall. *no-hijack stall*: the heartbeat "
          "thread alone, which no tool borrows (ours, gdb and frida borrow the main thread). "
          "Goal: ≤1.5× the floor at every N.", ""]
    head = ["N", "floor pause", "ours pause", "×floor", "floor stall", "ours stall", "×floor",
            "floor no-hijack", "ours no-hijack", "×floor"]
    for p in peers:
        head += [f"{p} no-hijack"]
    rows = []
    for r in res["stall"]:
        f, o = r.get("floor") or {}, r["ours"]
        row = [str(r["n"]), _m(f.get("pause_us")), _m(o["pause_us"]), _x(f.get("ours_pause_ratio")),
               _m(f.get("gap_us")), _m(o["gap_us"]), _x(f.get("ours_gap_ratio")),
               _m(f.get("gap_thread_us")), _m(o["gap_thread_us"]), _x(f.get("ours_gap_thread_ratio"))]
        for p in peers:
            pr = r.get(p)
            row += [_m(pr["gap_thread_us"]) if pr else "-"]
        rows.append(row)
    L += _table(head, rows)

    L += ["## End-to-end wall time of one apply (s, median / max)", "",
          "Each tool runs as a fresh process, timed from start to exit (ours with a warm cache).", ""]
    head = ["N", "ours", "ours runs ok"]
    for p in peers:
        head += [p, f"{p} ×ours", f"{p} runs ok"]
    rows = []
    for r in res["stall"]:
        o = r["ours"]
        row = [str(r["n"]), _m(o["wall_s"], fmt="{:.2f}"), f"{o['ok']}/{o['runs']}"]
        for p in peers:
            pr = r.get(p)
            row += ([_m(pr["wall_s"], fmt="{:.2f}"), _x(pr["wall_ratio_to_ours"]), f"{pr['ok']}/{pr['runs']}"]
                    if pr else ["-", "-", "-"])
        rows.append(row)
    L += _table(head, rows)
    fails = [f"N={r['n']}: {f}" for r in res["stall"] for f in r.get("failures", [])]
    if fails:
        L += ["Failures: " + "; ".join(sorted(set(fails))[:12]), ""]

    c = res["cache"]
    L += ["## `hotpatch apply` by cache state (N=8)", "",
          "*empty*: KSPLICE_PY_CACHE is a fresh empty directory (first use: builds the native "
          "helper, reads every object's symbols). *cold*: fresh directory with only the native "
          "helper (cold symbol cache). *warm*: everything cached.", ""]
    L += _table(["cache", "wall s (median / max)", "pause µs (median / max)", "runs ok"],
                [[k, _m(c[k]["wall_s"], fmt="{:.2f}"), _m(c[k]["pause_us"]), f"{c[k]['ok']}/{c[k]['runs']}"]
                 for k in ("empty", "cold", "warm") if k in c])

    b = c.get("breakdown") or {}
    if b:
        L += ["### Where a warm apply's time goes (s, medians)", "",
              "`bench/phases.py` runs the CLI's apply in a fresh interpreter with the library's "
              "phases timed exclusively; *interpreter* is the same Python running `pass`.", ""]
        rows = [["interpreter start + exit", f"{b['interpreter_s']:.3f}"],
                ["imports (ksplice_py.cli and everything it pulls in)", f"{b['imports_s']:.3f}"]]
        rows += [[k, f"{v:.3f}"] for k, v in b["phases_s"].items()]
        rows += [["wall time of the whole process", f"{b['wall_s']:.3f}"]]
        L += _table(["part", "s"], rows)

    L += ["## One cutover switching k functions (8 workers calling f0..f999)", ""]
    L += _table(["k", "pause µs", "stall µs", "revert pause µs", "attempts", "wall s", "runs ok"],
                [[str(r["functions"]), _m(r["pause_us"]), _m(r["gap_us"]), _m(r["revert_pause_us"]),
                  _m(r["attempts"]), _m(r["wall_s"], fmt="{:.2f}"), f"{r['ok']}/{r['runs']}"]
                 for r in res["cutover"]])
    fails = [f"k={r['functions']}: {f}" for r in res["cutover"] for f in r["failures"]]
    if fails:
        L += ["Failures: " + "; ".join(fails[:12]), ""]

    L += ["## Steady state: a patched call vs an unpatched one", "",
          "In the target, one thread alternates chunks of 2048 calls to `compute` and to "
          "`compute_ref` (an identical function nothing patches) and publishes the fastest "
          "chunk's calls/s of each per ~100 ms window. Medians over the windows before and "
          "after the patch (the window the patch lands in is skipped). *paired* divides by "
          "`compute_ref` in the same window, cancelling the drift of a shared machine; "
          "*control* applies nothing. The replacement does the same work as the original.", ""]
    L += _table(["patched by", "calls/s before", "calls/s after", "after / before", "paired after / before"],
                [[r["tool"], f"{r['before_calls_per_s'] / 1e6:.0f} M",
                  f"{r['after_calls_per_s'] / 1e6:.0f} M" if r["after_calls_per_s"] else "n/a",
                  f"{r['ratio']:.3f}" if r["ratio"] else f"n/a ({r.get('error', '')})",
                  f"{r['paired_ratio']:.3f}" if r["paired_ratio"] else "n/a"]
                 for r in res["steady"]])

    L += ["## Survival: 64 busy workers", "",
          "Fresh target per run, one apply each (ours with `--timeout 10`); 64 threads (nice 10) "
          "call `compute` back to back with a short loop of their own between calls, so a few of "
          "them are caught inside `compute` at any moment (most at compute+12, right after a "
          "load). After the operation: is the process alive, does every worker still progress, "
          "are all results right, does `compute` answer the new way. gdb writes the 14-byte "
          "`jmp *0(%rip)` (its library is out of rel32 reach), which covers compute+12; frida "
          "writes a 5-byte jump inside compute's first (8-byte) instruction, so only a thread "
          "caught mid-write can trip on it.", ""]
    L += _table(["tool", "runs", "ok", "died", "hung", "wrong results", "not patched", "tool failed", "notes"],
                [[r["tool"], str(r["runs"]), str(r["ok"]), str(r["died"]), str(r["hung"]),
                  str(r["wrong_results"]), str(r["not_patched"]), str(r["tool_failed"]),
                  "; ".join(n[:120] for n in r["notes"][:3]).replace("|", "/") or "-"]
                 for r in res["survival"]])
    if res.get("hot"):
        import hot as hot_bench  # benchmarks/hot.py, on sys.path beside run.py
        L += ["## Hot functions: N workers calling a short leaf back to back", "",
              "`benchmarks/hot.py`: a fresh target per run, N workers calling a 37-byte leaf "
              "(`lib`: in a shared library through the PLT; `exe`: in the executable) with no "
              "other work between calls; ours with `--timeout 2`, apply then revert; *floor*: "
              "one stop + release of the same target; *harmed*: died, a wrong result, or a "
              "worker no longer progressing afterwards.", ""]
        L += hot_bench.table(res["hot"]).splitlines() + [""]
    return "\n".join(L)


def plot(res: dict, path: Path) -> str | None:
    """stall.png; returns why not when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib unavailable ({e}); pip install matplotlib"
    rows = res["stall"]
    fig, ax = plt.subplots(figsize=(10.5, 5), dpi=110)

    def series(get, label, style, color):
        pts = [(r["n"], get(r)) for r in rows if get(r)]
        if not pts:
            return
        xs = [p[0] for p in pts]
        ax.plot(xs, [p[1]["median"] for p in pts], style, color=color, label=f"{label} (median)")
        ax.plot(xs, [p[1]["max"] for p in pts], style.replace("-", ":"), color=color, alpha=0.5,
                label=f"{label} (max)")

    series(lambda r: r["ours"]["gap_us"], "ksplice_py stall (heartbeat)", "o-", "tab:blue")
    series(lambda r: r["ours"]["pause_us"], "ksplice_py pause_us (own report)", "s-", "tab:cyan")
    series(lambda r: (r.get("gdb") or {}).get("gap_us"), "gdb stall", "^-", "tab:red")
    series(lambda r: (r.get("frida") or {}).get("gap_us"), "frida stall", "v-", "tab:orange")
    series(lambda r: (r.get("floor") or {}).get("gap_us"), "floor stall (floor.c)", "d-", "tab:green")
    series(lambda r: r["baseline_gap_us"], "idle heartbeat gap", "x-", "tab:gray")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("worker threads N")
    ax.set_ylabel("µs")
    ax.set_xticks([r["n"] for r in rows], [str(r["n"]) for r in rows])
    ax.set_title("Longest time a target thread could not run, per patch")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def write(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    why = plot(res, out / "stall.png")
    if why:
        res["meta"]["plot"] = why
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "results.md").write_text(markdown(res) + "\n")
