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
    # Registered first, so it runs last of the exit handlers (logging, tqdm's monitor, finalizers
    # registered by the command's imports): then the command leaves without the interpreter's
    # teardown, which only frees memory (~900 modules: 0.22-0.24 s of every command here, of a
    # 256-model `zoo generate`'s 9.5 s). Every file is closed by then.
    atexit.register(_leave)
    try:
        from .cli import main

        status = main(own_process=True)
    except KeyboardInterrupt:
        print("zoo: interrupted", file=sys.stderr)
        status = 130
    if status == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    _finished.append(status)
    return status


_finished: list[int] = []  # the command's exit status, once it returned one


def _leave() -> None:
    if _finished:  # (not after an uncaught exception: Python then reports it and exits as usual)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_finished[0])


if __name__ == "__main__":
    sys.exit(run())
