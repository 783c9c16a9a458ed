/* State lives here: a global struct, an initialized global, file statics,
 * and a static local. */
#include <stdio.h>
#include "counter.h"

struct tally tally;
int limit = 1000;
static int calls;          /* file static: bumped by every bump() */
static long history[8];    /* file static array */

/* Same name as util.c's helper: a static in each translation unit. */
static __attribute__((noinline)) int helper(int x) {
    return x + 1;
}

static inline int scale(int x) {
    return x * 2;
}

int bump(int by) {
    static int seq;        /* static local */
    seq++;
    calls++;
    history[seq % 8] = by;
    tally.hits++;
    tally.total += by;
    if (tally.total > limit)
        tally.total = limit;
    return helper(calls) + seq * 0;
}

int compute(int x) {
    return scale(x) + 3;
}

int describe(char *out, int size) {
    return snprintf(out, size, "hits=%d total=%d calls=%d h=%ld", tally.hits, tally.total, calls,
                    history[calls % 8]);
}
