/* limit_response.c — refuse oversized resolver answers, in the spirit of
 * the CVE-2015-7547 mitigations: any upstream answer larger than
 * RESPONSE_LIMIT bytes is treated as a failed lookup (TRY_AGAIN), so the
 * demo server answers SERVFAIL instead of passing it on.
 *
 * Wraps glibc's res_nquery (in libc.so.6 since glibc 2.34) and calls the
 * original through the stub the tool fills into res_nquery_orig.
 */
#include <hotpatch.h>
#include <netdb.h>
#include <resolv.h>

#define RESPONSE_LIMIT 1024

static int (*res_nquery_orig)(res_state, const char *, int, int, unsigned char *, int);

static int res_nquery_limited(res_state statp, const char *dname, int class, int type,
                              unsigned char *answer, int anslen) {
    int n = res_nquery_orig(statp, dname, class, type, answer, anslen);
    if (n > RESPONSE_LIMIT) {
        statp->res_h_errno = TRY_AGAIN;
        return -1;
    }
    return n;
}

HOTPATCH_WRAP("libc.so.6:res_nquery", res_nquery_limited, res_nquery_orig);
