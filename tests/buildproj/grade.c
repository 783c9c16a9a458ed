/* Switches: gcc turns grade() into a lookup table (a local constant,
 * CSWTCH.N) and word() into a jump table with a .cold part. */
#include <stdio.h>
#include "counter.h"

__attribute__((noinline)) int grade(int x) {
    switch (x) {
    case 0: return 10;
    case 1: return 21;
    case 2: return 35;
    case 3: return 47;
    case 4: return 51;
    case 5: return 68;
    case 6: return 72;
    default: return -1;
    }
}

__attribute__((noinline)) const char *word(int x) {
    switch (x) {
    case 0: puts("zero"); return "a";
    case 1: puts("one"); return "b";
    case 2: puts("two"); return "c";
    case 3: puts("three"); return "d";
    case 4: puts("four"); return "e";
    case 5: puts("five"); return "f";
    default: return "z";
    }
}
