"""loader.link: every relocated slot checked against an independent reading of
the relocation tables (pyelftools), protections, binding rules — and an
end-to-end run where a real process maps the linked image and calls into it."""
from __future__ import annotations

import io
import random
import re
import shlex
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from ksplice_py import HotpatchError, SymbolNotFound
from ksplice_py.loader import LinkedImage, link
from ksplice_py.patchfile import Import, PatchFile, cflags
from ksplice_py.trust import load_patch

BASE = 0x7F12_3400_0000

PATCH = r"""
#include <hotpatch.h>
#include <stdio.h>
#include <string.h>

static int compute_v2(int x) { return x * 3; }
HOTPATCH_REPLACE("compute", compute_v2);

static int (*compute_orig)(int);
static int compute_wrap(int x) { return compute_orig(x) * 10; }
HOTPATCH_WRAP("main:compute", compute_wrap, compute_orig);

static int *counter_ptr;
HOTPATCH_SYMBOL("main:counter", counter_ptr);

extern int maybe_there(void) __attribute__((weak));
__attribute__((visibility("default"))) int shared_var = 7;   /* GOT reloc, defined here */

static const char *const names[] = {"even", "odd"};          /* .data.rel.ro (RELRO) */
static char buf[64];

int use_all(int n) {
    memcpy(buf, names[n & 1], strlen(names[n & 1]) + 1);     /* memcpy@GLIBC_2.14 ifunc */
    fprintf(stderr, "patch: %s counter=%d\n", buf, *counter_ptr);  /* data import */
    printf("patch stdout %d\n", n);
    return *counter_ptr + n + (int)strlen(buf) + shared_var + (maybe_there ? 1000 : 0);
}
HOTPATCH_REPLACE("use_all", use_all);
"""


def build(tmp_path: Path, src: str, name: str = "fix", drop: tuple[str, ...] = ()) -> Path:
    c, so = tmp_path / f"{name}.c", tmp_path / f"{name}.so"
    c.write_text(src)
    flags = [f for f in shlex.split(cflags()) if f not in drop]
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", *flags, "-o", str(so), str(c)], check=True)
    return so


class FakeBinder:
    def __init__(self, missing: tuple[str, ...] = ()) -> None:
        self.calls: list[Import] = []
        self.missing = missing

    def addr(self, name: str) -> int:
        return 0x5500_0000_0000 + 0x1000 * (sum(map(ord, name)) % 4096)

    def __call__(self, imp: Import) -> int | None:
        self.calls.append(imp)
        return None if imp.name in self.missing else self.addr(imp.name)


def read(img: LinkedImage, addr: int, n: int = 8) -> bytes:
    for start, data in img.writes:
        if start <= addr and addr + n <= start + len(data):
            return data[addr - start:addr - start + n]
    raise AssertionError(f"0x{addr:x} not covered by writes")


def u64(img: LinkedImage, addr: int) -> int:
    return struct.unpack("<Q", read(img, addr))[0]


def dyn_relocs(so: Path):
    """Independent reading: (offset, type name, symbol name, addend) of .rela.*"""
    elf = ELFFile(io.BytesIO(so.read_bytes()))
    dynsym = elf.get_section_by_name(".dynsym")
    out = []
    for sec in elf.iter_sections(type="SHT_RELA"):
        for r in sec.iter_relocations():
            sym = dynsym.get_symbol(r["r_info_sym"])
            out.append((r["r_offset"], r["r_info_type"], sym.name, r["r_addend"],
                        sym["st_shndx"], sym["st_value"]))
    return out


@pytest.fixture(scope="module")
def patch(tmp_path_factory):
    so = build(tmp_path_factory.mktemp("loader"), PATCH)
    return so, load_patch(str(so))


def test_every_relocated_slot(patch):
    so, p = patch
    binder = FakeBinder(missing=("maybe_there",))  # weak + unresolved -> 0
    img = link(p, BASE, binder)
    relocs = dyn_relocs(so)
    assert relocs, "the patch must have relocations for this test to mean anything"
    seen_types = set()
    for off, rtype, name, addend, shndx, value in relocs:
        got = u64(img, BASE + off)
        seen_types.add(rtype)
        if rtype == 8:  # RELATIVE
            assert got == BASE + addend
        elif rtype in (6, 7):  # GLOB_DAT / JUMP_SLOT
            expect = BASE + value if shndx != "SHN_UNDEF" else (
                0 if name == "maybe_there" else binder.addr(name))
            assert got == expect, name
        else:
            pytest.fail(f"unexpected relocation type {rtype}")
    assert {6, 8} <= seen_types
    memcpy_slot = next(off for off, t, name, *_ in relocs if name == "memcpy")
    assert u64(img, BASE + memcpy_slot) == binder.addr("memcpy")
    # One bind per import, versions passed; defined `shared_var` never asked for.
    names = [(i.name, i.version) for i in binder.calls]
    assert len(names) == len(set(names))
    assert ("memcpy", "GLIBC_2.14") in names and ("stderr", "GLIBC_2.2.5") in names
    assert "shared_var" not in {n for n, _ in names}
    assert Import("maybe_there", None, True) in binder.calls
    weak_slot = next(off for off, t, name, *_ in relocs if name == "maybe_there")
    assert u64(img, BASE + weak_slot) == 0


def test_manifest_pointers_relocated_and_vars_left(patch):
    _, p = patch
    img = link(p, BASE, FakeBinder())
    hotpatch = ELFFile(io.BytesIO(Path(p.name).read_bytes())).get_section_by_name(".hotpatch")
    funcs = {u64(img, BASE + hotpatch["sh_addr"] + 32 * i + 16)
             for i in range(hotpatch["sh_size"] // 32)}
    assert {img.addr(r.func) for r in p.replacements} <= funcs
    wrap = next(r for r in p.replacements if r.kind == "wrap")
    assert u64(img, img.addr(wrap.orig_ptr)) == 0  # the caller fills it later
    assert u64(img, img.addr(p.symbol_refs[0].ptr)) == 0


def test_writes_and_protections(patch):
    _, p = patch
    img = link(p, BASE, FakeBinder())
    assert img.base == BASE and img.size == p.span[1] - p.span[0]
    assert img.addr(0x1234) == BASE + 0x1234
    assert [(a, len(d)) for a, d in img.writes] == [(BASE + s.vaddr, s.memsz) for s in p.segments]
    for s in p.segments:  # bss is zero-filled, file bytes otherwise unchanged outside relocs
        tail = read(img, BASE + s.vaddr + len(s.data), s.memsz - len(s.data))
        assert tail == bytes(len(tail))
    # Contiguous, page-granular cover of the whole span.
    pos = BASE + p.span[0]
    for addr, size, _ in img.protections:
        assert addr == pos and size % 4096 == 0
        pos += size
    assert pos == BASE + p.span[1]

    def prot_at(vaddr: int) -> int:
        return next(pr for a, n, pr in img.protections if a <= BASE + vaddr < a + n)

    text = next(s for s in p.segments if s.prot & 4)
    assert prot_at(text.vaddr) == 1 | 4
    relro_start, relro_size = p.relro[0]
    assert relro_size >= 4096 and prot_at(relro_start) == 1
    assert prot_at(p.symbol_refs[0].ptr) == 1 | 2  # .bss: rw-
    assert prot_at(0) == 1  # headers, dynsym, rela: r--


def test_jump_slots_without_fno_plt(tmp_path):
    so = build(tmp_path, PATCH, drop=("-fno-plt",))
    p = load_patch(str(so))
    binder = FakeBinder()
    img = link(p, BASE, binder)
    slots = [(off, name) for off, t, name, *_ in dyn_relocs(so) if t == 7]
    assert slots, "expected R_X86_64_JUMP_SLOT relocations in .rela.plt"
    for off, name in slots:
        assert u64(img, BASE + off) == binder.addr(name)


def test_missing_import_and_bad_base(patch):
    _, p = patch
    with pytest.raises(SymbolNotFound, match=r"'memcpy@GLIBC_2\.14'"):
        link(p, BASE, FakeBinder(missing=("memcpy",)))
    with pytest.raises(ValueError):
        link(p, BASE + 8, FakeBinder())


def test_link_of_mutated_patches_never_escapes(patch):
    so, _ = patch
    data = so.read_bytes()
    elf = ELFFile(io.BytesIO(data))
    rela, dynsym = elf.get_section_by_name(".rela.dyn"), elf.get_section_by_name(".dynsym")
    regions = [(0, 64 + 56 * elf.header["e_phnum"]), (rela["sh_offset"], rela["sh_size"]),
               (dynsym["sh_offset"], dynsym["sh_size"])]
    rng = random.Random(99)
    linked = 0
    for _ in range(300):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            start, size = rng.choice(regions)
            buf[start + rng.randrange(size)] = rng.randrange(256)
        try:
            p = PatchFile.from_bytes(bytes(buf), "fuzz.so")
            link(p, BASE, FakeBinder())
            linked += 1
        except HotpatchError as e:
            assert "\n" not in str(e)
    assert linked > 0


# --- end to end: a real process maps the image and calls the patch --------------
HARNESS = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

int counter = 41;
__attribute__((noinline)) int compute(int x) { return x + 1; }

static uint64_t get(void) {
    uint64_t v;
    if (fread(&v, 8, 1, stdin) != 1) exit(3);
    return v;
}

int main(int argc, char **argv) {
    size_t size = strtoul(argv[1], 0, 0);
    char *map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    printf("map %p\ncounter %p\ncompute %p\n", map, (void *)&counter, (void *)compute);
    for (int i = 2; i + 1 < argc; i += 2) {
        void *a = strcmp(argv[i + 1], "-") ? dlvsym(RTLD_DEFAULT, argv[i], argv[i + 1])
                                           : dlsym(RTLD_DEFAULT, argv[i]);
        printf("sym %s %p\n", argv[i], a);
    }
    printf("end\n");
    fflush(stdout);
    for (uint64_t n = get(); n; n--) {
        char *addr = (char *)get();
        uint64_t len = get();
        if (fread(addr, 1, len, stdin) != len) return 4;
    }
    for (uint64_t n = get(); n; n--) {
        void *addr = (void *)get();
        uint64_t len = get(), prot = get();
        if (mprotect(addr, len, (int)prot)) { perror("mprotect"); return 5; }
    }
    FILE *maps = fopen("/proc/self/maps", "r");
    char line[512];
    while (fgets(line, sizeof line, maps)) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx", &lo, &hi) == 2 && lo >= (unsigned long)map &&
            hi <= (unsigned long)map + size)
            printf("maps %s", line);
    }
    for (uint64_t n = get(); n; n--) {
        int (*fn)(int) = (int (*)(int))get();
        int arg = (int)get();
        printf("result %d\n", fn(arg));
        fflush(stdout);
    }
    return 0;
}
"""


def test_end_to_end_in_a_real_process(patch, tmp_path):
    _, p = patch
    c, exe = tmp_path / "harness.c", tmp_path / "harness"
    c.write_text(HARNESS)
    subprocess.run(["gcc", "-O1", "-o", str(exe), str(c)], check=True)
    imports = [i for i in p.imports]
    args = [str(exe), str(p.span[1] - p.span[0])]
    for i in imports:
        args += [i.name, i.version or "-"]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        header: dict[str, int] = {}
        syms: dict[str, int] = {}
        for line in proc.stdout:
            words = line.decode().split()
            if words == ["end"]:
                break
            if words[0] == "sym":
                syms[words[1]] = int(words[2], 16) if words[2] != "(nil)" else 0
            else:
                header[words[0]] = int(words[1], 16)

        img = link(p, header["map"] - p.span[0],
                   lambda imp: syms.get(imp.name) or None)
        wrap = next(r for r in p.replacements if r.kind == "wrap")
        by_target = {r.target: r for r in p.replacements}
        # What the tool does after link: fill HOTPATCH_WRAP / HOTPATCH_SYMBOL vars.
        writes = img.writes + [(img.addr(wrap.orig_ptr), struct.pack("<Q", header["compute"])),
                               (img.addr(p.symbol_refs[0].ptr), struct.pack("<Q", header["counter"]))]
        blob = bytearray(struct.pack("<Q", len(writes)))
        for addr, data in writes:
            blob += struct.pack("<QQ", addr, len(data)) + data
        blob += struct.pack("<Q", len(img.protections))
        for addr, size, prot in img.protections:
            blob += struct.pack("<QQQ", addr, size, prot)
        calls = [(by_target["compute"].func, 5), (wrap.func, 5), (by_target["use_all"].func, 3)]
        blob += struct.pack("<Q", len(calls))
        for vaddr, arg in calls:
            blob += struct.pack("<QQ", img.addr(vaddr), arg)
        out, err = proc.communicate(bytes(blob), timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = out.decode(), err.decode()
    assert proc.returncode == 0, (out, err)
    results = [int(x) for x in re.findall(r"^result (-?\d+)$", out, re.M)]
    # compute_v2(5)=15; wrap: compute(5)*10=60; use_all(3)=41+3+len("odd")+7 (weak absent)
    assert results == [15, 60, 41 + 3 + 3 + 7]
    assert "patch: odd counter=41" in err
    assert "patch stdout 3" in out
    perms = {}
    for m in re.finditer(r"^maps ([0-9a-f]+)-([0-9a-f]+) (\S+)", out, re.M):
        perms[int(m.group(1), 16)] = m.group(3)
    relro_addr = img.addr(p.relro[0][0])
    assert any(perm.startswith("r--") and lo <= relro_addr for lo, perm in perms.items())
    text = next(s for s in p.segments if s.prot & 4)
    assert perms.get(img.addr(text.vaddr), "").startswith("r-x")
