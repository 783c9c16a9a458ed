"""Run inside gdb: the do-it-by-hand hot patch people reach for with gdb.

    gdb -nx -batch -p PID -ex 'py LIB="/abs/peer.so"; FUNC="compute"; NEW="compute_v3"' -x gdb_patch.py

dlopen() the library in the stopped target (an inferior call: the current
thread runs dlopen while gdb holds the others), look up the replacement, and
write a jump over the first bytes of FUNC: `jmp rel32` when the library is
within +-2 GiB (it never is for a PIE executable: dlopen maps far above),
else the 14-byte `jmp *0(%rip); .quad new`, the absolute jump that clobbers
no register (so it is right for any function, varargs ones too, where %al
is live at entry).  No check whether a thread is stopped inside, or will
return into, the bytes overwritten: that is the method, and its hazard.
"""
import gdb  # noqa: provided by gdb

lib, func, new = LIB, FUNC, NEW  # noqa: F821  set with -ex 'py ...'
handle = int(gdb.parse_and_eval(f'(unsigned long)dlopen("{lib}", 2)'))
if handle == 0:
    raise gdb.GdbError("dlopen failed: " + gdb.parse_and_eval("(char*)dlerror()").string())
new_addr = int(gdb.parse_and_eval(f'(unsigned long)dlsym({handle}, "{new}")'))
old_addr = int(gdb.parse_and_eval(f"(unsigned long)&{func}"))
if new_addr == 0:
    raise gdb.GdbError(f"dlsym({new}) failed")
rel = new_addr - (old_addr + 5)
if -(1 << 31) <= rel < (1 << 31):
    code = b"\xe9" + rel.to_bytes(4, "little", signed=True)
else:
    code = b"\xff\x25\x00\x00\x00\x00" + new_addr.to_bytes(8, "little")
gdb.selected_inferior().write_memory(old_addr, code)
print(f"PATCHED old=0x{old_addr:x} new=0x{new_addr:x} bytes={code.hex()}")
