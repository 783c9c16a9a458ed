/* libfleet.c — the shared library the fleet tests and benchmark patch
 * ("libfleet.so:fleet_compute"); unique to them, so an --all run can never
 * reach another process. -DFLEET_MUL=N builds "another build" (a different
 * build-id) with the same soname. fleet_hold() parks a caller inside
 * fleet_compute's frame (a "busy" process with no safe moment). */
#include <time.h>

#ifndef FLEET_MUL
#define FLEET_MUL 5
#endif

volatile int fleet_holding;

/* Returns (as far as the compiler knows), so the return address it leaves
 * on the stack lies inside fleet_compute. */
__attribute__((noinline)) static void fleet_park(void)
{
    struct timespec ts = {0, 1000000};
    while (fleet_holding)
        nanosleep(&ts, 0);
}

__attribute__((noinline, noipa)) int fleet_compute(int x)
{
    volatile int k = FLEET_MUL;
    if (__builtin_expect(x < 0, 0)) {
        fleet_holding = 1;
        fleet_park();
    }
    return x * k;
}
