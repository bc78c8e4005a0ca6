"""A job function for the launcher's tests, in a module of its own so that its job process
imports nothing heavy: it records its process id, and an object whose finalizer writes a file
when the interpreter's teardown frees it."""

from __future__ import annotations

from pathlib import Path

from zoo.launch import leaving_without_teardown


class _TornDown:
    def __init__(self, path: Path):
        self.path = path

    def __del__(self):
        self.path.write_text("torn down")


_kept: list[_TornDown] = []  # freed only by the interpreter's teardown


def record_and_return(items: list[str], folder: str) -> list[str]:
    """Keep an object that marks the teardown, then return `items`, or raise if asked to."""
    import os

    with leaving_without_teardown():
        Path(folder, f"pid-{items[0]}").write_text(str(os.getpid()))
        _kept.append(_TornDown(Path(folder, f"torn-down-{items[0]}")))
        if items[0] == "raise":
            raise ValueError("asked to raise")
        return items
