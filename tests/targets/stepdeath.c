/* stepdeath.c — the premise of runout.py, checked on the running kernel:
 * does a tracee survive its tracer's SIGKILL while single-stepping, and
 * while under PTRACE_SYSCALL?
 *
 *   stepdeath step|syscall    prints "killed by signal N" or "alive"
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    int request = strcmp(argv[1], "step") ? PTRACE_SYSCALL : PTRACE_SINGLESTEP;
    pid_t target = fork();
    if (!target)
        for (volatile int x = 0;; x++)
            ;
    pid_t tracer = fork();
    if (!tracer) {
        ptrace(PTRACE_SEIZE, target, 0, 0);
        ptrace(PTRACE_INTERRUPT, target, 0, 0);
        waitpid(target, NULL, __WALL);
        ptrace(request, target, 0, 0);
        waitpid(target, NULL, __WALL); /* a step done (or a syscall stop never comes) */
        ptrace(request, target, 0, 0);
        for (;;)
            pause(); /* SIGKILLed here */
    }
    usleep(300000);
    kill(tracer, SIGKILL);
    waitpid(tracer, NULL, 0);
    usleep(300000);
    int st = 0;
    if (waitpid(target, &st, WNOHANG) == target && WIFSIGNALED(st))
        printf("killed by signal %d\n", WTERMSIG(st));
    else
        printf("alive\n");
    kill(target, SIGKILL);
    waitpid(target, NULL, 0);
    return 0;
}
