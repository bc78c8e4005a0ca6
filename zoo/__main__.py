"""`python -m zoo` and the `zoo` command (zoo.cli holds the commands).

Ctrl-C ends a command with one line and status 130 at any point, also during the imports, and
also when the shell started the command with SIGINT ignored (a background job of a
non-interactive shell). After an interrupt the process leaves without Python's interpreter
teardown: DuckDB's threads may still be returning from the interrupted query, and the teardown
would stop them mid-call (an abort). What was stored is written atomically, so nothing is lost.
Every other command also ends without the teardown (after the exit handlers): it only frees
memory, and took 0.2 s of each command here.

A KeyboardInterrupt can be lost: code that catches every exception (during an import, in a
callback) swallows it, and once, under load, a Ctrl-C 0.5 s into `zoo sql` left its query
running (CI, 2026-12-01). So Ctrl-C also arms a timer: if the command is still running
`INTERRUPT_GRACE_S` seconds later, the process leaves with the same line and status.
"""

import atexit
import os
import signal
import sys
import threading

INTERRUPT_GRACE_S = 10.0


def _interrupted(signum, frame) -> None:
    """SIGINT: KeyboardInterrupt where the command is, as Python's own handler raises it, and a
    timer that ends the process should that exception be lost."""
    if not _timers:
        timer = threading.Timer(INTERRUPT_GRACE_S, _leave_interrupted)
        timer.daemon = True
        timer.start()
        _timers.append(timer)
    raise KeyboardInterrupt


_timers: list[threading.Timer] = []


def _leave_interrupted() -> None:
    print("zoo: interrupted", file=sys.stderr)
    _exit_now(130)


def run() -> int:
    signal.signal(signal.SIGINT, _interrupted)
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
        _exit_now(status)
    _finished.append(status)
    return status


_finished: list[int] = []  # the command's exit status, once it returned one


def _leave() -> None:
    if _finished:  # (not after an uncaught exception: Python then reports it and exits as usual)
        _exit_now(_finished[0])


def _exit_now(status: int) -> None:
    """Leave with `status` at once, without the interpreter's teardown (module docstring)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(run())
