"""`python -m zoo` and the `zoo` command (zoo.cli holds the commands).

Ctrl-C ends a command with one line and status 130 at any point, also during the imports, and
also when the shell started the command with SIGINT ignored (a background job of a
non-interactive shell). After an interrupt the process leaves without Python's interpreter
teardown: DuckDB's threads may still be returning from the interrupted query, and the teardown
would stop them mid-call (an abort). What was stored is written atomically, so nothing is lost.
Every other command also ends without the teardown (after the exit handlers): it only frees
memory, and took 0.2 s of each command here.
"""

import atexit
import os
import signal
import sys


def run() -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        from .cli import main

        status = main()
    except KeyboardInterrupt:
        print("zoo: interrupted", file=sys.stderr)
        status = 130
    sys.stdout.flush()
    sys.stderr.flush()
    if status != 130:  # the exit handlers (logging, tqdm's monitor, finalizers), as a normal exit runs them
        atexit._run_exitfuncs()
    # Then leave without the interpreter's teardown: freeing ~900 modules took 0.22-0.24 s of every
    # command here (of a 256-model `zoo generate`'s 9.5 s), and every file is closed by then.
    os._exit(status)


if __name__ == "__main__":
    sys.exit(run())
