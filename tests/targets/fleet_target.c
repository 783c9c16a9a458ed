/* fleet_target.c — a small two-thread process mapping libfleet.so, for the
 * fleet (--all) tests and benchmark. argv: STATUS_FILE [PERIOD_US [hold]].
 *
 * The worker thread calls fleet_compute(3) every PERIOD_US (default 1000)
 * and publishes the result (15 before the patch, 21 after; another build of
 * the library gives another first value); a result that is neither the
 * first one nor 21 counts as an error. The main thread is a heartbeat: it sleeps
 * PERIOD_US at a time and keeps in slot "early" nothing, in worker slot 1
 * "last" the longest gap (µs) between two wake-ups beyond the period — the
 * stall the process felt. A test may write 0 there to restart the
 * measurement. With "hold", the worker parks inside fleet_compute for ever
 * (a process with no safe moment). */
#include "common.h"

extern int fleet_compute(int x);
static int64_t period_ns = 1000000;
static int hold;

static void *worker(void *p)
{
    (void)p;
    struct hp_worker *w = &hp->w[0];
    if (hold)
        fleet_compute(-1);
    int first = fleet_compute(3);
    for (;;) {
        int v = fleet_compute(3);
        if (v != first && v != 21)
            hp_add(SL_ERRORS, 1);
        w->last = v;
        __atomic_fetch_add(&w->iters, 1, __ATOMIC_SEQ_CST);
        hp_sleep_ns(period_ns);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    hp_open(argv[1]);
    if (argc > 2)
        period_ns = atoll(argv[2]) * 1000LL;
    hold = argc > 3 && strcmp(argv[3], "hold") == 0;
    hp->nworkers = 1;
    hp_addr(SL_ADDR0, (const void *)fleet_compute);
    hp_spawn(worker, NULL);
    if (hold) {
        extern volatile int fleet_holding;
        while (!fleet_holding)
            hp_sleep_ns(1000000);
    } else {
        while (__atomic_load_n(&hp->w[0].iters, __ATOMIC_SEQ_CST) == 0)
            hp_sleep_ns(1000000);
    }
    hp_ready();
    struct hp_worker *hb = &hp->w[1];
    int64_t last = hp_now_ns();
    for (;;) {
        hp_sleep_ns(period_ns);
        int64_t now = hp_now_ns();
        int64_t over = (now - last - period_ns) / 1000;
        if (over > hb->last)
            hb->last = over;
        __atomic_fetch_add(&hb->iters, 1, __ATOMIC_SEQ_CST);
        last = now;
    }
}
