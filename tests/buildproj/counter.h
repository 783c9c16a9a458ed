#ifndef COUNTER_H
#define COUNTER_H

struct tally {
    int hits;
    int total;
};

extern struct tally tally;
extern int limit;

int bump(int by);
int compute(int x);
int describe(char *out, int size);
int util_mix(int x);
int util_name(char *out, int size);
int util_weigh(int x);
int grade(int x);
const char *word(int x);
long stamp(void);

#endif
