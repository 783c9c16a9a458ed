/* ed_target.c — target for the editions and crash-safety tests.
 *
 *   ed_target STATUS NWORKERS
 *
 * Workers call, every iteration, compute(7), g() and h(), and publish
 *     last = compute(7) * 100000 + g() * 100 + h()
 * (decoded by tests/test_editions.py: decode()).
 *   compute(x): x * 2 (patched by compute_mul, ed_wrap)
 *   f():        1     (the version of f)
 *   g():        100 * (the version of g) + f()
 *   h():        5     (patched by ed_h)
 * g calls f while g is on the stack, so no safe cutover can fall between
 * the two: a g() whose hundreds differ from its units saw f and g of two
 * different editions — a half-applied patch. Each such result increments
 * slot MISMATCH (index SL_COUNT_ = 23) and is stored in slot MIX_VALUE.
 * Slots: ADDR0 = compute, ADDR1 = f, ADDR2 = g, ADDR3 = h.
 */
#include "common.h"

#define SL_MISMATCH (SL_COUNT_ + 0)
#define SL_MIX_VALUE (SL_COUNT_ + 1)

/* The volatile locals make every body longer than a 5-byte jmp and keep
 * the values from being folded; noipa keeps calls real. */
__attribute__((noinline, noipa)) int compute(int x)
{
    volatile int k = 2;
    return x * k;
}

__attribute__((noinline, noipa)) int f(void)
{
    volatile int v = 1;
    return v;
}

__attribute__((noinline, noipa)) int g(void)
{
    volatile int v = 1;
    return v * 100 + f();
}

__attribute__((noinline, noipa)) int h(void)
{
    volatile int v = 5;
    return v;
}

static volatile int input = 7;

static int64_t work(void)
{
    int c = compute(input);
    int gv = g();
    if (gv / 100 != gv % 100) {
        hp_add(SL_MISMATCH, 1);
        hp_set(SL_MIX_VALUE, gv);
    }
    int hv = h();
    return (int64_t)c * 100000 + (int64_t)gv * 100 + hv;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s STATUS NWORKERS\n", argv[0]);
        return 2;
    }
    hp_open(argv[1]);
    hp_addr(SL_ADDR0, (const void *)compute);
    hp_addr(SL_ADDR1, (const void *)f);
    hp_addr(SL_ADDR2, (const void *)g);
    hp_addr(SL_ADDR3, (const void *)h);
    hp_start_workers(atoi(argv[2]), work);
    hp_ready();
    hp_idle();
}
