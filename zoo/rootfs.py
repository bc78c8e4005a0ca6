"""A zoo root as a read-only file system confined to it: what every reader of a root goes through.

A root may come from someone else, so nothing in it is trusted to be what its name says. Here a
path is read only if it is a regular file inside the root reached without a symbolic link:
`..`, absolute paths, a link at any level (to a file or a folder, inside the root or out of it),
a named pipe, a socket or a device are each refused with one line naming the path and the way
out (`zoo verify` moves such entries to quarantine/).

`RootFileSystem` is the same rules as an fsspec file system, `zoo://<path in the root>`, which the
SQL connection (zoo.sql) registers with DuckDB in place of DuckDB's own local file system. DuckDB
then reads the root only through it, and it has no way to write: every write, delete, rename or
new folder is refused here, whatever statement asked for it. The checks are made on the path at
open time; the threat is a zoo's files (fixed when opened), not a process racing the reader.
"""

from __future__ import annotations

import io
import os
import re
import stat
import threading
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from fsspec import AbstractFileSystem

from .errors import ZooError

PROTOCOL = "zoo"


class UnsafePath(ZooError):
    """A path of a root that is not a regular file or folder reached inside the root. (Not an
    OSError: fsspec's walks skip folders whose listing raises one, which would hide the link.)"""


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device or special file"


def checked(root: Path, relative: str | os.PathLike, want: str = "file") -> Path:
    """`root / relative` after checking it is a regular file (or, with want="dir", a folder)
    inside `root`, with no symbolic link on the way; raises UnsafePath (one line) if not, and
    FileNotFoundError if it does not exist."""
    rel = PurePosixPath(os.fspath(relative))
    if rel.is_absolute() or ".." in rel.parts:
        raise UnsafePath(f"refused: {os.fspath(relative)!r} is not a path inside the zoo root")
    path = root
    parts = [p for p in rel.parts if p not in ("", ".")]
    for i, part in enumerate(parts):
        path = path / part
        mode = os.lstat(path).st_mode
        last = i == len(parts) - 1
        if stat.S_ISDIR(mode) and (not last or want == "dir"):
            continue
        if last and stat.S_ISREG(mode) and want == "file":
            return path
        what = _kind(mode) if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)) else ("a folder" if stat.S_ISDIR(mode) else "a file")
        raise UnsafePath(f"refused: {path} is {what}, not a regular {want}"
                         f" (run `zoo verify --root {root}` to move it to quarantine/)")
    if want == "dir":
        return path
    raise UnsafePath(f"refused: {path} is a folder, not a regular file")


def entries(root: Path, folder: Path) -> list[os.DirEntry]:
    """The entries of `folder` (inside `root`, reached without links), each a regular file or a
    folder: a link or a special file in it is refused. An absent folder has none."""
    try:
        checked(root, folder.relative_to(root), want="dir")
    except FileNotFoundError:
        return []
    with os.scandir(folder) as scan:
        found = list(scan)
    for entry in found:
        if not (entry.is_file(follow_symlinks=False) or entry.is_dir(follow_symlinks=False)):
            checked(root, Path(entry.path).relative_to(root))  # raises, naming what it is
    return found


def glob_pattern(pattern: str) -> re.Pattern:
    """A glob pattern (`*`, `?`, `[...]` within a name, `**` across folders) as a compiled
    regular expression over '/'-separated paths."""
    return re.compile(_translate(pattern))


def _translate(pattern: str) -> str:
    """A glob pattern as a regular expression over '/'-separated paths."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


class ThreadPositionedFile(io.RawIOBase):
    """A file open for reading whose position is each thread's own; a subclass reads `size` bytes
    at an offset statelessly (`read_at`).

    DuckDB scans a Parquet file from several threads through one handle, each a seek and then a
    read; on an ordinary Python file (or fsspec's HTTP file) another thread's seek can fall
    between the two, and the read returns the wrong bytes (seen as "Out of buffer", a Thrift type
    error or a Snappy failure on a multi-column scan). Here a seek moves only the calling thread's
    position, and each read is one positional read."""

    def __init__(self, name: str, size: int):
        super().__init__()
        self.name, self.size = name, size
        self._position = threading.local()

    def read_at(self, offset: int, size: int) -> bytes:
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.tell(), io.SEEK_END: self.size}[whence]
        self._position.offset = max(0, base + offset)
        return self._position.offset

    def tell(self) -> int:
        return getattr(self._position, "offset", 0)

    def read(self, size: int = -1) -> bytes:
        at = self.tell()
        end = self.size if size is None or size < 0 else min(self.size, at + size)
        data = self.read_at(min(at, end), end - min(at, end)) if end > at else b""
        self._position.offset = at + len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(memoryview(buffer)))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)


class PositionalFile(ThreadPositionedFile):
    """A regular file of the root, read with `os.pread`."""

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        super().__init__(str(path), os.fstat(self._fd).st_size)

    def read_at(self, offset: int, size: int) -> bytes:
        return os.pread(self._fd, size, offset)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class RootFileSystem(AbstractFileSystem):
    """`zoo://tables/models/...`: the files of one root, read-only (see the module docstring)."""

    protocol = PROTOCOL
    cachable = False  # one instance per root and connection, never shared through fsspec's cache

    def __init__(self, root: Path):
        super().__init__()
        self.root = Path(root)

    @classmethod
    def _strip_protocol(cls, path) -> str:
        path = os.fspath(path)
        return path[len(PROTOCOL) + 3:] if path.startswith(PROTOCOL + "://") else path

    def _path(self, path, want: str = "file") -> Path:
        return checked(self.root, self._strip_protocol(path) or ".", want)

    def _describe(self, name: str, st: os.stat_result) -> dict:
        kind = "directory" if stat.S_ISDIR(st.st_mode) else "file"
        return {"name": name, "size": st.st_size, "type": kind, "mtime": st.st_mtime}

    def info(self, path, **kwargs) -> dict:
        name = self._strip_protocol(path).rstrip("/")
        target = self.root / name if name else self.root
        st = os.lstat(target)  # (FileNotFoundError for a missing path, as fsspec expects)
        self._path(name or ".", "dir" if stat.S_ISDIR(st.st_mode) else "file")
        return self._describe(name, st)

    def ls(self, path, detail: bool = True, **kwargs):
        name = self._strip_protocol(path).rstrip("/")
        folder = self._path(name or ".", want="dir")
        out = [self._describe(f"{name}/{e.name}" if name else e.name, e.stat(follow_symlinks=False))
               for e in entries(self.root, folder)]
        return out if detail else [o["name"] for o in out]

    def glob(self, path, maxdepth=None, **kwargs) -> list[str]:
        """The files matching a pattern (`*`, `?`, `[...]` within a name, `**` across folders),
        found by walking the folders under the pattern's literal part. Written here because
        fsspec's walk skips a folder whose listing fails, which would hide a refused link as
        "no files found"; this walk raises it."""
        pattern = self._strip_protocol(path).strip("/")
        parts = pattern.split("/")
        literal = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
        base = "/".join(parts[:literal])
        if literal == len(parts):  # no wildcard: the file itself, if it is one
            try:
                return [base] if self.info(base)["type"] == "file" else []
            except FileNotFoundError:
                return []
        matcher = glob_pattern("/".join(parts[literal:]))
        found = []

        def walk(folder: str, relative: str) -> None:
            try:
                listed = entries(self.root, self.root / folder if folder else self.root)
            except FileNotFoundError:
                return
            for entry in sorted(listed, key=lambda e: e.name):
                inner = f"{relative}/{entry.name}" if relative else entry.name
                if entry.is_dir(follow_symlinks=False):
                    walk(f"{folder}/{entry.name}" if folder else entry.name, inner)
                elif matcher.fullmatch(inner):
                    found.append(f"{base}/{inner}" if base else inner)

        walk(base, "")
        return found

    def modified(self, path) -> datetime:
        return datetime.fromtimestamp(self.info(path)["mtime"], tz=timezone.utc)

    def _open(self, path, mode: str = "rb", **kwargs):
        if mode != "rb":
            self._refuse("write", path)
        return PositionalFile(self._path(path))

    def _refuse(self, action: str, path) -> None:
        raise PermissionError(f"refused: a zoo root is read-only here (a query tried to {action} {self._strip_protocol(path)!r})")

    # every way to change the file system is refused (fsspec's defaults would try some of them)
    def mkdir(self, path, create_parents: bool = True, **kwargs):
        self._refuse("create", path)

    def makedirs(self, path, exist_ok: bool = False):
        self._refuse("create", path)

    def rm(self, path, recursive: bool = False, maxdepth=None):
        self._refuse("remove", path)

    def rm_file(self, path):
        self._refuse("remove", path)

    def _rm(self, path):
        self._refuse("remove", path)

    def rmdir(self, path):
        self._refuse("remove", path)

    def mv(self, path1, path2, recursive: bool = False, maxdepth=None, **kwargs):
        self._refuse("move", path1)

    def cp_file(self, path1, path2, **kwargs):
        self._refuse("copy to", path2)

    def touch(self, path, truncate: bool = True, **kwargs):
        self._refuse("write", path)

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        self._refuse("write", path)

    def put_file(self, lpath, rpath, callback=None, mode="overwrite", **kwargs):
        self._refuse("write", rpath)
