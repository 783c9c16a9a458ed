/* hot_target.c — the hot-function workload (issue #16).
 *
 *   hot_target STATUS_FILE NWORKERS EXIT_AFTER_MS
 *
 * NWORKERS threads call hot_leaf() back to back, no other work between
 * calls; every 1024th call checks the result (hot_ref(x) originally,
 * hot_ref(x) + 1 patched; anything else counts in `errors`) and publishes a
 * per-worker call count. Built with -DUSE_LIB, hot_leaf lives in libhot.so
 * and is called through the PLT; otherwise it is in the executable. A
 * heartbeat thread times its own 50 µs sleeps (the stall a tool causes).
 * Exits after EXIT_AFTER_MS and when the runner dies (PR_SET_PDEATHSIG).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <fcntl.h>
#include <time.h>
#include <unistd.h>

#include "hot_leaf.h"

#ifdef USE_LIB
int hot_leaf(int x); /* libhot.so, through the PLT */
#else
__attribute__((noinline, noipa)) int hot_leaf(int x) { return hot_ref(x); }
#endif

#define MAX_WORKERS 1024
struct status {                     /* keep in sync with bench/hot.py */
    volatile int64_t magic, ready, errors, max_gap_ns, reset_req, reset_ack, beats, pad;
    volatile int64_t calls[MAX_WORKERS];
};
static struct status *st;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void *worker(void *p)
{
    long i = (long)p;
    for (uint64_t n = 1;; n++) {
        int v = hot_leaf((int)n);
        if ((n & 1023) == 0) {
            int d = v - hot_ref((int)n);
            if (d != 0 && d != 1)
                __atomic_fetch_add(&st->errors, 1, __ATOMIC_RELAXED);
            st->calls[i] = (int64_t)n;
        }
    }
    return NULL;
}

static void *heartbeat(void *p)
{
    (void)p;
    int64_t last = now_ns();
    for (;;) {
        struct timespec ts = {0, 50000};
        nanosleep(&ts, NULL);
        int64_t t = now_ns();
        if (st->reset_req != st->reset_ack) {
            st->max_gap_ns = 0;
            st->reset_ack = st->reset_req;
        } else if (t - last > st->max_gap_ns) {
            st->max_gap_ns = t - last;
        }
        last = t;
        st->beats++;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 4)
        return 2;
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    int fd = open(argv[1], O_RDWR);
    st = mmap(NULL, sizeof *st, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (fd < 0 || st == MAP_FAILED)
        return 3;
    int n = atoi(argv[2]);
    if (n < 1 || n > MAX_WORKERS)
        return 2;
    pthread_t t;
    pthread_create(&t, NULL, heartbeat, NULL);
    for (long i = 0; i < n; i++)
        pthread_create(&t, NULL, worker, (void *)i);
    for (int i = 0; i < n; i++)
        while (!st->calls[i])
            usleep(1000);
    st->ready = 1;
    usleep(atoll(argv[3]) * 1000);
    return 0;
}
