"""What gcc assumes about local functions, and patches that would break it
(issue #15 items 4 and 4b): clones with a changed ABI, and callers that keep
values in call-clobbered registers across a call (-fipa-ra)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from conftest import assert_error, assert_ok, describe, run_hotpatch
from inline import Proc, patch, program

# --- item 4: clones ---------------------------------------------------------------
CLONE_C = r"""
#include <stdio.h>
#include <string.h>
static __attribute__((noinline)) int format_reply(char *buf, int code, int value)
{
    return sprintf(buf, "%d:%d", code, value);
}
int main(void)
{
    char line[64], out[64];
    printf("ready\n"); fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        format_reply(out, 200, (int)strlen(line));   /* code is always 200 */
        printf("%s\n", out); fflush(stdout);
    }
    return 0;
}
"""

SOURCE_SIGNATURE = r"""
#include <hotpatch.h>
#include <stdio.h>
static int format_v2(char *buf, int code, int value) { return sprintf(buf, "v2 %d:%d", code, value); }
HOTPATCH_REPLACE("TARGET", format_v2);
"""

CLONE_ABI = r"""
#include <hotpatch.h>
#include <stdio.h>
/* the clone's ABI: code folded in (constprop), return value dropped (isra) */
static void format_v2(char *buf, int value) { sprintf(buf, "v2 200:%d", value); }
HOTPATCH_REPLACE("TARGET", format_v2);
HOTPATCH_CLONE_ABI("TARGET");
"""


@pytest.fixture(scope="module")
def clone_prog(tmp_path_factory) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("clones")
    exe = program(d, "server", CLONE_C, "-O2", "-g")
    names = subprocess.run(["nm", str(exe)], capture_output=True, text=True, check=True).stdout
    clones = re.findall(r"\b(format_reply\.(?:constprop|isra|part)\.\d+\S*)", names)
    assert clones and "format_reply\n" not in names, f"gcc made no clone of format_reply:\n{names}"
    return exe, clones[0]


def test_missing_function_names_its_clones(clone_prog, tmp_path):
    exe, clone = clone_prog
    fix = patch(tmp_path, "fix", SOURCE_SIGNATURE.replace("TARGET", "main:format_reply"))
    with Proc([str(exe)]) as t:
        line = assert_error(run_hotpatch("check", t.pid, fix), 4)
        assert f"main:{clone}" in line and "HOTPATCH_CLONE_ABI" in line, line
        unqualified = patch(tmp_path, "fix2", SOURCE_SIGNATURE.replace("TARGET", "format_reply"))
        line = assert_error(run_hotpatch("check", t.pid, unqualified), 4)
        assert f"main:{clone}" in line, line


def test_clone_target_refused_without_declared_abi(clone_prog, tmp_path):
    exe, clone = clone_prog
    fix = patch(tmp_path, "fix", SOURCE_SIGNATURE.replace("TARGET", f"main:{clone}"))
    with Proc([str(exe)]) as t:
        before = t.ask("abc")
        line = assert_error(run_hotpatch("apply", t.pid, fix), 4)
        assert "gcc clone" in line and f'HOTPATCH_CLONE_ABI("main:{clone}")' in line, line
        assert t.ask("abc") == before == "200:4"


def test_clone_patched_when_abi_declared(clone_prog, tmp_path):
    exe, clone = clone_prog
    fix = patch(tmp_path, "fix", CLONE_ABI.replace("TARGET", f"main:{clone}"))
    info = run_hotpatch("info", fix, "--json")
    assert_ok(info)
    assert '"clone_abi": true' in info.stdout, info.stdout
    with Proc([str(exe)]) as t:
        assert_ok(run_hotpatch("apply", t.pid, fix))
        assert t.ask("abc") == "v2 200:4"


def test_clone_abi_must_name_a_replaced_clone(tmp_path):
    stray = patch(tmp_path, "stray", CLONE_ABI.replace('HOTPATCH_REPLACE("TARGET"', 'HOTPATCH_REPLACE("main:f.isra.0"')
                  .replace("TARGET", "main:g.isra.0"))
    line = assert_error(run_hotpatch("info", stray), 2)
    assert "neither replaces nor wraps" in line, line
    plain = patch(tmp_path, "plain", CLONE_ABI.replace("TARGET", "main:format_reply"))
    line = assert_error(run_hotpatch("info", plain), 2)
    assert "does not name a gcc clone" in line, line
