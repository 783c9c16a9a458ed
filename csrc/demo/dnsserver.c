/* dnsserver.c — the live-patching demo target: a small threaded UDP DNS server.
 *
 *   dnsserver -z zone.txt [-p PORT] [-w WORKERS] [-u UPSTREAM_PORT]
 *
 * Binds 127.0.0.1:PORT (0: the kernel picks; the port is printed), answers
 * names under demo.test. from the zone file, and forwards every other name
 * through glibc's resolver (res_nquery on a private per-thread res_state
 * aimed at 127.0.0.1:UPSTREAM_PORT). Prints one line "READY port=N pid=N"
 * on stdout when it serves.
 *
 * It carries a deliberate bug of the CVE kind: parse_qname() decodes the
 * QNAME into a fixed stack buffer and never checks the total length, so one
 * packet with a long enough name smashes its stack (built with
 * -fstack-protector-strong the process aborts: "stack smashing detected").
 * csrc/demo/patches/fix_parse.c replaces it live; limit_response.c wraps
 * res_nquery. Functions a patch touches are noipa so that gcc neither
 * inlines them nor specialises their callers on their body.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <arpa/nameser.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <resolv.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#define NAME_MAX_TEXT 256  /* RFC 1035: 255 octets on the wire */
#define PKT_MAX 4096       /* what we read from a client */
#define ANSWER_MAX 8192    /* what we accept from upstream */
#define ZONE_SUFFIX "demo.test."
#define TTL 300

enum { RC_NOERROR = 0, RC_FORMERR = 1, RC_SERVFAIL = 2, RC_NXDOMAIN = 3, RC_NOTIMP = 4 };

struct record {
    char name[NAME_MAX_TEXT];
    uint16_t type;
    uint16_t rdlen;
    uint8_t rdata[256];
};

static struct record *zone;
static size_t zone_len;
static int server_fd = -1;
static struct sockaddr_in upstream;

/* --- the zone -------------------------------------------------------------- */

static void die(const char *what) {
    fprintf(stderr, "dnsserver: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int parse_record(char *line, struct record *r) {
    char name[NAME_MAX_TEXT], type[16];
    int used = 0;
    if (sscanf(line, "%255s %15s %n", name, type, &used) < 2 || name[0] == '#')
        return 0;
    char *value = line + used;
    value[strcspn(value, "\r\n")] = '\0';
    snprintf(r->name, sizeof r->name, "%s", name);
    if (strcasecmp(type, "A") == 0) {
        r->type = ns_t_a, r->rdlen = 4;
        return inet_pton(AF_INET, value, r->rdata) == 1 ? 1 : -1;
    }
    if (strcasecmp(type, "AAAA") == 0) {
        r->type = ns_t_aaaa, r->rdlen = 16;
        return inet_pton(AF_INET6, value, r->rdata) == 1 ? 1 : -1;
    }
    if (strcasecmp(type, "TXT") == 0) {
        size_t n = strlen(value);
        if (n < 2 || value[0] != '"' || value[n - 1] != '"' || n - 2 > 255)
            return -1;
        r->type = ns_t_txt, r->rdlen = (uint16_t)(n - 1);
        r->rdata[0] = (uint8_t)(n - 2);
        memcpy(r->rdata + 1, value + 1, n - 2);
        return 1;
    }
    return -1;
}

static void load_zone(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f)
        die(path);
    char line[512];
    size_t cap = 0;
    for (int lineno = 1; fgets(line, sizeof line, f); lineno++) {
        struct record r;
        int ok = parse_record(line, &r);
        if (ok < 0) {
            fprintf(stderr, "dnsserver: %s:%d: bad record\n", path, lineno);
            exit(2);
        }
        if (ok == 0)
            continue;
        if (zone_len == cap && !(zone = realloc(zone, (cap = cap ? 2 * cap : 16) * sizeof *zone)))
            die("realloc");
        zone[zone_len++] = r;
    }
    fclose(f);
}

/* --- parsing: the vulnerable function --------------------------------------- */

/* Decode the QNAME at pkt[off] into dotted text ("www.demo.test.") in out.
 * Returns the offset just past the QNAME, or -1 for a malformed name.
 *
 * BUG (the demo's "CVE"): labels are gathered in `text` without checking
 * that the name still fits — the bound is only checked when copying out,
 * too late. A query whose QNAME has more than 256 bytes of labels overflows
 * `text`; the stack protector aborts the process on return. */
__attribute__((noipa)) int parse_qname(const uint8_t *pkt, size_t len, size_t off,
                                       char *out, size_t outsz) {
    char text[NAME_MAX_TEXT];
    size_t n = 0;
    for (;;) {
        if (off >= len)
            return -1;
        uint8_t l = pkt[off++];
        if (l == 0)
            break;
        if (l & 0xC0)  /* no compression pointers in a question */
            return -1;
        if (off + l > len)
            return -1;
        memcpy(text + n, pkt + off, l);  /* unchecked: n + l may pass 256 */
        n += l;
        text[n++] = '.';
        off += l;
    }
    if (n == 0)
        text[n++] = '.';
    if (n >= outsz)
        return -1;
    memcpy(out, text, n);
    out[n] = '\0';
    return (int)off;
}

/* --- answering -------------------------------------------------------------- */

struct worker {
    pthread_t thread;
    int index;
    struct __res_state res;  /* private resolver state: no shared _res */
};

static size_t put16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)(v >> 8), p[1] = (uint8_t)v;
    return 2;
}

static int name_in_zone(const char *name) {
    size_t n = strlen(name), s = strlen(ZONE_SUFFIX);
    return n >= s && strcasecmp(name + n - s, ZONE_SUFFIX) == 0 &&
           (n == s || name[n - s - 1] == '.');
}

/* Header of a reply to `query`: same id and RD, QR=1, RA=1. */
static void reply_header(uint8_t *r, const uint8_t *query, int aa, int rcode,
                         uint16_t qd, uint16_t an) {
    memcpy(r, query, 2);
    r[2] = (uint8_t)(0x80 | (aa ? 0x04 : 0) | (query[2] & 0x01));
    r[3] = (uint8_t)(0x80 | rcode);
    put16(r + 4, qd), put16(r + 6, an), put16(r + 8, 0), put16(r + 10, 0);
}

static size_t answer_zone(const uint8_t *q, size_t qend, const char *name, uint16_t qtype,
                          uint8_t *r, size_t rmax) {
    int exists = 0;
    uint16_t an = 0;
    memcpy(r + 12, q + 12, qend - 12);  /* the question, as asked */
    size_t len = qend;
    for (size_t i = 0; i < zone_len; i++) {
        if (strcasecmp(zone[i].name, name) != 0)
            continue;
        exists = 1;
        if (zone[i].type != qtype || len + 12 + zone[i].rdlen > rmax)
            continue;
        len += put16(r + len, 0xC00C);  /* pointer to the question's name */
        len += put16(r + len, zone[i].type);
        len += put16(r + len, ns_c_in);
        len += put16(r + len, 0), len += put16(r + len, TTL);
        len += put16(r + len, zone[i].rdlen);
        memcpy(r + len, zone[i].rdata, zone[i].rdlen);
        len += zone[i].rdlen;
        an++;
    }
    reply_header(r, q, 1, exists ? RC_NOERROR : RC_NXDOMAIN, 1, an);
    return len;
}

static size_t answer_upstream(struct worker *w, const uint8_t *q, size_t qend, const char *name,
                              uint16_t qtype, uint8_t *r, size_t rmax) {
    int n = res_nquery(&w->res, name, ns_c_in, qtype, r, (int)rmax);
    if (n >= 12 && (size_t)n <= rmax) {
        memcpy(r, q, 2);                        /* the client's id */
        r[2] = (uint8_t)((r[2] & ~0x01) | (q[2] & 0x01));
        r[3] |= 0x80;                           /* RA */
        return (size_t)n;
    }
    int rcode = RC_SERVFAIL;
    if (w->res.res_h_errno == HOST_NOT_FOUND)
        rcode = RC_NXDOMAIN;
    else if (w->res.res_h_errno == NO_DATA)
        rcode = RC_NOERROR;
    memcpy(r + 12, q + 12, qend - 12);
    reply_header(r, q, 0, rcode, 1, 0);
    return qend;
}

static size_t handle_query(struct worker *w, const uint8_t *q, size_t qlen, uint8_t *r, size_t rmax) {
    char name[NAME_MAX_TEXT];
    if (qlen < 12 || (q[2] & 0x80))
        return 0;  /* not a query: never answer (no reflection loops) */
    uint16_t qd = (uint16_t)(q[4] << 8 | q[5]);
    int opcode = (q[2] >> 3) & 0x0F;
    if (opcode != 0) {
        reply_header(r, q, 0, RC_NOTIMP, 0, 0);
        return 12;
    }
    int end = qd == 1 ? parse_qname(q, qlen, 12, name, sizeof name) : -1;
    if (end < 0 || (size_t)end + 4 > qlen) {
        reply_header(r, q, 0, RC_FORMERR, 0, 0);
        return 12;
    }
    uint16_t qtype = (uint16_t)(q[end] << 8 | q[end + 1]);
    size_t qend = (size_t)end + 4;
    if (name_in_zone(name))
        return answer_zone(q, qend, name, qtype, r, rmax);
    return answer_upstream(w, q, qend, name, qtype, r, rmax);
}

static void *worker_main(void *arg) {
    struct worker *w = arg;
    uint8_t *q = malloc(PKT_MAX), *r = malloc(ANSWER_MAX);
    if (!q || !r)
        die("malloc");
    for (;;) {
        struct sockaddr_in peer;
        socklen_t plen = sizeof peer;
        ssize_t n = recvfrom(server_fd, q, PKT_MAX, 0, (struct sockaddr *)&peer, &plen);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("recvfrom");
        }
        size_t rlen = handle_query(w, q, (size_t)n, r, ANSWER_MAX);
        if (rlen && sendto(server_fd, r, rlen, 0, (struct sockaddr *)&peer, plen) < 0 &&
            errno != EAGAIN && errno != EMSGSIZE)
            die("sendto");
    }
    return NULL;
}

static void resolver_init(struct worker *w) {
    memset(&w->res, 0, sizeof w->res);
    if (res_ninit(&w->res) != 0) {
        fprintf(stderr, "dnsserver: res_ninit failed\n");
        exit(1);
    }
    /* Only our upstream, answer fast or fail fast. */
    w->res.nsaddr_list[0] = upstream;
    w->res.nscount = 1;
    w->res.retrans = 1;
    w->res.retry = 1;
    w->res.options &= ~(unsigned long)(RES_DNSRCH | RES_DEFNAMES);
}

static void usage(void) {
    fprintf(stderr, "usage: dnsserver -z ZONE [-p PORT] [-w WORKERS] [-u UPSTREAM_PORT]\n");
    exit(2);
}

int main(int argc, char **argv) {
    int port = 0, workers = 4, upstream_port = 53, opt;
    const char *zone_path = NULL;
    while ((opt = getopt(argc, argv, "p:w:u:z:")) != -1) {
        switch (opt) {
        case 'p': port = atoi(optarg); break;
        case 'w': workers = atoi(optarg); break;
        case 'u': upstream_port = atoi(optarg); break;
        case 'z': zone_path = optarg; break;
        default: usage();
        }
    }
    if (!zone_path || port < 0 || port > 65535 || workers < 1 || workers > 64 ||
        upstream_port < 1 || upstream_port > 65535)
        usage();
    load_zone(zone_path);

    upstream.sin_family = AF_INET;
    upstream.sin_port = htons((uint16_t)upstream_port);
    upstream.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

    server_fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (server_fd < 0)
        die("socket");
    /* Room for seconds of queries: a stop-the-world that runs long must
     * delay answers, not drop them (FORCE passes rmem_max when privileged). */
    int big = 8 << 20;
    if (setsockopt(server_fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big) < 0)
        setsockopt(server_fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(server_fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        die("bind");
    socklen_t alen = sizeof addr;
    getsockname(server_fd, (struct sockaddr *)&addr, &alen);

    struct worker *ws = calloc((size_t)workers, sizeof *ws);
    if (!ws)
        die("calloc");
    for (int i = 0; i < workers; i++) {
        ws[i].index = i;
        resolver_init(&ws[i]);
    }
    for (int i = 0; i < workers; i++)
        if ((errno = pthread_create(&ws[i].thread, NULL, worker_main, &ws[i])) != 0)
            die("pthread_create");
    printf("READY port=%d pid=%d\n", ntohs(addr.sin_port), (int)getpid());
    fflush(stdout);
    for (int i = 0; i < workers; i++)
        pthread_join(ws[i].thread, NULL);
    return 0;
}
