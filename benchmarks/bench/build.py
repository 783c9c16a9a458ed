"""Compile the benchmark targets and patches into the work directory.

Rebuilt whenever a source, the patch header, the flags or this file changed
(a stamp holds their hash): the numbers must come from the sources in this
tree, never from a stale binary.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # benchmarks/
NFUNCS = 1000
MANY_KS = (1, 10, 100, 1000)


@dataclass
class Built:
    target: Path                 # bench_target: modes stall, tight, rate
    many: Path                   # bench_target -DMANY: mode many, f0..f999
    patch: Path                  # ours: compute -> compute_v3
    peer_lib: Path               # plain .so exporting compute_v3 (gdb, frida)
    many_patches: dict[int, Path] = field(default_factory=dict)  # k -> patch replacing f0..f(k-1)
    floor: Path | None = None    # floor/floor.c: the least a ptrace tool can do


def _cc(args: list[str], cwd: Path) -> None:
    cp = subprocess.run(["cc", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    if cp.returncode != 0:
        raise RuntimeError(f"cc {' '.join(args)} failed:\n{cp.stderr}")


def _hotpatch_cflags(hotpatch: str) -> list[str]:
    cp = subprocess.run([hotpatch, "cflags"], capture_output=True, text=True, timeout=60)
    if cp.returncode != 0:
        raise RuntimeError(f"`hotpatch cflags` failed: {cp.stderr.strip()}")
    return cp.stdout.split()


def _many_funcs_header() -> str:
    """f0..f999 shaped like compute() (f_i returns x * (2 + i % 7)) and a
    table the workers walk, so every function is really called."""
    lines = [f"#define NFUNCS {NFUNCS}"]
    for i in range(NFUNCS):
        lines.append(f"__attribute__((noinline, noipa)) int f{i}(int x) "
                     f"{{ volatile int k = {2 + i % 7}; return x * k; }}")
    lines.append("static int (*const fn_table[NFUNCS])(int) = {"
                 + ", ".join(f"f{i}" for i in range(NFUNCS)) + "};")
    return "\n".join(lines) + "\n"


def _many_patch(k: int) -> str:
    lines = ["#include <hotpatch.h>"]
    for i in range(k):
        lines.append(f"static int f{i}_v3(int x) {{ volatile int k = 3; return x * k; }}")
        lines.append(f'HOTPATCH_REPLACE("f{i}", f{i}_v3);')
    return "\n".join(lines) + "\n"


def _stamp(cflags: list[str]) -> str:
    h = hashlib.sha256(" ".join(cflags).encode())
    files = [Path(__file__), HERE / "targets" / "bench_target.c", HERE / "floor" / "floor.c",
             *sorted((HERE / "patches").glob("*.c"))]
    files += [Path(f[2:]) / "hotpatch.h" for f in cflags if f.startswith("-I")]
    for f in files:
        h.update(f.read_bytes() if f.exists() else b"-")
    return h.hexdigest()


def build(work: Path, hotpatch: str) -> Built:
    out = (work / "build").resolve()
    pflags = ["-shared", "-fPIC", "-O2", *_hotpatch_cflags(hotpatch)]
    built = Built(out / "bench_target", out / "bench_many", out / "compute_v3.so",
                  out / "peer_compute.so", {k: out / f"many_{k}.so" for k in MANY_KS}, out / "floor")
    stamp = _stamp(pflags)
    if (out / "stamp").exists() and (out / "stamp").read_text() == stamp:
        return built
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    src = HERE / "targets" / "bench_target.c"
    flags = ["-O2", "-g", "-Wall", "-Wextra", "-pthread"]
    (out / "many_funcs.h").write_text(_many_funcs_header())
    jobs = [
        [*flags, "-o", str(built.target), str(src)],
        [*flags, "-DMANY", f"-I{out}", "-o", str(built.many), str(src)],
        [*pflags, "-o", str(built.patch), str(HERE / "patches" / "compute_v3.c")],
        ["-shared", "-fPIC", "-O2", "-o", str(built.peer_lib), str(HERE / "patches" / "peer_compute.c")],
        ["-O2", "-Wall", "-o", str(built.floor), str(HERE / "floor" / "floor.c")],
    ]
    for k in MANY_KS:
        c = out / f"many_{k}.c"
        c.write_text(_many_patch(k))
        # -fno-ipa-icf: keep k distinct replacement functions, as in a real patch.
        jobs.append([*pflags, "-fno-ipa-icf", "-o", str(built.many_patches[k]), str(c)])
    with ThreadPoolExecutor(max_workers=2) as pool:
        for f in [pool.submit(_cc, j, out) for j in jobs]:
            f.result()
    (out / "stamp").write_text(stamp)
    return built
