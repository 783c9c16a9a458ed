/* resolver.c — threads that sit inside glibc's resolver, for the
 * glibc-resolver harness tests (tests/test_harness.py).
 *
 *   resolver STATUS PORT RETRANS NQUERY NGAI
 *
 * NQUERY threads named "dnsq-N" call res_nquery() on a private res_state:
 * res_ninit(), then nsaddr_list[0] = 127.0.0.1:PORT, nscount = 1,
 * retrans = RETRANS seconds, retry = 1.
 * NGAI threads named "gai-N" call getaddrinfo(AF_INET) after pointing their
 * own per-thread _res the same way (res_init() first): glibc keeps a _res the
 * program modified instead of reloading /etc/resolv.conf, and hosts is
 * "files dns" in nsswitch.conf, so the lookup reaches the stub server.
 * Every lookup thread does one lookup per "go" line on stdin.
 * One worker (common.h) calls compute(), a main-executable function.
 *
 * Slots: ADDR0 = compute, ADDR1 = res_nquery, ADDR2 = getaddrinfo, and the
 * free slots 23.. (resolver-only, read by index in the test):
 *   23 INSIDE   threads currently inside a lookup
 *   24 DONE     lookups that returned
 *   25 OK       lookups that returned the stub's answer (127.0.0.7)
 *   26 WRAPPED  value of wrap_calls (only a patch increments it)
 *   27 STARTED  lookups started
 */
#include "common.h"

#include <arpa/inet.h>
#include <arpa/nameser.h>
#include <netdb.h>
#include <netinet/in.h>
#include <resolv.h>
#include <sys/socket.h>

enum { SL_INSIDE = SL_COUNT_, SL_DONE, SL_OK, SL_WRAPPED, SL_STARTED };
_Static_assert(SL_STARTED < HP_NSLOTS, "slots");

#define NAME "hp-harness.test."
#define ANSWER_ADDR "127.0.0.7"

static volatile long wrap_calls; /* static: reached by HOTPATCH_SYMBOL */
static int port, retrans;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static long generation; /* one lookup per thread per "go" */

/* The volatile local makes the body longer than a 5-byte jmp. */
__attribute__((noinline, noipa)) int compute(int x)
{
    volatile int k = 2;
    return x * k;
}

static volatile int input = 7;

static int64_t work(void)
{
    hp_set(SL_WRAPPED, wrap_calls);
    return compute(input);
}

static void point_at_stub(res_state st)
{
    st->nsaddr_list[0].sin_family = AF_INET;
    st->nsaddr_list[0].sin_port = htons(port);
    st->nsaddr_list[0].sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    st->nscount = 1;
    st->retrans = retrans;
    st->retry = 1;
}

static void wait_go(long *seen)
{
    pthread_mutex_lock(&mu);
    while (generation == *seen)
        pthread_cond_wait(&cv, &mu);
    *seen = generation;
    pthread_mutex_unlock(&mu);
}

static void finished(int ok)
{
    hp_add(SL_INSIDE, -1);
    hp_add(SL_DONE, 1);
    if (ok)
        hp_add(SL_OK, 1);
    hp_set(SL_WRAPPED, wrap_calls);
}

/* ok when the answer holds exactly the stub's A record */
static int answer_ok(const unsigned char *ans, int len)
{
    ns_msg msg;
    ns_rr rr;
    struct in_addr want;
    inet_pton(AF_INET, ANSWER_ADDR, &want);
    if (len <= 0 || ns_initparse(ans, len, &msg) < 0 || ns_msg_count(msg, ns_s_an) != 1
        || ns_parserr(&msg, ns_s_an, 0, &rr) < 0 || ns_rr_rdlen(rr) != 4)
        return 0;
    return memcmp(ns_rr_rdata(rr), &want, 4) == 0;
}

static void *nquery_main(void *p)
{
    char name[16];
    snprintf(name, sizeof name, "dnsq-%d", (int)(intptr_t)p);
    pthread_setname_np(pthread_self(), name);
    struct __res_state st;
    memset(&st, 0, sizeof st);
    if (res_ninit(&st) != 0)
        hp_die("res_ninit");
    point_at_stub(&st);
    long seen = 0;
    for (;;) {
        wait_go(&seen);
        unsigned char ans[512];
        hp_add(SL_STARTED, 1);
        hp_add(SL_INSIDE, 1);
        int n = res_nquery(&st, NAME, ns_c_in, ns_t_a, ans, sizeof ans);
        finished(answer_ok(ans, n));
    }
    return NULL;
}

static void *gai_main(void *p)
{
    char name[16];
    snprintf(name, sizeof name, "gai-%d", (int)(intptr_t)p);
    pthread_setname_np(pthread_self(), name);
    if (res_init() != 0)
        hp_die("res_init");
    point_at_stub(&_res);
    long seen = 0;
    for (;;) {
        wait_go(&seen);
        struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res = NULL;
        hp_add(SL_STARTED, 1);
        hp_add(SL_INSIDE, 1);
        int err = getaddrinfo(NAME, "80", &hints, &res);
        int ok = 0;
        if (err == 0) {
            char text[INET_ADDRSTRLEN];
            struct sockaddr_in *sin = (struct sockaddr_in *)res->ai_addr;
            ok = inet_ntop(AF_INET, &sin->sin_addr, text, sizeof text) && !strcmp(text, ANSWER_ADDR);
            freeaddrinfo(res);
        }
        finished(ok);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 6) {
        fprintf(stderr, "usage: %s STATUS PORT RETRANS NQUERY NGAI\n", argv[0]);
        return 2;
    }
    hp_open(argv[1]);
    port = atoi(argv[2]);
    retrans = atoi(argv[3]);
    hp_addr(SL_ADDR0, (const void *)compute);
    hp_addr(SL_ADDR1, (const void *)res_nquery);
    hp_addr(SL_ADDR2, (const void *)getaddrinfo);
    for (int i = 0; i < atoi(argv[4]); i++)
        hp_spawn(nquery_main, (void *)(intptr_t)i);
    for (int i = 0; i < atoi(argv[5]); i++)
        hp_spawn(gai_main, (void *)(intptr_t)i);
    hp_start_workers(1, work);
    hp_ready();

    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (!strcmp(line, "go\n")) {
            pthread_mutex_lock(&mu);
            generation++;
            pthread_cond_broadcast(&cv);
            pthread_mutex_unlock(&mu);
        } else {
            hp_add(SL_ERRORS, 1);
        }
        hp_add(SL_COMMANDS, 1);
    }
    hp_idle();
}
