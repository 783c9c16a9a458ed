/* See kp_native.h. Everything here is about the stopped window: no
 * allocation in loops, no Python, no work that could have been done before. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>

#include "kp_native.h"

#ifndef PTRACE_EVENT_STOP
#define PTRACE_EVENT_STOP 128
#endif

_Static_assert(sizeof(struct kp_regs) == sizeof(struct user_regs_struct),
               "kp_regs must mirror user_regs_struct");

double kp_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

int kp_seize(int tid, int options)
{
    long opts = ((options & KP_FOLLOW_CLONES) ? PTRACE_O_TRACECLONE : 0)
              | ((options & KP_SYSCALL_STOPS) ? PTRACE_O_TRACESYSGOOD : 0);
    if (ptrace(PTRACE_SEIZE, tid, 0, (void *)opts) == 0)
        return 0;
    return -errno;
}

static void note_signal(struct kp_thread *th, int sig)
{
    if (th->nsigs < KP_MAX_SIGS)
        th->sigs[th->nsigs++] = sig;
}

static int is_stop_signal(int sig)
{
    return sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU;
}

static struct kp_thread *find_tid(struct kp_thread *t, int n, int tid)
{
    for (int i = 0; i < n; i++)
        if (t[i].tid == tid)
            return &t[i];
    return NULL;
}

static void init_thread(struct kp_thread *th, int tid)
{
    memset(th, 0, sizeof *th);
    th->tid = tid;
    th->state = KP_RUNNING;
}

/* Syscalls that return -EINTR instead of an -ERESTART* code when woken with
 * no signal to deliver, as PTRACE_INTERRUPT wakes them: epoll_wait family,
 * rt_sigtimedwait, semop/semtimedop, io_getevents, io_pgetevents, and socket
 * calls with SO_RCVTIMEO/SO_SNDTIMEO. EINTR means nothing was transferred. */
static int eintr_syscall(long nr)
{
    switch (nr) {
    case 232: case 281: case 441:          /* epoll_wait, epoll_pwait, epoll_pwait2 */
    case 128:                              /* rt_sigtimedwait */
    case 65: case 220:                     /* semop, semtimedop */
    case 208: case 333:                    /* io_getevents, io_pgetevents */
    case 42: case 43: case 288:            /* connect, accept, accept4 */
    case 44: case 45: case 46: case 47:    /* sendto, recvfrom, sendmsg, recvmsg */
    case 299: case 307:                    /* recvmmsg, sendmmsg */
        return 1;
    }
    return 0;
}

/* Our interrupt (not a signal) woke the thread out of such a syscall: rewind
 * it to its `syscall` instruction so it re-issues the call on resume, exactly
 * as the kernel restarts -ERESTARTNOHAND calls. A real signal is never
 * undone this way: those stops are signal-delivery-stops, not ours. */
static void undo_spurious_eintr(struct kp_thread *th)
{
    struct kp_regs *r = &th->regs;
    if ((long)r->rax != -EINTR || !eintr_syscall((long)r->orig_rax))
        return;
    unsigned char insn[2];
    struct iovec local = {insn, 2}, remote = {(void *)(r->rip - 2), 2};
    if (process_vm_readv(th->tid, &local, 1, &remote, 1, 0) != 2 || insn[0] != 0x0f || insn[1] != 0x05)
        return;
    r->rip -= 2;
    r->rax = r->orig_rax;
    if (ptrace(PTRACE_SETREGS, th->tid, 0, r) != 0) {
        r->rip += 2;
        r->rax = (unsigned long)-EINTR;
    }
}

/* Interpret one wait status of a thread we wait for; returns 1 if it is now
 * stopped (or gone) for good, 0 if we must keep waiting (e.g. after resuming
 * a stop that is not ours to keep). */
static int on_status(struct kp_thread *t, int *n, int cap, struct kp_thread *th, int st)
{
    if (WIFEXITED(st) || WIFSIGNALED(st)) {
        th->state = KP_GONE;
        return 1;
    }
    if (!WIFSTOPPED(st))
        return 0;
    int event = (unsigned)st >> 16;
    int sig = WSTOPSIG(st);
    th->event = event;
    if (event == PTRACE_EVENT_CLONE) {
        unsigned long child = 0;
        ptrace(PTRACE_GETEVENTMSG, th->tid, 0, &child);
        if (child && !find_tid(t, *n, (int)child) && *n < cap)
            init_thread(&t[(*n)++], (int)child);   /* reports its own EVENT_STOP */
    } else if (event == PTRACE_EVENT_STOP) {
        if (is_stop_signal(sig))
            th->group_stop = 1;
    } else if (event == 0) {
        /* signal-delivery-stop: it counts as our stop (any trap clears the
         * pending interrupt); the signal is suppressed now, re-sent on release */
        note_signal(th, sig);
    }
    th->state = KP_STOPPED;
    if (ptrace(PTRACE_GETREGS, th->tid, 0, &th->regs) != 0 && errno == ESRCH) {
        th->state = KP_GONE;
        return 1;
    }
    if (event == PTRACE_EVENT_STOP && !th->group_stop)
        undo_spurious_eintr(th);
    return 1;
}

static const int idle_spins = 64;      /* sched_yield rounds before sleeping */
static const long idle_sleep_ns = 20000;

int kp_stop_all(struct kp_thread *t, int *n, int cap, long timeout_us)
{
    double deadline = kp_now_us() + (double)timeout_us;
    for (int i = 0; i < *n; i++)
        if (t[i].state == KP_RUNNING && ptrace(PTRACE_INTERRUPT, t[i].tid, 0, 0) != 0
            && errno == ESRCH)
            t[i].state = KP_GONE;

    int idle_rounds = 0;
    for (;;) {
        int pending = 0, progress = 0;
        for (int i = 0; i < *n; i++) {
            struct kp_thread *th = &t[i];
            if (th->state != KP_RUNNING)
                continue;
            int st = 0;
            pid_t r = waitpid(th->tid, &st, __WALL | WNOHANG);
            if (r == 0) {
                pending++;
                continue;
            }
            if (r < 0) {           /* ECHILD: exited and reaped, or not ours */
                th->state = KP_GONE;
                progress++;
                continue;
            }
            progress++;
            on_status(t, n, cap, th, st);
        }
        if (!pending)
            return 0;
        if (kp_now_us() > deadline)
            return pending;
        /* Threads need CPU to reach their stop; on few cores, give it. */
        if (progress) {
            idle_rounds = 0;
        } else if (++idle_rounds < idle_spins) {
            sched_yield();
        } else {
            struct timespec ts = {0, idle_sleep_ns};
            nanosleep(&ts, NULL);
        }
    }
}

/* Sorted disjoint ranges [lo[i], hi[i]): index of the one holding v, or -1. */
static long range_index(unsigned long v, const unsigned long *lo, const unsigned long *hi, int n)
{
    int a = 0, b = n;
    while (a < b) {
        int m = (a + b) / 2;
        if (v < lo[m])
            b = m;
        else if (v >= hi[m])
            a = m + 1;
        else
            return m;
    }
    return -1;
}

static int in_ranges(unsigned long v, const unsigned long *lo, const unsigned long *hi, int n)
{
    return range_index(v, lo, hi, n) >= 0;
}

#define SCAN_CHUNK 65536
static unsigned long scan_buf[SCAN_CHUNK / sizeof(unsigned long)];

static void scan_thread(int pid, struct kp_thread *th,
                        const unsigned long *lo, const unsigned long *hi, int nranges,
                        const unsigned long *stack_lo, const unsigned long *stack_hi, int nstacks,
                        unsigned long max_scan)
{
    th->unsafe = KP_SAFE;
    if (in_ranges(th->regs.rip, lo, hi, nranges)) {
        th->unsafe = KP_IN_RIP;
        th->hit_value = th->regs.rip;
        return;
    }
    unsigned long sp = th->regs.rsp & ~7UL;
    long si = range_index(sp, stack_lo, stack_hi, nstacks);
    if (si < 0) {     /* stack not in the mappings we were given: caller re-reads maps */
        th->unsafe = KP_STACK_UNKNOWN;
        return;
    }
    unsigned long top = stack_hi[si];
    if (top - sp > max_scan)
        top = sp + max_scan;
    unsigned long minv = lo[0], maxv = hi[nranges - 1];
    for (unsigned long at = sp; at < top;) {
        size_t len = top - at < SCAN_CHUNK ? top - at : SCAN_CHUNK;
        struct iovec local = {scan_buf, len}, remote = {(void *)at, len};
        ssize_t got = process_vm_readv(pid, &local, 1, &remote, 1, 0);
        if (got <= 0) {
            th->unsafe = KP_STACK_UNKNOWN;
            return;
        }
        size_t words = (size_t)got / sizeof(unsigned long);
        for (size_t w = 0; w < words; w++) {
            unsigned long v = scan_buf[w];
            if (v < minv || v >= maxv)    /* the common case: one compare pair */
                continue;
            if (in_ranges(v, lo, hi, nranges)) {
                th->unsafe = KP_ON_STACK;
                th->hit_value = v;
                return;
            }
        }
        at += (size_t)got;
    }
}

int kp_scan(int pid, struct kp_thread *t, int n,
            const unsigned long *lo, const unsigned long *hi, int nranges,
            const unsigned long *stack_lo, const unsigned long *stack_hi, int nstacks,
            unsigned long max_scan_bytes)
{
    int unsafe = 0;
    for (int i = 0; i < n; i++) {
        if (t[i].state != KP_STOPPED)
            continue;
        if (nranges == 0) {
            t[i].unsafe = KP_SAFE;
            continue;
        }
        scan_thread(pid, &t[i], lo, hi, nranges, stack_lo, stack_hi, nstacks, max_scan_bytes);
        unsafe += t[i].unsafe != KP_SAFE;
    }
    return unsafe;
}

int kp_write_all(int memfd, int n, const unsigned long *addr,
                 const unsigned char *const *buf, const unsigned long *len)
{
    for (int i = 0; i < n; i++) {
        ssize_t w = pwrite(memfd, buf[i], len[i], (off_t)addr[i]);
        if (w != (ssize_t)len[i])
            return i;
    }
    return -1;
}

int kp_release_all(int pid, struct kp_thread *t, int n)
{
    int failed = 0;
    for (int i = 0; i < n; i++) {
        struct kp_thread *th = &t[i];
        if (th->state != KP_STOPPED)
            continue;
        /* A group-stopped thread keeps its group-stop over a detach (the
         * kernel re-instates it). */
        int first = th->nsigs ? th->sigs[0] : 0;
        long r = ptrace(PTRACE_DETACH, th->tid, 0, (void *)(long)first);
        if (r != 0 && errno != ESRCH) {
            failed++;
            continue;
        }
        /* More than one signal caught: the rest are re-queued (siginfo is
         * simplified to a tgkill's; the kernel does not let us forge it). */
        for (int s = 1; s < th->nsigs; s++)
            syscall(SYS_tgkill, pid, th->tid, th->sigs[s]);
        th->nsigs = 0;
        th->state = r == 0 ? KP_RUNNING : KP_GONE;
    }
    return failed;
}

int kp_inject_syscall(struct kp_thread *th, unsigned long entry, long nr,
                      long a1, long a2, long a3, long a4, long a5, long a6,
                      long *ret)
{
    struct user_regs_struct saved, r;
    /* Only stops on the return-to-user path (interrupt, signal, group stop)
     * take new registers safely. In a syscall-event stop such as
     * PTRACE_EVENT_CLONE the kernel still writes the syscall's result into
     * rax afterwards: our syscall would run with a tid as its number. */
    if (th->event != 0 && th->event != PTRACE_EVENT_STOP)
        return -EINVAL;
    if (ptrace(PTRACE_GETREGS, th->tid, 0, &saved) != 0)
        return -errno;
    r = saved;
    r.rip = entry;
    r.rax = nr;
    /* orig_rax = -1: the kernel must not treat the stop we resume from as an
     * interrupted syscall to restart with *our* registers. */
    r.orig_rax = (unsigned long)-1;
    r.rdi = a1; r.rsi = a2; r.rdx = a3; r.r10 = a4; r.r8 = a5; r.r9 = a6;
    if (ptrace(PTRACE_SETREGS, th->tid, 0, &r) != 0)
        return -errno;
    /* Syscall stops, not a single-step: if we die now, the kernel drops the
     * syscall-trace flag with us, while a pending single-step trap would
     * reach the target as a fatal SIGTRAP. (The entry stub restores the
     * thread's registers by itself in that case; see tracer.py.) */
    int syscall_stops = 0;
    while (syscall_stops < 2) {
        if (ptrace(PTRACE_SYSCALL, th->tid, 0, 0) != 0)
            return -errno;
        int st = 0;
        if (waitpid(th->tid, &st, __WALL) < 0)
            return -errno;
        if (WIFEXITED(st) || WIFSIGNALED(st)) {
            th->state = KP_GONE;
            return -ESRCH;
        }
        int event = (unsigned)st >> 16;
        int sig = WSTOPSIG(st);
        if (sig == (SIGTRAP | 0x80))
            syscall_stops++;            /* entry, then exit */
        else if (event == 0)
            note_signal(th, sig);       /* arrived meanwhile: keep for later */
        /* other stops (a group-stop arriving): just go on */
    }
    if (ptrace(PTRACE_GETREGS, th->tid, 0, &r) != 0)
        return -errno;
    *ret = (long)r.rax;
    /* Restore everything: with the saved orig_rax/rax the kernel restarts an
     * interrupted read/epoll_wait/nanosleep when the thread is resumed. */
    if (ptrace(PTRACE_SETREGS, th->tid, 0, &saved) != 0)
        return -errno;
    return 0;
}
