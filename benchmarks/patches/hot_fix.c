/* hot_fix.c — ours: hot_leaf returns hot_ref(x) + 1. -DTARGET selects the object. */
#include <hotpatch.h>
#include "../targets/hot_leaf.h"
#ifndef TARGET
#define TARGET "hot_leaf"
#endif
static int hot_leaf_v2(int x) { return hot_ref(x) + 1; }
HOTPATCH_REPLACE(TARGET, hot_leaf_v2);
