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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ZooError, one_line
from .integrity import forget, rename, write_error
from .matrices import write_matrices

if TYPE_CHECKING:
    from .storage import Store

PACKED_TABLES = ("checkpoints", "curves", "tensors", "models")  # the models row last: the commit
PACK_PREFIX = "pack-"
MERGED = PACK_PREFIX + "merged-"  # a pack that replaces smaller packs of the same table
PENDING = ".pending"
PACK_BYTES = 256 << 20
SMALL_PACK_BYTES = PACK_BYTES // 8  # a smaller checkpoint pack is merged with others by `pack`,
MERGE_FROM = 16  # once there are this many (a few dozen files read as fast as one; merging 8 stacks'
# packs of 32 digits MLPs took 0.8 s, 7% of the `zoo generate` that wrote them: not worth it so early)
PACKER_WAIT_S = 5.0  # how long a job waits for the packer's lock to store a stack as packs
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
                _write_pending(store, table, zoo, tables)
            store.finish_packs(zoo)
        _merge_small_packs(store, zoo)
        return len(ids)


def _merge_small_packs(store: Store, zoo: str) -> None:
    """Merge packs whose checkpoints hold under SMALL_PACK_BYTES (a trained stack's, written by
    its job: `write_models`) into packs of about PACK_BYTES, table by table: each merged pack
    (named MERGED...) takes every pack of its table whose models are among the merged ones, and
    `finish_packs` removes those as it puts the merged pack in place."""
    folder = store.zoo_dir("checkpoints", zoo)
    small = [(path.name, path.stat().st_size) for path in _packs_in(store, "checkpoints", zoo)]
    small = sorted((name, size) for name, size in small if size < SMALL_PACK_BYTES)
    if len(small) < MERGE_FROM:
        return
    chunks, chunk, total = [], [], 0
    for name, size in small:
        chunk.append(name)
        total += size
        if total >= PACK_BYTES:
            chunks.append(chunk)
            chunk, total = [], 0
    chunks = [c for c in chunks + [chunk] if len(c) > 1]
    members = {table: {p: set(model_ids_in(p)) for p in _packs_in(store, table, zoo)} for table in PACKED_TABLES}
    for chunk in chunks:
        ids = {m for name in chunk for m in members["checkpoints"][folder / name]}
        for table in PACKED_TABLES:  # models last
            packs = [p for p, held in members[table].items() if held <= ids]
            if packs:
                _write_pending(store, table, zoo, [pq.ParquetFile(p).read() for p in packs], merged=True)
        store.finish_packs(zoo)


def _packs_in(store: Store, table: str, zoo: str) -> list[Path]:
    """`zoo`'s packs of `table` in place (not pending)."""
    folder = store.zoo_dir(table, zoo)
    return [folder / n for n in store.names(folder) if n.startswith(PACK_PREFIX) and n.endswith(".parquet")]


def write_models(store: Store, zoo: str, tables: dict[str, list[pa.Table]]) -> list[str] | None:
    """Store the rows of several just-trained models (`tables`: each packed table's per-model
    rows, in one model order) as one pack per table, and return the ids stored: those no run had
    stored when the packer's lock was taken (another run may have trained the same models). None
    when the packer's lock stayed busy for PACKER_WAIT_S (a long merge, `zoo verify`): the
    caller stores the models as parts instead, which the next `pack` merges.

    Under the packer's lock, the packs are written pending, the `models` pack last, then put in
    place. A writer killed before its `models` pack was written leaves pending packs of models
    that are not stored: the next `finish_packs` removes them (the models are trained again), so
    a crash can neither duplicate rows nor store a model in part."""
    deadline = time.monotonic() + PACKER_WAIT_S
    while True:
        with store.packing() as held:
            if held:
                return _write_models_held(store, zoo, tables)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def _write_models_held(store: Store, zoo: str, tables: dict[str, list[pa.Table]]) -> list[str]:
    stored = store.stored_ids("models", zoo)
    keep = [i for i, rows in enumerate(tables["models"]) if rows.column("model_id")[0].as_py() not in stored]
    if not keep:
        return []
    store.finish_packs(zoo)  # (first: a dead writer's pending packs of these models go)
    for table in PACKED_TABLES:
        try:
            store.zoo_dir(table, zoo).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(store.zoo_dir(table, zoo), e) from None
    for table in PACKED_TABLES:  # models last
        _write_pending(store, table, zoo, [tables[table][i] for i in keep])
    store.finish_packs(zoo)
    return [tables["models"][i].column("model_id")[0].as_py() for i in keep]


def _write_pending(store: Store, table: str, zoo: str, tables: list[pa.Table], merged: bool = False) -> None:
    """Several models' rows of `table` as one pending pack, sorted (checkpoints by epoch, then
    model; the rest by model), a checkpoint pack's weight matrices first."""
    data = pa.concat_tables(tables, promote_options="permissive")
    order = [("epoch", "ascending"), ("model_id", "ascending")] if table == "checkpoints" else [("model_id", "ascending")]
    data = data.sort_by(order)
    if table == "checkpoints":  # the N x P matrices first: used only once the pack is in place
        write_matrices(store.zoo_dir(table, zoo) / f"{pack_key(data, merged)}{MATRIX_SUFFIX}", data)
    write_pack(store, table, zoo, data, pending=True, merged=merged)


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


def write_pack(store: Store, table: str, zoo: str, data: pa.Table, pending: bool = False, merged: bool = False) -> Path:
    """Write the rows of several models as one pack of `table` (pending: under its `.pending`
    name, put in place by `finish_packs`; merged: one that replaces smaller packs). Row groups
    of ~4 MB, so a read of one epoch or of a few models skips the rest by the groups'
    statistics; weights in LZ4, which decodes about 1.5x faster than zstd here (weights
    compress little: by 8% in LZ4, 13% in zstd on the smoke zoo)."""
    path = store.zoo_dir(table, zoo) / f"{pack_key(data, merged)}.parquet{PENDING if pending else ''}"
    row_bytes = max(1, data.nbytes // max(1, len(data)))
    store.write_file(path, data, row_group_size=max(1, min(len(data), (4 << 20) // row_bytes)),
                     compression="lz4" if table == "checkpoints" else "zstd")
    return path


def finish_packs(store: Store, zoo: str) -> None:
    """Put pending packs in place: remove the per-model parts they replace, then rename them (a
    pending pack is complete, since it was written atomically, so this is safe to redo). A
    pending pack that holds a model stored nowhere (no `models` row in a part, a pack or a
    pending pack) is what a writer killed before its commit left (`write_models`): it is removed.
    Call with the packer's lock held: a live writer's packs are pending until its commit."""
    committed: set[str] | None = None
    for table in PACKED_TABLES:
        folder = store.zoo_dir(table, zoo)
        pendings = sorted(folder / n for n in store.names(folder) if n.startswith(PACK_PREFIX) and n.endswith(PENDING))
        if not pendings:
            continue
        replaced: dict[Path, list[Path]] = {}  # merged pending pack -> the packs it replaces
        if any(p.name.startswith(MERGED) for p in pendings):
            in_place = {p: set(model_ids_in(p)) for p in _packs_in(store, table, zoo)}
            for pending in (p for p in pendings if p.name.startswith(MERGED)):
                merged = set(model_ids_in(pending))
                replaced[pending] = [p for p, members in in_place.items() if members <= merged]
        for pending in pendings:
            if committed is None and table != "models":
                committed = store.stored_ids("models", zoo)  # (a read: not under `removing`)
            with store.removing():  # readers see the models in their parts or in the pack, never in neither
                if not pending.exists():  # another process finished it meanwhile
                    continue
                ids = set(model_ids_in(pending))
                if table != "models":
                    if not ids <= committed:  # a dead writer's: its models are trained again
                        _remove(pending, pending.with_name(pending.name.split(".")[0] + MATRIX_SUFFIX))
                        continue
                for model_id in ids:
                    store.part_path(table, zoo, model_id).unlink(missing_ok=True)
                final = pending.with_name(pending.name[: -len(PENDING)])
                smaller = [path for path in replaced.get(pending, []) if path != final]  # (`_merge_small_packs`)
                if smaller:  # their records dropped in one rewrite of the manifest, not one per pack
                    _remove(*smaller, *(path.with_suffix(MATRIX_SUFFIX) for path in smaller))
                rename(pending, final)


def _remove(*paths: Path) -> None:
    """Remove files of one folder on purpose, their checksum records first (`integrity.forget`)."""
    forget(paths[0].parent, {n for p in paths for n in (p.name, p.name + PENDING)})  # (a pack's pending name too)
    for path in paths:
        path.unlink(missing_ok=True)


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
    return {m for path in _packs_in(store, table, zoo) for m in model_ids_in(path)}


def pack_key(data: pa.Table, merged: bool = False) -> str:
    """A pack's name: a hash of the model ids it holds (the same models give the same name),
    after MERGED for a pack that replaces smaller ones."""
    members = "\n".join(sorted(set(data.column("model_id").to_pylist())))
    return (MERGED if merged else PACK_PREFIX) + hashlib.sha256(members.encode()).hexdigest()[:16]


def model_ids_in(path: Path) -> list[str]:
    """The model ids a pack holds; a damaged pack is named, with the way to recover.

    A pack is never changed in place (it is written whole under a temporary name and renamed, or
    removed), so its ids are read once per process and kept by its name (a hash of the ids it
    holds, `pack_key`; the `.pending` suffix left out, which its rename into place drops) and the
    file's identity (device, inode, size, modification time: a file under the same name again,
    written anew, is read again). Listing what a zoo stores read every
    pack's `model_id` column at each call, and a job asks before and after each stack, so its
    reads grew with the square of its stacks (225 reads, 0.26 s, for the 16 two-model stacks of
    one job of an fmnist-cnn cell; 425, half of `pack`'s 0.72 s, merging that cell's 32 stacks;
    measured here). A pack damaged in place after its ids were read, keeping its size and
    modification time, is found by `zoo verify` (by its checksum), not here; neither did a read of
    the `model_id` column alone find damage elsewhere in the file."""
    try:
        s = os.stat(path)
        key = (path.name.removesuffix(PENDING), s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns)
        ids = _MODEL_IDS.get(key)
        if ids is None:
            ids = tuple(dict.fromkeys(pq.read_table(path, columns=["model_id"]).column(0).to_pylist()))  # (once each)
            if len(_MODEL_IDS) >= 4096:  # (a bound on the memory kept: start over)
                _MODEL_IDS.clear()
            _MODEL_IDS[key] = ids
        return list(ids)
    except (OSError, pa.ArrowException) as e:
        raise ZooError(f"damaged file {path} ({one_line(e)}): "
                       f"run `zoo verify --root {path.parents[3]}` to quarantine it") from None


_MODEL_IDS: dict[tuple[str, int, int, int, int], tuple[str, ...]] = {}  # a pack's name and file identity -> its ids
