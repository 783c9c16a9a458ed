/* Loads libfoo.so; answers "a N" (foo_add) and "g" (foo_get), one line each. */
#include <stdio.h>
#include <stdlib.h>
int foo_add(int); int foo_get(void);
int main(void) { char l[64]; setvbuf(stdout, NULL, _IOLBF, 0); puts("ready");
  while (fgets(l, sizeof l, stdin)) { if (l[0] == 'a') printf("%d\n", foo_add(atoi(l + 2))); else printf("%d\n", foo_get()); } }
