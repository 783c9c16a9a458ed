/* Advancing stopped threads out of retired code (issue #16), while every
 * other thread stays stopped. Part of the cffi cdef: plain declarations only.
 *
 * A thread is never single-stepped and no breakpoint is ever written: it
 * runs out through a *run-out copy* of the retired code that ksplice_py
 * built in a scratch mapping (ksplice_py/runout.py). In the copy every way
 * out (ret, a branch leaving the retired code) and every barrier (a call, an
 * indirect jump, anything not copied) goes through a stub that stops the
 * thread with a harmless getpid syscall, caught with PTRACE_SYSCALL: there
 * we finish the exit in its registers, and when that lands in retired code
 * the copy holds (a return into a register-preserving thunk, a call between
 * retired functions) let it go on in the copy. The kernel clears the
 * syscall-trace flag when the tracer dies, and the stubs restore every
 * register and carry on by themselves, so a killed tool leaves a thread
 * that simply finishes the old code. */

#define KP_ADV_OUT      0   /* left the retired code: registers as after the exit */
#define KP_ADV_SKIPPED  1   /* not tried: in a syscall, signal or group stop */
#define KP_ADV_NOMAP    2   /* rip is not an instruction the copy holds */
#define KP_ADV_SYSCALL  3   /* made a syscall inside the retired code: put back */
#define KP_ADV_BARRIER  4   /* reached a call or untranslatable instruction: put back */
#define KP_ADV_SIGNAL   5   /* a signal arrived: put back, signal kept for release */
#define KP_ADV_TIMEOUT  6   /* still inside when the budget ran out (a spin?): put back */
#define KP_ADV_GONE     7   /* exited */
#define KP_ADV_LOST     8   /* ptrace failed with the thread inside the copy */

#define KP_STUB_SIZE    48  /* every stub slot; see runout.py for the layout */
#define KP_STUB_SYSCALL_END 16 /* offset just past the stub's syscall */

#define KP_STUB_EXIT    1   /* leaves the retired code: to dest, or ret when dest == 0 */
#define KP_STUB_BARRIER 2   /* would stay inside via code we cannot follow */
#define KP_STUB_CALL    3   /* a direct call into copied code: push stub_ret, go on there */

struct kp_runout {
    int n;                        /* copied instructions */
    const unsigned long *orig;    /* their addresses, ascending */
    const unsigned long *copy;    /* where the copy holds each, ascending too */
    int nstubs;
    unsigned long stubs;          /* address of stub 0; stub i at stubs + i*KP_STUB_SIZE */
    const unsigned long *stub_orig;  /* the original instruction a stub stands for */
    const unsigned long *stub_dest;  /* exit destination (0: return address at [rsp]) */
    const int *stub_kind;
    const int *stub_pop;          /* extra bytes a `ret imm16` pops */
    const unsigned long *stub_ret;   /* KP_STUB_CALL: the original return address */
};

/* Advance the threads t[idx[0..k)] (stopped, rip in retired code) at once,
 * for budget_us, extended by quiet_us after each thread that gets out (up to
 * 4 * budget_us); each gets a KP_ADV_* verdict in result[]. A thread
 * that did not get out is put back exactly at the equivalent instruction of
 * the original code, in a stop that keeps any signal it received. Returns
 * how many got out. */
int kp_advance_all(int pid, struct kp_thread *t, const int *idx, int k,
                   const struct kp_runout *ro, long budget_us, long quiet_us, int *result);
