/* resolver_mkquery.c — wrap glibc's res_nmkquery(), a resolver function
 * that the lookups in tests/targets/resolver.c never call: only the
 * glibc-resolver harness (not the core quiescence check) can make this
 * patch wait for threads inside a lookup. */
#include <hotpatch.h>
#include <resolv.h>

static int (*mkquery_orig)(res_state, int, const char *, int, int, const unsigned char *, int,
                           const unsigned char *, unsigned char *, int);

static int mkquery_wrap(res_state st, int op, const char *dname, int class, int type,
                        const unsigned char *data, int datalen, const unsigned char *newrr,
                        unsigned char *buf, int buflen)
{
    return mkquery_orig(st, op, dname, class, type, data, datalen, newrr, buf, buflen);
}

HOTPATCH_WRAP("libc.so.6:res_nmkquery", mkquery_wrap, mkquery_orig);
