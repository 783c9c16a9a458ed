/* peer_compute.c — the same replacement as compute_v3.c, as a plain shared
 * library for the peers: gdb dlopen()s it and jumps to compute_v3, frida
 * Module.load()s it and Interceptor.replace()s compute with it. */
__attribute__((visibility("default"))) int compute_v3(int x)
{
    volatile int k = 3;
    return x * k;
}
