"""The `hotpatch` executable (and ``python -m ksplice_py``).

SIGINT/SIGTERM are ours before the library is imported (a second or so on a
busy machine): an interrupt then exits 130/143 with the usual one line
instead of a KeyboardInterrupt traceback. Nothing was touched yet, so
leaving at once is exact; cli.main() installs the real handlers."""
import os
import signal
import sys


def _before_start(signum, frame):
    os.write(2, f"hotpatch: interrupted by {signal.Signals(signum).name}; "
                "the target was left running and unchanged\n".encode())
    os._exit(128 + signum)


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _before_start)
    from .cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
