/* scaled_wrap.c — wrap scaled() (RIP-relative first instruction) and reach
 * two static variables of the executable.
 * new scaled(x) = orig scaled(x) * 10 + bonus, and ++wrap_hits. */
#include <hotpatch.h>

static int (*scaled_orig)(int);
static long *hits_ptr;
static int *bonus_ptr;

static int scaled_wrap(int x)
{
    __atomic_fetch_add(hits_ptr, 1, __ATOMIC_RELAXED);
    return scaled_orig(x) * 10 + *bonus_ptr;
}

HOTPATCH_WRAP("scaled", scaled_wrap, scaled_orig);
HOTPATCH_SYMBOL("main:wrap_hits", hits_ptr);
HOTPATCH_SYMBOL("main:bonus", bonus_ptr);
