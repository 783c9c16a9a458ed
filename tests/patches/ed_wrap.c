/* ed_wrap.c — wrap compute(): new compute(x) = orig(x) * 10 + 1, where
 * "orig" is whatever ran before this patch (a lower edition, if any). */
#include <hotpatch.h>

static int (*compute_orig)(int);

static int compute_wrap(int x) { return compute_orig(x) * 10 + 1; }

HOTPATCH_WRAP("compute", compute_wrap, compute_orig);
