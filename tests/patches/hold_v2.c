/* hold_v2.c — replace blocker's hold() by one that does not block. */
#include <hotpatch.h>

static int hold_v2(int fd)
{
    (void)fd;
    return 777;
}
HOTPATCH_REPLACE("hold", hold_v2);
