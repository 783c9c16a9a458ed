#include <stdio.h>
#include "counter.h"

/* Same name as counter.c's helper, different behaviour. */
static __attribute__((noinline)) int helper(int x) {
    return x * 100;
}

int util_mix(int x) {
    return helper(x) + 7;
}

/* gcc specialises it for k == 3 (weigh.constprop.0): a clone with its own
 * calling convention. */
static __attribute__((noinline)) int weigh(int x, int k) {
    return x * k + k / 2;
}

int util_weigh(int x) {
    return weigh(x, 3) + weigh(x + 1, 3);
}

int util_name(char *out, int size) {
    return snprintf(out, size, "util v1");
}
