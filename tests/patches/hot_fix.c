/* hot_fix.c — for tests/targets/hot.c: hot_ref(x) + 1 instead of hot_ref(x).
 * -DFUNC=hot_leaf (default) | hot_sys | hot_spin; -DLEAF_ROUNDS=N as the target. */
#include <hotpatch.h>
#include <time.h>
#include "../targets/hot.h"

#ifndef FUNC
#define FUNC hot_leaf
#endif
#define STR2(x) #x
#define STR(x) STR2(x)

static int fixed(int x)
{
    return hot_ref(x) + 1;
}
HOTPATCH_REPLACE(STR(FUNC), fixed);
