/* service.c — a small service, one per "host" of the Ansible test.
 *
 *   service STATUS NWORKERS [busy]
 *
 * NWORKERS threads call compute() in a loop (each worker's last result is in
 * the status file: 14 before the compute_mul patch, 21 after). With "busy",
 * one more thread is parked inside compute() for good, so no moment is ever
 * safe to switch it: that host's cutover must fail, untouched.
 * Slots: ADDR0 = compute.
 */
/* Six of these run at once in the test, beside others' work: a batch every
 * 2 ms keeps them cheap. */
#define HP_PAUSE_NS 2000000LL
#include "common.h"

__attribute__((noinline, noipa)) int compute(int x)
{
    volatile int k = 2;
    if (x < 0) /* the busy thread stays in here */
        for (;;)
            hp_sleep_ns(1000000000LL);
    return x * k;
}

static volatile int input = 7;

static int64_t work(void) { return compute(input); }

static void *parked(void *unused)
{
    (void)unused;
    compute(-1);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s STATUS NWORKERS [busy]\n", argv[0]);
        return 2;
    }
    hp_open(argv[1]);
    hp_addr(SL_ADDR0, (const void *)compute);
    hp_start_workers(atoi(argv[2]), work);
    if (argc > 3 && strcmp(argv[3], "busy") == 0)
        hp_spawn(parked, NULL);
    hp_ready();
    hp_idle();
}
