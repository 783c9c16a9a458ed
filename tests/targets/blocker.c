/* blocker.c — a thread that sleeps INSIDE the function a patch replaces.
 *
 *   blocker STATUS NWORKERS GO_FD CTL_FD
 *
 * The holder thread waits for a byte on GO_FD (outside hold), then calls
 * hold(CTL_FD), which blocks in read() until the test writes a byte to
 * CTL_FD; hold returns 1000 + that byte. So while the test holds CTL_FD
 * empty, hold() is on the holder's stack and no cutover is safe.
 * NWORKERS workers call compute() to show the rest keeps running.
 * Slots: ADDR0 = hold, ADDR1 = compute, HOLD_STATE, HOLD_RESULT, HOLD_CALLS.
 */
#include "common.h"

__attribute__((noinline, noipa)) int hold(int fd)
{
    unsigned char c = 0;
    hp_set(SL_HOLD_STATE, 1);
    ssize_t n = read(fd, &c, 1);
    hp_set(SL_HOLD_STATE, 2);
    if (n != 1) {
        hp_add(n < 0 && errno == EINTR ? SL_EINTR : SL_ERRORS, 1);
        return -1;
    }
    return 1000 + c;
}

__attribute__((noinline, noipa)) int compute(int x)
{
    volatile int k = 2;
    return x * k;
}

static volatile int input = 7;
static int go_fd, ctl_fd;

static int64_t work(void) { return compute(input); }

static void *holder(void *unused)
{
    (void)unused;
    for (;;) {
        unsigned char g;
        ssize_t n = read(go_fd, &g, 1);
        if (n != 1) {
            hp_add(n < 0 && errno == EINTR ? SL_EINTR : SL_ERRORS, 1);
            if (n == 0)
                return NULL;
            continue;
        }
        int r = hold(ctl_fd);
        hp_set(SL_HOLD_RESULT, r);
        hp_add(SL_HOLD_CALLS, 1);
    }
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: %s STATUS NWORKERS GO_FD CTL_FD\n", argv[0]);
        return 2;
    }
    hp_open(argv[1]);
    go_fd = atoi(argv[3]);
    ctl_fd = atoi(argv[4]);
    hp_addr(SL_ADDR0, (const void *)hold);
    hp_addr(SL_ADDR1, (const void *)compute);
    hp_start_workers(atoi(argv[2]), work);
    hp_spawn(holder, NULL);
    hp_ready();
    hp_idle();
}
