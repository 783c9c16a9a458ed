/* hot_lib.c — libhot.so: hot_leaf for the `lib` form of hot_target. */
#include "hot_leaf.h"
__attribute__((visibility("default"))) int hot_leaf(int x) { return hot_ref(x); }
