/* Reads commands from stdin, one per line, and answers each with one line. */
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include "counter.h"

static int parse_arg(const char *line) {
    const char *sp = strchr(line, ' ');
    return sp ? atoi(sp + 1) : 0;
}

int main(void) {
    char line[256], text[256];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    while (fgets(line, sizeof line, stdin)) {
        int arg = parse_arg(line);
        if (!strncmp(line, "bump", 4))
            printf("%d\n", bump(arg));
        else if (!strncmp(line, "compute", 7))
            printf("%d\n", compute(arg));
        else if (!strncmp(line, "describe", 8)) {
            describe(text, sizeof text);
            printf("%s\n", text);
        } else if (!strncmp(line, "mix", 3))
            printf("%d\n", util_mix(arg));
        else if (!strncmp(line, "grade", 5)) {
            const char *w = word(arg);  /* prints a line of its own for 0..5 */
            printf("%d %s\n", grade(arg), w);
        } else if (!strncmp(line, "weigh", 5))
            printf("%d\n", util_weigh(arg));
        else if (!strncmp(line, "name", 4)) {
            util_name(text, sizeof text);
            printf("%s\n", text);
        } else if (!strncmp(line, "stamp", 5))
            printf("%ld\n", stamp());
        else
            printf("?\n");
    }
    return 0;
}
