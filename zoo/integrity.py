"""File integrity of a zoo root: checksums recorded at write, temporary files, `zoo verify`.

Every data file (Parquet part or pack, weight matrix) is written under a temporary name, and
`commit` then records its sha256 and size in its folder's `.checksums` manifest before renaming
it into place, so every file a reader can see has its checksum on record. A manifest line is
`sha256<TAB>bytes<TAB>file name`; a file may have several (a part rewritten with new content),
and it is intact when it matches any of them. Appends take a shared lock on the manifest, and
`compact_manifest` (run by the packer) an exclusive one, so an append is never lost to a rewrite.

`verify` checks every file against the manifest; a file with no record (written by an older
version, or copied in) is checked by decoding it in full. Checkpoint rows are checked against
their weight hashes either way. A damaged file is moved out of `tables/` into `quarantine/`,
so the rest of the zoo stays queryable, and models that lost rows with it are un-stored so the
next `zoo generate` retrains them (training is deterministic: the same code gives the same bits).

Temporary names carry the writer's host and pid: a file left by a writer killed mid-write is
removed by the next `sweep_temporary` once that pid is gone (or after a day, from other hosts).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from safetensors import SafetensorError

from .errors import StorageError, one_line

MANIFEST = ".checksums"
QUARANTINE = "quarantine"
STALE_SECONDS = 24 * 3600
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
_LINE = re.compile(r"^([0-9a-f]{64})\t(\d+)\t([^\t/]+)$")
_UMASK = os.umask(0)  # (read once: asking changes it, for a moment, for every thread)
os.umask(_UMASK)
_TEMPORARY = re.compile(r"^\..+\.([A-Za-z0-9-]+)\.(\d+)\.[0-9a-f]{12}\.tmp(\.wal)?$")


def temporary_name(path: Path) -> Path:
    """A hidden name beside `path` for writing it; queries and listings skip hidden names."""
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def temporary_name_of(name: str) -> bool:
    """Whether `name` is a temporary name `temporary_name` makes."""
    return _TEMPORARY.match(name) is not None


def write_error(path: Path, e: Exception) -> StorageError:
    """The one-line error for a write that failed (full disk, read-only root, ...)."""
    code = getattr(e, "errno", None)
    text = getattr(e, "strerror", None) or one_line(e)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or "No space left" in str(e) or "File too large" in str(e):
        hint = " (the disk is full: free space, then rerun; nothing partial was kept)"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM) or "Read-only file system" in str(e):
        hint = " (the zoo root is read-only: use a writable --root)"
    else:
        hint = ""
    return StorageError(f"cannot write {path}: {text}{hint}")


def write_atomically(path: Path, write: Callable[[Path], None], record: bool = True) -> None:
    """Write `path` through `write(tmp)` under a temporary name, fsync it, give it the mode the
    umask gives new files (safetensors creates its files 0600), and put it in place: with its
    checksum on record (`commit`), or, for a transient file (`record=False`), by a durable rename
    alone. A failed write (a full disk, a read-only root) leaves nothing behind and raises the
    one-line `StorageError`."""
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if record:
            commit(tmp, path)
        else:
            os.replace(tmp, path)
            _fsync_folder(path.parent)
    except (OSError, SafetensorError) as e:  # (safetensors reports a full disk as its own error type)
        raise write_error(path, e) from None
    finally:
        with contextlib.suppress(OSError):  # (a read-only root refuses even this)
            tmp.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def digest(path: Path) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


@contextlib.contextmanager
def _manifest(folder: Path, exclusive: bool):
    """The folder's manifest opened for appending, under a shared (or exclusive) lock. A
    compaction may have replaced the file while we waited for the lock: then reopen."""
    path = folder / MANIFEST
    while True:
        handle = open(path, "a+b")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                same = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield handle
                return
        finally:
            handle.close()  # (closing releases the lock)


def commit(tmp: Path, path: Path) -> None:
    """Record the checksum of the fsynced file `tmp` under `path`'s name, rename it to `path`,
    and make the rename durable."""
    sha, size = digest(tmp)
    line = f"{sha}\t{size}\t{path.name}\n".encode()
    with _manifest(path.parent, exclusive=False) as manifest:
        _append(manifest, line)
        os.replace(tmp, path)
    _fsync_folder(path.parent)


def rename(src: Path, dst: Path) -> None:
    """Rename a committed file within its folder, its checksum records going with it."""
    pairs = recorded(src.parent).get(src.name, set())
    with _manifest(dst.parent, exclusive=False) as manifest:
        if pairs:
            _append(manifest, "".join(f"{sha}\t{size}\t{dst.name}\n" for sha, size in sorted(pairs)).encode())
        os.replace(src, dst)


def _append(manifest, lines: bytes) -> None:
    end = manifest.seek(0, os.SEEK_END)
    if end and os.pread(manifest.fileno(), 1, end - 1) != b"\n":
        lines = b"\n" + lines  # a line cut short (a full disk): keep ours whole
    os.write(manifest.fileno(), lines)  # one O_APPEND write: appends never interleave
    os.fsync(manifest.fileno())


def recorded(folder: Path) -> dict[str, set[tuple[str, int]]]:
    """File name -> the (sha256, size) pairs the manifest records for it."""
    out: dict[str, set[tuple[str, int]]] = {}
    try:
        text = (folder / MANIFEST).read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return out
    for line in text.split("\n"):
        m = _LINE.match(line)
        if m:
            out.setdefault(m.group(3), set()).add((m.group(1), int(m.group(2))))
    return out


def compact_manifest(folder: Path) -> None:
    """Drop the records of files that no longer exist (packed parts), atomically."""
    _drop_records(folder, lambda names: names - set(os.listdir(folder)), optional=True)


def forget(folder: Path, names: set[str]) -> None:
    """Drop the records of `names` before they are removed on purpose: a crash in between leaves
    a file without a record (checked by its content), never a record of a file gone."""
    _drop_records(folder, lambda recorded_names: recorded_names & names, optional=False)


def _drop_records(folder: Path, dropped: Callable[[set[str]], set[str]], optional: bool) -> None:
    """Rewrite the manifest of `folder` without the records of `dropped(recorded names)`,
    atomically; an optional rewrite is skipped on a full disk."""
    if not (folder / MANIFEST).exists():
        return
    with contextlib.suppress(*((OSError,) if optional else ())), _manifest(folder, exclusive=True):
        records = recorded(folder)
        gone = dropped(set(records))
        if not gone:
            return  # nothing to drop: no rewrite (compaction runs at the end of every writing command)
        lines = sorted({f"{sha}\t{size}\t{name}" for name, pairs in records.items() if name not in gone
                        for sha, size in pairs})
        tmp = temporary_name(folder / MANIFEST)
        try:
            with open(tmp, "w") as f:
                f.write("".join(line + "\n" for line in lines))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, folder / MANIFEST)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def sweep_temporary(folder: Path) -> int:
    """Remove the temporary files in `folder` whose writer is dead (on this host) or that are a
    day old; returns how many."""
    removed = 0
    if not folder.is_dir():
        return 0
    now = time.time()
    for entry in os.scandir(folder):
        m = _TEMPORARY.match(entry.name)
        if not m:
            continue
        host, pid = m.group(1), int(m.group(2))
        try:
            stale = now - entry.stat().st_mtime > STALE_SECONDS or (host == _HOST and not pid_alive(pid))
        except FileNotFoundError:
            continue
        if stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- verify --------------------------------------------------------------------------------


@dataclass
class Damage:
    path: Path  # relative to the root
    problem: str
    moved: Path | None = None  # where it went in quarantine/ (None: not moved, or gone already)


@dataclass
class Verification:
    """What `verify` found and did."""

    checked: int = 0
    recorded: int = 0  # files whose checksum was on record (the rest were decoded in full)
    weight_rows: int = 0  # checkpoint rows whose weight hash was recomputed
    damaged: list[Damage] = field(default_factory=list)
    quarantined: list[Path] = field(default_factory=list)
    unstored: dict[str, list[str]] = field(default_factory=dict)  # zoo -> model ids to retrain
    swept: int = 0
    repaired: bool = False  # False: --report-only, nothing was moved
    index_rewritten: bool = False  # zoo.duckdb was written anew (a planted one replaced)

    @property
    def intact(self) -> bool:
        return not self.damaged


def check_file(path: Path, records: set[tuple[str, int]] | None, table: str) -> tuple[str | None, int]:
    """(the problem with one data file or None, checkpoint rows checked)."""
    import numpy as np
    import pyarrow.parquet as pq

    from .weights import sha256

    if records:
        sha, size = digest(path)
        if (sha, size) not in records:
            sizes = {s for _, s in records}
            if size not in sizes:
                return f"size {size} bytes, recorded {' or '.join(map(str, sorted(sizes)))} (truncated or overwritten)", 0
            return f"sha256 {sha[:12]}... differs from the recorded checksum", 0
    rows = 0
    try:
        if path.name.endswith(".safetensors"):
            _check_safetensors(path)
            return None, 0
        if records and table != "checkpoints":
            return None, 0  # the checksum covers every byte
        data = pq.ParquetFile(path, page_checksum_verification=True).read()
        if table == "checkpoints" and {"weights", "sha256"} <= set(data.column_names):
            weights = data.column("weights").combine_chunks()  # (as arrays: a pack holds millions of values)
            values = weights.flatten().to_numpy(zero_copy_only=False)
            bounds = np.concatenate([[0], np.cumsum(weights.value_lengths().fill_null(0).to_numpy())])
            for i, expected in enumerate(data.column("sha256").to_pylist()):
                if sha256(values[bounds[i]:bounds[i + 1]]) != expected:
                    return f"checkpoint row {i}: the weights do not match their sha256", rows
                rows += 1
    except Exception as e:  # any decoding failure is damage; say what the decoder said
        return f"unreadable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", rows
    return None, rows


def _check_safetensors(path: Path) -> None:
    """The header parses, and the tensors' byte ranges tile the file exactly."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        size = os.fstat(f.fileno()).st_size
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise ValueError(f"the header describes {8 + n + end} bytes, the file has {size}")


def quarantine(root: Path, path: Path, problem: str) -> Path:
    """Move a damaged file (or a link, or a folder: the entry itself, never a link's target) out
    of the tables into root/quarantine (same relative path, with a time stamp), and log why in
    quarantine/log.tsv. Nothing is written through a link: a `quarantine` that is one is itself
    moved into a real folder first, and one further down is refused in one line."""
    relative = path.relative_to(root)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    base = root / QUARANTINE
    if base.is_symlink():
        aside, moved = temporary_name(base), base / f"{QUARANTINE}.{stamp}"
        os.replace(base, aside)
        base.mkdir()
        os.replace(aside, moved)
        _log(root, stamp, Path(QUARANTINE), moved, problem if path == base else "a link in place of quarantine/")
        if path == base:
            return moved
    target = base / relative.parent / f"{relative.name}.{stamp}"
    if not target.parent.resolve().is_relative_to(base.resolve()):
        raise StorageError(f"cannot quarantine {relative}: {target.parent} leads out of the root through a link; remove that link and rerun")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    except OSError as e:
        raise write_error(target, e) from None
    return _log(root, stamp, relative, target, problem)


def _log(root: Path, stamp: str, relative: Path, target: Path, problem: str) -> Path:
    path = root / QUARANTINE / "log.tsv"
    try:  # (O_NOFOLLOW: never append through a planted link)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        raise StorageError(f"cannot write {path}: {e.strerror or e} (a link there? remove it and rerun)") from None
    with open(fd, "a") as log:
        log.write(f"{stamp}\t{relative}\t{target.relative_to(root)}\t{problem}\n")
    return target
