/* peer_hot.c — the same fix as a plain library for gdb and frida. */
#include "../targets/hot_leaf.h"
__attribute__((visibility("default"))) int hot_leaf_v2(int x) { return hot_ref(x) + 1; }
