"""ksplice_py.symbols against real, running processes compiled here."""
from __future__ import annotations

import os
import signal
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from ksplice_py import symbols
from ksplice_py import (
    AmbiguousSymbol,
    BadInput,
    SymbolNotFound,
    UnknownObject,
    UnsupportedPatch,
)
from ksplice_py.memory import RemoteMemory
from ksplice_py.symbols import TargetSymbols

LIB_C = r"""
int dup(int x) { return x + 100; }
int lib_hello(int x) { return x * 2; }
"""

MAIN_C = r"""
#include <stdio.h>
#include <string.h>
#include <wchar.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/mman.h>
int lib_hello(int);
static int counter = 5;
static int helper(int x) { return x + counter++; }
int compute(int x) { return helper(x) * 2; }
int dup(int x) { return x - 1; }
static void map_file(const char *path) {   /* a data mapping, as any program may have */
    int fd = open(path, O_RDONLY);
    if (fd >= 0) { mmap(0, 4096, PROT_READ, MAP_PRIVATE, fd, 0); close(fd); }
}
int main(int argc, char **argv) {
    /* In a PIE these load GOT slots (GLOB_DAT): for IFUNCs, the implementation. */
    void *(*volatile p)(void *, const void *, size_t) = memcpy;
    char *(*volatile q)(const char *, const char *) = strstr;
    if (argc > 100)  /* never runs: its JUMP_SLOT stays lazily unresolved */
        return wcsncmp((const wchar_t *)argv[0], (const wchar_t *)argv[1], 3);
    for (int i = 1; i < argc; i++) map_file(argv[i]);
    printf("%p %p %p %p %p\n", (void *)compute, (void *)&counter, (void *)helper, (void *)p, (void *)q);
    fflush(stdout);
    lib_hello(compute(1));
    for (;;) pause();
}
"""

PLAIN_C = r"""
#include <stdio.h>
#include <unistd.h>
static int counter = 1;
int compute(int x) { return x + counter; }
int main(void) {
    printf("%p %p\n", (void *)compute, (void *)&counter);
    fflush(stdout);
    for (;;) pause();
}
"""


def _gcc(*args: str) -> None:
    subprocess.run(["gcc", "-O0", "-g0", "-fno-builtin", *args], check=True, capture_output=True)


class Target:
    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.addrs = [int(x, 16) for x in self.proc.stdout.readline().split()]
        assert self.addrs, "target printed nothing"

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture(scope="module", autouse=True)
def _module_cache(tmp_path_factory):
    """A private cache per module (not ~/.cache); tests that count parses use their own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KSPLICE_PY_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _corrupt_dynsym(src: Path, dst: Path) -> None:
    """Headers readable, .dynsym pointing past the end of the file."""
    data = bytearray(src.read_bytes())
    with open(src, "rb") as f:
        elf = ELFFile(f)
        idx = next(i for i, s in enumerate(elf.iter_sections()) if s.name == ".dynsym")
        struct.pack_into("<Q", data, elf["e_shoff"] + idx * elf["e_shentsize"] + 0x18, 0x7FFFFF00)
    dst.write_bytes(data)


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("prog")
    (d / "lib.c").write_text(LIB_C)
    (d / "main.c").write_text(MAIN_C)
    (d / "bad.c").write_text("int bad_fn(int x) { return x; }\n")
    _gcc("-shared", "-fPIC", "-o", str(d / "libdup.so"), str(d / "lib.c"))
    _gcc("-shared", "-fPIC", "-o", str(d / "libbad.so"), str(d / "bad.c"))
    _gcc("-fPIE", "-pie", "-o", str(d / "prog"), str(d / "main.c"),
         f"-L{d}", "-ldup", f"-Wl,-rpath,{d}")
    _corrupt_dynsym(d / "libbad.so", d / "bad_symbols.so")
    hdr = bytearray((d / "libbad.so").read_bytes())
    struct.pack_into("<Q", hdr, 0x28, 0x7FFFFF00)  # e_shoff past EOF: unreadable headers
    (d / "bad_header.so").write_bytes(hdr)
    return d


@pytest.fixture(scope="module")
def target(build):
    t = Target([str(build / "prog"), str(build / "bad_symbols.so"), str(build / "bad_header.so")])
    yield t
    t.kill()


@pytest.fixture
def ts(target):
    mem = RemoteMemory(target.pid)
    yield TargetSymbols(target.pid, mem)
    mem.close()


@pytest.fixture
def parse_counter(monkeypatch, tmp_path):
    """Fresh cache directory and a record of which files get parsed."""
    monkeypatch.setenv("KSPLICE_PY_CACHE", str(tmp_path / "cache"))
    parsed: list[str] = []
    real = symbols._parse_file

    def counting(host_path, build_id):
        parsed.append(os.path.basename(host_path))
        return real(host_path, build_id)

    monkeypatch.setattr(symbols, "_parse_file", counting)
    return parsed


def _libc_debug_present(ts: TargetSymbols) -> bool:
    bid = ts.build_id("libc.so.6")
    return bool(bid) and os.path.exists(f"{symbols.DEBUG_ROOT}/{bid[:2]}/{bid[2:]}.debug")


# --- objects -------------------------------------------------------------
def test_objects_bias_build_id_and_search_order(ts, build):
    names = [o.name for o in ts.objects]
    assert names[0] == "main"
    assert {"libdup.so", "libc.so.6", "ld-linux-x86-64.so.2", "bad_symbols.so"} <= set(names)
    # Link-map order: main, then DT_NEEDED in load order, ld.so; mmap'ed data files last.
    # Libraries are mapped top-down, so libdup.so lies *above* libc: address order differs.
    libdup, libc = ts.object("libdup.so"), ts.object("libc.so.6")
    assert libdup.start > libc.start
    assert names.index("libdup.so") < names.index("libc.so.6") < names.index("ld-linux-x86-64.so.2")
    assert names[-1] == "bad_symbols.so"
    assert "bad_header.so" not in names
    assert [p for p, _ in ts.skipped] == [str(build / "bad_header.so")]

    main = ts.object("main")
    assert main.bias == main.start and main.bias != 0  # PIE, first PT_LOAD at vaddr 0
    with open(build / "prog", "rb") as f:
        note = next(n for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_NOTE"
                    for n in s.iter_notes() if n["n_type"] == "NT_GNU_BUILD_ID")
    assert ts.build_id("main") == note["n_desc"]
    assert len(ts.build_id("libc.so.6")) == 40


def test_unknown_object(ts):
    with pytest.raises(UnknownObject) as e:
        ts.resolve("nosuch.so:x")
    msg = str(e.value)
    assert "nosuch.so" in msg and "libc.so.6" in msg and "libdup.so" in msg and "\n" not in msg


# --- resolve ---------------------------------------------------------------
def test_resolve_matches_running_process(ts, target):
    compute, counter, helper = target.addrs[:3]
    s = ts.resolve("main:compute")
    assert (s.addr, s.kind, s.binding, s.object) == (compute, "func", "global", "main")
    assert s.size > 0 and s.qualified == "main:compute"
    assert ts.resolve("compute").addr == compute  # unique, so unqualified works too
    st = ts.resolve("main:helper")
    assert (st.addr, st.kind, st.binding) == (helper, "func", "local")
    var = ts.resolve("main:counter")
    assert (var.addr, var.kind, var.binding, var.size) == (counter, "object", "local", 4)


def test_ambiguous_lists_candidates(ts):
    with pytest.raises(AmbiguousSymbol) as e:
        ts.resolve("dup")
    msg = str(e.value)
    assert "main:dup" in msg and "libdup.so:dup" in msg and "qualify" in msg
    assert "\n" not in msg
    assert ts.resolve("libdup.so:dup").object == "libdup.so"
    assert ts.resolve("main:dup").addr != ts.resolve("libdup.so:dup").addr


def test_symbol_not_found(ts):
    with pytest.raises(SymbolNotFound, match="libdup.so"):
        ts.resolve("libdup.so:compute")
    with pytest.raises(SymbolNotFound):
        ts.resolve("no_such_symbol_anywhere")
    with pytest.raises(BadInput):
        ts.resolve("main:")


def test_libc_rand_and_versions(ts):
    rand = ts.resolve("libc.so.6:rand")
    libc = ts.object("libc.so.6")
    assert libc.start <= rand.addr < libc.end
    assert (rand.kind, rand.version, rand.default_version) == ("func", "GLIBC_2.2.5", True)
    # memcpy has two global versions at different addresses: the default one wins,
    # and the other can be asked for explicitly.
    new = ts.resolve("libc.so.6:memcpy")
    assert (new.kind, new.version, new.default_version) == ("ifunc", "GLIBC_2.14", True)
    old = ts.resolve("libc.so.6:memcpy@GLIBC_2.2.5")
    assert old.addr != new.addr and old.default_version is False


def test_libc_internal_from_debug_file(ts):
    if not _libc_debug_present(ts):
        pytest.skip("libc6-dbg not installed")
    s = ts.resolve("libc.so.6:send_dg")
    libc = ts.object("libc.so.6")
    assert s.binding == "local" and s.kind == "func" and s.size > 100
    assert libc.start <= s.addr < libc.end
    assert ts.function_at(s.addr + 10) == s


def test_malformed_elf_in_target(ts, target):
    # Unqualified lookups skip it; naming it is a one-line BadInput.
    assert ts.resolve("compute").addr == target.addrs[0]
    with pytest.raises(BadInput, match="malformed ELF") as e:
        ts.resolve("bad_symbols.so:bad_fn")
    assert "\n" not in str(e.value)
    assert ts.function_at(ts.object("bad_symbols.so").start) is None


# --- bind_import -----------------------------------------------------------
def test_bind_import_ifunc_matches_targets_got(ts, target):
    memcpy_impl, strstr_impl = target.addrs[3], target.addrs[4]
    libc = ts.object("libc.so.6")
    resolver = ts.resolve("libc.so.6:memcpy")
    assert libc.start <= memcpy_impl < libc.end and memcpy_impl != resolver.addr
    # via libc's own R_X86_64_IRELATIVE slot
    assert ts.bind_import("memcpy", "GLIBC_2.14", False) == memcpy_impl
    assert ts.bind_import("memcpy", None, False) == memcpy_impl
    # strstr has no IRELATIVE slot in libc: bound from prog's resolved GLOB_DAT slot
    assert ts.resolve("libc.so.6:strstr").kind == "ifunc"
    assert ts.bind_import("strstr", "GLIBC_2.2.5", False) == strstr_impl


def test_bind_import_ifunc_unresolved_slot_is_refused(ts):
    # wcsncmp: an IFUNC without IRELATIVE slot in libc, and prog's JUMP_SLOT for it
    # still points into prog's PLT (lazy binding, never called).
    libc_data = ts._load(ts.object("libc.so.6"))
    d = libc_data.dynamic["wcsncmp"][0]
    if d.kind != "ifunc" or d.value in libc_data.irelative:
        pytest.skip("this libc binds wcsncmp differently")
    assert ts._load(ts.object("main")).slots.get("wcsncmp"), "prog should import wcsncmp"
    with pytest.raises(UnsupportedPatch, match="wcsncmp"):
        ts.bind_import("wcsncmp", "GLIBC_2.2.5", False)


def test_bind_import_plain_weak_and_missing(ts):
    # Search order: prog's dup interposes libdup.so's and libc's.
    assert ts.bind_import("dup", None, False) == ts.resolve("main:dup").addr
    # ld.so lets an unversioned definition satisfy a versioned reference: still prog's.
    assert ts.bind_import("dup", "GLIBC_2.2.5", False) == ts.resolve("main:dup").addr
    assert ts.bind_import("lib_hello", None, False) == ts.resolve("lib_hello").addr
    assert ts.bind_import("memcpy", "GLIBC_2.2.5", False) == ts.resolve("libc.so.6:memcpy@GLIBC_2.2.5").addr
    assert ts.bind_import("no_such_fn", None, True) is None
    with pytest.raises(SymbolNotFound, match=r"no_such_fn@GLIBC_9\.9 which no object in process"):
        ts.bind_import("no_such_fn", "GLIBC_9.9", False)
    # local (static) symbols are not visible to the dynamic linker
    assert ts.bind_import("helper", None, True) is None


# --- function_at -------------------------------------------------------------
def test_function_at(ts, target):
    compute, _counter, helper = target.addrs[:3]
    assert ts.function_at(compute).name == "compute"
    assert ts.function_at(compute + 5).name == "compute"
    assert ts.function_at(helper + 1).name == "helper"
    rand = ts.resolve("libc.so.6:rand")
    assert ts.function_at(rand.addr + rand.size - 1) == rand
    assert ts.function_at(8) is None


# --- cache and laziness --------------------------------------------------
def test_qualified_lookup_parses_one_object(target, parse_counter):
    t = TargetSymbols(target.pid, RemoteMemory(target.pid))
    assert parse_counter == []  # constructing reads headers only
    t.resolve("libc.so.6:rand")
    assert parse_counter == ["libc.so.6"]


def test_cache_hit_and_corrupt_cache(target, parse_counter):
    mem = RemoteMemory(target.pid)
    first = TargetSymbols(target.pid, mem).resolve("libc.so.6:rand")
    assert parse_counter == ["libc.so.6"]
    bid = TargetSymbols(target.pid, mem).build_id("libc.so.6")
    path = symbols.cache_path(bid)
    assert path.exists() and path.name == f"{bid}.{symbols.FORMAT_VERSION}.pickle"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp")]

    again = TargetSymbols(target.pid, mem)
    assert again.resolve("libc.so.6:rand") == first
    assert parse_counter == ["libc.so.6"]  # served from the cache

    path.write_bytes(b"\x80\x05garbage")
    third = TargetSymbols(target.pid, mem)
    assert third.resolve("libc.so.6:rand") == first
    assert parse_counter == ["libc.so.6", "libc.so.6"]  # rebuilt
    assert TargetSymbols(target.pid, mem).resolve("libc.so.6:rand") == first
    assert parse_counter == ["libc.so.6", "libc.so.6"]  # and rewritten


# --- executables that are not PIE --------------------------------------------
@pytest.mark.parametrize("flags", [["-no-pie"], ["-static"]], ids=["non-pie", "static"])
def test_non_pie_and_static_executables(tmp_path, flags):
    (tmp_path / "p.c").write_text(PLAIN_C)
    try:
        _gcc(*flags, "-o", str(tmp_path / "p"), str(tmp_path / "p.c"))
    except subprocess.CalledProcessError:
        pytest.skip(f"cannot link with {flags}")
    t = Target([str(tmp_path / "p")])
    try:
        ts = TargetSymbols(t.pid, RemoteMemory(t.pid))
        assert ts.objects[0].name == "main" and ts.object("main").bias == 0
        assert ts.resolve("main:compute").addr == t.addrs[0]
        assert ts.resolve("main:counter").addr == t.addrs[1]
        if flags == ["-static"]:
            assert [o.name for o in ts.objects] == ["main"]
        else:
            assert "libc.so.6" in [o.name for o in ts.objects]
    finally:
        t.kill()


def test_library_replaced_on_disk_is_read_from_the_mapping(tmp_path):
    """After a package upgrade the path names a different file than the one
    mapped: symbols must come from the mapped (deleted) one."""
    lib_v1 = "int lib_fn(int x) { return x + 1; }\n"
    lib_v2 = "int pad[4096] = {1};\nint filler(int x) { return x * pad[x]; }\n" + lib_v1
    (tmp_path / "v.c").write_text(lib_v1)
    (tmp_path / "main.c").write_text(
        "#include <stdio.h>\n#include <unistd.h>\nint lib_fn(int);\n"
        "int main(void) { printf(\"%p\\n\", (void *)lib_fn); fflush(stdout); for (;;) pause(); }\n")
    _gcc("-shared", "-fPIC", "-o", str(tmp_path / "libv.so"), str(tmp_path / "v.c"))
    _gcc("-fPIE", "-pie", "-o", str(tmp_path / "p"), str(tmp_path / "main.c"),
         f"-L{tmp_path}", "-lv", f"-Wl,-rpath,{tmp_path}")
    t = Target([str(tmp_path / "p")])
    try:
        (tmp_path / "v.c").write_text(lib_v2)
        _gcc("-shared", "-fPIC", "-o", str(tmp_path / "libv.new"), str(tmp_path / "v.c"))
        os.replace(tmp_path / "libv.new", tmp_path / "libv.so")
        ts = TargetSymbols(t.pid, RemoteMemory(t.pid))
        assert ts.object("libv.so").host_path.startswith(f"/proc/{t.pid}/map_files/")
        assert ts.resolve("libv.so:lib_fn").addr == t.addrs[0]
        with pytest.raises(SymbolNotFound):
            ts.resolve("libv.so:filler")
    finally:
        t.kill()
