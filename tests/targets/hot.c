/* hot.c — hot functions (issue #16): threads that are almost always inside
 * the function being replaced.
 *
 *   hot STATUS NWORKERS MODE
 *
 * leaf   NWORKERS threads call hot_leaf() back to back (no other work between
 *        calls). Every 256th call checks the result: hot_ref(x) (old) or
 *        hot_ref(x) + 1 (tests/patches/hot_leaf.c); anything else counts in
 *        ERRORS. Per-worker call counts at COUNTERS (up to 256 workers).
 * sys    NWORKERS threads call hot_sys(): ~0.5 ms of computing, then a 50 µs
 *        nanosleep made by an inline `syscall` inside the function (EINTR
 *        and early wake-ups are counted), then hot_ref(x).
 * spin   NWORKERS threads call hot_spin(), which takes a spinlock that a
 *        holder thread keeps most of the time (outside any patched code).
 * event  one thread sits in wait_event(), whose inline read(2) of stdin blocks
 *        until the test writes a byte; the byte + 1 (old) or + 100 (patched)
 *        goes to HOLD_RESULT and COMMANDS counts events. NWORKERS leaf workers
 *        run beside it.
 * Slots: ADDR0 = the mode's function.
 */
#include "common.h"
#include "hot.h"

#define COUNTERS_OFFSET 1280 /* past struct hp_status */
#define MAX_HOT 256
#define SYS_SPIN 300000 /* ~0.5 ms of computing before hot_sys sleeps */

static volatile int64_t *counters;
static volatile int spinlock_word;
static volatile int64_t shared_count;
static volatile int sink;

__attribute__((noinline, noipa)) int hot_leaf(int x)
{
    return hot_ref(x);
}

__attribute__((noinline, noipa)) int hot_sys(int x)
{
    int r = x;
    for (int i = 0; i < SYS_SPIN; i++)
        r = r * 5 + (r >> 3) + i;
    sink = r;
    struct timespec ts = {0, 50000};
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "0"(35L), "D"(&ts), "S"(0L) : "rcx", "r11", "memory");
    if (ret != 0)
        hp_add(ret == -EINTR ? SL_EINTR : SL_ERRORS, 1);
    return hot_ref(x);
}

__attribute__((noinline, noipa)) int hot_spin(int x)
{
    while (__atomic_exchange_n(&spinlock_word, 1, __ATOMIC_ACQUIRE))
        __builtin_ia32_pause();
    shared_count++;
    __atomic_store_n(&spinlock_word, 0, __ATOMIC_RELEASE);
    return hot_ref(x);
}

__attribute__((noinline, noipa)) int wait_event(int fd)
{
    unsigned char c = 0;
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "0"(0L), "D"((long)fd), "S"(&c), "d"(1L) : "rcx", "r11", "memory");
    if (ret == -EINTR)
        hp_add(SL_EINTR, 1);
    return ret == 1 ? c + 1 : -1;
}

/* Its loop branches back to its very entry: fine for a strict switch (no
 * thread is inside then), refused for new-calls (a thread left in the old
 * body would jump into the trampoline). Never called. */
__asm__(".text\n"
        ".globl loop_to_entry\n"
        ".type loop_to_entry, @function\n"
        "loop_to_entry:\n"
        "  addl $1, %eax\n"
        "  subl $1, %edi\n"
        "  jg loop_to_entry\n"
        "  ret\n"
        ".size loop_to_entry, .-loop_to_entry\n");
int loop_to_entry(int n);

static void count(long i, uint64_t n, int diff)
{
    if (diff != 0 && diff != 1)
        hp_add(SL_ERRORS, 1);
    counters[i] = (int64_t)n;
    if (i < HP_MAX_WORKERS) {
        hp->w[i].last = diff;
        __atomic_fetch_add(&hp->w[i].iters, 1, __ATOMIC_SEQ_CST);
    }
}

static void *leaf_worker(void *p)
{
    long i = (long)p;
    for (uint64_t n = 1;; n++) {
        int v = hot_leaf((int)n);
        if ((n & 255) == 0)
            count(i, n, v - hot_ref((int)n));
    }
    return NULL;
}

static void *sys_worker(void *p)
{
    long i = (long)p;
    for (uint64_t n = 1;; n++) {
        int64_t t0 = hp_now_ns();
        int diff = hot_sys((int)n) - hot_ref((int)n);
        if (diff == 0 && hp_now_ns() - t0 < 50000) /* the old body sleeps 50 µs */
            hp_add(SL_EARLY, 1);
        count(i, n, diff);
    }
    return NULL;
}

static void *spin_worker(void *p)
{
    long i = (long)p;
    for (uint64_t n = 1;; n++)
        count(i, n, hot_spin((int)n) - hot_ref((int)n));
    return NULL;
}

/* Holds the spinlock ~90% of the time, in code no patch touches. */
static void *holder(void *p)
{
    (void)p;
    for (;;) {
        while (__atomic_exchange_n(&spinlock_word, 1, __ATOMIC_ACQUIRE))
            __builtin_ia32_pause();
        int64_t until = hp_now_ns() + 900000;
        while (hp_now_ns() < until)
            __builtin_ia32_pause();
        __atomic_store_n(&spinlock_word, 0, __ATOMIC_RELEASE);
        until = hp_now_ns() + 100000;
        while (hp_now_ns() < until)
            __builtin_ia32_pause();
    }
    return NULL;
}

static void *event_thread(void *p)
{
    (void)p;
    for (;;) {
        int v = wait_event(0);
        if (v < 0) {
            hp_add(SL_ERRORS, 1);
            return NULL;
        }
        hp_set(SL_HOLD_RESULT, v);
        hp_add(SL_COMMANDS, 1);
    }
    return NULL;
}

static void start(int n, void *(*fn)(void *))
{
    for (long i = 0; i < n; i++)
        hp_spawn(fn, (void *)i);
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s STATUS NWORKERS leaf|sys|spin|event\n", argv[0]);
        return 2;
    }
    (void)hp_start_workers; /* common.h's batch workers are not tight enough here */
    hp_open(argv[1]);
    counters = (volatile int64_t *)((char *)hp + COUNTERS_OFFSET);
    int n = atoi(argv[2]);
    const char *mode = argv[3];
    if (n < 0 || n > MAX_HOT)
        return 2;
    hp->nworkers = n < HP_MAX_WORKERS ? n : HP_MAX_WORKERS;
    if (!strcmp(mode, "leaf") || !strcmp(mode, "event")) {
        hp_addr(SL_ADDR0, (const void *)(!strcmp(mode, "leaf") ? (void *)hot_leaf : (void *)wait_event));
        hp_addr(SL_ADDR1, (const void *)hot_leaf);
    hp_addr(SL_ADDR2, (const void *)loop_to_entry);
        start(n, leaf_worker);
        if (!strcmp(mode, "event"))
            hp_spawn(event_thread, NULL);
    } else if (!strcmp(mode, "sys")) {
        hp_addr(SL_ADDR0, (const void *)hot_sys);
        start(n, sys_worker);
    } else if (!strcmp(mode, "spin")) {
        hp_addr(SL_ADDR0, (const void *)hot_spin);
        hp_spawn(holder, NULL);
        start(n, spin_worker);
    } else {
        return 2;
    }
    for (int i = 0; i < n; i++)
        while (__atomic_load_n(&counters[i], __ATOMIC_SEQ_CST) == 0)
            hp_sleep_ns(1000000);
    hp_ready();
    hp_idle();
}
