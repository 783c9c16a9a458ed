/* rand_const.c — replace libc's rand() by a constant no real rand() can
 * return (rand() is in [0, RAND_MAX]). */
#include <hotpatch.h>

static int rand_const(void) { return -4242; }
HOTPATCH_REPLACE("rand", rand_const);
