"""The live DNS-server demo (issue #5): a threaded C DNS server, patched
under constant checked load — its parser fixed, glibc's res_nquery wrapped,
reverted and re-applied — with a report of lost queries (none), latency
around each cutover, each cutover's pause, and the server's unchanged pid.

    ksplice_py.demo.main(["--qps", "400", "--duration-per-phase", "3"])

Needs the optional dependencies dnspython and rich (imported lazily, so
``import ksplice_py`` never needs them).
"""
from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run the demo; argv as for ``hotpatch demo`` (--port, --workers, --qps,
    --duration-per-phase, --upstream-delay, --json). Returns the exit status:
    0 every check passed, 1 a check failed or an error, 2 bad usage, 130
    interrupted; a HotpatchError's own exit code when patching failed."""
    try:
        import dns.message  # noqa: F401
        import rich  # noqa: F401
    except ImportError as e:
        import sys

        print(f"hotpatch demo: needs the {e.name} package: pip install 'ksplice_py[demo]' "
              "(dnspython and rich)", file=sys.stderr)
        return 2
    from .run import main as run_main

    return run_main(argv)


__all__ = ["main"]
