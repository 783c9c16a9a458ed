/* libdemo.c — the DT_NEEDED library whose compute() a patch replaces
 * ("libdemo.so:compute"). Returns x*5 so the test can tell it from the
 * executable's compute (x*2). */
__attribute__((noinline, noipa)) int compute(int x)
{
    volatile int k = 5;
    return x * k;
}
