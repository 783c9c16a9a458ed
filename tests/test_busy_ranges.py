"""Unit tests of the busy-range (stacking) rules, quiescence.patch_ranges and
unpatch_ranges: which code a thread must not be in for a cutover or a revert,
with and without an earlier edition below. Pure: no target."""
from __future__ import annotations

from ksplice_py import editions as ed
from ksplice_py import quiescence as q
from ksplice_py import x86writer as w
from ksplice_py.lifecycle import State
from ksplice_py.quiescence import CodeRange

FUNC = 0x5555_0000_1000
ED1 = 0x5555_4000_0000  # an earlier edition's region (near the text)
ED2 = 0x5555_5000_0000


def switch(addr: int = FUNC, size: int = 40, old: bytes = b"\x55\x48\x89\xe5\x90",
           new_dest: int = ED2 + 0x1000) -> ed.FunctionSwitch:
    return ed.FunctionSwitch(target="compute", symbol="main:compute", kind="replace", addr=addr,
                             size=size, new_addr=new_dest, old_bytes=old.hex(),
                             new_bytes=w.jmp_rel32(addr, new_dest).hex())


def edition(eid: int, start: int, functions: list[ed.FunctionSwitch]) -> ed.Edition:
    return ed.Edition(id=eid, patch=f"p{eid}.so", sha256="", state=State.APPLIED,
                      functions=functions, regions=[(start, 0x4000), (start + 0x10_0000, 0x1000)])


def no_parts(f: ed.FunctionSwitch) -> list[CodeRange]:
    return []


def spans(ranges: list[CodeRange]) -> list[tuple[int, int]]:
    return [(r.start, r.end) for r in ranges]


def test_first_patch_retires_the_whole_original_function():
    assert spans(q.patch_ranges([switch()], [], no_parts)) == [(FUNC, FUNC + 40)]


def test_a_function_shorter_than_its_trampoline_still_covers_the_overwritten_bytes():
    (r,) = q.patch_ranges([switch(size=2)], [], no_parts)
    assert (r.start, r.end) == (FUNC, FUNC + 5)


def test_split_parts_count_too():
    cold = CodeRange(FUNC + 0x9000, FUNC + 0x9040, "main:compute.cold")
    got = q.patch_ranges([switch()], [], lambda f: [cold])
    assert spans(got) == [(FUNC, FUNC + 40), (cold.start, cold.end)]


def test_stacking_retires_the_edition_below():
    below = edition(1, ED1, [])
    # the function is already redirected into edition 1: its current first
    # bytes are edition 1's trampoline
    f = switch(old=w.jmp_rel32(FUNC, ED1 + 0x1000))
    got = q.patch_ranges([f], [below], no_parts)
    assert spans(got) == [(FUNC, FUNC + 40), (ED1, ED1 + 0x4000), (ED1 + 0x10_0000, ED1 + 0x10_1000)]
    assert {r.name for r in got} == {"main:compute", "edition 1"}


def test_a_jump_elsewhere_is_no_edition():
    other = edition(1, ED1, [])
    f = switch(old=w.jmp_rel32(FUNC, FUNC + 0x800))  # the program's own jmp
    assert spans(q.patch_ranges([f], [other], no_parts)) == [(FUNC, FUNC + 40)]


def test_revert_retires_its_memory_and_the_trampolines():
    e = edition(2, ED2, [switch(), switch(addr=FUNC + 0x100)])
    got = q.unpatch_ranges(e, e.functions)
    assert spans(got) == [(FUNC, FUNC + 5), (FUNC + 0x100, FUNC + 0x105),
                          (ED2, ED2 + 0x4000), (ED2 + 0x10_0000, ED2 + 0x10_1000)]


def test_redirected_to_and_owner():
    e1, e2 = edition(1, ED1, []), edition(2, ED2, [])
    assert q.owner_edition(ED2 + 0x10_0800, [e1, e2]) is e2
    assert q.owner_edition(ED2 + 0x4000, [e1, e2]) is None  # one past the end
    assert q.redirected_to(FUNC, w.jmp_rel32(FUNC, ED1 + 8), [e1, e2]) is e1
    assert q.redirected_to(FUNC, b"\x55\x48\x89\xe5", [e1, e2]) is None


def test_busy_ranges_drops_empty_and_sorts():
    a, b, empty = CodeRange(30, 40, "a"), CodeRange(10, 20, "b"), CodeRange(50, 50, "e")
    assert q.busy_ranges([a, empty], [b]) == [b, a]


def test_frames_are_safe_uses_return_address_minus_one():
    ranges = [CodeRange(100, 200, "f")]
    assert not q.frames_are_safe([150], ranges)  # frame 0: its pc as is
    assert q.frames_are_safe([300, 100], ranges)  # returns to 100: the call was before f
    assert not q.frames_are_safe([300, 200], ranges)  # returns just past f: a call that ends f


def test_verdicts_are_the_c_helpers_own():
    from ksplice_py import native
    _, lib = native.load()
    for v in q.Verdict:
        assert getattr(lib, f"KP_{v.name}") == v, v
