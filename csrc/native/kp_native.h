/* ksplice_py native helpers: the parts of process control that run while the
 * target's threads are stopped, written in C so the stopped window holds no
 * Python per-call overhead. Built through cffi (ksplice_py/native.py); this
 * header is also the cdef, so it must stay within what cffi's parser accepts
 * (no #include, no macros with arguments). */

/* Thread states as seen by the tracer. */
#define KP_RUNNING 0   /* seized, not (yet) stopped */
#define KP_STOPPED 1   /* in a ptrace-stop, registers valid */
#define KP_GONE    2   /* exited */
#define KP_DETACHED 3  /* released by us */

#define KP_MAX_SIGS 8

/* Quiescence verdicts of kp_scan, per thread (ksplice_py/quiescence.py reads
 * them from here: this header is their one definition). */
#define KP_SAFE          0   /* neither rip nor a stack word in a busy range */
#define KP_IN_RIP        1   /* rip in a busy range */
#define KP_ON_STACK      2   /* a stack word (return address?) in a busy range */
#define KP_STACK_UNKNOWN 3   /* stack not in the given mappings, or unreadable */
#define KP_NOT_STOPPED   4   /* set by kp_window_open: a thread kp_stop_all could not stop */

struct kp_regs {   /* == struct user_regs_struct on x86-64 */
    unsigned long r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8;
    unsigned long rax, rcx, rdx, rsi, rdi, orig_rax, rip, cs, eflags, rsp, ss;
    unsigned long fs_base, gs_base, ds, es, fs, gs;
};

struct kp_thread {
    int tid;
    int state;
    int group_stop;              /* stopped in a group-stop: leave it stopped */
    int event;                   /* PTRACE_EVENT_* of its stop (0: signal-delivery-stop) */
    int nsigs;                   /* signals caught while stopped, re-delivered on release */
    int sigs[8];
    struct kp_regs regs;
    /* quiescence scan result */
    int unsafe;                  /* a KP_SAFE .. KP_STACK_UNKNOWN verdict */
    unsigned long hit_value;     /* the offending address */
    /* a flagged thread's stack [regs.rsp, +snap_len), copied to the window's
     * arena at snap_off for unwinding after release (snap_len 0: not copied) */
    unsigned long snap_off, snap_len;
    int snap_whole;              /* the copy reaches the top of its stack */
};

/* A thread that precise unwinding cleared after an earlier attempt, as it
 * was then: while its registers and the stack bytes the walk read are byte
 * for byte the same, the verdict is the same (the unwinder reads nothing
 * else), so the scan dismisses its conservative hit without unwinding. */
struct kp_known {
    int tid;
    struct kp_regs regs;
    unsigned long len;           /* stack bytes from regs.rsp the walk read */
    const unsigned char *stack;
};

/* One stopped window: everything it needs, computed before it. */
struct kp_window {
    int pid;
    int memfd;                                   /* /proc/PID/mem */
    long stop_timeout_us;
    int write;                                   /* 0: probe only */
    int realtime;                                /* SCHED_FIFO while stopped */
    const unsigned long *lo, *hi; int nranges;   /* busy code, sorted, disjoint */
    const unsigned long *stack_lo, *stack_hi; int nstacks;  /* writable maps */
    unsigned long max_scan;
    int nwrites;
    const unsigned long *waddr;
    const unsigned char *const *wbuf;            /* the bytes to write */
    const unsigned char *const *ubuf;            /* what was there: undo */
    const unsigned long *wlen;
    int nknown;
    const struct kp_known *known;
    unsigned char *arena; unsigned long arena_cap; /* copies of flagged stacks */
    /* results */
    int late;                                    /* threads that did not stop */
    int unsafe;                                  /* threads flagged by the scan */
    int failed_write;                            /* index, or -1 */
    unsigned long arena_used;
    double pause_us;                             /* first interrupt -> last release */
    double stop_us, scan_us, write_us, release_us; /* where the pause went */
    double t0;                                   /* (internal) */
    int old_policy, old_priority;                /* (internal) */
};

#define KP_FOLLOW_CLONES 1   /* PTRACE_O_TRACECLONE: the stop-the-world tracer */
#define KP_SYSCALL_STOPS 2   /* PTRACE_O_TRACESYSGOOD: the syscall injector */

/* Seize one thread with KP_* options. Returns 0 or -errno. */
int kp_seize(int tid, int options);

/* Change a stopped, seized thread's KP_* options. Returns 0 or -errno. */
int kp_set_options(int tid, int options);

/* Interrupt every RUNNING thread of t[0..*n) and wait until each is stopped,
 * gone, or the deadline passes. Threads born meanwhile are appended (up to
 * cap) and waited for too. Registers of stopped threads are read. Returns the
 * number of threads that did not stop in time (0 = world stopped). */
int kp_stop_all(struct kp_thread *t, int *n, int cap, long timeout_us);

/* One ready wait status of a RUNNING thread of t[0..n), consumed into *st:
 * its index; -1 when none is ready; -2 when a ready child is not one of
 * them (peeked, left for its owner: the caller waits per thread instead). */
int kp_next_event(const struct kp_thread *t, int n, int *st);

/* SCHED_FIFO for the calling thread: returns 1 and what to restore, or 0
 * (not allowed, or already FIFO; *old_policy = -1). */
int kp_rt_enter(int *old_policy, int *old_priority);
void kp_rt_leave(int old_policy, int old_priority);

/* One pause of a wait loop that made no progress since idle_since_us. */
void kp_idle(double idle_since_us);

/* Conservative quiescence scan of stopped threads: a thread is unsafe when its
 * rip or any aligned word from rsp to its stack's top lies in one of the
 * sorted, disjoint ranges [lo[i], hi[i]). stack_lo/stack_hi: sorted disjoint
 * writable mappings, to find each thread's stack top. Returns unsafe count. */
int kp_scan(int pid, struct kp_thread *t, int n,
            const unsigned long *lo, const unsigned long *hi, int nranges,
            const unsigned long *stack_lo, const unsigned long *stack_hi, int nstacks,
            unsigned long max_scan_bytes);

/* Write n buffers at their addresses through /proc/PID/mem. Returns the index
 * of the first failing write, or -1 when all succeeded. */
int kp_write_all(int memfd, int n, const unsigned long *addr,
                 const unsigned char *const *buf, const unsigned long *len);

/* The whole stopped window, in C: stop every thread, scan, write (when
 * w->write and nothing blocks), release every thread. Returns 1 if the
 * writes were made, 0 if not (see late, unsafe, failed_write). A step that
 * must see the stopped world before the writes goes between scan and
 * write in kp_window() (kp_native.c). */
int kp_window(struct kp_thread *t, int *n, int cap, struct kp_window *w);

/* kp_window in two halves, for a harness's Python check between them:
 * open stops and scans (returns 1 when nothing blocks); close writes if
 * go (and nothing blocked) and releases. */
int kp_window_open(struct kp_thread *t, int *n, int cap, struct kp_window *w);
int kp_window_close(struct kp_thread *t, int *n, int cap, struct kp_window *w, int go);

/* Detach every thread of t[0..*n): the stopped ones (kp_release_all), and
 * one still running is stopped briefly first, so none is left in a
 * ptrace-stop behind us. Sets *n to 0. */
void kp_release_world(int pid, struct kp_thread *t, int *n, int cap);

/* Release every stopped thread with PTRACE_DETACH, re-delivering the signals
 * caught while stopped (a group-stopped thread stays stopped: the kernel
 * re-instates its group-stop on detach). Returns the count of threads that
 * could not be released. */
int kp_release_all(int pid, struct kp_thread *t, int n);

/* Run one raw syscall in a stopped thread (seized with KP_SYSCALL_STOPS):
 * rip := entry (a `syscall` instruction), rsp := stack (the stub's save
 * area, see stub.py), run it between its syscall-entry
 * and syscall-exit stops, and restore every register exactly, so an
 * interrupted syscall of the thread restarts as if nothing happened. Signals
 * arriving meanwhile are recorded in th for re-delivery. Returns 0 and the
 * syscall's result in *ret, or -errno of the ptrace failure. */
int kp_inject_syscall(struct kp_thread *th, unsigned long entry, unsigned long stack, long nr,
                      long a1, long a2, long a3, long a4, long a5, long a6,
                      long *ret);

/* Microseconds on CLOCK_MONOTONIC, for measuring the pause. */
double kp_now_us(void);
