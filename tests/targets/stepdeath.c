/* stepdeath.c — the premises of runout.py and the injector, checked on the
 * running kernel: does a tracee survive its tracer's SIGKILL
 *   step            while single-stepping (a loop without syscalls)?
 *   syscall         while under PTRACE_SYSCALL with PTRACE_O_TRACESYSGOOD,
 *                   stopped at or running to a syscall stop (a getppid loop)?
 *   syscall-nogood  the same without TRACESYSGOOD?
 * Prints "killed by signal N" or "alive". (Without TRACESYSGOOD the stop's
 * code is a plain SIGTRAP, which ptrace_report_syscall sends the tracee when
 * no tracer resumed it with another; 0x80|SIGTRAP is no signal and is not.)
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <unistd.h>
#include <sys/syscall.h>

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    int request = strcmp(argv[1], "step") ? PTRACE_SYSCALL : PTRACE_SINGLESTEP;
    long options = strcmp(argv[1], "syscall") ? 0 : PTRACE_O_TRACESYSGOOD;
    pid_t target = fork();
    if (!target)
        for (volatile int x = 0;; x++)
            if (request == PTRACE_SYSCALL)
                syscall(SYS_getppid);
    int ready[2];
    if (pipe(ready))
        return 3;
    pid_t tracer = fork();
    if (!tracer) {
        ptrace(PTRACE_SEIZE, target, 0, (void *)options);
        ptrace(PTRACE_INTERRUPT, target, 0, 0);
        waitpid(target, NULL, __WALL);
        ptrace(request, target, 0, 0);
        if (request == PTRACE_SINGLESTEP) { /* one step done, stepping again */
            waitpid(target, NULL, __WALL);
            ptrace(request, target, 0, 0);
        } else { /* at a syscall stop when killed, or on its way to one */
            waitpid(target, NULL, __WALL);
            ptrace(request, target, 0, 0);
        }
        if (write(ready[1], "x", 1) != 1)
            return 3;
        for (;;)
            pause(); /* SIGKILLed here */
    }
    char c;
    if (read(ready[0], &c, 1) != 1) /* however loaded the machine: only once armed */
        return 3;
    kill(tracer, SIGKILL);
    waitpid(tracer, NULL, 0);
    int st = 0, dead = 0;
    for (int i = 0; i < 200 && !dead; i++) { /* up to 2 s for the trap to be taken */
        usleep(10000);
        dead = waitpid(target, &st, WNOHANG) == target;
    }
    if (dead && WIFSIGNALED(st))
        printf("killed by signal %d\n", WTERMSIG(st));
    else
        printf("alive\n");
    kill(target, SIGKILL);
    waitpid(target, NULL, 0);
    return 0;
}
