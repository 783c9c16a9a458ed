/* floor.c — the least any ptrace tool can do to switch code in a live
 * process: seize every thread, interrupt them all, wait until each is
 * stopped, write one word through /proc/PID/mem, release them all.
 *
 *   floor PID ADDR    (writes back the word already at ADDR: nothing changes)
 *
 * Prints {"pause_us": ...}: from the first PTRACE_INTERRUPT to the last
 * PTRACE_DETACH, the same span ksplice_py reports as its pause. Threads
 * born meanwhile are not followed (a real tool must; the floor does not
 * pay for it). The benchmark runs it on the same target as ours.
 *
 * It waits the way ours does, since on a loaded 2-core machine the wait
 * policy, not the work, decides the pause: SCHED_FIFO from the first
 * interrupt to the last detach (at normal priority the threads it
 * interrupts preempt it between interrupts and between reaps, and released
 * threads would take its CPU while the others wait), reaping whichever
 * thread has stopped (one waitpid(-1) each: it has no other children) and
 * sleeping 10 µs, never spinning, while none has. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 4096

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: floor PID ADDR\n");
        return 2;
    }
    int pid = atoi(argv[1]);
    unsigned long addr = strtoul(argv[2], NULL, 0);
    static int tids[MAX_THREADS];
    int n = 0;
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", pid);
    DIR *d = opendir(path);
    if (!d) {
        perror("opendir");
        return 1;
    }
    for (struct dirent *e; (e = readdir(d)) && n < MAX_THREADS;)
        if (e->d_name[0] != '.' && ptrace(PTRACE_SEIZE, atoi(e->d_name), 0, 0) == 0)
            tids[n++] = atoi(e->d_name);
    closedir(d);
    snprintf(path, sizeof path, "/proc/%d/mem", pid);
    int mem = open(path, O_RDWR);
    unsigned long word;
    if (mem < 0 || pread(mem, &word, sizeof word, (off_t)addr) != sizeof word) {
        perror("mem");
        return 1;
    }

    struct sched_param rt = {1}, normal = {0};
    sched_setscheduler(0, SCHED_FIFO, &rt);
    double t0 = now_us();
    static char stopped[MAX_THREADS];
    for (int i = 0; i < n; i++)
        ptrace(PTRACE_INTERRUPT, tids[i], 0, 0);
    for (int pending = n; pending;) {
        int st;
        pid_t w = waitpid(-1, &st, __WALL | WNOHANG);
        if (w <= 0) {
            struct timespec ts = {0, 10000};
            nanosleep(&ts, NULL);
            continue;
        }
        for (int i = 0; i < n; i++) {
            if (tids[i] != w || stopped[i])
                continue;
            if (WIFSTOPPED(st) && (st >> 16) == 0) {
                /* a signal arrived first: it counts as the stop (and cleared
                 * the interrupt); the signal goes back on release */
                stopped[i] = (char)WSTOPSIG(st);
            } else {
                stopped[i] = -1;
            }
            pending--;
        }
    }
    if (pwrite(mem, &word, sizeof word, (off_t)addr) != sizeof word)
        perror("pwrite");
    for (int i = 0; i < n; i++)
        ptrace(PTRACE_DETACH, tids[i], 0, (void *)(long)(stopped[i] > 0 ? stopped[i] : 0));
    double t1 = now_us();
    sched_setscheduler(0, SCHED_OTHER, &normal);
    printf("{\"pause_us\": %.1f, \"threads\": %d}\n", t1 - t0, n);
    return 0;
}
