/* wrap.c — target for HOTPATCH_WRAP and HOTPATCH_SYMBOL.
 *
 *   wrap STATUS NWORKERS
 *
 * scaled() reads the global `factor` in its first instruction, which at -O2
 * is RIP-relative (`mov factor(%rip),%eax`): a call-original stub must
 * relocate it. Workers publish scaled(5) and the static `wrap_hits`, which
 * only a patch writes. stdin commands: "factor N\n" sets factor.
 * Slots: ADDR0 = scaled, WRAP_HITS, FACTOR, COMMANDS.
 */
#include "common.h"

int factor = 3;
static volatile long wrap_hits; /* static: reached by HOTPATCH_SYMBOL */
static volatile int bonus = 7;  /* static: read by the patch */

__attribute__((noinline, noipa)) int scaled(int x) { return x * factor; }

static volatile int input = 5;

static int64_t work(void)
{
    hp_set(SL_WRAP_HITS, wrap_hits);
    if (bonus != 7)
        hp_add(SL_ERRORS, 1);
    return scaled(input);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s STATUS NWORKERS\n", argv[0]);
        return 2;
    }
    hp_open(argv[1]);
    hp_addr(SL_ADDR0, (const void *)scaled);
    hp_set(SL_FACTOR, factor);
    hp_start_workers(atoi(argv[2]), work);
    hp_ready();

    char line[128];
    int v;
    while (fgets(line, sizeof line, stdin)) {
        if (sscanf(line, "factor %d", &v) == 1) {
            __atomic_store_n(&factor, v, __ATOMIC_SEQ_CST);
            hp_set(SL_FACTOR, v);
        } else {
            hp_add(SL_ERRORS, 1);
        }
        hp_add(SL_COMMANDS, 1);
    }
    hp_idle();
}
