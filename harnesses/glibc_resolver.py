"""glibc's DNS resolver: no thread may be inside a name lookup when resolver
code (or any other code of libc.so.6 / libresolv.so.2) is switched.

Why: a lookup carries state across many functions and many seconds (buffers
sized by one function and filled by another, sockets kept in the res_state,
answers parsed after a poll() that may last `retrans` seconds). CVE-2015-7547
was exactly such a disagreement between `send_dg`/`send_vc` and their
callers about who owns which buffer; a patch that fixes one side while a
thread is half-way through the old protocol can crash it. So the whole lookup
path is critical, not just the function a patch replaces.

How the patterns match (ksplice_py/harness.py): fnmatch over every function
of the governed objects, *one name per address* (the best-ranked alias: the
exported, default-version name when there is one). glibc gives most functions
several aliases (`res_nquery`, `__res_nquery@GLIBC_2.2.5`, `___res_nquery`,
`__GI___res_nquery`), so each family lists all of them; which one wins
depends on the build. GCC's split-off parts (`send_dg.cold`,
`getanswer_r.constprop.0`) are separate symbols, hence the `NAME.*` clones.
Internal (static) names exist only with debug symbols (libc6-dbg); without
them the exported entry points still cover every lookup, because the stack
scan is conservative and every lookup has one of them as a caller.

Deliberately NOT used: a bare `__res*` (it matches `__restore_rt`, the
signal-return trampoline that is on the stack of every thread running a
signal handler: any such thread would block every libc patch; this build
gives it size 0, so it would be skipped, but other builds need not), nor `res_*`
(it also matches the pure name checkers `res_hnok`/`res_dnok`/... and
`res_setoptions`, which carry no lookup state). Names checked against
glibc 2.36 (Debian 12, libc6-dbg) with `nm` on the build-id debug file.
"""
from ksplice_py.harness import Harness


def _aliases(*names: str) -> tuple[str, ...]:
    """glibc's alias family of each public name, and GCC clones of each."""
    out: list[str] = []
    for n in names:
        for a in (n, f"__{n}", f"___{n}", f"__GI_{n}", f"__GI___{n}", f"__new_{n}"):
            out += [a, f"{a}.*"]
    return tuple(out)


def _clones(*names: str) -> tuple[str, ...]:
    """An internal function and its GCC clones (`.cold`, `.constprop.N`, ...)."""
    return tuple(p for n in names for p in (n, f"{n}.*"))


# Entry points of a lookup (libc.so.6). gethostbyname*/gethostbyaddr* cover
# the plain, _r, 2 and 2_r forms and nss_dns's gethostbyname3_context; the
# only other functions with these prefixes are the nss_files host lookups
# (gethostbyname3_multi), which are part of the same lookup.
ENTRY_POINTS = (
    *_aliases("getaddrinfo", "getnameinfo"),
    "gethostbyname*", "gethostbyaddr*", "__gethostbyname*", "__gethostbyaddr*",
    "__new_gethostbyname*", "__new_gethostbyaddr*", "__GI_gethostby*",
)

# The res_* API (libc.so.6 since 2.34; libresolv keeps compat aliases):
# building, sending and searching queries, and the res_state lifecycle that
# owns the sockets send_dg/send_vc reuse (init and close).
RES_API = _aliases(
    "res_nquery", "res_query", "res_nsearch", "res_search",
    "res_nquerydomain", "res_querydomain", "res_nsend", "res_send",
    "res_nmkquery", "res_mkquery", "res_ninit", "res_init", "res_vinit",
    "res_nclose", "res_iclose", "res_close",
)

# The internal query path (names present with libc6-dbg):
#   __res_context_{query,search,querydomain,send,mkquery,hostalias}: what every
#     entry point above calls;
#   __resolv_context_* / __resolv_conf_*: the per-thread context and the shared
#     configuration (reference counts and a lock held across calls);
#   res_send.c statics: send_dg / send_vc (the CVE-2015-7547 pair),
#     context_send_common, and reopen / sock_eq (only res_send.c defines
#     functions of those names in this build; a same-named function elsewhere
#     would only make the harness more cautious, never less);
#   nss_dns (built into libc.so.6 since 2.34): the _nss_dns_* NSS functions and
#     their answer parsers getanswer_r / gaih_getanswer_slice.
INTERNAL = (
    "__res_context_*", "__GI___res_context_*",
    "__resolv_context_*", "__GI___resolv_context_*", "__resolv_conf_*",
    *_clones("send_dg", "send_vc", "context_send_common", "reopen", "sock_eq"),
    "_nss_dns_*", "__GI__nss_dns_*",
    *_clones("getanswer_r", "getanswer_r_store_alias", "gaih_getanswer_slice"),
)

# libresolv.so.2 (2.36): the deprecated res_gethostby* lookups (they query
# through libc's __res_context_search) and their parser getanswer.
LIBRESOLV = (
    "res_gethostby*", "__GI_res_gethostby*", *_clones("getanswer"),
)

HARNESS = Harness(
    name="glibc-resolver",
    description="glibc DNS resolver: no thread inside getaddrinfo, gethostby*, res_* or send_dg/send_vc",
    objects=("libc.so.6", "libresolv.so.2"),
    critical=(*ENTRY_POINTS, *RES_API, *INTERNAL, *LIBRESOLV),
)
