/* bench_target.c — the process every benchmark patches.
 *
 *   bench_target MODE STATUS_FILE NWORKERS EXIT_AFTER_MS
 *
 * MODE
 *   stall  NWORKERS threads call compute() in batches with a short sleep
 *          between batches; a heartbeat thread times its own loop.
 *   tight  NWORKERS threads call compute() back to back (a little work of
 *          their own between calls, see spin_n); heartbeat too.
 *   rate   one thread calls compute() and compute_ref() back to back and
 *          publishes calls/s of each for consecutive windows.
 *   many   (built with -DMANY) like stall, the workers call f0..f999.
 *
 * The runner creates STATUS_FILE (zero-filled, STATUS_SIZE bytes); we map it
 * MAP_SHARED and publish plain int64 values (layout: struct status, keep in
 * sync with benchmarks/run.py).  The process exits by itself after
 * EXIT_AFTER_MS, and when the runner dies (PR_SET_PDEATHSIG).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x68636e6562706b73LL /* "skpbench" */
#define STATUS_SIZE (128 * 1024)
#define MAX_WORKERS 1024
#define RING 128

struct status {                    /* offsets in bytes */
    volatile int64_t magic;        /* 0 */
    volatile int64_t ready;        /* 8    1 once every thread runs */
    volatile int64_t pid;          /* 16 */
    volatile int64_t nworkers;     /* 24 */
    volatile int64_t reset_req;    /* 32   runner: bump to reset max_gap */
    volatile int64_t reset_ack;    /* 40   heartbeat: = reset_req once done */
    volatile int64_t max_gap_ns;   /* 48   longest heartbeat gap since reset */
    volatile int64_t beats;        /* 56   heartbeat iterations */
    volatile int64_t rt;           /* 64   1 if the heartbeat is SCHED_FIFO */
    volatile int64_t errors;       /* 72   calls that returned a wrong value */
    volatile int64_t windows;      /* 80   rate: windows published so far */
    volatile int64_t window_ns;    /* 88   rate: window length */
    volatile int64_t variant;      /* 96   last result / input (2 = original) */
    volatile int64_t reset_ack_main;  /* 104  the main thread's heartbeat: */
    volatile int64_t max_gap_main_ns; /* 112  same protocol as the above */
    volatile int64_t beats_main;      /* 120 */
    volatile int64_t pad[16];      /* up to 256 */
    volatile int64_t rate[RING];   /* 256  rate: compute() calls/s, window i % RING */
    volatile int64_t rate_ref[RING]; /* 1280 rate: compute_ref() calls/s */
    struct {
        volatile int64_t iters;    /* batches (stall) or calls (tight) done */
        int64_t pad[7];
    } w[MAX_WORKERS];              /* 2304 */
};
_Static_assert(sizeof(struct status) <= STATUS_SIZE, "status too big");
_Static_assert(__builtin_offsetof(struct status, rate) == 256, "layout");
_Static_assert(__builtin_offsetof(struct status, w) == 256 + 16 * RING, "layout");

static struct status *st;
static volatile int input = 7;

static void die(const char *what)
{
    fprintf(stderr, "bench_target: %s: %s\n", what, strerror(errno));
    _exit(99);
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void sleep_ns(int64_t ns)
{
    struct timespec req = {ns / 1000000000LL, ns % 1000000000LL};
    while (clock_nanosleep(CLOCK_MONOTONIC, 0, &req, &req) == EINTR)
        ;
}

/* --- the functions the benchmarks replace -------------------------------
 * noipa: gcc must neither inline, clone nor const-fold the calls.  The
 * volatile local makes the body 16 bytes (room for the 14-byte absolute jump
 * the gdb peer writes) and its first instruction 8 bytes long. */
__attribute__((noinline, noipa)) int compute(int x)
{
    volatile int k = 2;
    return x * k;
}

#ifdef MANY
#include "many_funcs.h" /* generated: f0..f999 like compute, and fn_table[] */
#endif

/* Work of the caller's own between calls in "tight" mode.  Without it the 64
 * threads are nearly always caught inside compute() (most at compute+12,
 * right after the load that waits on the store before it), and no tool that
 * checks could ever find a safe moment.  argv[5] sets it (default 30). */
static int spin_n = 30; /* argv[5] */
__attribute__((noinline, noipa)) static int spin(int n)
{
    volatile int acc = 0;
    for (int i = 0; i < n; i++)
        acc += i;
    return acc;
}

static void check(int x, int v)
{
    /* Original: x*2; every patch in benchmarks/patches returns x*3. */
    if (v != x * 2 && v != x * 3)
        __atomic_fetch_add(&st->errors, 1, __ATOMIC_RELAXED);
    else
        st->variant = v / x;
}

/* --- workers ------------------------------------------------------------ */

#define BATCH 16
static int64_t worker_pause_ns;

static void *stall_worker(void *p)
{
    int i = (int)(intptr_t)p;
    unsigned c = (unsigned)i * 37u;
    (void)c; /* used by -DMANY only */
    for (;;) {
        int x = input, v = 0;
        for (int j = 0; j < BATCH; j++) {
#ifdef MANY
            unsigned f = c++ % NFUNCS; /* every worker walks all of them */
            v = fn_table[f](x);
            if (v != x * (int)(2 + f % 7) && v != x * 3)
                __atomic_fetch_add(&st->errors, 1, __ATOMIC_RELAXED);
#else
            v = compute(x);
            check(x, v);
#endif
        }
        __atomic_fetch_add(&st->w[i].iters, 1, __ATOMIC_RELAXED);
        sleep_ns(worker_pause_ns);
    }
    return NULL;
}

static void *tight_worker(void *p)
{
    int i = (int)(intptr_t)p;
    /* nice 10: 64 spinning threads still get every idle cycle, but a thread a
     * tool injects into the process (frida's agent) is not starved by them. */
    setpriority(PRIO_PROCESS, (id_t)gettid(), 10);
    /* No atomics or shared stores per call: interrupts would pile up after
     * them and the threads would seldom be caught inside compute(). */
    for (int64_t n = 1;; n++) {
        int x = input, v = compute(x);
        if (v != x * 2 && v != x * 3)
            __atomic_fetch_add(&st->errors, 1, __ATOMIC_RELAXED);
        if (spin_n)
            spin(spin_n);
        st->w[i].iters = n; /* this thread's own cache line */
        if ((n & 1023) == 0)
            st->variant = v / x;
    }
    return NULL;
}

/* The call's cost, measured in here as a paired comparison: the rate
 * thread alternates chunks of CHUNK calls to compute() and to compute_ref(),
 * an identical function no patch touches, and keeps the fastest chunk of
 * each per ~100 ms window (the minimum is what the code costs; slower chunks
 * were interrupted or descheduled).  Both rates are published per window;
 * compute/compute_ref before vs after the patch cancels the drift of a
 * shared machine. */
__attribute__((noinline, noipa)) int compute_ref(int x)
{
    volatile int k = 2;
    return x * k;
}

#define CHUNK 2048

static void publish_window(int64_t i, int64_t best, int64_t best_ref)
{
    st->rate[i % RING] = CHUNK * 1000000000LL / (best ? best : 1);
    st->rate_ref[i % RING] = CHUNK * 1000000000LL / (best_ref ? best_ref : 1);
    st->variant = compute(1); /* 2 = original, 3 = patched */
    __atomic_store_n(&st->windows, i + 1, __ATOMIC_SEQ_CST);
}

static void *rate_worker(void *p)
{
    (void)p;
    const int64_t win = 100 * 1000000LL;
    st->window_ns = win;
    int64_t start = now_ns(), best = INT64_MAX, best_ref = INT64_MAX;
    for (int64_t i = 0;;) {
        int x = input, bad = 0;
        int64_t t0 = now_ns();
        for (int j = 0; j < CHUNK; j++)
            bad |= compute(x) > (1 << 30); /* never true; keeps the call */
        int64_t t1 = now_ns();
        for (int j = 0; j < CHUNK; j++)
            bad |= compute_ref(x) > (1 << 30);
        int64_t t2 = now_ns();
        if (bad)
            __atomic_fetch_add(&st->errors, 1, __ATOMIC_RELAXED);
        if (t1 - t0 < best)
            best = t1 - t0;
        if (t2 - t1 < best_ref)
            best_ref = t2 - t1;
        if (t2 - start >= win) {
            publish_window(i++, best, best_ref);
            start = t2, best = best_ref = INT64_MAX;
        }
    }
    return NULL;
}

/* --- heartbeats ------------------------------------------------------------
 * A heartbeat times its own loop (a 20 or 50 µs sleep) and keeps the longest gap.
 * While a tool holds the process stopped the heartbeat is stopped too, so
 * the gap it sees on resuming is the stall.  Two of them: a thread of its
 * own and the main thread, which is the thread a tool attaching to PID
 * (frida's injector, gdb's inferior calls) is most likely to hijack.
 * SCHED_FIFO (when allowed) keeps the scheduler's own delays, which
 * hundreds of runnable workers would cause, out of the measurement. */
static void heartbeat_loop(volatile int64_t *ack, volatile int64_t *max_gap,
                           volatile int64_t *beats, long period_ns, int64_t until)
{
    struct sched_param sp = {.sched_priority = 10};
    st->rt = pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp) == 0;
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    int64_t last = now_ns(), seen = 0;
    while (last < until) {
        struct timespec req = {0, period_ns};
        clock_nanosleep(CLOCK_MONOTONIC, 0, &req, NULL);
        int64_t t = now_ns(), gap = t - last;
        last = t;
        int64_t want = __atomic_load_n(&st->reset_req, __ATOMIC_ACQUIRE);
        if (want != seen) {
            /* Only this thread writes *max_gap: no lost updates. */
            *max_gap = 0;
            seen = want;
            __atomic_store_n(ack, want, __ATOMIC_RELEASE);
            continue;
        }
        if (gap > *max_gap)
            *max_gap = gap;
        (*beats)++;
    }
}

static void *heartbeat(void *p)
{
    (void)p;
    heartbeat_loop(&st->reset_ack, &st->max_gap_ns, &st->beats, 20000, INT64_MAX);
    return NULL;
}

static pthread_t spawn(void *(*fn)(void *), void *arg, size_t stack)
{
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setstacksize(&a, stack);
    pthread_t t;
    int err = pthread_create(&t, &a, fn, arg);
    if (err) {
        errno = err;
        die("pthread_create");
    }
    pthread_attr_destroy(&a);
    return t;
}

int main(int argc, char **argv)
{
    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: %s stall|tight|rate|many STATUS NWORKERS EXIT_AFTER_MS [SPIN]\n", argv[0]);
        return 2;
    }
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    const char *mode = argv[1];
    int n = atoi(argv[3]);
    int64_t exit_after = atoll(argv[4]) * 1000000LL;
    if (argc == 6)
        spin_n = atoi(argv[5]);
    if (n < 0 || n > MAX_WORKERS)
        return 2;

    int fd = open(argv[2], O_RDWR);
    if (fd < 0)
        die("open status");
    st = mmap(NULL, STATUS_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (st == MAP_FAILED)
        die("mmap status");
    close(fd);
    st->pid = getpid();
    st->nworkers = n;
    st->magic = MAGIC;

    /* Keep N sleeping workers to a bounded total of wake-ups (about 50k/s)
     * so that 1024 of them still leave the two cores usable. */
    worker_pause_ns = n * 20000LL > 200000LL ? n * 20000LL : 200000LL;
    const size_t stack = 128 * 1024;
    if (!strcmp(mode, "rate")) {
        spawn(rate_worker, NULL, stack);
        while (st->windows < 1)
            sleep_ns(1000000);
    } else {
        void *(*fn)(void *) = !strcmp(mode, "tight") ? tight_worker : stall_worker;
#ifdef MANY
        if (strcmp(mode, "many"))
            return 2;
#else
        if (strcmp(mode, "stall") && strcmp(mode, "tight"))
            return 2;
#endif
        for (int i = 0; i < n; i++)
            spawn(fn, (void *)(intptr_t)i, stack);
        spawn(heartbeat, NULL, stack);
        for (int i = 0; i < n; i++)
            while (__atomic_load_n(&st->w[i].iters, __ATOMIC_RELAXED) == 0)
                sleep_ns(1000000);
        while (st->beats < 10)
            sleep_ns(1000000);
    }
    __atomic_store_n(&st->ready, 1, __ATOMIC_SEQ_CST);
    if (!strcmp(mode, "rate"))
        sleep_ns(exit_after);
    else
        heartbeat_loop(&st->reset_ack_main, &st->max_gap_main_ns, &st->beats_main, 50000,
                       now_ns() + exit_after);
    _exit(0);
}
