#include <stdio.h>
#include "counter.h"

/* Same name as counter.c's helper, different behaviour. */
static __attribute__((noinline)) int helper(int x) {
    return x * 100;
}

int util_mix(int x) {
    return helper(x) + 7;
}

int util_name(char *out, int size) {
    return snprintf(out, size, "util v1");
}
