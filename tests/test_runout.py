"""Unit tests of the run-out copy's planning (ksplice_py/runout.py): what is
copied, how a register-preserving thunk's call and return are followed,
and the area an edition reserves. The copy in action: tests/test_hot.py."""
from __future__ import annotations

from ksplice_py import runout
from ksplice_py import x86writer as w
from ksplice_py.quiescence import CodeRange

THUNK, NEW = 0x10000, 0x20000
LEAF = bytes.fromhex("8d047f" "c3")  # lea eax,[rdi+rdi*2]; ret


def thunk_and_leaf() -> list[tuple[int, bytes]]:
    return [(THUNK, w.preserving_thunk(THUNK, NEW, ["rdi"], [])), (NEW, LEAF)]


def test_a_call_between_copied_functions_is_followed_and_returns_come_back():
    code = thunk_and_leaf()
    retired = [CodeRange(THUNK, THUNK + 0x100, "thunk"), CodeRange(NEW, NEW + 0x100, "new")]
    plan = runout.Builder(code, retired, 0x30000).plan()
    kinds = {s.orig: s for s in plan.stubs}
    call_at = THUNK + 1  # after push rdi (no xmm area: no rsp adjustment)
    assert kinds[call_at].kind is runout.Stub.CALL
    assert kinds[call_at].dest == NEW and kinds[call_at].ret == call_at + w.CALL_REL32_LEN
    assert kinds[call_at].resume == call_at  # a killed tool's thread re-runs the original call
    rets = [s for s in plan.stubs if s.kind is runout.Stub.EXIT and not s.dest]
    assert {s.orig for s in rets} == {NEW + 3, THUNK + 1 + w.CALL_REL32_LEN + 1}


def test_a_call_out_of_the_copied_code_is_a_barrier():
    code = [(NEW, w.call_rel32(NEW, 0x50000) + b"\xc3")]
    plan = runout.Builder(code, [CodeRange(NEW, NEW + 0x10, "new")], 0x30000).plan()
    assert plan.stubs[0].kind is runout.Stub.BARRIER and plan.stubs[0].resume == NEW


def test_padding_is_not_copied():
    insns = runout.decode(LEAF + bytes(64) + b"\xcc" * 8 + LEAF, NEW)
    kept = runout.drop_padding(insns)
    assert [i.raw for i in kept] == [bytes.fromhex("8d047f"), b"\xc3"] * 2
    short = runout.decode(LEAF + b"\xcc" * 3 + LEAF, NEW)  # a few int3 may be code: kept
    assert len(runout.drop_padding(short)) == len(short)


def test_the_area_fits_either_direction_and_gives_up_on_huge_code():
    originals = [(0x40000, LEAF * 4)]
    new = thunk_and_leaf() + [(0x21000, bytes(4000))]  # an unused page tail is not copied
    size = runout.area_size(originals, new, trampolines=1)
    assert size % 4096 == 0 and 0 < size <= 4 * 4096
    for direction in (originals, new):
        plan = runout.Builder(direction, [], 0x30000).plan()
        assert len(plan.code) <= size
    huge = [(0x40000, LEAF * 40000)]
    assert runout.area_size(huge, [], 0) == 0


def test_a_revert_copies_its_code_but_not_the_area():
    ranges = [CodeRange(0x1000, 0x9000, "edition 1")]
    assert runout.without(ranges, (0x8000, 0x1000)) == [CodeRange(0x1000, 0x8000, "edition 1")]
    assert runout.without(ranges, (0x2000, 0x1000)) == [CodeRange(0x1000, 0x2000, "edition 1"),
                                                        CodeRange(0x3000, 0x9000, "edition 1")]
    assert runout.without(ranges, None) == ranges
