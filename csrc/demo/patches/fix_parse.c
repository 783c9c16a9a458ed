/* fix_parse.c — the security fix for the demo server's QNAME parser.
 *
 * Replaces main:parse_qname with a version that bounds the decoded name
 * (255 octets on the wire, RFC 1035 3.1) *before* copying each label, so a
 * crafted over-long QNAME is a malformed query: the server answers FORMERR
 * instead of smashing its stack. Same signature and contract as the
 * original (csrc/demo/dnsserver.c).
 */
#include <hotpatch.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define NAME_MAX_TEXT 256
#define NAME_MAX_WIRE 255

static int parse_qname_fixed(const uint8_t *pkt, size_t len, size_t off, char *out, size_t outsz) {
    char text[NAME_MAX_TEXT];
    size_t n = 0, wire = 1;  /* the root label's zero octet */
    for (;;) {
        if (off >= len)
            return -1;
        uint8_t l = pkt[off++];
        if (l == 0)
            break;
        if (l & 0xC0)
            return -1;
        if (off + l > len)
            return -1;
        wire += 1u + l;
        if (wire > NAME_MAX_WIRE || n + l + 1 >= sizeof text)
            return -1;  /* the fix: too long is malformed, checked before the copy */
        memcpy(text + n, pkt + off, l);
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

HOTPATCH_REPLACE("main:parse_qname", parse_qname_fixed);
