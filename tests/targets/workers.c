/* workers.c — N worker threads calling one function in a loop.
 *
 *   workers STATUS NWORKERS [EXIT_AFTER_MS]
 *
 * Built three ways (see conftest.Build):
 *   default          compute() is defined here, in the PIE executable
 *   -DUSE_LIBDEMO    compute() comes from libdemo.so (DT_NEEDED, rpath)
 *   -DUSE_RAND       workers call libc's rand()
 * Slots: ADDR0 = the called function, ADDR1 = tiny, ADDR2 = loopy.
 * With EXIT_AFTER_MS the process exits on its own after that time.
 */
#include "common.h"

#ifdef USE_LIBDEMO
int compute(int x); /* from libdemo.so */
#else
/* The volatile local makes the body longer than a 5-byte jmp (its first
 * instruction is an 8-byte store) and keeps it from being folded away. */
__attribute__((noinline, noipa)) int compute(int x)
{
    volatile int k = 2;
    return x * k;
}
#endif

/* Functions a trampoline must refuse (exit 4):
 *   tiny:  3 bytes, shorter than a 5-byte jmp rel32.
 *   loopy: long enough, but its loop branches back to offset 2, inside the
 *          first 5 bytes the jmp would overwrite. */
__asm__(".text\n"
        ".globl tiny\n"
        ".type tiny, @function\n"
        "tiny:\n"
        "  xorl %eax, %eax\n"
        "  ret\n"
        ".size tiny, .-tiny\n"
        ".globl loopy\n"
        ".type loopy, @function\n"
        "loopy:\n"
        "  xorl %eax, %eax\n"
        "1:\n"
        "  addl $1, %eax\n"
        "  subl $1, %edi\n"
        "  jg 1b\n"
        "  ret\n"
        ".size loopy, .-loopy\n");
int tiny(void);
int loopy(int n);

static volatile int input = 7;

static int64_t work(void)
{
    if (tiny() != 0 || loopy(3) != 3)
        hp_add(SL_ERRORS, 1);
#ifdef USE_RAND
    return rand();
#else
    return compute(input);
#endif
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s STATUS NWORKERS [EXIT_AFTER_MS]\n", argv[0]);
        return 2;
    }
    hp_open(argv[1]);
#ifdef USE_RAND
    hp_addr(SL_ADDR0, (const void *)rand);
#else
    hp_addr(SL_ADDR0, (const void *)compute);
#endif
    hp_addr(SL_ADDR1, (const void *)tiny);
    hp_addr(SL_ADDR2, (const void *)loopy);
    hp_start_workers(atoi(argv[2]), work);
    hp_ready();
    if (argc > 3) {
        hp_sleep_ns(atoll(argv[3]) * 1000000LL);
        _exit(0);
    }
    hp_idle();
}
