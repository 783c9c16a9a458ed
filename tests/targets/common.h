/* common.h — how a test target reports what it sees, shared with
 * tests/conftest.py (class Status).
 *
 * The test creates a zero-filled status file of HP_STATUS_SIZE bytes and
 * passes its path as argv[1]; the target maps it MAP_SHARED and writes plain
 * int64 values into it.  The test maps the same file and reads them, so it
 * observes the target without stopping it and without any I/O in the target.
 *
 * Layout (all little-endian int64; keep in sync with conftest.py):
 *   0  magic        HP_MAGIC once mapped
 *   8  ready        1 once the target is fully set up
 *   16 nworkers     number of worker slots in use
 *   24 pid
 *   32 slot[28]     named values, enum hp_slot below
 *   256 worker[16]  64 bytes each: iters (calls batches done), last (last result)
 */
#ifndef HP_COMMON_H
#define HP_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define HP_MAGIC 0x7375746174737068LL /* "hpstatus" */
#define HP_STATUS_SIZE 4096
#define HP_MAX_WORKERS 16
#define HP_NSLOTS 28

/* Named slots; the same names (lower-case, without SL_) are in conftest.SLOTS. */
enum hp_slot {
    SL_ADDR0 = 0, /* addresses of functions the test reads from /proc/PID/mem */
    SL_ADDR1,
    SL_ADDR2,
    SL_ADDR3,
    SL_ERRORS,        /* unexpected results or failed calls */
    SL_EINTR,         /* blocking calls that failed with EINTR */
    SL_EARLY,         /* sleeps that ended before their time / spurious wakeups */
    SL_READ_BYTES,    /* syscalls: bytes read from the data pipe */
    SL_READ_BAD,      /* syscalls: bytes whose value broke the stream pattern */
    SL_READ_RETURNS,  /* syscalls: read() calls that returned */
    SL_IN_READ,       /* 1 while a thread is inside read() */
    SL_EPOLL_BYTES,   /* syscalls: bytes drained after epoll_wait */
    SL_EPOLL_RETURNS, /* syscalls: epoll_wait(-1) calls that returned */
    SL_IN_EPOLL,      /* 1 while a thread is inside epoll_wait(-1) */
    SL_TIMED_WAITS,   /* syscalls: completed epoll_wait(timeout) calls */
    SL_SLEEPS,        /* syscalls: completed nanosleep calls */
    SL_IN_SLEEP,      /* 1 while a thread is inside nanosleep */
    SL_HOLD_STATE,    /* blocker: 1 inside hold() before read, 2 after */
    SL_HOLD_RESULT,   /* blocker: last hold() result */
    SL_HOLD_CALLS,    /* blocker: hold() calls that returned */
    SL_WRAP_HITS,     /* wrap: value of the static variable the patch increments */
    SL_FACTOR,        /* wrap: current value of the global `factor` */
    SL_COMMANDS,      /* number of stdin commands handled */
    SL_COUNT_
};
_Static_assert(SL_COUNT_ <= HP_NSLOTS, "too many slots");

struct hp_worker {
    volatile int64_t iters;
    volatile int64_t last;
    int64_t pad[6];
};

struct hp_status {
    volatile int64_t magic;
    volatile int64_t ready;
    volatile int64_t nworkers;
    volatile int64_t pid;
    volatile int64_t slot[HP_NSLOTS];
    struct hp_worker w[HP_MAX_WORKERS];
};
_Static_assert(sizeof(struct hp_status) <= HP_STATUS_SIZE, "status too big");
_Static_assert(__builtin_offsetof(struct hp_status, w) == 256, "layout");

static struct hp_status *hp;

static void hp_die(const char *what)
{
    fprintf(stderr, "target: %s: %s\n", what, strerror(errno));
    _exit(99);
}

static void hp_open(const char *path)
{
    int fd = open(path, O_RDWR);
    if (fd < 0)
        hp_die("open status file");
    void *p = mmap(NULL, HP_STATUS_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        hp_die("mmap status file");
    close(fd);
    hp = p;
    hp->pid = getpid();
    hp->magic = HP_MAGIC;
}

static inline void hp_set(int slot, int64_t v) { __atomic_store_n(&hp->slot[slot], v, __ATOMIC_SEQ_CST); }
static inline void hp_add(int slot, int64_t d) { __atomic_fetch_add(&hp->slot[slot], d, __ATOMIC_SEQ_CST); }
static inline void hp_addr(int slot, const void *fn) { hp_set(slot, (int64_t)(intptr_t)fn); }

static inline int64_t hp_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* nanosleep that reports what a patch tool must never cause: EINTR (no
 * signal handlers are installed, so the kernel restarts it unless someone
 * corrupted the registers) or a sleep shorter than asked. */
static void hp_sleep_ns(int64_t ns)
{
    struct timespec req = {ns / 1000000000LL, ns % 1000000000LL};
    int64_t t0 = hp_now_ns();
    if (nanosleep(&req, NULL) != 0) {
        hp_add(errno == EINTR ? SL_EINTR : SL_ERRORS, 1);
        return;
    }
    if (hp_now_ns() - t0 < ns)
        hp_add(SL_EARLY, 1);
}

/* --- workers: call work() in batches, publish the last result ----------- */

typedef int64_t (*hp_work_fn)(void);

#define HP_BATCH 32          /* calls per batch */
#ifndef HP_PAUSE_NS
#define HP_PAUSE_NS 200000LL /* sleep between batches: keeps 2 cores usable */
#endif

struct hp_worker_arg {
    int index;
    hp_work_fn work;
};

static void *hp_worker_main(void *p)
{
    struct hp_worker_arg *a = p;
    struct hp_worker *w = &hp->w[a->index];
    for (;;) {
        int64_t v = 0;
        for (int i = 0; i < HP_BATCH; i++)
            v = a->work();
        w->last = v;
        __atomic_fetch_add(&w->iters, 1, __ATOMIC_SEQ_CST);
        hp_sleep_ns(HP_PAUSE_NS);
    }
    return NULL;
}

static void hp_spawn(void *(*fn)(void *), void *arg)
{
    pthread_t t;
    int err = pthread_create(&t, NULL, fn, arg);
    if (err) {
        errno = err;
        hp_die("pthread_create");
    }
}

/* Start n workers and return once each has finished one batch. */
static void hp_start_workers(int n, hp_work_fn work)
{
    static struct hp_worker_arg args[HP_MAX_WORKERS];
    if (n < 0 || n > HP_MAX_WORKERS) {
        fprintf(stderr, "target: bad worker count %d\n", n);
        _exit(99);
    }
    hp->nworkers = n;
    for (int i = 0; i < n; i++) {
        args[i].index = i;
        args[i].work = work;
        hp_spawn(hp_worker_main, &args[i]);
    }
    for (int i = 0; i < n; i++)
        while (__atomic_load_n(&hp->w[i].iters, __ATOMIC_SEQ_CST) == 0)
            hp_sleep_ns(1000000);
}

static void hp_ready(void) { __atomic_store_n(&hp->ready, 1, __ATOMIC_SEQ_CST); }

/* Main thread after setup: block forever (pause() is restarted by the
 * kernel after a ptrace stop since no handler runs). */
static void hp_idle(void)
{
    for (;;)
        pause();
}

#endif /* HP_COMMON_H */
