/* syscalls.c — threads parked in blocking system calls while being patched.
 *
 *   syscalls STATUS NWORKERS DATA_FD EVENT_FD
 *
 * reader:  read(DATA_FD) forever; byte k of the stream must be k % 251.
 * poller:  epoll_wait(-1) on EVENT_FD; returning with no event is a
 *          spurious wakeup (EARLY); drains what arrived.
 * timed:   epoll_wait(300 ms) on an empty epoll set; returning early or
 *          with an event is EARLY.
 * sleeper: nanosleep(1 s); returning early is EARLY.
 * Any EINTR goes to EINTR, any other failure to ERRORS. No signal handlers
 * are installed, so the kernel itself never lets EINTR through.
 * NWORKERS workers call compute() (the function the test patches).
 * Slots: ADDR0 = compute, READ_*, EPOLL_*, TIMED_WAITS, SLEEPS, IN_*.
 */
#include "common.h"
#include <sys/epoll.h>

#define TIMED_MS 300
#define SLEEP_NS 1000000000LL

__attribute__((noinline, noipa)) int compute(int x)
{
    volatile int k = 2;
    return x * k;
}

static volatile int input = 7;
static int data_fd, event_fd;

static int64_t work(void) { return compute(input); }

static void count_failure(void) { hp_add(errno == EINTR ? SL_EINTR : SL_ERRORS, 1); }

static void *reader(void *unused)
{
    (void)unused;
    unsigned char buf[4096];
    int64_t pos = 0;
    for (;;) {
        hp_set(SL_IN_READ, 1);
        ssize_t n = read(data_fd, buf, sizeof buf);
        hp_set(SL_IN_READ, 0);
        hp_add(SL_READ_RETURNS, 1);
        if (n < 0) {
            count_failure();
            continue;
        }
        if (n == 0) { /* the test closed the pipe: done */
            return NULL;
        }
        for (ssize_t i = 0; i < n; i++, pos++)
            if (buf[i] != (unsigned char)(pos % 251))
                hp_add(SL_READ_BAD, 1);
        hp_add(SL_READ_BYTES, n);
    }
}

static void *poller(void *unused)
{
    (void)unused;
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = event_fd};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, event_fd, &ev) != 0)
        hp_die("epoll setup");
    for (;;) {
        struct epoll_event out[4];
        hp_set(SL_IN_EPOLL, 1);
        int n = epoll_wait(ep, out, 4, -1);
        hp_set(SL_IN_EPOLL, 0);
        hp_add(SL_EPOLL_RETURNS, 1);
        if (n < 0) {
            count_failure();
            continue;
        }
        if (n == 0) {
            hp_add(SL_EARLY, 1);
            continue;
        }
        char buf[4096];
        ssize_t got = read(event_fd, buf, sizeof buf);
        if (got <= 0) {
            if (got == 0)
                return NULL;
            count_failure();
            continue;
        }
        hp_add(SL_EPOLL_BYTES, got);
    }
}

static void *timed(void *unused)
{
    (void)unused;
    int ep = epoll_create1(0);
    if (ep < 0)
        hp_die("epoll_create1");
    for (;;) {
        struct epoll_event out[1];
        int64_t t0 = hp_now_ns();
        int n = epoll_wait(ep, out, 1, TIMED_MS);
        int64_t dt = hp_now_ns() - t0;
        if (n < 0) {
            count_failure();
            continue;
        }
        if (n != 0 || dt < TIMED_MS * 1000000LL)
            hp_add(SL_EARLY, 1);
        hp_add(SL_TIMED_WAITS, 1);
    }
    return NULL;
}

static void *sleeper(void *unused)
{
    (void)unused;
    for (;;) {
        hp_set(SL_IN_SLEEP, 1);
        hp_sleep_ns(SLEEP_NS);
        hp_set(SL_IN_SLEEP, 0);
        hp_add(SL_SLEEPS, 1);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: %s STATUS NWORKERS DATA_FD EVENT_FD\n", argv[0]);
        return 2;
    }
    hp_open(argv[1]);
    data_fd = atoi(argv[3]);
    event_fd = atoi(argv[4]);
    hp_addr(SL_ADDR0, (const void *)compute);
    hp_start_workers(atoi(argv[2]), work);
    hp_spawn(reader, NULL);
    hp_spawn(poller, NULL);
    hp_spawn(timed, NULL);
    hp_spawn(sleeper, NULL);
    hp_ready();
    hp_idle();
}
