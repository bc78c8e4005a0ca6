"""A published zoo (see zoo.publish), read where it lies: a local folder, `http(s)://`, `s3://`,
`hf://datasets/ORG/NAME`, or any other fsspec URL.

Nothing of it is trusted beyond its manifest (`manifest.json`: every file's path, size and
sha256). Only the files the manifest lists are read, each by byte ranges through the URL's fsspec
file system; a path with `..`, an absolute path, or a file whose size is not the manifest's is
refused in one line. `ManifestFileSystem` is those rules as the `zoo://` file system that the SQL
connection (zoo.sql) registers with DuckDB, as for a local root (zoo.rootfs), so a query reads only
the row groups and columns it needs. `PublishedStore` is what `zoo.api.Root` reads such a zoo
through: its views, and the weights of the models asked for, one byte range per run of rows,
each row checked against the sha256 the checkpoint index records. Nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

import duckdb
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import ZooError, ZooWarning, one_line
from .rootfs import PROTOCOL, RootFileSystem, ThreadPositionedFile, glob_pattern
from .schemas import SCHEMAS
from .storage import empty_view_sql
from .weights import sha256

MANIFEST = "manifest.json"
FORMAT = "phase-zoo/published-1"
MAX_MANIFEST_BYTES = 256 << 20
# the tables a published zoo holds (metadata; the weights are in safetensors shards)
PUBLISHED_TABLES = ("models", "curves", "checkpoints", "tensors", "metrics", "layer_metrics", "pair_metrics",
                    "densities", "cells", "benchmark_results")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def is_url(root: str) -> bool:
    return bool(_URL.match(str(root))) and not str(root).startswith("file://")


def is_published(root) -> bool:
    """Whether `root` names a published zoo: a URL, or a local folder holding a manifest and no
    `tables/` (a zoo root)."""
    if is_url(str(root)):
        return True
    path = Path(root)
    return (path / MANIFEST).is_file() and not (path / "tables").is_dir()


def table_path(table: str) -> str:
    return f"data/{table}.parquet"


@dataclass(frozen=True)
class Entry:
    path: str
    size: int
    sha256: str


def check_relative(path: str, where: str) -> str:
    """`path` if it is a plain relative path ('/'-separated, no `..`, not absolute); else one line."""
    pure = PurePosixPath(path)
    if (not isinstance(path, str) or not path or "\\" in path or pure.is_absolute() or ".." in pure.parts
            or path != str(pure) or any(c in path for c in "\0\n\r")):
        raise ZooError(f"{where}: refused file path {path!r} (not a plain path inside the published folder)")
    return path


@dataclass(frozen=True)
class Manifest:
    zoo: str
    files: dict[str, Entry]
    tables: tuple[str, ...]
    body: dict
    refused: tuple[str, ...] = ()  # entries left out, each one line

    @classmethod
    def parse(cls, text: bytes, where: str) -> Manifest:
        try:
            body = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise ZooError(f"{where}: not a manifest ({one_line(e)})") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ZooError(f"{where}: not a published zoo's manifest (format {FORMAT!r} expected)")
        files, refused = {}, []
        listed = body.get("files")
        if not isinstance(listed, list):
            raise ZooError(f"{where}: no list of files")
        for i, item in enumerate(listed):
            try:  # a bad entry is refused alone: the files listed right can still be read
                if not isinstance(item, dict):
                    raise ZooError(f"{where}, files[{i}]: not an object")
                path = check_relative(item.get("path"), f"{where}, files[{i}]")
                size, digest = item.get("size"), item.get("sha256")
                if not isinstance(size, int) or size < 0 or not isinstance(digest, str) or not _SHA256.match(digest):
                    raise ZooError(f"{where}, files[{i}] ({path}): size and sha256 must be a count and 64 hex digits")
                files[path] = Entry(path, size, digest)
            except ZooError as e:
                refused.append(str(e))
        tables = tuple(t for t in PUBLISHED_TABLES if table_path(t) in files)
        if "models" not in tables or "checkpoints" not in tables:
            raise ZooError(f"{where}: the manifest lists no models or checkpoints table")
        return cls(str(body.get("zoo", "")), files, tables, body, tuple(refused))


class Source:
    """The files of a published zoo at a URL or local folder, read only as the manifest lists them."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = str(url)
        try:
            self.fs, base = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        except Exception as e:  # (an unknown protocol, a missing library, bad options)
            raise ZooError(f"cannot open {self.url}: {type(e).__name__}: {one_line(e)}") from None
        self.base = base.rstrip("/")
        self.manifest = Manifest.parse(self.fetch_small(MANIFEST), f"{self.url}/{MANIFEST}")
        self._sizes_checked: set[str] = set()
        self._lock = threading.Lock()

    def full(self, path: str) -> str:
        return f"{self.base}/{path}" if self.base else path

    def fetch_small(self, path: str) -> bytes:
        """A whole small file (the manifest), at most MAX_MANIFEST_BYTES."""
        try:
            with self.fs.open(self.full(path), "rb") as f:
                data = f.read(MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError:
            raise ZooError(f"no published zoo at {self.url} ({path} is missing)") from None
        except Exception as e:  # (each file system has its own errors: network, credentials, ...)
            raise ZooError(f"cannot read {self.url}/{path}: {type(e).__name__}: {one_line(e)}") from None
        if len(data) > MAX_MANIFEST_BYTES:
            raise ZooError(f"{self.url}/{path}: larger than {MAX_MANIFEST_BYTES} bytes")
        return data

    def entry(self, path: str) -> Entry:
        entry = self.manifest.files.get(path)
        if entry is None:
            raise ZooError(f"refused: {path!r} is not listed in the manifest of {self.url}")
        return entry

    def check_size(self, path: str) -> Entry:
        """The manifest's entry, after checking (once) that the served file has its size."""
        entry = self.entry(path)
        if path not in self._sizes_checked:
            try:
                size = self.fs.size(self.full(path))
            except FileNotFoundError:
                raise ZooError(f"{self.url}/{path}: missing (the manifest lists it)") from None
            except Exception as e:
                raise ZooError(f"{self.url}/{path}: {type(e).__name__}: {one_line(e)}") from None
            if size != entry.size:
                raise ZooError(f"refused {self.url}/{path}: {size} bytes, but the manifest says {entry.size}")
            with self._lock:
                self._sizes_checked.add(path)
        return entry

    def read_range(self, path: str, start: int, end: int) -> bytes:
        entry = self.check_size(path)
        if not 0 <= start <= end <= entry.size:
            raise ZooError(f"refused: bytes {start}-{end} lie outside {path} ({entry.size} bytes)")
        if start == end:
            return b""
        try:
            data = self.fs.cat_file(self.full(path), start=start, end=end)
        except Exception as e:
            raise ZooError(f"{self.url}/{path}: {type(e).__name__}: {one_line(e)}") from None
        if len(data) != end - start:
            raise ZooError(f"{self.url}/{path}: {len(data)} bytes came for a range of {end - start}")
        return data

    def fetch_checked(self, path: str) -> bytes:
        """A whole file, checked against the manifest's size and sha256 (one line if it differs)."""
        entry = self.check_size(path)
        data = self.read_range(path, 0, entry.size)
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise ZooError(f"refused {self.url}/{path}: its sha256 is not the manifest's (changed or damaged)")
        return data


class RangeFile(ThreadPositionedFile):
    """A published file open for reading: every read is one stateless byte-range request."""

    def __init__(self, source: Source, path: str):
        self._source, self._path = source, path
        super().__init__(path, source.check_size(path).size)

    def read_at(self, offset: int, size: int) -> bytes:
        return self._source.read_range(self._path, offset, offset + size)


class ManifestFileSystem(RootFileSystem):
    """`zoo://data/models.parquet`: the files a published zoo's manifest lists, read-only (every
    write is refused, as for a local root)."""

    def __init__(self, source: Source):
        super().__init__(Path("."))
        self.source = source

    def _listed(self, name: str) -> list[str]:
        prefix = f"{name}/" if name else ""
        return [p for p in self.source.manifest.files if p.startswith(prefix)]

    def info(self, path, **kwargs) -> dict:
        name = self._strip_protocol(path).strip("/")
        if name in self.source.manifest.files:
            return {"name": name, "size": self.source.manifest.files[name].size, "type": "file"}
        if not name or self._listed(name):
            return {"name": name, "size": 0, "type": "directory"}
        raise FileNotFoundError(name)

    def ls(self, path, detail: bool = True, **kwargs):
        name = self._strip_protocol(path).strip("/")
        children = sorted({(f"{name}/" if name else "") + p[len(name) + 1 if name else 0:].split("/")[0] for p in self._listed(name)})
        out = [self.info(c) for c in children]
        return out if detail else [o["name"] for o in out]

    def glob(self, path, maxdepth=None, **kwargs) -> list[str]:
        pattern = self._strip_protocol(path).strip("/")
        if not any(c in pattern for c in "*?["):
            return [pattern] if pattern in self.source.manifest.files else []
        matcher = glob_pattern(pattern)
        return sorted(p for p in self.source.manifest.files if matcher.fullmatch(p))

    def modified(self, path) -> datetime:
        return datetime.fromtimestamp(0, tz=timezone.utc)  # (a published zoo records no times: its files never change)

    def _open(self, path, mode: str = "rb", **kwargs):
        if mode != "rb":
            self._refuse("write", path)
        return RangeFile(self.source, check_relative(self._strip_protocol(path), "zoo://"))


class PublishedStore:
    """A published zoo as `zoo.api.Root` reads it: the same methods as zoo.storage.Store uses for
    reading (views, weights), read-only and lock-free (nothing here ever changes)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.source = Source(url, storage_options)
        self.root = self.source.url
        self.lock_timeout = None
        self.refused: list[str] = list(self.source.manifest.refused)

    @contextlib.contextmanager
    def reading(self):
        yield

    def pending_zoos(self) -> list[str]:
        return []

    def recover(self) -> None:
        pass

    def filesystem(self) -> ManifestFileSystem:
        return ManifestFileSystem(self.source)

    def tables(self) -> list[str]:
        return list(self.source.manifest.tables)

    def create_views(self, con: duckdb.DuckDBPyConnection, base: str | None = None) -> None:
        base = f"{PROTOCOL}://" if base is None else base
        for table in SCHEMAS:
            if table in self.source.manifest.tables:
                try:
                    con.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM read_parquet('{base}{table_path(table)}')")
                    continue
                except duckdb.Error as e:  # (a damaged or changed file: that table is left empty, and said so)
                    self.refused.append(f"{table_path(table)}: {one_line(e)}")
            con.execute(empty_view_sql(con, table))  # (a table the zoo never had: empty, with its base columns)
        if self.refused:
            warnings.warn(ZooWarning(f"{self.root}: left out (empty): " + "; ".join(self.refused)), stacklevel=6)

    def checkpoint_index(self, model_ids: list[str], epoch: int | None = None) -> pa.Table:
        """The checkpoint index rows (model_id, epoch, sha256, file, byte_offset, byte_length, ...)
        of `model_ids` (at `epoch`, or every published epoch), reading only the row groups that
        can hold them (the index is sorted by grid position: first the models' loads are looked up)."""
        ids = sorted(set(model_ids))
        wanted = pc.field("model_id").isin(ids)
        if epoch is not None:
            wanted = wanted & (pc.field("epoch") == int(epoch))
        fs = self.filesystem()
        try:
            with fs.open(table_path("models"), "rb") as f:  # their grid positions: the index is sorted by them
                loads = pq.read_table(f, columns=["model_id", "load"], filters=pc.field("model_id").isin(ids)).column("load")
            with fs.open(table_path("checkpoints"), "rb") as f:
                return pq.read_table(f, filters=wanted & pc.field("load").isin(pc.unique(loads)))
        except (OSError, pa.ArrowException) as e:
            raise ZooError(f"{self.root}/{table_path('checkpoints')}: {one_line(e)}") from None

    def read_weights(self, zoo: str, model_ids: list[str], epoch: int) -> tuple[np.ndarray | None, list[str]]:
        """The weights of `model_ids` at `epoch` as one (N, n_values) float32 matrix in the given
        order, and the ids without such a checkpoint; each run of adjacent rows of a shard is one
        byte-range read, each row checked against its recorded sha256."""
        index = self.checkpoint_index(model_ids, epoch)
        rows = {m: r for m, r in zip(index.column("model_id").to_pylist(), index.to_pylist())}
        found = [m for m in model_ids if m in rows]
        if not found:
            return None, list(model_ids)
        lengths = {rows[m]["n_values"] for m in found}
        if len(lengths) > 1:
            raise ZooError(f"checkpoints of zoo {zoo!r} at epoch {epoch} have different lengths")
        out = np.zeros((len(model_ids), lengths.pop()), dtype=np.float32)
        position = {m: i for i, m in enumerate(model_ids)}
        for run in read_rows(self.source, [rows[m] for m in dict.fromkeys(found)]):
            for row, vector in run:
                out[position[row["model_id"]]] = vector
        return out, [m for m in model_ids if m not in rows]


def read_rows(source: Source, rows: list[dict]):
    """Yield, per run of adjacent rows of one shard, [(index row, float32 vector)], reading each
    run as one byte range and checking each row's sha256 (one line naming the shard if not)."""
    by_file: dict[str, list[dict]] = {}
    for row in rows:
        by_file.setdefault(check_relative(row["file"], "checkpoint index"), []).append(row)
    for path, members in sorted(by_file.items()):
        members.sort(key=lambda r: r["byte_offset"])
        run: list[dict] = []
        for row in members + [None]:
            if run and (row is None or row["byte_offset"] > run[-1]["byte_offset"] + run[-1]["byte_length"]):
                start, end = run[0]["byte_offset"], run[-1]["byte_offset"] + run[-1]["byte_length"]
                data = source.read_range(path, start, end)
                vectors = []
                for r in run:
                    at = r["byte_offset"] - start
                    vector = np.frombuffer(data, dtype="<f4", count=r["byte_length"] // 4, offset=at)
                    if sha256(vector) != r["sha256"]:
                        raise ZooError(f"refused {source.url}/{path}: the weights of model {r['model_id']!r} at epoch "
                                       f"{r['epoch']} do not match the sha256 the index records (changed or damaged)")
                    vectors.append((r, vector))
                yield vectors
                run = []
            if row is not None:
                if row["byte_length"] != 4 * row["n_values"]:
                    raise ZooError(f"refused checkpoint index row of model {row['model_id']!r}: "
                                   f"{row['byte_length']} bytes for {row['n_values']} values")
                run.append(row)


# --- selections: what publish writes and pull copies ---------------------------------------


def rows_of(table: pa.Table | None, column: str, ids: set[str]) -> pa.Table | None:
    """The rows of `table` whose `column` is one of `ids` (None stays None)."""
    if table is None:
        return None
    return table.filter(pc.is_in(table.column(column), value_set=pa.array(sorted(ids), pa.string())))


def at_epochs(checkpoints: pa.Table, epochs: str, strict: bool = False) -> pa.Table:
    """The checkpoint rows at `epochs`: "all", "final" (each model's last), or a list "0,5,20".
    `strict` (publishing from a root) also refuses an empty list and an epoch nobody has."""
    if epochs == "all":
        return checkpoints
    pairs = list(zip(checkpoints.column("model_id").to_pylist(), checkpoints.column("epoch").to_pylist()))
    if epochs == "final":
        last = checkpoints.group_by("model_id").aggregate([("epoch", "max")])
        wanted = set(zip(last.column("model_id").to_pylist(), last.column("epoch_max").to_pylist()))
    else:
        try:
            listed = {int(e) for e in epochs.split(",") if e.strip()}
        except ValueError:
            raise ZooError(f"--epochs {epochs!r}: give final, all, or a list such as 0,5,20") from None
        if strict and not listed:
            raise ZooError(f"--epochs {epochs!r}: no epoch listed")
        if strict and (missing := sorted(listed - {e for _, e in pairs})):
            raise ZooError(f"--epochs: no stored checkpoint at epoch {missing[0]}")
        wanted = {(m, e) for m, e in pairs if e in listed}
    return checkpoints.filter(pa.array([pair in wanted for pair in pairs], pa.bool_()))


def shared_rows(tables: dict[str, pa.Table | None], models: pa.Table, ids: set[str]) -> dict[str, pa.Table | None]:
    """The rows that refer to several models, kept only when all of them are in `ids`: pair
    metrics of two such models, cells all of whose models (in `models`, every model of their
    zoos) are, and benchmark rows whose unit (a model, a cell, a zoo's population) is."""
    cells: dict[tuple, set[str]] = {}
    for m, zoo, load, temperature in zip(*(models.column(c).to_pylist() for c in ("model_id", "zoo", "load", "temperature"))):
        cells.setdefault((zoo, load, temperature), set()).add(m)
    whole = {c for c, members in cells.items() if members <= ids}
    whole_zoos = {c[0] for c in cells} - {c[0] for c in cells if c not in whole}
    out: dict[str, pa.Table | None] = {"pair_metrics": rows_of(rows_of(tables.get("pair_metrics"), "model_a", ids), "model_b", ids)}
    if (table := tables.get("cells")) is not None:
        keep = [c in whole for c in zip(*(table.column(k).to_pylist() for k in ("zoo", "load", "temperature")))]
        out["cells"] = table.filter(pa.array(keep, pa.bool_()))
    if (table := tables.get("benchmark_results")) is not None:
        every = set(models.column("model_id").to_pylist())
        keep = [u in ids if u in every else (z in whole_zoos if u == "population" else (z, l, t) in whole)
                for u, z, l, t in zip(*(table.column(k).to_pylist() for k in ("unit", "zoo", "load", "temperature")))]
        out["benchmark_results"] = table.filter(pa.array(keep, pa.bool_()))
    return out
