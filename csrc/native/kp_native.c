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

static long ptrace_options(int options)
{
    return ((options & KP_FOLLOW_CLONES) ? PTRACE_O_TRACECLONE : 0)
         | ((options & KP_SYSCALL_STOPS) ? PTRACE_O_TRACESYSGOOD : 0);
}

int kp_seize(int tid, int options)
{
    if (ptrace(PTRACE_SEIZE, tid, 0, (void *)ptrace_options(options)) == 0)
        return 0;
    return -errno;
}

int kp_set_options(int tid, int options)
{
    if (ptrace(PTRACE_SETOPTIONS, tid, 0, (void *)ptrace_options(options)) == 0)
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

int kp_next_event(const struct kp_thread *t, int n, int *st)
{
    siginfo_t si;
    si.si_pid = 0;
    /* Peek (WNOWAIT): a child that is not one of t[] keeps its status. */
    if (waitid(P_ALL, 0, &si, WEXITED | WSTOPPED | WNOHANG | WNOWAIT | __WALL) != 0 || !si.si_pid)
        return -1;
    for (int i = 0; i < n; i++)
        if (t[i].tid == si.si_pid && t[i].state == KP_RUNNING)
            return waitpid(t[i].tid, st, __WALL | WNOHANG) == t[i].tid ? i : -2;
    return -2;
}

int kp_rt_enter(int *old_policy, int *old_priority)
{
    struct sched_param rt = {1}, old;
    int policy = sched_getscheduler(0);
    *old_policy = -1;
    if (policy == SCHED_FIFO || sched_getparam(0, &old) != 0 || sched_setscheduler(0, SCHED_FIFO, &rt) != 0)
        return 0;
    *old_policy = policy;
    *old_priority = old.sched_priority;
    return 1;
}

void kp_rt_leave(int old_policy, int old_priority)
{
    if (old_policy >= 0) {
        struct sched_param old = {old_priority};
        sched_setscheduler(0, old_policy, &old);
    }
}

/* Waiting without progress. At SCHED_FIFO: sleep (an RT wake-up preempts
 * the load at once, and sleeping leaves our CPU to the threads that must
 * reach their stop). Otherwise yield for up to idle_yield_us, then sleep:
 * a CFS sleep's wake-up queues behind the machine's load (milliseconds on a
 * busy 2-core machine: 64 threads stopped in 1.0-1.2 ms yielding against
 * 1.5-2.7 ms once it slept after 64 rounds), while a yield hands the CPU
 * to the threads that must reach their stop; the sleeps only spare the CPU
 * when a thread will not stop at all (uninterruptible sleep). */
static const long idle_yield_us = 20000;
static const long idle_sleep_ns = 20000;
static const long rt_sleep_ns = 10000;

void kp_idle(double idle_since_us)
{
    if (sched_getscheduler(0) == SCHED_FIFO) {
        struct timespec ts = {0, rt_sleep_ns};
        nanosleep(&ts, NULL);
    } else if (kp_now_us() - idle_since_us < idle_yield_us) {
        sched_yield();
    } else {
        struct timespec ts = {0, idle_sleep_ns};
        nanosleep(&ts, NULL);
    }
}

/* Wait for every RUNNING thread once: all at once, each waited for alone. */
static int sweep(struct kp_thread *t, int *n, int cap, int *pending)
{
    int progress = 0;
    *pending = 0;
    for (int i = 0; i < *n; i++) {
        struct kp_thread *th = &t[i];
        if (th->state != KP_RUNNING)
            continue;
        int st = 0;
        pid_t r = waitpid(th->tid, &st, __WALL | WNOHANG);
        if (r == 0) {
            (*pending)++;
            continue;
        }
        progress++;
        if (r < 0)             /* ECHILD: exited and reaped, or not ours */
            th->state = KP_GONE;
        else
            on_status(t, n, cap, th, st);
    }
    return progress;
}

int kp_stop_all(struct kp_thread *t, int *n, int cap, long timeout_us)
{
    double deadline = kp_now_us() + (double)timeout_us;
    for (int i = 0; i < *n; i++)
        if (t[i].state == KP_RUNNING && ptrace(PTRACE_INTERRUPT, t[i].tid, 0, 0) != 0
            && errno == ESRCH)
            t[i].state = KP_GONE;

    double idle_since = kp_now_us();
    for (int swept = 0;; swept = 0) {
        /* Events first, one syscall each; a full sweep only when a child
         * that is not ours is ready, or nothing seems to move (a thread
         * reaped behind our back). */
        int progress = 0, pending = 0, st = 0, i;
        while ((i = kp_next_event(t, *n, &st)) >= 0) {
            on_status(t, n, cap, &t[i], st);
            progress++;
        }
        if (i == -2 || !progress) {
            progress += sweep(t, n, cap, &pending);
            swept = 1;
        }
        if (!swept)
            for (int j = 0; j < *n; j++)
                pending += t[j].state == KP_RUNNING;
        if (!pending)
            return 0;
        double now = kp_now_us();
        if (now > deadline)
            return pending;
        if (progress)
            idle_since = now;
        else
            kp_idle(idle_since);
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

/* Does th look exactly as k did (registers, and the stack bytes its walk
 * read)? Read in chunks into scan_buf and compared. */
static int same_as_known(int pid, const struct kp_thread *th, const struct kp_known *k,
                         unsigned long top)
{
    if (memcmp(&th->regs, &k->regs, sizeof k->regs) != 0 || top - th->regs.rsp < k->len)
        return 0;
    for (unsigned long done = 0; done < k->len;) {
        size_t len = k->len - done < SCAN_CHUNK ? k->len - done : SCAN_CHUNK;
        struct iovec local = {scan_buf, len}, remote = {(void *)(th->regs.rsp + done), len};
        if (process_vm_readv(pid, &local, 1, &remote, 1, 0) != (ssize_t)len
            || memcmp(scan_buf, k->stack + done, len) != 0)
            return 0;
        done += len;
    }
    return 1;
}

static unsigned long stack_top(const struct kp_thread *th, const unsigned long *stack_lo,
                               const unsigned long *stack_hi, int nstacks)
{
    long si = range_index(th->regs.rsp, stack_lo, stack_hi, nstacks);
    return si < 0 ? 0 : stack_hi[si];
}

/* A flagged thread: dismissed if precise unwinding cleared it as it is now;
 * else its stack is copied to the arena for unwinding after release. */
static void second_look(struct kp_window *w, struct kp_thread *th)
{
    th->snap_len = 0;
    unsigned long top = stack_top(th, w->stack_lo, w->stack_hi, w->nstacks);
    if (th->unsafe != KP_ON_STACK || !top)
        return;                 /* a rip in busy code is never dismissed */
    for (int k = 0; k < w->nknown; k++)
        if (w->known[k].tid == th->tid && same_as_known(w->pid, th, &w->known[k], top)) {
            th->unsafe = KP_SAFE;
            return;
        }
    unsigned long len = top - th->regs.rsp, room = w->arena_cap - w->arena_used;
    th->snap_whole = len <= room;
    if (len > room)
        len = room;
    struct iovec local = {w->arena + w->arena_used, len}, remote = {(void *)th->regs.rsp, len};
    if (len && process_vm_readv(w->pid, &local, 1, &remote, 1, 0) == (ssize_t)len) {
        th->snap_off = w->arena_used;
        th->snap_len = len;
        w->arena_used += len;
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

void kp_release_world(int pid, struct kp_thread *t, int *n, int cap)
{
    if (!*n)
        return;
    kp_release_all(pid, t, *n);
    for (int i = 0; i < *n; i++)
        if (t[i].state == KP_RUNNING) {
            kp_stop_all(t, n, cap, 200000);
            kp_release_all(pid, t, *n);
            break;
        }
    *n = 0;
}

static int write_all(struct kp_window *w)
{
    int failed = kp_write_all(w->memfd, w->nwrites, w->waddr, w->wbuf, w->wlen);
    if (failed < 0)
        return -1;
    for (int i = failed - 1; i >= 0; i--)   /* all or nothing: undo what landed */
        (void)pwrite(w->memfd, w->ubuf[i], w->wlen[i], (off_t)w->waddr[i]);
    return failed;
}

int kp_window_open(struct kp_thread *t, int *n, int cap, struct kp_window *w)
{
    w->unsafe = 0;
    w->failed_write = -1;
    w->arena_used = 0;
    w->old_policy = -1;
    w->t0 = kp_now_us();
    /* SCHED_FIFO from the first interrupt: at normal priority the spinning
     * threads we interrupt preempt us between interrupts and between reaps
     * (and, once stopped, released threads would take our CPU while the
     * rest of the world waits). We sleep, never spin, while they stop. */
    if (w->realtime)
        kp_rt_enter(&w->old_policy, &w->old_priority);
    w->late = kp_stop_all(t, n, cap, w->stop_timeout_us);
    w->stop_us = kp_now_us() - w->t0;
    w->scan_us = w->write_us = 0;
    if (w->late) {
        for (int i = 0; i < *n; i++)
            if (t[i].state == KP_RUNNING)
                t[i].unsafe = KP_NOT_STOPPED;
        return 0;
    }
    /* scan, then a second look at what it flagged */
    double t_scan = kp_now_us();
    w->unsafe = kp_scan(w->pid, t, *n, w->lo, w->hi, w->nranges,
                        w->stack_lo, w->stack_hi, w->nstacks, w->max_scan);
    for (int i = 0; w->unsafe && i < *n; i++)
        if (t[i].state == KP_STOPPED && t[i].unsafe) {
            second_look(w, &t[i]);
            if (!t[i].unsafe)
                w->unsafe--;
        }
    w->scan_us = kp_now_us() - t_scan;
    /* (a step that moves threads out of retired code goes here) */
    return !w->unsafe;
}

int kp_window_close(struct kp_thread *t, int *n, int cap, struct kp_window *w, int go)
{
    int done = 0;
    double t_write = kp_now_us();
    if (go && w->write && !w->late && !w->unsafe) {
        w->failed_write = write_all(w);
        done = w->failed_write < 0;
    }
    double t_release = kp_now_us();
    w->write_us = t_release - t_write;
    int m = *n;   /* *n stays: the verdicts are read after release */
    kp_release_world(w->pid, t, &m, cap);
    double end = kp_now_us();
    w->release_us = end - t_release;
    w->pause_us = end - w->t0;
    kp_rt_leave(w->old_policy, w->old_priority);
    return done;
}

int kp_window(struct kp_thread *t, int *n, int cap, struct kp_window *w)
{
    return kp_window_close(t, n, cap, w, kp_window_open(t, n, cap, w));
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
        th->state = r == 0 ? KP_DETACHED : KP_GONE;
    }
    return failed;
}

int kp_inject_syscall(struct kp_thread *th, unsigned long entry, unsigned long stack, long nr,
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
    r.rsp = stack;   /* the save area: the stub pops the thread back from it */
    r.rax = nr;
    /* orig_rax = -1: the kernel must not treat the stop we resume from as an
     * interrupted syscall to restart with *our* registers. */
    r.orig_rax = (unsigned long)-1;
    r.rdi = a1; r.rsi = a2; r.rdx = a3; r.r10 = a4; r.r8 = a5; r.r9 = a6;
    if (ptrace(PTRACE_SETREGS, th->tid, 0, &r) != 0)
        return -errno;
    /* Syscall stops, not a single-step: if we die now, the kernel drops the
     * syscall-trace flag with us, while a pending single-step trap would
     * reach the target as a fatal SIGTRAP. (The stub restores the thread's
     * registers by itself in that case; see stub.py.) */
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
