"""A target that creates and joins threads without pause: our syscall
injection and stop-the-world meet threads inside clone() on every run.
(Regression: injecting a syscall into a thread stopped at PTRACE_EVENT_CLONE
ran a syscall numbered by the new thread's tid and killed the target.)"""
from __future__ import annotations

import subprocess
import time

from ksplice_py.patchfile import cflags

from conftest import assert_ok, run_hotpatch

SPAWNER = r"""
#include <pthread.h>
#include <stdio.h>
__attribute__((noipa)) int compute(int x) { return x * 2 + 1; }
volatile int last;
static void *shortlived(void *a) { last = compute(21); return 0; }
int main(void) {
    setvbuf(stdout, 0, _IONBF, 0);
    printf("ready\n");
    for (long i = 0;; i++) {
        pthread_t t;
        if (pthread_create(&t, 0, shortlived, 0) != 0) { printf("create failed\n"); return 2; }
        pthread_join(t, 0);
        if (i % 2000 == 0) printf("%d\n", last);
    }
}
"""

PATCH = r"""
#include <hotpatch.h>
static int compute_v2(int x) { return x * 3; }
HOTPATCH_REPLACE("compute", compute_v2);
"""


def test_patch_and_revert_while_threads_are_born_and_die(tmp_path):
    (tmp_path / "spawner.c").write_text(SPAWNER)
    (tmp_path / "fix.c").write_text(PATCH)
    exe, so = tmp_path / "spawner", tmp_path / "fix.so"
    subprocess.run(["gcc", "-O2", "-pie", "-fPIE", "-pthread", "-o", exe, tmp_path / "spawner.c"], check=True)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", *cflags().split(), "-o", so, tmp_path / "fix.c"], check=True)
    target = subprocess.Popen([exe], stdout=subprocess.PIPE, text=True)
    try:
        assert target.stdout.readline().strip() == "ready"
        for _ in range(15):
            assert_ok(run_hotpatch(target.pid, so))
            assert_ok(run_hotpatch("revert", target.pid))
        assert_ok(run_hotpatch(target.pid, so))
        seen = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and seen[-2:] != ["63", "63"]:
            seen.append(target.stdout.readline().strip())
        assert seen[-2:] == ["63", "63"], seen
        assert target.poll() is None, "the target died"
    finally:
        target.kill()
        target.wait()
