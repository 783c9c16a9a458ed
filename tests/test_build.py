"""`hotpatch build` (issue #14): live patches from source diffs, checked on
real running processes of a small multi-file Makefile project
(tests/buildproj: counter.c holds state — a global struct, an initialized
global, file statics, a static local —, util.c a static with the same name as
one in counter.c, main.c a command loop, stamp.S assembly).

Every patch is built with the real CLI from a copy of the tree, applied to a
running `prog` with the real CLI, and its effect observed through the
program's own answers."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from conftest import assert_ok, describe, run_hotpatch
from ksplice_py import loader
from ksplice_py.errors import BadPatchFile, UnsupportedPatch
from ksplice_py.patchfile import PatchFile

PROJECT = Path(__file__).resolve().parent / "buildproj"
FIXES = PROJECT / "fixes"
LIBPROJECT = Path(__file__).resolve().parent / "buildlib"

pytestmark = pytest.mark.skipif(shutil.which("make") is None or shutil.which("patch") is None,
                                reason="hotpatch build tests need make and patch (apt-get install make patch)")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """The project, built the ordinary way (no extra flags): what 'runs'."""
    root = tmp_path_factory.mktemp("buildproj") / "src"
    shutil.copytree(PROJECT, root, ignore=shutil.ignore_patterns("fixes"))
    cp = subprocess.run(["make", "-s"], cwd=root, capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    return root


class Prog:
    """A running prog: one command per line in, one answer per line out."""

    def __init__(self, binary: Path) -> None:
        self.proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.pid = self.proc.pid

    def __call__(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def more(self) -> str:
        """The next line of a multi-line answer."""
        return self.proc.stdout.readline().strip()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def prog(tree):
    started: list[Prog] = []

    def start(binary: Path | None = None) -> Prog:
        p = Prog(binary or tree / "prog")
        started.append(p)
        return p
    yield start
    for p in started:
        p.stop()


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def build(tree: Path, fix: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_hotpatch("build", "--src", tree, "--diff", FIXES / fix, "--object", "prog",
                        "-o", out, "--json", *extra, timeout=300)


def built(tree: Path, fix: str, tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / (Path(fix).stem + ".so")
    cp = build(tree, fix, out)
    assert_ok(cp)
    return out, json.loads(cp.stdout)


def apply(pid: int, patch: Path) -> None:
    assert_ok(run_hotpatch("apply", pid, patch))


def build_id(binary: Path) -> str:
    out = subprocess.run(["readelf", "-n", str(binary)], capture_output=True, text=True).stdout
    return out.split("Build ID:")[1].split()[0]


# --- fixes that become live patches ------------------------------------------

def test_fix_using_statics_updates_the_running_programs_state(tree, prog, tmp_path):
    """bump() uses a global struct, an initialized global, file statics, a
    static local and a same-named static helper: after the patch, the
    running program's own variables are the ones updated (an unchanged
    function, describe(), reads them), and the helper reached is
    counter.c's, not util.c's."""
    before = tree_digest(tree)
    patch, report = built(tree, "statics.diff", tmp_path)
    assert tree_digest(tree) == before, "hotpatch build modified the source tree"
    assert [r["function"] for r in report["replaced"]] == ["bump"]
    assert report["object"] == "main" and report["build_id"] == build_id(tree / "prog")

    p = prog()
    assert p("bump 3") == "2" and p("bump 4") == "3"
    assert p("describe") == "hits=2 total=7 calls=2 h=4"
    assert_ok(run_hotpatch("check", p.pid, patch))
    apply(p.pid, patch)
    # new code: total grows by 2*5; helper(calls) = calls+1 is counter.c's helper (util.c's is x*100)
    assert p("bump 5") == "4"
    assert p("describe") == "hits=3 total=17 calls=3 h=5"
    assert p("bump 1") == "5"
    assert p("describe") == "hits=4 total=19 calls=4 h=1"
    info = run_hotpatch("info", "--json", patch)
    assert_ok(info)
    d = json.loads(info.stdout)
    assert [r["target"] for r in d["replaces"]] == ["main:bump"]
    assert d["pins"] == [{"object": "main", "build_id": build_id(tree / "prog")}]
    assert {b["target"] for b in d["binds"]} >= {"main:tally", "main:calls", "main:seq.0", "main:limit"}
    assert_ok(run_hotpatch("revert", p.pid))
    assert p("bump 5") == "6" and p("describe") == "hits=5 total=24 calls=5 h=5"


def test_fix_to_an_inlined_helper_replaces_its_callers(tree, prog, tmp_path):
    patch, report = built(tree, "inline_helper.diff", tmp_path)
    assert report["replaced"] == []
    assert [(r["function"], r["why"]) for r in report["inlined"]] == [("compute", "scale inlined into it")]
    assert report["inline_only"] == {"scale": ["compute"]}
    p = prog()
    assert p("compute 5") == "13"
    apply(p.pid, patch)
    assert p("compute 5") == "18"


def test_new_function_and_new_string(tree, prog, tmp_path):
    patch, report = built(tree, "new_function.diff", tmp_path)
    assert [r["function"] for r in report["replaced"]] == ["util_name"]
    assert [r["function"] for r in report["added"]] == ["util_version"]
    p = prog()
    assert p("name") == "util v1"
    apply(p.pid, patch)
    assert p("name") == "util v2 (patched)"


def test_same_named_static_is_reached_through_its_callers(tree, prog, tmp_path):
    """util.c's helper shares its name with counter.c's: it cannot be named
    as a target, so it travels as new code and util_mix (its caller) is
    replaced; counter.c's helper is untouched."""
    patch, report = built(tree, "same_name_static.diff", tmp_path)
    assert [r["function"] for r in report["replaced"]] == ["util_mix"]
    assert [r["function"] for r in report["added"]] == ["helper"]
    p = prog()
    assert p("mix 2") == "207" and p("bump 1") == "2"
    apply(p.pid, patch)
    assert p("mix 2") == "2007" and p("bump 1") == "3"


def test_changed_compiler_clone_is_added_and_its_callers_replaced(tree, prog, tmp_path):
    """weigh() runs as weigh.constprop.0 (k == 3 folded in: its own calling
    convention): the new clone travels as new code, util_weigh is replaced."""
    patch, report = built(tree, "clone.diff", tmp_path)
    assert [r["function"] for r in report["replaced"]] == ["util_weigh"]
    assert [r["function"] for r in report["added"]] == ["weigh.constprop.0"]
    p = prog()
    assert p("weigh 2") == "17"  # (2*3+1) + (3*3+1)
    apply(p.pid, patch)
    assert p("weigh 2") == "27"  # (2*3+6) + (3*3+6)


def test_renumbered_static_local_still_binds_to_the_running_one(tree, prog, tmp_path):
    """A new function with a static local before bump(): gcc renumbers
    bump's `seq.0` to `seq.1`. bump is not changed for that, and the new
    function's own static local is new state."""
    patch, report = built(tree, "static_local.diff", tmp_path)
    assert [r["function"] for r in report["replaced"]] == ["describe"]
    assert [r["function"] for r in report["added"]] == ["asked"]
    assert report["new_data"] == [{"name": "times.0", "file": "counter.c", "kind": "variable"}]
    p = prog()
    assert p("bump 2") == "2"
    apply(p.pid, patch)
    assert p("describe") == "hits=1 total=2 calls=1 h=2 asked=1"
    assert p("bump 3") == "3"
    assert p("describe") == "hits=2 total=5 calls=2 h=3 asked=2"


def test_switch_tables_and_cold_parts(tree, prog, tmp_path):
    """grade() reads a switch lookup table (CSWTCH.N, a local constant): the
    new table travels and grade is replaced; word() has a jump table and a
    .cold part, which travel with it."""
    patch, report = built(tree, "switch_tables.diff", tmp_path)
    replaced = {r["function"]: r["why"] for r in report["replaced"]}
    assert set(replaced) == {"grade", "word"}
    assert "a constant that changed" in replaced["grade"]
    assert [r["function"] for r in report["added"]] == ["word.cold"]
    assert [(d["name"].split(".")[0], d["kind"]) for d in report["new_data"]] == [("CSWTCH", "constant")]
    p = prog()
    assert p("grade 4") == "four" and p.more() == "51 e"
    apply(p.pid, patch)
    assert p("grade 4") == "four" and p.more() == "99 e"
    assert p("grade 5") == "FIVE" and p.more() == "68 F"
    assert p("grade 9") == "-1 z"


def test_shared_library(tmp_path):
    """RELPATH is a library: its globals are reached through the GOT, so the
    patch fills its own slots (HOTPATCH_SYMBOL) and binds statics and
    calls (Bind32) to the running library; foo_get, unchanged, reads the
    state the patched foo_add wrote."""
    root = tmp_path / "lib"
    shutil.copytree(LIBPROJECT, root, ignore=shutil.ignore_patterns("fixes"))
    cp = subprocess.run(["make", "-s"], cwd=root, capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    out = tmp_path / "fix.so"
    cp = run_hotpatch("build", "--src", root, "--diff", LIBPROJECT / "fixes" / "shared_total.diff",
                      "--object", "libfoo.so", "-o", out, "--json", timeout=300)
    assert_ok(cp)
    assert json.loads(cp.stdout)["object"] == "libfoo.so"
    d = PatchFile.from_bytes(Path(out).read_bytes(), str(out))
    assert [r.target for r in d.replacements] == ["libfoo.so:foo_add"]
    assert [s.target for s in d.symbol_refs] == ["libfoo.so:shared_total"]
    p = Prog(root / "prog")
    try:
        assert p("a 1") == "8" and p("g") == "8001"
        apply(p.pid, out)
        assert p("a 1") == "20" and p("g") == "20002"
    finally:
        p.stop()


def test_cli_text_output_and_default_output_path(tree, tmp_path):
    diff = tmp_path / "fix.diff"
    shutil.copy(FIXES / "new_function.diff", diff)
    cp = run_hotpatch("build", "--src", tree, "--diff", diff, "--object", "prog", timeout=300)
    assert_ok(cp)
    assert (tmp_path / "fix.so").is_file()
    assert "replaces  util_name" in cp.stdout and "adds      util_version" in cp.stdout


# --- refusals -------------------------------------------------------------------

@pytest.mark.parametrize("fix, reason", [
    ("refuse_init_value.diff", "the initial value of limit changed"),
    ("refuse_layout.diff", "struct tally changed layout (size 8 -> 12)"),
    ("refuse_assembly.diff", "stamp.S: assembly changed"),
    ("refuse_inlined_into_main.diff", "parse_arg changed and the running program inlined it into main, "
                                      "which cannot be replaced"),
])
def test_refusals(tree, tmp_path, fix, reason):
    out = tmp_path / "out.so"
    cp = build(tree, fix, out)
    assert cp.returncode == 4, describe(cp)
    lines = cp.stderr.strip().splitlines()
    assert lines[0] == "hotpatch: the diff cannot become a live patch:"
    assert any(reason in line for line in lines[1:]), cp.stderr
    assert json.loads(cp.stdout)["exit_code"] == 4
    assert not out.exists()


def test_before_build_must_reproduce_the_running_binary(tree, tmp_path):
    """--binary built with other flags: the "before" build cannot match it."""
    other = tmp_path / "other"
    shutil.copytree(tree, other)
    cp = subprocess.run(["make", "-s", "-B", "CFLAGS=-O1"], cwd=other, capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    cp = build(tree, "statics.diff", tmp_path / "out.so", "--binary", other / "prog")
    assert cp.returncode == 4, describe(cp)
    assert "the build before the diff does not reproduce bump in prog" in cp.stderr


# --- bad input ------------------------------------------------------------------

def test_bad_input(tree, tmp_path):
    cp = run_hotpatch("build", "--src", tmp_path / "nope", "--diff", FIXES / "statics.diff", "--object", "prog")
    assert cp.returncode == 2 and "no such directory" in cp.stderr, describe(cp)

    bad = tmp_path / "bad.diff"
    bad.write_text((FIXES / "statics.diff").read_text().replace("tally.total += by;", "tally.total -= by;"))
    cp = run_hotpatch("build", "--src", tree, "--diff", bad, "--object", "prog", timeout=120)
    assert cp.returncode == 2 and "does not apply" in cp.stderr, describe(cp)

    broken = tmp_path / "broken.diff"
    broken.write_text((FIXES / "statics.diff").read_text().replace("+    tally.total += 2 * by;",
                                                                   "+    tally.total += 2 * by"))
    cp = run_hotpatch("build", "--src", tree, "--diff", broken, "--object", "prog", timeout=300)
    assert cp.returncode == 2, describe(cp)
    assert "the after build ('make') failed" in cp.stderr and "error" in cp.stderr.split("\n", 1)[1]
    assert "Traceback" not in cp.stderr


# --- the Bind32 record ------------------------------------------------------------

def test_bind32_is_range_checked_and_validated(tree, tmp_path):
    """The loader refuses a bind whose target is beyond +-2 GiB; the parser
    refuses a bind place that a dynamic relocation also writes."""
    patch, _ = built(tree, "statics.diff", tmp_path)
    p = PatchFile.from_bytes(Path(patch).read_bytes(), str(patch))
    assert p.binds
    targets = {b.target: 0x7F0000000000 for b in p.binds}
    img = loader.link(p, 0x7F0000100000, lambda imp: 0x7F0000200000, targets)
    b = p.binds[0]
    seg = next(s for s in p.segments if s.vaddr <= b.place < s.vaddr + s.memsz)
    written = dict(img.writes)[img.addr(seg.vaddr)]
    disp = struct.unpack_from("<i", written, b.place - seg.vaddr)[0]
    assert disp == 0x7F0000000000 + b.addend - img.addr(b.place)
    with pytest.raises(UnsupportedPatch, match="out of 32-bit reach"):
        loader.link(p, 0x7F0000100000, lambda imp: 0, {**targets, b.target: 0x100000})
    data = bytearray(patch.read_bytes())
    rel = next(r for r in p.relocs if r.type == 8)  # a RELATIVE reloc of the manifest
    # point the first bind's place at a relocated word: refused at parse time
    raw = bytes(data)
    needle = struct.pack("<Q", b.place)
    assert raw.count(needle) >= 1
    at = next(i for i in range(len(raw) - 7) if raw[i:i + 8] == needle and _is_rela_addend(p, raw, i))
    data[at:at + 8] = struct.pack("<Q", rel.offset)
    with pytest.raises(BadPatchFile, match="overlaps a dynamic relocation"):
        PatchFile.from_bytes(bytes(data), "mutant.so")


def _is_rela_addend(p: PatchFile, raw: bytes, i: int) -> bool:
    """raw[i:i+8] is the addend field of a RELATIVE entry in .rela.dyn."""
    return i >= 16 and struct.unpack_from("<Q", raw, i - 8)[0] & 0xFFFFFFFF == 8
