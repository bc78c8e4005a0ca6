"""Packs: many models' rows of a table in one Parquet file, written so that a crash loses nothing.

Reading 10,000 small files costs far more than reading one (perf/storage_read.py), so once a run
has stored its models their per-model parts are merged: each pack is first written in full under a
`.pending` name (invisible to queries), then the per-model parts it replaces are removed and it is
renamed into place. A crash in between leaves the pending pack, which still counts as stored, and
the next writer (or a reader that asks to recover) finishes it. A checkpoint pack also gets its
weights as N x P matrices beside it (zoo.matrices), written first and used only once the pack is
in place.

Every function takes the `Store` of the root (zoo.storage), whose paths, listings, locks and
atomic writes it uses; `Store.pack`, `Store.finish_packs` and `Store.recover` are the entry points
callers use.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ZooError, one_line
from .integrity import rename
from .matrices import write_matrices

if TYPE_CHECKING:
    from .storage import Store

PACKED_TABLES = ("checkpoints", "curves", "tensors", "models")  # the models row last: the commit
PACK_PREFIX = "pack-"
PENDING = ".pending"
PACK_BYTES = 256 << 20
MATRIX_SUFFIX = ".safetensors"  # a checkpoint pack's weight matrices (zoo.matrices)


def pack(store: Store, zoo: str) -> int:
    """Merge the per-model parts of `zoo`'s stored models into pack files (at most about
    PACK_BYTES of checkpoints each); returns how many models were packed. Safe at any time, also
    while jobs store more models: only models whose `models` part exists (all their rows written)
    are packed, one packer runs at a time (a lock file; a second one returns 0 at once), and a
    per-model part of an already packed model (a second run that trained it at the same time) is
    removed, not packed twice."""
    from .storage import part_key

    folder = store.zoo_dir("models", zoo)
    if not folder.is_dir():
        return 0
    with store.packing() as locked:
        if not locked:
            return 0
        store.finish_packs(zoo)
        matrices = store.zoo_dir("checkpoints", zoo)
        packed = {t: packed_ids(store, t, zoo) for t in PACKED_TABLES}
        ids = sorted(filter(None, map(part_key, store.names(folder))))
        with store.removing():
            for path in matrices.glob(f"{PACK_PREFIX}*{MATRIX_SUFFIX}") if matrices.is_dir() else []:
                if not path.with_suffix(".parquet").exists():  # a packer died before writing its pack
                    path.unlink(missing_ok=True)
            for table in PACKED_TABLES:  # strays: rows already in a pack
                for model_id in packed[table].intersection(ids):
                    store.part_path(table, zoo, model_id).unlink(missing_ok=True)
        ids = [m for m in ids if m not in packed["models"]]
        for chunk in _chunks_of_pack_size(store, zoo, ids):
            for table in PACKED_TABLES:  # models last
                # a model may lack a part here only if a crashed packer already packed it
                paths = [p for p in (store.part_path(table, zoo, m) for m in chunk) if p.exists()]
                if not paths:
                    continue
                # (ParquetFile.read: a third of read_table's per-file cost, measured here; in threads,
                # since pyarrow decodes without the GIL: packing 256 models' 1,024 parts took 1.8 s
                # instead of 2.4 s on 2 cores)
                with ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool:
                    tables = list(pool.map(lambda p: pq.ParquetFile(p).read(), paths))
                data = pa.concat_tables(tables, promote_options="permissive")
                order = [("epoch", "ascending"), ("model_id", "ascending")] if table == "checkpoints" else [("model_id", "ascending")]
                data = data.sort_by(order)
                if table == "checkpoints":  # the N x P matrices first: used only once the pack is in place
                    write_matrices(store.zoo_dir(table, zoo) / f"{pack_key(data)}{MATRIX_SUFFIX}", data)
                store.write_pack(table, zoo, data, pending=True)
            store.finish_packs(zoo)
        return len(ids)


def _chunks_of_pack_size(store: Store, zoo: str, ids: list[str]) -> list[list[str]]:
    """`ids` in runs whose checkpoint parts add up to about PACK_BYTES."""
    chunks, chunk, size = [], [], 0
    for model_id in ids:
        path = store.part_path("checkpoints", zoo, model_id)
        size += path.stat().st_size if path.exists() else 0
        chunk.append(model_id)
        if size >= PACK_BYTES:
            chunks.append(chunk)
            chunk, size = [], 0
    return chunks + ([chunk] if chunk else [])


def write_pack(store: Store, table: str, zoo: str, data: pa.Table, pending: bool = False) -> Path:
    """Write the rows of several models as one pack of `table` (pending: under its `.pending`
    name, put in place by `finish_packs`). Row groups of ~4 MB, so a read of one epoch or of a
    few models skips the rest by the groups' statistics; weights in LZ4, which decodes about 1.5x
    faster than zstd here (weights compress little: by 8% in LZ4, 13% in zstd on the smoke zoo)."""
    path = store.zoo_dir(table, zoo) / f"{pack_key(data)}.parquet{PENDING if pending else ''}"
    row_bytes = max(1, data.nbytes // max(1, len(data)))
    store.write_file(path, data, row_group_size=max(1, min(len(data), (4 << 20) // row_bytes)),
                     compression="lz4" if table == "checkpoints" else "zstd")
    return path


def finish_packs(store: Store, zoo: str) -> None:
    """Put pending packs in place: remove the per-model parts they replace, then rename them (a
    pending pack is complete, since it was written atomically, so this is safe to redo)."""
    for table in PACKED_TABLES:
        folder = store.zoo_dir(table, zoo)
        for pending in sorted(folder / n for n in store.names(folder) if n.startswith(PACK_PREFIX) and n.endswith(PENDING)):
            with store.removing():  # readers see the models in their parts or in the pack, never in neither
                if not pending.exists():  # another process finished it meanwhile
                    continue
                for model_id in set(model_ids_in(pending)):
                    store.part_path(table, zoo, model_id).unlink(missing_ok=True)
                rename(pending, pending.with_name(pending.name[: -len(PENDING)]))


def pending_zoos(store: Store) -> list[str]:
    """The zoos with a pending pack: a packer killed between removing a pack's parts and renaming
    it leaves those models' rows in the pending file only, which queries do not read."""
    return sorted({d.name for table in PACKED_TABLES for d in store.folders(store.table_dir(table))
                   if any(n.startswith(PACK_PREFIX) and n.endswith(PENDING) for n in store.names(d))})


def recover(store: Store) -> None:
    """Finish the packs a killed packer left pending, like a database replaying its journal; on
    a root this process cannot write, or while a packer runs (it finishes its own), nothing is
    done."""
    zoos = pending_zoos(store)
    if not zoos:
        return
    with contextlib.suppress(OSError, ZooError, pa.ArrowException):  # (verify names a damaged pack)
        with store.packing() as locked:
            for zoo in zoos if locked else []:
                store.finish_packs(zoo)


def packed_ids(store: Store, table: str, zoo: str) -> set[str]:
    """The model ids in `zoo`'s packs of `table` (in place, not pending)."""
    folder = store.zoo_dir(table, zoo)
    names = [n for n in store.names(folder) if n.startswith(PACK_PREFIX) and n.endswith(".parquet")]
    return {m for n in names for m in model_ids_in(folder / n)}


def pack_key(data: pa.Table) -> str:
    """A pack's name: a hash of the model ids it holds (the same models give the same name)."""
    members = "\n".join(sorted(set(data.column("model_id").to_pylist())))
    return PACK_PREFIX + hashlib.sha256(members.encode()).hexdigest()[:16]


def model_ids_in(path: Path) -> list[str]:
    """The model ids a pack holds; a damaged pack is named, with the way to recover."""
    try:
        return pq.read_table(path, columns=["model_id"]).column(0).to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise ZooError(f"damaged file {path} ({one_line(e)}): "
                       f"run `zoo verify --root {path.parents[3]}` to quarantine it") from None
