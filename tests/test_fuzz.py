"""Fuzz: malformed patch files never produce a traceback, a hang or a harmed
target.

Valid patches (seeds, built here) are mutated where a parser can go wrong:
the ELF header, program and section header tables, the .hotpatch manifest
records, relocations, symbol tables, symbol-version records, the dynamic
section, string tables and notes; plus truncation, byte flips and copied
blocks. Each mutant goes through `hotpatch info`, `hotpatch check` against a
live target and, for a bounded sample, `hotpatch apply`. Every input must end
with a documented exit code and, when it fails, exactly one line on stderr,
within its time limit, and leave the target as it was (code, mappings, no
tracer, no stopped thread, still computing the same results).

Runs in-process (``ksplice_py.cli.main``: ~10 ms an input) plus a few real
subprocesses and a short coverage-guided atheris run on the parser.

Budget: the default example counts keep this file well under 3 minutes.
``KSPLICE_PY_FUZZ_LONG=1`` runs 25x more inputs with random seeds;
``KSPLICE_PY_FUZZ_ARTIFACTS=DIR`` keeps every failing input there.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import (HOTPATCH, STATUS_SIZE, Status, get_cflags, maps_lines, read_mem,  # noqa: E402
                      thread_states, tracer_pid, wait_until)
from elftools.elf.elffile import ELFFile  # noqa: E402

from ksplice_py import cli  # noqa: E402

LONG = os.environ.get("KSPLICE_PY_FUZZ_LONG") == "1"
SCALE = 25 if LONG else 1
N_INFO = 1200 * SCALE
N_CHECK = 400 * SCALE
N_APPLY = 24 * SCALE
N_SUBPROCESS = 6
ATHERIS_SECONDS = 300 if LONG else 15
INFO_LIMIT_S, CHECK_LIMIT_S, APPLY_LIMIT_S = 10.0, 20.0, 30.0
ARTIFACTS = os.environ.get("KSPLICE_PY_FUZZ_ARTIFACTS")

FUZZ_SETTINGS = dict(
    deadline=None,  # we enforce our own per-input limit (and a hard watchdog)
    database=None,  # nothing written into the source tree
    derandomize=not LONG,  # CI: the same inputs every run; long runs explore
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
    print_blob=True,
)

RICH = r"""
/* Seed patch using every manifest record kind, versioned imports (getpid),
 * an IFUNC import (strlen), GOT and RELATIVE relocations. For `workers`:
 * compute(7) = 14 -> 140. */
#include <hotpatch.h>
#include <string.h>
#include <unistd.h>
static int (*compute_orig)(int);
static int (*tiny_live)(void);
static const char *volatile s = "abc";
static int compute_wrap(int x)
{
    return compute_orig(x) * 10 + (int)strlen(s) - 3 + (getpid() > 0 ? 0 : 1) + tiny_live();
}
HOTPATCH_WRAP("compute", compute_wrap, compute_orig);
HOTPATCH_SYMBOL("main:tiny", tiny_live);
HOTPATCH_BUILD_ID("libc.so.6", LIBC_BUILD_ID);
"""


# --- seeds and where to mutate them ----------------------------------------------

@dataclass(frozen=True)
class Field:
    area: str
    name: str
    offset: int
    size: int


@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes
    fields: tuple[Field, ...]
    areas: tuple[str, ...]
    vaddrs: tuple[int, ...]  # section addresses: plausible values for pointers


# ELF64 record layouts (the ELF spec, gABI), used only to place mutations.
EHDR = [("e_ident.class", 4, 1), ("e_ident.data", 5, 1), ("e_ident.version", 6, 1),
        ("e_ident.osabi", 7, 1), ("e_type", 16, 2), ("e_machine", 18, 2), ("e_version", 20, 4),
        ("e_entry", 24, 8), ("e_phoff", 32, 8), ("e_shoff", 40, 8), ("e_flags", 48, 4),
        ("e_ehsize", 52, 2), ("e_phentsize", 54, 2), ("e_phnum", 56, 2),
        ("e_shentsize", 58, 2), ("e_shnum", 60, 2), ("e_shstrndx", 62, 2)]
PHDR = [("p_type", 0, 4), ("p_flags", 4, 4), ("p_offset", 8, 8), ("p_vaddr", 16, 8),
        ("p_paddr", 24, 8), ("p_filesz", 32, 8), ("p_memsz", 40, 8), ("p_align", 48, 8)]
SHDR = [("sh_name", 0, 4), ("sh_type", 4, 4), ("sh_flags", 8, 8), ("sh_addr", 16, 8),
        ("sh_offset", 24, 8), ("sh_size", 32, 8), ("sh_link", 40, 4), ("sh_info", 44, 4),
        ("sh_addralign", 48, 8), ("sh_entsize", 56, 8)]
RECORD = [("magic", 0, 4), ("version", 4, 2), ("kind", 6, 2), ("target", 8, 8), ("a", 16, 8),
          ("b", 24, 8)]
RELA = [("r_offset", 0, 8), ("r_type", 8, 4), ("r_sym", 12, 4), ("r_addend", 16, 8)]
SYM = [("st_name", 0, 4), ("st_info", 4, 1), ("st_other", 5, 1), ("st_shndx", 6, 2),
       ("st_value", 8, 8), ("st_size", 16, 8)]
DYN = [("d_tag", 0, 8), ("d_val", 8, 8)]
# DT_NEEDED, PLTRELSZ, STRTAB, SYMTAB, RELA, RELASZ, RELAENT, STRSZ, INIT, FINI,
# REL, PLTREL, JMPREL, INIT_ARRAY, FINI_ARRAY, INIT_ARRAYSZ, FINI_ARRAYSZ,
# PREINIT_ARRAY(SZ), RELRSZ, RELR, RELRENT, VERSYM, VERNEED, VERNEEDNUM, VERDEF
DYN_TAGS = [1, 2, 5, 6, 7, 8, 9, 10, 12, 13, 17, 20, 23, 25, 26, 27, 28, 32, 33, 35, 36, 37,
            0x6FFFFFF0, 0x6FFFFFFE, 0x6FFFFFFF, 0x6FFFFFFC]


def _table(area: str, label: str, base: int, count: int, stride: int, layout) -> list[Field]:
    return [Field(area, f"{label}[{i}].{name}", base + i * stride + off, size)
            for i in range(count) for name, off, size in layout]


def _words(area: str, label: str, base: int, size: int, width: int) -> list[Field]:
    return [Field(area, f"{label}+{i:#x}", base + i, width) for i in range(0, size - width + 1, width)]


def fields_of(data: bytes) -> list[Field]:
    """Every mutation point of a seed, located with pyelftools."""
    elf = ELFFile(io.BytesIO(data))
    h = elf.header
    out = [Field("elf-header", n, o, s) for n, o, s in EHDR]
    out += _table("program-header", "phdr", h["e_phoff"], h["e_phnum"], h["e_phentsize"], PHDR)
    out += _table("section-header", "shdr", h["e_shoff"], h["e_shnum"], h["e_shentsize"], SHDR)
    for sec in elf.iter_sections():
        off, size, typ, name = sec["sh_offset"], sec["sh_size"], sec["sh_type"], sec.name
        if typ == "SHT_NOBITS":
            continue
        if name == ".hotpatch":
            out += _table("manifest", "record", off, size // 32, 32, RECORD)
        elif typ == "SHT_RELA":
            out += _table("relocation", name, off, size // 24, 24, RELA)
        elif typ in ("SHT_DYNSYM", "SHT_SYMTAB"):
            out += _table("symbol", name, off, size // 24, 24, SYM)
        elif typ == "SHT_GNU_versym":
            out += _words("version", name, off, size, 2)
        elif typ in ("SHT_GNU_verneed", "SHT_GNU_verdef"):
            out += _words("version", name, off, size, 2) + _words("version", name, off, size, 4)
        elif typ == "SHT_DYNAMIC":
            out += _table("dynamic", "dyn", off, size // 16, 16, DYN)
        elif typ == "SHT_STRTAB":
            out += _words("strings", name, off, size, 1)
        elif typ == "SHT_NOTE":
            out += _words("note", name, off, size, 4)
        elif name == ".rodata":  # the manifest's target strings live here
            out += _words("manifest-strings", name, off, size, 1)
    return out


def build_seeds(outdir: Path) -> list[Seed]:
    cflags = get_cflags()
    libc = subprocess.run(["readelf", "-n", "/lib/x86_64-linux-gnu/libc.so.6"],
                          capture_output=True, text=True, check=True).stdout
    build_id = next(line.split()[-1] for line in libc.splitlines() if "Build ID" in line)
    (outdir / "rich.c").write_text(RICH)
    (outdir / "mul.c").write_text('#include <hotpatch.h>\nstatic int compute_new(int x) '
                                  '{ return x * 3; }\nHOTPATCH_REPLACE("compute", compute_new);\n')
    specs = [("rich", "rich.c", []), ("rich-relr", "rich.c", ["-Wl,-z,pack-relative-relocs"]),
             ("mul", "mul.c", [])]
    seeds = []
    for name, src, extra in specs:
        out = outdir / f"{name}.so"
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", *cflags, *extra,
                        f'-DLIBC_BUILD_ID="{build_id}"', "-o", str(out), str(outdir / src)],
                       check=True, capture_output=True)
        data = out.read_bytes()
        fields = fields_of(data)
        vaddrs = tuple(sorted({s["sh_addr"] for s in ELFFile(io.BytesIO(data)).iter_sections()
                               if s["sh_addr"]}))
        seeds.append(Seed(name, data, tuple(fields), tuple(sorted({f.area for f in fields})), vaddrs))
    return seeds


# --- mutations ----------------------------------------------------------------------

def _interesting(f: Field, original: int, file_size: int) -> list[int]:
    bits = 8 * f.size
    top = (1 << bits) - 1
    vals = [0, 1, 2, 7, 8, 0x10, 0x18, 0x20, 0x40, 0x7F, 0x80, 0xFF, 0x100, 0x1000,
            0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 40, top, top >> 1, (top >> 1) + 1,
            original + 1, original - 1, original + 8, original - 8, original * 2,
            original + 0x1000, file_size, file_size - 1, file_size + 1, file_size // 2]
    return sorted({v & top for v in vals})


@st.composite
def mutants(draw, seeds: list[Seed], areas: tuple[str, ...] | None = None,
            structural_only: bool = False):
    """(seed name, [what was changed], bytes)."""
    seed = draw(st.sampled_from(seeds))
    data = bytearray(seed.data)
    changes = []
    # area first, then a field in it: the few ELF-header fields are hit as
    # often as the many string-table bytes
    by_area: dict[str, list[Field]] = {}
    for f in seed.fields:
        if areas is None or f.area in areas:
            by_area.setdefault(f.area, []).append(f)
    ops = ["field"] * 6 + ["dyn-entry"]
    if not structural_only:
        ops += ["truncate", "flip", "zero", "copy"]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(ops))
        if op == "field":
            f = draw(st.sampled_from(by_area[draw(st.sampled_from(sorted(by_area)))]))
            if f.offset + f.size > len(data):
                continue
            old = int.from_bytes(data[f.offset:f.offset + f.size], "little")
            new = draw(st.one_of(st.sampled_from(_interesting(f, old, len(data))),
                                 st.integers(0, (1 << (8 * f.size)) - 1)))
            data[f.offset:f.offset + f.size] = new.to_bytes(f.size, "little")
            changes.append(f"{f.area}:{f.name} {old:#x}->{new:#x}")
        elif op == "dyn-entry":  # a whole (tag, value) pair: arrays need their size too
            slots = [f for f in seed.fields if f.name.endswith(".d_tag")]
            if not slots:
                continue
            f = draw(st.sampled_from(slots))
            tag = draw(st.sampled_from(DYN_TAGS))
            val = draw(st.one_of(st.sampled_from(_interesting(f, 0, len(data))),
                                 st.sampled_from(seed.vaddrs)))
            data[f.offset:f.offset + 16] = tag.to_bytes(8, "little") + val.to_bytes(8, "little")
            changes.append(f"{f.name}=({tag:#x}, {val:#x})")
        elif op == "truncate":
            n = draw(st.integers(0, len(data)))
            del data[n:]
            changes.append(f"truncate@{n:#x}")
        elif op == "flip" and data:
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= 1 << draw(st.integers(0, 7))
            changes.append(f"flip@{at:#x}")
        elif op == "zero" and data:
            at = draw(st.integers(0, len(data) - 1))
            n = draw(st.integers(1, 256))
            data[at:at + n] = bytes(len(data[at:at + n]))
            changes.append(f"zero@{at:#x}+{n}")
        elif op == "copy" and data:
            src, dst = draw(st.integers(0, len(data) - 1)), draw(st.integers(0, len(data) - 1))
            n = draw(st.integers(1, 128))
            chunk = data[src:src + n]
            data[dst:dst + len(chunk)] = chunk
            changes.append(f"copy@{src:#x}->{dst:#x}+{n}")
    return seed.name, changes, bytes(data)


# --- running the CLI in-process, with a watchdog ----------------------------------------

class Hang(BaseException):
    """Raised by the watchdog alarm; not an Exception, so the CLI can't swallow it."""


def _alarm(signum, frame):
    raise Hang()


def run_cli(argv: list[str], limit: float) -> tuple[int, str, str, float]:
    """cli.main in-process: (exit code, stdout, stderr, seconds)."""
    out, err = io.StringIO(), io.StringIO()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit + 5)
    t0 = time.monotonic()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(argv)
    except Hang:
        rc = -1
        err.write(f"\nHANG: no answer after {limit + 5:.0f}s")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in saved.items():
            signal.signal(s, h)
    return rc, out.getvalue(), err.getvalue(), time.monotonic() - t0


def run_timed(argv: list[str], limit: float) -> tuple[int, str, str, float]:
    """run_cli for commands that change nothing (info, check): an input over
    its time limit runs once more, so a load spike on a shared machine passes
    the second time while a real hang does not."""
    result = run_cli(argv, limit)
    if result[0] == -1 or result[3] > limit:
        STATS.add(f"{argv[0]}: over the limit, run again", result[0], result[3], "")
        result = run_cli(argv, limit)
    return result


def problems(rc: int, out: str, err: str, took: float, allowed: set[int], limit: float) -> list[str]:
    found = []
    if "Traceback" in err or "Traceback" in out:
        found.append("traceback")
    if "internal error" in err:
        found.append("internal error (an uncaught exception)")
    if rc not in allowed:
        found.append(f"exit {rc}, documented here: {sorted(allowed)}")
    lines = err.strip().splitlines()
    if rc not in (0, 3) and (len(lines) != 1 or not lines[0].startswith("hotpatch: ")):
        found.append(f"{len(lines)} stderr lines, want exactly one")
    if rc == 0 and err.strip():
        found.append("success with output on stderr")
    if took > limit:
        found.append(f"took {took:.1f}s > {limit}s")
    return found


class Stats:
    """Outcome counts per command, printed at the end (pytest -s / -rA)."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[int, int]] = {}
        self.slowest: dict[str, float] = {}
        self.messages: dict[str, dict[str, int]] = {}
        self.t0 = time.monotonic()

    def add(self, cmd: str, rc: int, took: float, err: str) -> None:
        by = self.counts.setdefault(cmd, {})
        by[rc] = by.get(rc, 0) + 1
        self.slowest[cmd] = max(self.slowest.get(cmd, 0.0), took)
        key = " ".join(err.split()[:6])
        msgs = self.messages.setdefault(cmd, {})
        msgs[key] = msgs.get(key, 0) + 1

    def report(self) -> str:
        rows = [f"fuzz ({'long' if LONG else 'CI'} run, {time.monotonic() - self.t0:.0f}s):"]
        for cmd, by in self.counts.items():
            total = sum(by.values())
            rows.append(f"  {cmd}: {total} inputs, exit codes {dict(sorted(by.items()))}, "
                        f"slowest {self.slowest[cmd] * 1000:.0f} ms, "
                        f"{len(self.messages[cmd])} distinct messages")
        return "\n".join(rows)


STATS = Stats()


def keep(data: bytes, name: str) -> str:
    if not ARTIFACTS:
        return "(set KSPLICE_PY_FUZZ_ARTIFACTS=DIR to keep failing inputs)"
    Path(ARTIFACTS).mkdir(parents=True, exist_ok=True)
    path = Path(ARTIFACTS) / name
    path.write_bytes(data)
    return f"input kept at {path}"


# --- fixtures -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def seeds(workdir) -> list[Seed]:
    return build_seeds(workdir)


def own_maps(pid: int) -> list[str]:
    """The target's mappings, less the tool's syscall-injection page (created
    once per process by the tracer and kept: not a change a patch makes)."""
    return [line for line in maps_lines(pid) if INJECTOR not in line]


INJECTOR = "/memfd:ksplice_py:injector"


class LiveTarget:
    """`workers` with 2 threads; compute(7) = 14 until patched."""

    def __init__(self, exe: Path, workdir: Path) -> None:
        self.exe, self.workdir = exe, workdir
        self.spawned = 0
        self.start()

    def start(self) -> None:
        status = self.workdir / f"status{self.spawned}.bin"
        status.write_bytes(b"\0" * STATUS_SIZE)
        self.spawned += 1
        self.proc = subprocess.Popen([str(self.exe), str(status), "2"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.status = Status(status)
        wait_until(lambda: self.status.ready, 5, "the fuzz target to start")
        self.compute = self.status["addr0"]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def snapshot(self) -> tuple:
        return read_mem(self.pid, self.compute, 32), own_maps(self.pid)

    def harm(self, before: tuple) -> list[str]:
        """What is wrong with the target compared with ``before``."""
        if self.proc.poll() is not None:
            return [f"target died (exit {self.proc.returncode})"]
        found = []
        if self.snapshot() != before:
            found.append("target code or mappings changed")
        if tracer_pid(self.pid):
            found.append("target left traced")
        stopped = {t: s for t, s in thread_states(self.pid).items() if s in "tT"}
        if stopped:
            found.append(f"threads left stopped: {stopped}")
        return found

    def healthy(self) -> list[str]:
        before = self.status.iters()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            now = self.status.iters()
            if all(a > b for a, b in zip(now, before)):
                break
            time.sleep(0.005)
        else:
            return [f"workers stopped making progress ({before} -> {self.status.iters()})"]
        bad = [v for v in self.status.lasts() if v != 14]
        errors = self.status["errors"]
        return ([f"compute() now returns {bad}"] if bad else []) + \
            ([f"target counted {errors} errors"] if errors else [])

    def ensure_running(self) -> None:
        """A new target if the last one died (a crash the test reported, or
        a mutant's code): every example starts from a healthy target."""
        if self.proc.poll() is not None:
            self.start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def live(build, workdir):
    target = LiveTarget(build.target("workers"), workdir)
    yield target
    target.stop()


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    print("\n" + STATS.report())
    if ARTIFACTS:
        Path(ARTIFACTS).mkdir(parents=True, exist_ok=True)
        (Path(ARTIFACTS) / "stats.json").write_text(json.dumps(
            {"long": LONG, "counts": STATS.counts, "slowest_s": STATS.slowest,
             "messages": STATS.messages}, indent=1, sort_keys=True))


# --- the fuzz tests -----------------------------------------------------------------------

def test_seeds_are_valid(seeds, live):
    """The premise: every seed parses and fits the live target."""
    live.ensure_running()
    for seed in seeds:
        path = Path(live.workdir) / f"seed-{seed.name}.so"
        path.write_bytes(seed.data)
        assert run_cli(["info", str(path)], INFO_LIMIT_S)[0] == 0
        rc, out, err, _ = run_cli(["check", str(live.pid), str(path)], CHECK_LIMIT_S)
        assert rc in (0, 3), err
        assert {"manifest", "relocation", "symbol", "dynamic"} <= set(seed.areas), seed.areas
    assert "version" in seeds[0].areas, "the rich seed has symbol-version records"


def test_fuzz_info(seeds, workdir):
    path = workdir / "info-input.so"

    @settings(max_examples=N_INFO, **FUZZ_SETTINGS)
    @given(st.data())
    def run(data):
        name, changes, blob = data.draw(mutants(seeds))
        path.write_bytes(blob)
        argv = ["info", str(path)] + (["--json"] if len(changes) % 2 else [])
        rc, out, err, took = run_timed(argv, INFO_LIMIT_S)
        STATS.add("info", rc, took, err)
        found = problems(rc, out, err, took, {0, 2, 4}, INFO_LIMIT_S)
        assert not found, f"{found} for {name} {changes}: {err.strip()!r} " \
                          f"{keep(blob, f'info-{int(time.time() * 1000)}.so')}"

    run()


def test_fuzz_check(seeds, live, workdir):
    path = workdir / "check-input.so"

    @settings(max_examples=N_CHECK, **FUZZ_SETTINGS)
    @given(st.data())
    def run(data):
        name, changes, blob = data.draw(mutants(seeds))
        path.write_bytes(blob)
        live.ensure_running()
        before = live.snapshot()
        rc, out, err, took = run_timed(["check", str(live.pid), str(path)], CHECK_LIMIT_S)
        STATS.add("check", rc, took, err)
        found = problems(rc, out, err, took, {0, 2, 3, 4}, CHECK_LIMIT_S) + live.harm(before)
        assert not found, f"{found} for {name} {changes}: {err.strip()!r} " \
                          f"{keep(blob, f'check-{int(time.time() * 1000)}.so')}"

    run()
    assert live.healthy() == []


def test_fuzz_apply_sample(seeds, live, workdir):
    """A bounded sample against the live target, structural mutations only.

    A mutant the tool refuses must leave the target unchanged. A mutant it
    accepts (``check`` says it fits) is a *different valid patch*: it is
    applied and reverted, and must leave the target as it was. Its code may
    still be wrong (say, a GOT slot no relocation fills any more): if the
    target then dies running it, that is the patch's content, not the tool;
    counted as "accepted, code crashed", and a new target is started."""
    path = workdir / "apply-input.so"

    @settings(max_examples=N_APPLY, **FUZZ_SETTINGS)
    @given(st.data())
    def run(data):
        name, changes, blob = data.draw(mutants(seeds, structural_only=True))
        path.write_bytes(blob)
        live.ensure_running()
        before = live.snapshot()
        fits, _, _, _ = run_cli(["check", str(live.pid), str(path)], CHECK_LIMIT_S)
        rc, out, err, took = run_cli(["apply", str(live.pid), str(path), "--timeout", "2"],
                                     APPLY_LIMIT_S)
        STATS.add("apply", rc, took, err)
        accepted = fits in (0, 3)
        crashed = live.proc.poll() is not None or (rc == 0 and not live_after(live))
        if accepted and crashed:
            # The tool must still say so properly: done (0) or "exited" (1).
            STATS.add("apply: accepted, code crashed the target", rc, 0.0, " ".join(changes))
            found = problems(rc, out, err, took, {0, 1}, APPLY_LIMIT_S)
            if rc == 1 and "exited" not in err:
                found.append("exit 1 without saying the target exited")
            live.start()
            assert not found, f"{found} for {name} {changes}: {err.strip()!r} " \
                              f"{keep(blob, f'apply-crash-{int(time.time() * 1000)}.so')}"
            return
        # refused: the same verdict as check; accepted: done, or no safe moment
        found = problems(rc, out, err, took, {0, 3} if accepted else {fits}, APPLY_LIMIT_S)
        if rc == 0:
            rrc, _, rerr, _ = run_cli(["revert", str(live.pid)], APPLY_LIMIT_S)
            found += [f"revert failed: {rerr.strip()}"] if rrc else []
            found += [f"after revert: {h}" for h in live.harm(before)]
        else:
            found += live.harm(before)
        assert not found, f"{found} for {name} {changes}: {err.strip()!r} " \
                          f"{keep(blob, f'apply-{int(time.time() * 1000)}.so')}"

    run()
    assert live.healthy() == []


def live_after(live: "LiveTarget", seconds: float = 0.1) -> bool:
    """Still alive a moment after the new code started running?"""
    time.sleep(seconds)
    return live.proc.poll() is None


def test_fuzz_subprocess(seeds, live, workdir):
    """The real command on a few mutants: no traceback, one line, in time."""
    rng = random.Random(0 if not LONG else None)
    for i in range(N_SUBPROCESS):
        seed = rng.choice(seeds)
        data = bytearray(seed.data)
        for f in rng.sample(seed.fields, 3):
            data[f.offset:f.offset + f.size] = rng.randrange(1 << (8 * f.size)).to_bytes(f.size, "little")
        path = workdir / f"sub{i}.so"
        path.write_bytes(data)
        live.ensure_running()
        before = live.snapshot()
        for argv, allowed in ((["info", path], {0, 2, 4}), (["check", live.pid, path], {0, 2, 3, 4})):
            t0 = time.monotonic()
            cp = subprocess.run([HOTPATCH, *map(str, argv)], capture_output=True, text=True,
                                timeout=CHECK_LIMIT_S + 10)
            took = time.monotonic() - t0
            STATS.add(f"{argv[0]} (subprocess)", cp.returncode, took, cp.stderr)
            found = problems(cp.returncode, cp.stdout, cp.stderr, took, allowed, CHECK_LIMIT_S)
            assert not found, f"{found}: hotpatch {argv}: {cp.stderr!r}"
        assert live.harm(before) == []


ATHERIS_HARNESS = r'''
import sys, atheris
with atheris.instrument_imports():
    from ksplice_py.patchfile import PatchFile
    from ksplice_py import HotpatchError
    from ksplice_py import loader

def one(data: bytes) -> None:
    try:
        patch = PatchFile.from_bytes(data, "fuzz.so")
    except HotpatchError as e:
        assert "\n" not in str(e), repr(str(e))
        return
    patch.to_dict()
    try:  # a parsed patch must link at any page-aligned base, or refuse cleanly
        loader.link(patch, 0x7f0000000000, lambda imp: 0x7f1000000000)
    except HotpatchError:
        pass

atheris.Setup(sys.argv, one)
atheris.Fuzz()
'''


def test_atheris_parser(seeds, workdir):
    """Coverage-guided (libFuzzer) run on the parser and linker."""
    pytest.importorskip("atheris")
    corpus = workdir / "corpus"
    corpus.mkdir(exist_ok=True)
    for seed in seeds:
        (corpus / seed.name).write_bytes(seed.data)
    harness = workdir / "atheris_patchfile.py"
    harness.write_text(ATHERIS_HARNESS)
    artifacts = Path(ARTIFACTS) if ARTIFACTS else workdir / "atheris-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    cp = subprocess.run([sys.executable, str(harness), str(corpus),
                         f"-max_total_time={ATHERIS_SECONDS}", "-timeout=10", "-rss_limit_mb=2048",
                         "-max_len=65536", f"-artifact_prefix={artifacts}/", "-print_final_stats=1"],
                        capture_output=True, text=True, timeout=ATHERIS_SECONDS + 120)
    tail = "\n".join(cp.stderr.splitlines()[-25:])
    runs = [line for line in cp.stderr.splitlines() if "stat::number_of_executed_units" in line]
    STATS.add("atheris parser", cp.returncode, 0.0, runs[-1] if runs else "")
    print("\n".join(line for line in cp.stderr.splitlines() if line.startswith("stat::")))
    assert cp.returncode == 0, f"atheris found a crash or hang:\n{tail}"


# --- inputs that hung the parser (spinning for hours) before it bounded its loops -------

def _edit(seed: Seed, name: str, value: int) -> bytes:
    data = bytearray(seed.data)
    f = next(f for f in seed.fields if f.name == name)
    data[f.offset:f.offset + f.size] = value.to_bytes(f.size, "little")
    return bytes(data)


def _section_index(seed: Seed, name: str) -> int:
    return [s.name for s in ELFFile(io.BytesIO(seed.data)).iter_sections()].index(name)


@pytest.mark.parametrize("case", ["verneed-count", "init-array-size"])
def test_parser_hang_regressions(seeds, workdir, case):
    rich = seeds[0]
    if case == "verneed-count":  # sh_info = 2**32-1 entries linked by vn_next = 0
        blob = _edit(rich, f"shdr[{_section_index(rich, '.gnu.version_r')}].sh_info", 0xFFFFFFFF)
    else:  # DT_INIT_ARRAY over unmapped space with DT_INIT_ARRAYSZ = 2**62
        data = bytearray(rich.data)
        flags = [f for f in rich.fields if f.area == "dynamic" and f.name.endswith(".d_tag")
                 and int.from_bytes(data[f.offset:f.offset + 8], "little") in (0x1E, 0x6FFFFFFB)]
        assert len(flags) == 2, "premise: DT_FLAGS and DT_FLAGS_1 (from -z now) to overwrite"
        for f, (tag, val) in zip(flags, ((25, 0x7000000), (27, 1 << 62))):
            data[f.offset:f.offset + 16] = tag.to_bytes(8, "little") + val.to_bytes(8, "little")
        blob = bytes(data)
    path = workdir / f"regression-{case}.so"
    path.write_bytes(blob)
    rc, out, err, took = run_timed(["info", str(path)], 2.0)
    assert not problems(rc, out, err, took, {2}, 2.0), (rc, err, took)
