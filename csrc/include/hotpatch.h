/* hotpatch.h — declare what a ksplice_py patch replaces, wraps and needs.
 *
 * Build a patch with
 *
 *     cc -shared -fPIC -O2 $(hotpatch cflags) -o fix.so fix.c
 *
 * Every macro below emits one fixed-size record into the ELF section
 * ".hotpatch" of the patch.  The tool reads that manifest with pyelftools;
 * the pointer fields carry R_X86_64_RELATIVE relocations in the .so, which is
 * how the tool learns the patch-relative address of each function/variable.
 *
 *   HOTPATCH_REPLACE("compute", compute_v2);             replace a function
 *   HOTPATCH_REPLACE("libdemo.so:compute", compute_v2);  object-qualified
 *   HOTPATCH_WRAP("compute", compute_wrap, compute_orig);
 *        compute_orig: a (non-const) function-pointer variable of
 *        compute_wrap's type, e.g. `static int (*compute_orig)(int);`;
 *        the tool fills it with a "call the original" stub before cutover.
 *   HOTPATCH_SYMBOL("main:counter", counter_ptr);
 *        counter_ptr: a pointer variable the tool fills with the absolute
 *        address of the target symbol (static symbols of the target too).
 *   HOTPATCH_BUILD_ID("libdemo.so", "3f2a...");
 *        refuse to apply unless the object's GNU build-id is exactly this.
 *   HOTPATCH_CLONE_ABI("main:f.constprop.0");
 *        the replacement (or wrapper) of this gcc clone was written for the
 *        clone's own ABI, not f's source signature (gcc drops, folds or
 *        splits arguments in .constprop/.isra/.part clones); without it a
 *        clone is refused.  See docs/compiler-abi.md.
 *   HOTPATCH_CONSISTENCY("new-calls");
 *        weaker than the default ("strict"): only the bytes being
 *        overwritten must be free of threads; threads already inside a
 *        replaced function finish its old body. For functions that are never
 *        left (event loops, blocking syscall wrappers). Read
 *        docs/hot-functions.md for the risk before using it.
 *
 * Targets are "symbol" or "object:symbol"; object is the basename of the
 * mapped file (libc.so.6, libdemo.so), its SONAME (libfoo.so.0 for
 * libfoo.so.0.35.0), or "main" for the executable.
 * Argument mistakes (a non-function, an orig pointer of the wrong type, a
 * non-literal target) are compile errors, not surprises at apply time.
 */
#ifndef HOTPATCH_H
#define HOTPATCH_H

#ifdef __cplusplus
#error "hotpatch.h: patches are written in C (the type checks use GNU C builtins)"
#endif

#include <stdint.h>

#define HOTPATCH_MAGIC 0x43545048u /* bytes "HPTC" in memory (little-endian) */
#define HOTPATCH_VERSION 1

/* Record kinds; keep in sync with ksplice_py/patchfile.py. */
#define HOTPATCH_KIND_REPLACE 1  /* a = new function                      */
#define HOTPATCH_KIND_WRAP 2     /* a = wrapper, b = &orig_ptr_var          */
#define HOTPATCH_KIND_SYMBOL 3   /* a = &ptr_var                            */
#define HOTPATCH_KIND_BUILD_ID 4 /* target = object, a = hex build-id       */
#define HOTPATCH_KIND_BIND32 5   /* a = 4-byte field holding an addend: the
                                    loader stores target + addend - a there
                                    (written by `hotpatch build`)            */
#define HOTPATCH_KIND_CONSISTENCY 6 /* target = "strict" | "new-calls"     */
#define HOTPATCH_KIND_CLONE_ABI 7 /* target = a replaced/wrapped gcc clone */

/* A pointer field: a union so that functions need no (non-ISO)
 * function-to-object pointer conversion; 8 bytes either way. */
union hotpatch_ptr {
    const void *obj;
    void (*func)(void);
};

/* 32 bytes, 8-aligned: the section is an array of these. */
struct hotpatch_record {
    uint32_t magic;
    uint16_t version;
    uint16_t kind;
    const char *target;
    union hotpatch_ptr a;
    union hotpatch_ptr b;
};

_Static_assert(sizeof(struct hotpatch_record) == 32, "hotpatch_record layout");

#define HOTPATCH__CAT2(a, b) a##b
#define HOTPATCH__CAT(a, b) HOTPATCH__CAT2(a, b)
#define HOTPATCH__ID(prefix) HOTPATCH__CAT(prefix, __COUNTER__)

/* `f` is a function (not a function pointer, array or object): only for a
 * function designator is typeof(f) the same type as typeof(*f). */
#define HOTPATCH__IS_FUNCTION(f) \
    __builtin_types_compatible_p(__typeof__(f), __typeof__(*(f)))

/* `p` is a non-const pointer variable (object or function pointer, not an
 * array).  typeof(&*p) is p's type without qualifiers, so a `* const`
 * variable fails: the compiler could fold a const (null) pointer into the
 * patch code before the tool fills it in. */
#define HOTPATCH__IS_POINTER(p)                                  \
    (__builtin_classify_type(p) == 5 /* pointer_type_class */ && \
     __builtin_types_compatible_p(__typeof__(&(p)), __typeof__(&*(p)) *))

/* Non-const records: the section holds relocated pointers, so it is "aw"
 * anyway, and mixing const/non-const records would be a section conflict. */
#define HOTPATCH__RECORD(id, kind_, target_, a_, b_)                     \
    static struct hotpatch_record id                                     \
        __attribute__((used, section(".hotpatch"), aligned(8))) = {      \
            HOTPATCH_MAGIC, HOTPATCH_VERSION, (kind_), (target_),        \
            a_, b_}

#define HOTPATCH__REPLACE(id, target, newfunc)                            \
    _Static_assert(HOTPATCH__IS_FUNCTION(newfunc),                        \
                   "HOTPATCH_REPLACE: '" #newfunc "' must be a function"); \
    HOTPATCH__RECORD(id, HOTPATCH_KIND_REPLACE, "" target "",            \
                     {.func = (void (*)(void))(newfunc)}, {0})

#define HOTPATCH__WRAP(id, target, wrapper, orig_ptr_var)                     \
    _Static_assert(HOTPATCH__IS_FUNCTION(wrapper),                            \
                   "HOTPATCH_WRAP: '" #wrapper "' must be a function");       \
    _Static_assert(__builtin_types_compatible_p(__typeof__(&(orig_ptr_var)),  \
                                                __typeof__(wrapper) **),      \
                   "HOTPATCH_WRAP: '" #orig_ptr_var "' must be a non-const pointer to " \
                   "a function of the same type as '" #wrapper "'");          \
    HOTPATCH__RECORD(id, HOTPATCH_KIND_WRAP, "" target "",                    \
                     {.func = (void (*)(void))(wrapper)}, {.obj = &(orig_ptr_var)})

#define HOTPATCH__SYMBOL(id, target, ptr_var)                              \
    _Static_assert(HOTPATCH__IS_POINTER(ptr_var),                          \
                   "HOTPATCH_SYMBOL: '" #ptr_var "' must be a non-const pointer variable"); \
    HOTPATCH__RECORD(id, HOTPATCH_KIND_SYMBOL, "" target "", {.obj = &(ptr_var)}, {0})

#define HOTPATCH__BUILD_ID(id, object, hex)                                   \
    _Static_assert(sizeof(hex) > 1, "HOTPATCH_BUILD_ID: empty build-id");     \
    HOTPATCH__RECORD(id, HOTPATCH_KIND_BUILD_ID, "" object "", {.obj = "" hex ""}, {0})

#define HOTPATCH__CLONE_ABI(id, target) \
    HOTPATCH__RECORD(id, HOTPATCH_KIND_CLONE_ABI, "" target "", {0}, {0})

#define HOTPATCH__CONSISTENCY(id, mode) \
    HOTPATCH__RECORD(id, HOTPATCH_KIND_CONSISTENCY, "" mode "", {0}, {0})

/* Public macros: `target`, `object`, `hex` and `mode` must be string literals. */
#define HOTPATCH_REPLACE(target, newfunc) \
    HOTPATCH__REPLACE(HOTPATCH__ID(hotpatch__rec_), target, newfunc)
#define HOTPATCH_WRAP(target, wrapper, orig_ptr_var) \
    HOTPATCH__WRAP(HOTPATCH__ID(hotpatch__rec_), target, wrapper, orig_ptr_var)
#define HOTPATCH_SYMBOL(target, ptr_var) \
    HOTPATCH__SYMBOL(HOTPATCH__ID(hotpatch__rec_), target, ptr_var)
#define HOTPATCH_BUILD_ID(object, hex) \
    HOTPATCH__BUILD_ID(HOTPATCH__ID(hotpatch__rec_), object, hex)
#define HOTPATCH_CLONE_ABI(target) \
    HOTPATCH__CLONE_ABI(HOTPATCH__ID(hotpatch__rec_), target)
#define HOTPATCH_CONSISTENCY(mode) \
    HOTPATCH__CONSISTENCY(HOTPATCH__ID(hotpatch__rec_), mode)

#endif /* HOTPATCH_H */
