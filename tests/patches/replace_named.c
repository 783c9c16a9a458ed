/* replace_named.c — replace whatever -DTARGET='"..."' names by a function
 * returning a constant. Used for targets the tool must refuse. */
#include <hotpatch.h>

#ifndef TARGET
#error "build with -DTARGET='\"object:symbol\"'"
#endif

static int replacement(void) { return 4242; }
HOTPATCH_REPLACE(TARGET, replacement);
