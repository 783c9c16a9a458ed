/* resolver_wrap.c — wrap glibc's res_nquery(): count the calls in the
 * target's static wrap_calls and call the original. A patch of libc.so.6,
 * so the glibc-resolver harness applies to it. */
#include <hotpatch.h>
#include <resolv.h>

static int (*res_nquery_orig)(res_state, const char *, int, int, unsigned char *, int);
static long *calls_ptr;

static int res_nquery_wrap(res_state st, const char *dname, int class, int type,
                           unsigned char *answer, int anslen)
{
    __atomic_fetch_add(calls_ptr, 1, __ATOMIC_RELAXED);
    return res_nquery_orig(st, dname, class, type, answer, anslen);
}

HOTPATCH_WRAP("libc.so.6:res_nquery", res_nquery_wrap, res_nquery_orig);
HOTPATCH_SYMBOL("main:wrap_calls", calls_ptr);
