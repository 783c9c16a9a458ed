/* fleet_v2.c — libfleet.so:fleet_compute(x) becomes x * 7 (15 -> 21).
 * -DPIN='"hex"' pins the library's build-id (processes mapping another
 * build are then skipped). */
#include <hotpatch.h>

static int fleet_compute_v2(int x) { return x * 7; }
HOTPATCH_REPLACE("libfleet.so:fleet_compute", fleet_compute_v2);
#ifdef PIN
HOTPATCH_BUILD_ID("libfleet.so", PIN);
#endif
