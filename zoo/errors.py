"""The one exception type users see: a problem with their input or their zoo, said in one line."""

import os


class ZooError(Exception):
    """A user-facing error. The command line prints it as one line and exits with status 2."""


class ZooWarning(UserWarning):
    """Something a reader should act on that does not stop the work (the command line prints it
    as one line on stderr)."""


class StorageError(ZooError):
    """The root could not be written (a full disk, a read-only mount): nothing partial was kept,
    and no further model or metric can be stored, so a job stops instead of going on."""


class CatalogError(ZooError):
    """catalog.yaml is malformed; the message names the zoo and the field."""


def one_line(e: BaseException) -> str:
    """The line of an error worth showing: its first, or, for an error raised in Python inside
    DuckDB (the root's file system refusing a path), that error's own last line."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    if "Traceback (most recent call last)" in lines[0]:
        name, _, text = lines[-1].partition(": ")
        return text if text and name.replace(".", "").isidentifier() else lines[-1]
    return lines[0]


def limit_from_env(env: str, default: int) -> int:
    """A size limit: env `env` if set (an integer or a number such as 2e9), else `default`."""
    text = os.environ.get(env, "").strip()
    if not text:
        return default
    try:
        value = int(float(text))
    except (ValueError, OverflowError):
        raise ZooError(f"env {env}={text!r} is not a number") from None
    if value < 1:
        raise ZooError(f"env {env}={text!r} must be at least 1")
    return value
