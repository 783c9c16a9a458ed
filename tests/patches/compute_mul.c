/* compute_mul.c — replace compute(x) by x * MUL.
 * -DMUL=N (default 3), -DTARGET='"libdemo.so:compute"' (default "compute"). */
#include <hotpatch.h>

#ifndef MUL
#define MUL 3
#endif
#ifndef TARGET
#define TARGET "compute"
#endif

static int compute_new(int x) { return x * MUL; }
HOTPATCH_REPLACE(TARGET, compute_new);
