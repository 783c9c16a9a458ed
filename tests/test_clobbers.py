"""clobbers.py and the register-preserving thunk, on hand-made code
(the end-to-end -fipa-ra case is in test_compiler_abi.py)."""
from __future__ import annotations

from ksplice_py import clobbers, x86writer as w
from ksplice_py.x86relocator import disasm

# mov ecx, 1; syscall; ret
SYSCALL_LEAF = bytes.fromhex("b901000000" "0f05" "c3")
# lea eax, [rdi+rdi*2]; ret
LEAF = bytes.fromhex("8d047f" "c3")


def test_preserved_by_a_leaf_and_its_callees():
    code = {0x1000: LEAF, 0x2000: bytes.fromhex("e8fbefffff" "c3")}  # call 0x1000; ret
    extent = lambda a: next(((s, c) for s, c in code.items() if s <= a < s + len(c)), None)  # noqa: E731
    kept = clobbers.preserved_by(0x2000, extent, lambda a: False)
    assert "rax" not in kept and {"rcx", "rdx", "rsi", "rdi", "xmm0"} <= kept
    # syscall writes rcx, r11 and rax, though capstone does not say so
    code[0x1000] = SYSCALL_LEAF
    kept = clobbers.preserved_by(0x2000, extent, lambda a: False)
    assert not {"rax", "rcx", "r11"} & kept and "rdx" in kept
    # a call through the PLT or a pointer: gcc assumed everything clobbered
    assert clobbers.preserved_by(0x2000, extent, lambda a: a == 0x1000) == frozenset()
    code[0x2000] = bytes.fromhex("ffd0" "c3")  # call rax; ret
    assert clobbers.preserved_by(0x2000, extent, lambda a: False) == frozenset()


def test_written_by_follows_calls_and_gives_up_on_what_it_cannot_follow():
    code = bytes.fromhex("e804000000" "c3" "cccccc" "31d2" "c3")  # call +4 -> xor edx,edx; ret
    read = lambda a, n: code[a - 0x100:a - 0x100 + n]  # noqa: E731
    assert clobbers.written_by(0x100, read, (0x100, 0x100 + len(code))) == {"rdx"}
    jmp_ptr = bytes.fromhex("ff2500000000")  # jmp [rip]: a PLT entry
    read = lambda a, n: jmp_ptr[a - 0x100:a - 0x100 + n]  # noqa: E731
    assert clobbers.written_by(0x100, read, (0x100, 0x106)) == clobbers.CALL_CLOBBERED


def test_stack_arguments_seen_through_pushes_and_frame_pointer():
    assert clobbers.takes_stack_arguments(LEAF, 0x1000) is None
    # push rbx; mov eax, [rsp+0x10]  (= entry rsp + 8: the first stack argument)
    assert clobbers.takes_stack_arguments(bytes.fromhex("53" "8b442410" "5b" "c3"), 0) is not None
    # push rbx; mov eax, [rsp+8] (the return address's slot is not an argument)... then ret
    assert clobbers.takes_stack_arguments(bytes.fromhex("53" "8b442408" "5b" "c3"), 0) is None
    # push rbp; mov rbp, rsp; mov eax, [rbp+0x10]; pop rbp; ret
    assert clobbers.takes_stack_arguments(bytes.fromhex("55" "4889e5" "8b4510" "5d" "c3"), 0) is not None
    # and rsp, -16: not tracked, so not claimed safe
    assert clobbers.takes_stack_arguments(bytes.fromhex("4883e4f0" "c3"), 0) is not None


def test_thunk_saves_calls_restores_and_keeps_alignment():
    for gprs in (["rcx"], ["rcx", "rdx"], list(clobbers.GPRS)):
        xmms = [1, 9, 15]
        code = w.preserving_thunk(0x10000, 0x20000, gprs, xmms)
        assert len(code) <= w.preserving_thunk_bound(len(gprs), len(xmms))
        insns = disasm(code, 0x10000)
        assert sum(i.size for i in insns) == len(code)
        texts = [f"{i.mnemonic} {i.op_str}".strip() for i in insns]
        assert texts[:len(gprs)] == [f"push {r}" for r in gprs]
        assert texts[-len(gprs) - 1:] == [f"pop {r}" for r in reversed(gprs)] + ["ret"]
        assert "call 0x20000" in texts
        assert sum("movdqu xmmword ptr [rsp" in t for t in texts) == len(xmms)
        # entry rsp = 8 (mod 16) after the caller's call; at our call it must be 0
        area = next(-i.operands[1].imm for i in insns if i.mnemonic == "add")
        assert (8 - 8 * len(gprs) - area) % 16 == 0
    far = w.preserving_thunk(0x10000, 0x7FFF_0000_0000, ["rcx"], [])
    assert any(i.mnemonic == "call" and "rip" in i.op_str for i in disasm(far, 0x10000))
