"""PatchFile: real patches compiled with gcc + hotpatch.h, checked against nm /
readelf / pyelftools; refusals; mutated files never escape as tracebacks."""
from __future__ import annotations

import hashlib
import json
import random
import shlex
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from ksplice_py import BadPatchFile, HotpatchError, UnsupportedPatch
from ksplice_py.trust import load_patch
from ksplice_py.patchfile import (HOTPATCH_CFLAGS, Import, PatchFile, cflags, include_dir,
                                  RECORD)

FULL_PATCH = r"""
#include <hotpatch.h>
#include <stdio.h>
#include <string.h>

static int compute_v2(int x) { return x * 3; }
HOTPATCH_REPLACE("compute", compute_v2);

static int (*compute_orig)(int);
static int compute_wrap(int x) { return compute_orig(x) * 10; }
HOTPATCH_WRAP("libdemo.so:twice", compute_wrap, compute_orig);

static int *counter_ptr;
HOTPATCH_SYMBOL("main:counter", counter_ptr);
HOTPATCH_BUILD_ID("libdemo.so", "00112233445566778899AABBCCDDEEFF00112233");

static char buf[64];
int report(const char *s, int n) {
    memcpy(buf, s, (size_t)n);                 /* memcpy@GLIBC_2.14, an ifunc */
    fprintf(stderr, "%s %d\n", buf, *counter_ptr);   /* data import */
    return printf("%d\n", n);
}
HOTPATCH_REPLACE("main:report", report);
"""


def build(tmp_path: Path, src: str, name: str = "fix", flags: list[str] | None = None,
          check: bool = True) -> Path | subprocess.CompletedProcess:
    c = tmp_path / f"{name}.c"
    so = tmp_path / f"{name}.so"
    c.write_text(src)
    if flags is None:
        flags = shlex.split(cflags())
    proc = subprocess.run(["gcc", "-shared", "-fPIC", "-O2", *flags, "-o", str(so), str(c)],
                          capture_output=True, text=True)
    if not check:
        return proc
    assert proc.returncode == 0, proc.stderr
    return so


def nm(path: Path) -> dict[str, int]:
    out = subprocess.run(["nm", str(path)], capture_output=True, text=True, check=True).stdout
    syms = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:
            syms[parts[2]] = int(parts[0], 16)
    return syms


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> tuple[Path, PatchFile]:
    so = build(tmp_path_factory.mktemp("full"), FULL_PATCH)
    return so, load_patch(str(so))


def test_cflags_point_at_header():
    assert (include_dir() / "hotpatch.h").is_file()
    flags = shlex.split(cflags())
    assert flags[0] == f"-I{include_dir()}"
    for f in ("-nostartfiles", "-fvisibility=hidden", "-fno-plt", "-Wl,-z,now"):
        assert f in HOTPATCH_CFLAGS


def test_manifest_matches_symbols(full):
    so, p = full
    syms = nm(so)
    reps = {r.target: r for r in p.replacements}
    assert set(reps) == {"compute", "libdemo.so:twice", "main:report"}
    assert reps["compute"].kind == "replace" and reps["compute"].func == syms["compute_v2"]
    assert reps["compute"].orig_ptr is None
    assert reps["main:report"].func == syms["report"]
    wrap = reps["libdemo.so:twice"]
    assert wrap.kind == "wrap"
    assert wrap.func == syms["compute_wrap"]
    assert wrap.orig_ptr == syms["compute_orig"]
    assert [(s.target, s.ptr) for s in p.symbol_refs] == [("main:counter", syms["counter_ptr"])]
    assert [(b.object, b.build_id) for b in p.pins] == [
        ("libdemo.so", "00112233445566778899aabbccddeeff00112233")]
    assert p.func_names[syms["compute_wrap"]] == "compute_wrap"


def test_imports_versions_and_identity(full):
    so, p = full
    data = so.read_bytes()
    assert p.sha256 == hashlib.sha256(data).hexdigest() and p.size == len(data)
    imps = {i.name: i for i in p.imports}
    assert imps["memcpy"] == Import("memcpy", "GLIBC_2.14", False)
    assert imps["stderr"].version == "GLIBC_2.2.5"
    assert "printf" in imps and "fprintf" in imps
    assert not {"compute_v2", "report", "counter_ptr"} & set(imps)  # hidden: bound inside
    notes = subprocess.run(["readelf", "-n", str(so)], capture_output=True, text=True).stdout
    assert p.build_id and f"Build ID: {p.build_id}" in notes
    assert "libc.so.6" in p.needed


def test_segments_span_relro(full):
    so, p = full
    with open(so, "rb") as f:
        elf = ELFFile(f)
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        relro = next(s for s in elf.iter_segments() if s["p_type"] == "PT_GNU_RELRO")
        assert [(s.vaddr, s.memsz) for s in p.segments] == [
            (s["p_vaddr"], s["p_memsz"]) for s in loads]
        text = next(s for s in p.segments if s.prot & 4)
        assert text.prot == 1 | 4
        assert any(s.prot == 1 | 2 for s in p.segments)
        start = relro["p_vaddr"] & ~0xFFF
        end = (relro["p_vaddr"] + relro["p_memsz"]) & ~0xFFF
        assert p.relro == [(start, end - start)]
    assert p.span[0] == 0 and p.span[1] % 4096 == 0
    assert p.span[1] >= max(s.vaddr + s.memsz for s in p.segments)


def test_to_dict_is_json(full):
    _, p = full
    d = json.loads(json.dumps(p.to_dict()))
    assert {r["target"] for r in d["replaces"]} == {"compute", "main:report"}
    assert d["wraps"][0]["func_name"] == "compute_wrap"
    assert d["wraps"][0]["orig_ptr_name"] == "compute_orig"
    assert d["symbols"][0]["target"] == "main:counter"
    assert d["pins"][0]["object"] == "libdemo.so"
    assert {"name": "memcpy", "version": "GLIBC_2.14", "weak": False} in d["imports"]
    assert d["sha256"] == p.sha256 and d["size"] == p.size


def test_from_bytes_uses_only_given_bytes(full, tmp_path):
    so, p = full
    data = so.read_bytes()
    q = PatchFile.from_bytes(data, "elsewhere.so")
    assert q.replacements == p.replacements and q.sha256 == p.sha256
    assert q.name == "elsewhere.so"


# --- header type checks are compile errors -----------------------------------
@pytest.mark.parametrize("body, message", [
    ("static int w(int x){return x;} static long (*o)(int); HOTPATCH_WRAP(\"f\", w, o);",
     "must be a non-const pointer to a function of the same type"),
    ("static int w(int x){return x;} static int (*const o)(int); HOTPATCH_WRAP(\"f\", w, o);",
     "must be a non-const pointer"),
    ("static int (*fp)(int); HOTPATCH_REPLACE(\"f\", fp);", "must be a function"),
    ("static int arr[4]; HOTPATCH_SYMBOL(\"main:x\", arr);", "must be a non-const pointer variable"),
    ("static const char *t = \"f\"; static int g(void){return 0;} HOTPATCH_REPLACE(t, g);", "error"),
    ("HOTPATCH_BUILD_ID(\"libx.so\", \"\");", "empty build-id"),
])
def test_header_rejects_mistakes_at_compile_time(tmp_path, body, message):
    proc = build(tmp_path, f"#include <hotpatch.h>\n{body}\n", check=False)
    assert proc.returncode != 0
    assert message in proc.stderr


# --- refusals --------------------------------------------------------------------
def expect(exc, path_or_data, *words):
    with pytest.raises(exc) as info:
        if isinstance(path_or_data, bytes):
            PatchFile.from_bytes(path_or_data, "fix.so")
        else:
            load_patch(str(path_or_data))
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


MINIMAL = '#include <hotpatch.h>\nstatic int f2(int x){return x+1;}\nHOTPATCH_REPLACE("f", f2);\n'


def test_refuses_tls(tmp_path):
    so = build(tmp_path, MINIMAL + "static __thread int t;\nint g(void){ return ++t; }\n"
               'HOTPATCH_REPLACE("g", g);\n')
    expect(UnsupportedPatch, so, "thread-local")


def test_refuses_constructor_and_destructor(tmp_path):
    so = build(tmp_path, MINIMAL + "int seen;\n__attribute__((constructor)) static void init(void){ seen = 1; }\n")
    expect(UnsupportedPatch, so, "constructor", "init")
    so = build(tmp_path, MINIMAL + "int seen;\n__attribute__((destructor)) static void fini(void){ seen = 2; }\n", "d")
    expect(UnsupportedPatch, so, "destructor", "fini")


def test_tolerates_crt_boilerplate_without_nostartfiles(tmp_path):
    flags = [f for f in shlex.split(cflags()) if f != "-nostartfiles"]
    so = build(tmp_path, MINIMAL, flags=flags)
    with open(so, "rb") as f:  # the test must really have the crt entries
        tags = {t.entry.d_tag for t in ELFFile(f).get_section_by_name(".dynamic").iter_tags()}
    assert {"DT_INIT", "DT_INIT_ARRAY", "DT_FINI_ARRAY"} <= tags
    p = load_patch(str(so))
    assert [r.target for r in p.replacements] == ["f"]
    assert any(i.name == "__cxa_finalize" and i.weak for i in p.imports)


def test_refuses_ifunc_in_patch(tmp_path):
    src = MINIMAL + ("static int impl(void){return 1;}\n"
                     "static int (*resolve(void))(void){ return impl; }\n"
                     "int pick(void) __attribute__((ifunc(\"resolve\")));\n"
                     "int use(void){ return pick(); }\nHOTPATCH_REPLACE(\"use\", use);\n")
    expect(UnsupportedPatch, build(tmp_path, src), "ifunc")


def test_refuses_non_elf_empty_truncated(tmp_path, full):
    so, _ = full
    expect(BadPatchFile, b"", "empty")
    expect(BadPatchFile, b"#!/bin/sh\necho hi\n", "not an ELF file")
    expect(BadPatchFile, tmp_path / "missing.so", "cannot read")
    data = so.read_bytes()
    for cut in (10, 63, 200, len(data) // 2, len(data) - 100):
        expect(BadPatchFile, data[:cut])


def test_refuses_so_without_manifest(tmp_path):
    so = build(tmp_path, "int plain(int x){ return x; }\n")
    expect(BadPatchFile, so, "not a hotpatch patch", "hotpatch.h")


def test_refuses_executable(tmp_path):
    c = tmp_path / "prog.c"
    c.write_text("int main(void){ return 0; }\n")
    exe = tmp_path / "prog"
    subprocess.run(["gcc", "-no-pie", "-o", str(exe), str(c)], check=True)
    expect(BadPatchFile, exe, "not a hotpatch patch (a program")  # issue #15: named first


def test_refuses_duplicates_and_bad_build_id(tmp_path):
    dup = MINIMAL + 'static int f3(int x){return x;}\nHOTPATCH_REPLACE("f", f3);\n'
    expect(BadPatchFile, build(tmp_path, dup), "'f' appears twice")
    badhex = MINIMAL + 'HOTPATCH_BUILD_ID("libc.so.6", "xyz1");\n'
    expect(BadPatchFile, build(tmp_path, badhex, "h"), "hex digits")
    badtarget = MINIMAL + 'static int f4(int x){return x;}\nHOTPATCH_REPLACE("a:b:c", f4);\n'
    expect(BadPatchFile, build(tmp_path, badtarget, "t"), "'a:b:c'", "object:symbol")
    space = MINIMAL + 'static int f5(int x){return x;}\nHOTPATCH_REPLACE("main: x", f5);\n'
    expect(BadPatchFile, build(tmp_path, space, "s"), "whitespace")


# --- byte-level mutations of a good patch ------------------------------------------
def _layout(data: bytes):
    with_f = ELFFile(__import__("io").BytesIO(data))
    hp = with_f.get_section_by_name(".hotpatch")
    rela = with_f.get_section_by_name(".rela.dyn")
    relocs = [(i, r) for i, r in enumerate(rela.iter_relocations())]
    return hp, rela, relocs


def test_mutated_manifest_and_relocations(full):
    so, _ = full
    data = bytearray(so.read_bytes())
    hp, rela, relocs = _layout(bytes(data))
    off = hp["sh_offset"]

    bad = bytearray(data)
    struct.pack_into("<I", bad, off, 0xDEADBEEF)
    expect(BadPatchFile, bytes(bad), "bad magic")
    bad = bytearray(data)
    struct.pack_into("<H", bad, off + 4, 9)
    expect(BadPatchFile, bytes(bad), "version 9")
    bad = bytearray(data)
    struct.pack_into("<H", bad, off + 6, 77)
    expect(BadPatchFile, bytes(bad), "unknown kind 77")

    # The relocation that gives record 0 its target pointer, turned into R_NONE.
    target_slot = hp["sh_addr"] + 8
    idx = next(i for i, r in relocs if r["r_offset"] == target_slot)
    entry = rela["sh_offset"] + idx * rela["sh_entsize"]
    bad = bytearray(data)
    struct.pack_into("<Q", bad, entry + 8, 0)  # r_info: sym 0, type R_X86_64_NONE
    expect(BadPatchFile, bytes(bad), "no relocation")

    # Same entry as R_X86_64_32 (10): a text relocation we do not support.
    bad = bytearray(data)
    struct.pack_into("<Q", bad, entry + 8, 10)
    expect(UnsupportedPatch, bytes(bad), "R_X86_64_32")
    bad = bytearray(data)
    struct.pack_into("<Q", bad, entry + 8, 37)
    expect(UnsupportedPatch, bytes(bad), "IRELATIVE")
    bad = bytearray(data)
    struct.pack_into("<Q", bad, entry + 8, 18)  # R_X86_64_TPOFF64
    expect(UnsupportedPatch, bytes(bad), "thread-local")

    # Relocation place pointing far outside the image.
    bad = bytearray(data)
    struct.pack_into("<Q", bad, entry, 0x7FFF0000)
    expect(BadPatchFile, bytes(bad), "outside every loadable segment")


def test_random_mutations_never_escape(full):
    """Fuzz-lite: flip bytes in headers, tables and relocations; every outcome
    is a parsed patch or a one-line HotpatchError."""
    so, _ = full
    data = so.read_bytes()
    hp, rela, _ = _layout(data)
    with open(so, "rb") as f:
        elf = ELFFile(f)
        shoff = elf.header["e_shoff"]
        dynsym = elf.get_section_by_name(".dynsym")
        regions = [(0, 64), (64, 64 + 56 * elf.header["e_phnum"]),
                   (shoff, len(data) - shoff),
                   (rela["sh_offset"], rela["sh_size"]),
                   (dynsym["sh_offset"], dynsym["sh_size"]),
                   (hp["sh_offset"], hp["sh_size"])]
    rng = random.Random(1234)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(400):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            start, size = rng.choice(regions)
            pos = start + rng.randrange(size)
            buf[pos] = rng.choice((0, 0xFF, rng.randrange(256), buf[pos] ^ (1 << rng.randrange(8))))
        try:
            PatchFile.from_bytes(bytes(buf), "fuzz.so")
            outcomes["ok"] += 1
        except HotpatchError as e:
            assert "\n" not in str(e) and str(e)
            assert isinstance(e, (BadPatchFile, UnsupportedPatch)), repr(e)
            outcomes["error"] += 1
    assert outcomes["error"] > 50  # the mutations really hit something


def test_record_layout_matches_header():
    assert RECORD.size == 32
    hdr = (include_dir() / "hotpatch.h").read_text()
    assert "0x43545048u" in hdr and "HOTPATCH_VERSION 1" in hdr


def test_header_is_pedantic_clean(tmp_path):
    flags = ["-Wall", "-Wextra", "-pedantic", "-std=c11", "-Werror", *shlex.split(cflags())]
    so = build(tmp_path, FULL_PATCH, flags=flags)
    assert len(load_patch(str(so)).replacements) == 3


def test_packed_relative_relocs_give_same_manifest(tmp_path, full):
    """-z pack-relative-relocs moves RELATIVE relocs to DT_RELR (addend in place)."""
    _, plain = full
    so = build(tmp_path, FULL_PATCH, flags=[*shlex.split(cflags()), "-Wl,-z,pack-relative-relocs"])
    with open(so, "rb") as f:
        assert ELFFile(f).get_section_by_name(".relr.dyn") is not None
    p = load_patch(str(so))
    strip = lambda rs: sorted((r.target, r.kind) for r in rs)  # noqa: E731
    assert strip(p.replacements) == strip(plain.replacements)
    assert [s.target for s in p.symbol_refs] == ["main:counter"]
    assert p.pins == plain.pins
