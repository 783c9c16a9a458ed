"""The frida way to replace a function in a running process.

    python frida_patch.py PID /abs/peer.so compute compute_v3

Attach (frida injects its agent), Module.load() the library in the target,
Interceptor.replace() FUNC with the library's NEW, eternalize the script so
the replacement outlives the session, detach.  Prints one JSON line.
"""
import json
import sys
import time

import frida

SCRIPT = """
const lib = Module.load(%(lib)s);
const target = Process.mainModule.findSymbolByName(%(func)s)
            ?? DebugSymbol.fromName(%(func)s).address;
if (target === null || target.isNull()) throw new Error('no symbol ' + %(func)s);
const repl = lib.getExportByName(%(new)s);
Interceptor.replace(target, repl);
Interceptor.flush();
send({target: target.toString(), replacement: repl.toString()});
"""


def main() -> int:
    pid, lib, func, new = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    t0 = time.monotonic()
    session = frida.attach(pid)
    t_attach = time.monotonic()
    got: list = []
    errors: list = []
    script = session.create_script(SCRIPT % {"lib": json.dumps(lib), "func": json.dumps(func),
                                             "new": json.dumps(new)})
    script.on("message", lambda m, d: (got if m["type"] == "send" else errors).append(m))
    script.load()
    t_loaded = time.monotonic()
    if errors or not got:
        print(json.dumps({"ok": False, "error": str(errors)}))
        session.detach()
        return 1
    script.eternalize()
    session.detach()
    t1 = time.monotonic()
    print(json.dumps({"ok": True, **got[0]["payload"], "attach_s": t_attach - t0,
                      "script_s": t_loaded - t_attach, "total_s": t1 - t0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
