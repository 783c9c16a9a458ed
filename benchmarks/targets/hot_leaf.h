/* hot_leaf.h — the short leaf function of the hot-function workload. */
static inline __attribute__((always_inline)) int hot_ref(int x)
{
    int r = x;
    for (int i = 0; i < 3; i++)
        r = r * 5 + (r >> 3) + i;
    return r;
}
