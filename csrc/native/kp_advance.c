/* See kp_advance.h. Runs inside the stopped window, after the scan and
 * before the write: every other thread of the target is stopped. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <time.h>
#include <sys/ptrace.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>

#include "kp_native.h"
#include "kp_advance.h"

#ifndef PTRACE_EVENT_STOP
#define PTRACE_EVENT_STOP 128
#endif

/* TO_STUB: running towards a stub's syscall-entry stop. SKIP_EXIT: resumed
 * from such a stop with the getpid skipped, to go on in the copy; the
 * kernel still reports that syscall's exit stop, passed over. */
enum phase { DONE, TO_STUB, SKIP_EXIT };

/* The stub prefix (runout.py: STUB_PREFIX): lea rsp,[rsp-128] (5); push rax
 * (1); push rcx (1); push r11 (2); mov eax,39 (5); syscall (2). For each
 * instruction boundary: how far rsp has moved, and whether rax/rcx/r11 are
 * only in their slots ([rsp+16], [rsp+8], [rsp]) by then. */
struct prefix_state { int off, rsp_moved, rax_saved_only, all_saved_only; };
static const struct prefix_state PREFIX[] = {
    {0, 0, 0, 0}, {5, 128, 0, 0}, {6, 136, 0, 0}, {7, 144, 0, 0}, {9, 152, 0, 0},
    {14, 152, 1, 0}, {KP_STUB_SYSCALL_END, 152, 1, 1},
};

static int read_word(int pid, unsigned long addr, unsigned long *out)
{
    struct iovec local = {out, 8}, remote = {(void *)addr, 8};
    return process_vm_readv(pid, &local, 1, &remote, 1, 0) == 8 ? 0 : -1;
}

static long find(const unsigned long *a, int n, unsigned long v)
{
    int lo = 0, hi = n;
    while (lo < hi) {
        int m = (lo + hi) / 2;
        if (a[m] < v)
            lo = m + 1;
        else
            hi = m;
    }
    return lo < n && a[lo] == v ? lo : -1;
}

static long stub_index(const struct kp_runout *ro, unsigned long rip, int *off)
{
    if (rip < ro->stubs || rip >= ro->stubs + (unsigned long)ro->nstubs * KP_STUB_SIZE)
        return -1;
    *off = (int)((rip - ro->stubs) % KP_STUB_SIZE);
    return (long)((rip - ro->stubs) / KP_STUB_SIZE);
}

/* Undo a stub's prefix up to `off`: r becomes the registers the thread had
 * on the original instruction the stub stands for. */
static int undo_prefix(int pid, const struct kp_runout *ro, long i, int off, struct kp_regs *r)
{
    const struct prefix_state *ps = NULL;
    for (unsigned k = 0; k < sizeof PREFIX / sizeof PREFIX[0]; k++)
        if (PREFIX[k].off == off)
            ps = &PREFIX[k];
    if (!ps)
        return -1;
    unsigned long rax = r->rax, rcx = r->rcx, r11 = r->r11;
    if (ps->rax_saved_only && read_word(pid, r->rsp + 16, &rax))
        return -1;
    if (ps->all_saved_only && (read_word(pid, r->rsp + 8, &rcx) || read_word(pid, r->rsp, &r11)))
        return -1;
    r->rax = rax;
    r->rcx = rcx;
    r->r11 = r11;
    r->rsp += ps->rsp_moved;
    r->rip = ro->stub_orig[i];
    return 0;
}

/* The original-code state of a thread stopped somewhere in the copy. */
static int put_back_regs(int pid, const struct kp_runout *ro, struct kp_regs *r)
{
    int off = 0;
    long i = stub_index(ro, r->rip, &off);
    if (i >= 0)
        return undo_prefix(pid, ro, i, off, r);
    long j = find(ro->copy, ro->n, r->rip);
    if (j < 0)
        return -1;
    r->rip = ro->orig[j];
    return 0;
}

/* At the syscall-entry stop of stub i: finish the exit (or undo a barrier)
 * in the registers, so the thread resumes outside our memory altogether. */
static int leave_stub(int pid, const struct kp_runout *ro, long i, struct kp_regs *r)
{
    if (undo_prefix(pid, ro, i, KP_STUB_SYSCALL_END, r))
        return -1;
    if (ro->stub_kind[i] == KP_STUB_EXIT) {
        if (ro->stub_dest[i]) {
            r->rip = ro->stub_dest[i];
        } else {
            unsigned long ret;
            if (read_word(pid, r->rsp, &ret))
                return -1;
            r->rip = ret;
            r->rsp += 8 + (unsigned long)ro->stub_pop[i];
        }
    }
    /* Not a syscall any more: no restart logic may apply to these registers. */
    r->orig_rax = (unsigned long)-1;
    return 0;
}

static int write_word(int pid, unsigned long addr, unsigned long v)
{
    struct iovec local = {&v, 8}, remote = {(void *)addr, 8};
    return process_vm_writev(pid, &local, 1, &remote, 1, 0) == 8 ? 0 : -1;
}

/* After stub i (registers r as on its original instruction, or as after an
 * exit): the copy address to go on at, or 0 when the thread is out (or, for
 * a barrier, must be put back). A call stub pushes the original return
 * address, as the call would have; a return or branch into copied retired
 * code goes on in the copy. */
static unsigned long go_on_at(int pid, const struct kp_runout *ro, long i, struct kp_regs *r)
{
    int kind = ro->stub_kind[i];
    if (kind == KP_STUB_CALL) {
        long j = find(ro->orig, ro->n, ro->stub_dest[i]);
        if (j < 0 || write_word(pid, r->rsp - 8, ro->stub_ret[i]))
            return 0;
        r->rsp -= 8;
        return ro->copy[j];
    }
    long j = kind == KP_STUB_EXIT ? find(ro->orig, ro->n, r->rip) : -1;
    return j < 0 ? 0 : ro->copy[j];
}

static int setregs(struct kp_thread *th, const struct kp_regs *r)
{
    if (ptrace(PTRACE_SETREGS, th->tid, 0, r) != 0)
        return -1;
    th->regs = *r;
    return 0;
}

/* Give up on a thread stopped inside the copy: put it back on the original. */
static int put_back(int pid, const struct kp_runout *ro, struct kp_thread *th, int why)
{
    struct kp_regs r = th->regs;
    if (put_back_regs(pid, ro, &r) || setregs(th, &r))
        return KP_ADV_LOST;
    return why;
}

/* Let a stopped thread run on to its next syscall stop. */
static int resume(struct kp_thread *th)
{
    if (ptrace(PTRACE_SYSCALL, th->tid, 0, 0) != 0)
        return KP_ADV_LOST;
    th->state = KP_RUNNING;
    return -1;
}

static void note_sig(struct kp_thread *th, int sig)
{
    if (th->nsigs < KP_MAX_SIGS)
        th->sigs[th->nsigs++] = sig;
}

static int start(int pid, struct kp_thread *th, const struct kp_runout *ro)
{
    if (th->state != KP_STOPPED || th->nsigs || th->group_stop || (long)th->regs.orig_rax >= 0)
        return KP_ADV_SKIPPED;  /* a signal to deliver, a group stop, or inside a syscall */
    long j = find(ro->orig, ro->n, th->regs.rip);
    if (j < 0)
        return KP_ADV_NOMAP;
    /* TRACESYSGOOD tells syscall stops from a real SIGTRAP; harmless later. */
    if (ptrace(PTRACE_SETOPTIONS, th->tid, 0, (void *)(long)(PTRACE_O_TRACECLONE | PTRACE_O_TRACESYSGOOD)))
        return KP_ADV_SKIPPED;
    struct kp_regs r = th->regs;
    r.rip = ro->copy[j];
    if (setregs(th, &r))
        return KP_ADV_SKIPPED;
    if (ptrace(PTRACE_SYSCALL, th->tid, 0, 0) != 0) {
        r.rip = ro->orig[j];
        return setregs(th, &r) ? KP_ADV_LOST : KP_ADV_SKIPPED;
    }
    th->state = KP_RUNNING;
    (void)pid;
    return -1;  /* running */
}

/* One wait status of an advancing thread; returns the verdict, or -1 to keep waiting. */
static int on_stop(int pid, const struct kp_runout *ro, struct kp_thread *th, int st, int *phase)
{
    if (WIFEXITED(st) || WIFSIGNALED(st)) {
        th->state = KP_GONE;
        return KP_ADV_GONE;
    }
    if (!WIFSTOPPED(st))
        return -1;
    th->state = KP_STOPPED;
    if (ptrace(PTRACE_GETREGS, th->tid, 0, &th->regs) != 0)
        return errno == ESRCH ? (th->state = KP_GONE, KP_ADV_GONE) : KP_ADV_LOST;
    int event = (unsigned)st >> 16, sig = WSTOPSIG(st);
    if (sig == (SIGTRAP | 0x80) && *phase == SKIP_EXIT) {
        *phase = TO_STUB;                        /* the skipped getpid's exit stop */
        return resume(th);
    }
    if (sig == (SIGTRAP | 0x80)) {
        int off = 0;
        long i = stub_index(ro, th->regs.rip, &off);
        if (i >= 0 && off == KP_STUB_SYSCALL_END) {
            /* Entry stop of a stub's getpid: skip it (orig_rax = -1 keeps
             * the registers we set, rax included) and finish the exit, or
             * undo the barrier, in the registers. One scheduling round. */
            struct kp_regs r = th->regs;
            if (leave_stub(pid, ro, i, &r))
                return KP_ADV_LOST;
            unsigned long at = go_on_at(pid, ro, i, &r);
            if (at) {
                r.rip = at;
                *phase = SKIP_EXIT;
                return setregs(th, &r) ? put_back(pid, ro, th, KP_ADV_BARRIER) : resume(th);
            }
            if (setregs(th, &r))
                return KP_ADV_LOST;
            return ro->stub_kind[i] == KP_STUB_EXIT ? KP_ADV_OUT : KP_ADV_BARRIER;
        }
        /* The code's own syscall (it may block): let it run from the original. */
        struct kp_regs r = th->regs;
        long j = find(ro->copy, ro->n, r.rip - 2);
        if (j < 0)
            return KP_ADV_LOST;
        r.rip = ro->orig[j] + 2;
        return setregs(th, &r) ? KP_ADV_LOST : KP_ADV_SYSCALL;
    }
    if (event == 0) {                            /* signal-delivery-stop */
        note_sig(th, sig);
        th->event = 0;
        return put_back(pid, ro, th, KP_ADV_SIGNAL);
    }
    if (event == PTRACE_EVENT_STOP) {            /* our interrupt, or a group stop */
        th->event = event;
        if (sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU)
            th->group_stop = 1;
        return put_back(pid, ro, th, KP_ADV_TIMEOUT);
    }
    /* Any other event stop (clone/exec/exit come after a syscall entry we
     * already caught): keep going. */
    return resume(th);
}

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

#define MAX_ADVANCE 4096
static int phase[MAX_ADVANCE];
static char interrupted[MAX_ADVANCE];

static int slot_of(const int *idx, int k, int i)
{
    for (int j = 0; j < k; j++)
        if (idx[j] == i)
            return j;
    return -1;
}

/* Wait for every advancing thread once (when kp_next_event cannot tell). */
static int sweep(int pid, struct kp_thread *t, const int *idx, int k, const struct kp_runout *ro,
                 int *result, int *running)
{
    int progress = 0;
    for (int j = 0; j < k; j++) {
        if (phase[j] == DONE)
            continue;
        struct kp_thread *th = &t[idx[j]];
        int st = 0;
        pid_t w = waitpid(th->tid, &st, __WALL | WNOHANG);
        if (w == 0)
            continue;
        progress++;
        int v = w < 0 ? (th->state = KP_GONE, KP_ADV_GONE) : on_stop(pid, ro, th, st, &phase[j]);
        if (v >= 0) {
            result[j] = v;
            phase[j] = DONE;
            (*running)--;
        }
    }
    return progress;
}

int kp_advance_all(int pid, struct kp_thread *t, const int *idx, int k,
                   const struct kp_runout *ro, long budget_us, long quiet_us, int *result)
{
    if (k > MAX_ADVANCE)
        k = MAX_ADVANCE;
    int idx_max = 0;   /* kp_next_event looks at t[0..idx_max) */
    for (int j = 0; j < k; j++)
        if (idx[j] + 1 > idx_max)
            idx_max = idx[j] + 1;
    int running = 0;
    for (int j = 0; j < k; j++) {
        phase[j] = DONE;
        interrupted[j] = 0;
        result[j] = start(pid, &t[idx[j]], ro);
        if (result[j] < 0) {
            phase[j] = TO_STUB;
            running++;
        }
    }
    double started = now_us(), deadline = started + (double)budget_us;
    /* While threads keep getting out, each gets quiet_us more (up to four
     * budgets): on a VM a thread's wake-up and stop cost tens of µs, and
     * giving up on 250 threads that are all making their way out wastes the
     * attempt. After the budget: interrupt the stragglers; they stop at once
     * (user code) or at their next syscall entry. The second deadline only
     * guards against a thread that gets no CPU for seconds (a starved machine). */
    double longest = started + 4.0 * (double)budget_us, hard = longest + 2000000.0;
    double idle_since = now_us();
    int interrupting = 0;
    while (running) {
        int progress = 0, st = 0, i = -1;
        while (running && (i = kp_next_event(t, idx_max, &st)) >= 0) {
            int j = slot_of(idx, k, i);
            progress++;
            if (j < 0 || phase[j] == DONE)
                continue;   /* only advancing threads are RUNNING: cannot happen */
            int v = on_stop(pid, ro, &t[i], st, &phase[j]);
            if (v >= 0) {
                result[j] = v;
                phase[j] = DONE;
                running--;
            }
        }
        if (i == -2)
            progress += sweep(pid, t, idx, k, ro, result, &running);
        double now = now_us();
        if (now > deadline) {
            interrupting = 1;
            for (int j = 0; j < k; j++)
                if (phase[j] != DONE && !interrupted[j]) {
                    interrupted[j] = 1;
                    ptrace(PTRACE_INTERRUPT, t[idx[j]].tid, 0, 0);
                }
        }
        if (now > hard)
            break;
        if (progress) {
            idle_since = now;
            if (now + (double)quiet_us > deadline && !interrupting)
                deadline = now + (double)quiet_us < longest ? now + (double)quiet_us : longest;
        } else {
            kp_idle(idle_since);   /* at SCHED_FIFO: a short sleep, never a spin */
        }
    }
    int out = 0;
    for (int j = 0; j < k; j++) {
        if (phase[j] != DONE)
            result[j] = KP_ADV_LOST;   /* still running inside the copy */
        out += result[j] == KP_ADV_OUT;
    }
    return out;
}
