"""Compiler wrapper for `hotpatch build` (a standalone script: it imports
nothing from ksplice_py, so each compile pays only Python's start-up).

The build command finds it first on PATH as `cc`/`gcc` (and through CC). It
runs the real compiler with the project's own flags plus

    -ffunction-sections -fdata-sections   one section per function/object,
                                          so objects compare per function
    -g                                    DWARF: inlined calls, type layouts
                                          (gcc guarantees -g changes no code)

and appends one JSON line per step to $HOTPATCH_BUILD_LOG: what was compiled
into which object, and which objects were linked into which output. A
one-step `cc -o prog a.c b.c` is split into compile steps and a link, so
the objects exist to be compared.
"""
import json
import os
import subprocess
import sys

EXTRA = ["-ffunction-sections", "-fdata-sections", "-g"]
SOURCES = (".c", ".s", ".S")
# Options whose value is the next argument (gcc's common ones).
TAKES_VALUE = {"-o", "-I", "-D", "-U", "-include", "-imacros", "-isystem", "-iquote", "-idirafter",
               "-x", "-MF", "-MT", "-MQ", "-L", "-l", "-Xlinker", "-Xassembler", "-T", "-u",
               "-z", "-aux-info", "--param"}
LINK_ONLY = ("-l", "-L", "-Wl,", "-pie", "-no-pie", "-shared", "-static", "-rdynamic", "-Xlinker")
NO_OUTPUT = {"-E", "-M", "-MM", "--version", "-v", "-dumpversion", "-dumpmachine", "-print-file-name"}


def real_compiler(name: str) -> str:
    mine = os.path.dirname(os.path.abspath(__file__))
    for d in os.environ.get("HOTPATCH_BUILD_PATH", "").split(os.pathsep):
        cand = os.path.join(d, name)
        if d and os.path.abspath(d) != mine and os.access(cand, os.X_OK):
            return cand
    sys.exit(f"hotpatch build: no real '{name}' on PATH")


def log(entry: dict) -> None:
    path = os.environ.get("HOTPATCH_BUILD_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def split(args: list) -> tuple:
    """(sources, output or None, the other arguments in order)."""
    sources, out, rest, i = [], None, [], 0
    while i < len(args):
        a = args[i]
        if a in TAKES_VALUE and i + 1 < len(args):
            if a == "-o":
                out = args[i + 1]
            else:
                rest += [a, args[i + 1]]
            i += 2
            continue
        if not a.startswith("-") and a.endswith(SOURCES):
            sources.append(a)
        else:
            rest.append(a)
        i += 1
    return sources, out, rest


def run(cmd: list) -> int:
    return subprocess.call(cmd)


def compile_one(cc: str, rest: list, src: str, obj: str, mode: str) -> int:
    rc = run([cc, *rest, *EXTRA, mode, src, "-o", obj])
    if rc == 0 and mode == "-c":
        log({"step": "compile", "cwd": os.getcwd(), "source": os.path.abspath(src),
             "object": os.path.abspath(obj)})
    return rc


def main() -> int:
    cc = real_compiler(os.path.basename(sys.argv[0]))
    args = sys.argv[1:]
    if any(a in NO_OUTPUT for a in args) or not args:
        return run([cc, *args])
    sources, out, rest = split(args)
    if "-S" in rest:
        return run([cc, *args, *EXTRA])
    if "-c" in rest:
        rest = [a for a in rest if a != "-c"]
        if out is not None and len(sources) == 1:
            return compile_one(cc, rest, sources[0], out, "-c")
        for src in sources:
            rc = compile_one(cc, rest, src, os.path.splitext(os.path.basename(src))[0] + ".o", "-c")
            if rc:
                return rc
        return 0
    out = out or "a.out"
    compile_rest = [a for a in rest if not a.startswith(LINK_ONLY) and not a.endswith((".o", ".a"))]
    link = []
    for a in args:  # one-step compile and link: keep the objects, same order
        if a in sources:
            obj = os.path.abspath(f"{out}.{os.path.basename(a)}.o")
            rc = compile_one(cc, compile_rest, a, obj, "-c")
            if rc:
                return rc
            a = obj
        link.append(a)
    rc = run([cc, *link])
    if rc == 0:
        inputs = [a for a in link if not a.startswith("-") and a.endswith((".o", ".a"))]
        log({"step": "link", "cwd": os.getcwd(), "output": os.path.abspath(out),
             "inputs": [os.path.abspath(o) for o in inputs]})
    return rc

if __name__ == "__main__":
    sys.exit(main())
