/* ed_h.c — replace h() of ed_target: returns 6 instead of 5. */
#include <hotpatch.h>

static int h_new(void) { return 6; }
HOTPATCH_REPLACE("h", h_new);
