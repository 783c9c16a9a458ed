/* hot_loop.c — replaces loop_to_entry (tests/targets/hot.c), whose loop
 * branches back to its entry, with new-calls consistency (-DSTRICT: without). */
#include <hotpatch.h>

static int loop_v2(int n) { return n; }
HOTPATCH_REPLACE("loop_to_entry", loop_v2);
#ifndef STRICT
HOTPATCH_CONSISTENCY("new-calls");
#endif
