/* hot.h — the leaf function of tests/targets/hot.c and its patches. */
#ifndef LEAF_ROUNDS
#define LEAF_ROUNDS 3
#endif
static inline __attribute__((always_inline)) int hot_ref(int x)
{
    int r = x;
    for (int i = 0; i < LEAF_ROUNDS; i++)
        r = r * 5 + (r >> 3) + i;
    return r;
}
