"""The locks of a zoo root, `flock`s on files in it: `.pack.lock` (one packer at a time) and
`.read.lock` (readers share it; part removals and pack renames take it exclusively for
milliseconds). The OS releases a lock when its holder dies, so a killed process never blocks the
next. A wait may have a time limit, after which one line says who holds the root."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path

from .errors import ZooError
from .rootfs import UnsafePath


@contextlib.contextmanager
def exclusive_lock(path: Path, wait: bool = False, timeout: float | None = None):
    """Yields True while holding an exclusive lock on `path`, False if another process holds it
    (with `wait`, waits for it: for ever, or at most `timeout` seconds, then raises `_flock`'s
    one-line ZooError). The OS releases the lock when its holder dies, so a killed packer never
    blocks the next."""
    with lock_file(path) as handle:
        try:
            if wait:
                flock(handle, path, fcntl.LOCK_EX, timeout)
            else:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def shared_lock(path: Path, exclusive: bool = False, timeout: float | None = None):
    """Holds a shared (or exclusive) lock on `path` until the block ends, waiting for it (at most
    `timeout` seconds, if given). On a root that cannot be written (a read-only mount) nothing can
    change under a reader: no lock."""
    try:
        handle = lock_file(path)
    except UnsafePath:
        raise
    except OSError:
        yield
        return
    with handle:
        flock(handle, path, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, timeout)
        yield


def lock_file(path: Path):
    """The lock file, opened (created if absent) without following a link: a root from elsewhere
    may hold a `.read.lock` that points at a file outside it, which must not be created."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePath(f"refused: {path} is a symbolic link (run `zoo verify --root {path.parent}` "
                             "to move it to quarantine/)") from None
        raise
    return os.fdopen(fd, "a")


def flock(handle, path: Path, kind: int, timeout: float | None) -> None:
    """Take the lock `kind` on `handle`: waiting for ever (timeout None), or polling until
    `timeout` seconds have passed, then one line saying who holds the root."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            return fcntl.flock(handle, kind | (0 if deadline is None else fcntl.LOCK_NB))
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise ZooError(f"another zoo command (a query, an API reader or a writer) holds {path.parent}; "
                               f"gave up after {timeout:g} s: retry when it has finished") from None
            time.sleep(0.05)
