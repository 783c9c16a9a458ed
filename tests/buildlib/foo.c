/* A shared library for `hotpatch build` tests: a global reached through
 * the GOT (-fPIC), a file static, a static helper. */
int shared_total = 5;
static int local_calls;
static __attribute__((noinline)) int twice(int x) { return x * 2 + local_calls; }
int foo_add(int x) { local_calls++; shared_total += twice(x); return shared_total; }
int foo_get(void) { return shared_total * 1000 + local_calls; }
