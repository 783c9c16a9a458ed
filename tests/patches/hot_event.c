/* hot_event.c — for tests/targets/hot.c (event mode): wait_event() returns
 * byte + 100 instead of byte + 1. wait_event is never left (a thread sits
 * blocked in its read), so this patch asks for the weaker consistency.
 * -DSTRICT: the same patch without it. */
#include <hotpatch.h>

static int wait_event_v2(int fd)
{
    unsigned char c = 0;
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "0"(0L), "D"((long)fd), "S"(&c), "d"(1L) : "rcx", "r11", "memory");
    return ret == 1 ? c + 100 : -1;
}
HOTPATCH_REPLACE("wait_event", wait_event_v2);
#ifndef STRICT
HOTPATCH_CONSISTENCY("new-calls");
#endif
