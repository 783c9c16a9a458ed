/* ed_fg.c — replace BOTH f() and g() of ed_target with version VER
 * (-DVER=N, default 2): f returns VER, g returns 100 * VER + f().
 * g calls f through the target's own f (HOTPATCH_SYMBOL), i.e. through
 * f's trampoline: it sees whichever f is live, so a half-applied patch
 * (one trampoline in, the other not) shows as a mismatch either way. */
#include <hotpatch.h>

#ifndef VER
#define VER 2
#endif

static int (*f_live)(void);

static int f_new(void) { return VER; }
static int g_new(void) { return 100 * VER + f_live(); }

HOTPATCH_REPLACE("f", f_new);
HOTPATCH_REPLACE("g", g_new);
HOTPATCH_SYMBOL("main:f", f_live);
