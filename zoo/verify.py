"""`zoo verify [ZOO]`: check every file of a root, quarantine the damaged ones, un-store the
models they took rows from (so `zoo generate` retrains them), and keep the rest queryable.

What counts as damage, and how files are checked, is `zoo.integrity`'s; this module walks the
root and repairs. It holds the packer's lock while it works, so no pack moves under it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .integrity import Damage, Verification, check_file, quarantine, recorded
from .storage import MATRIX_SUFFIX, PACK_PREFIX, PACKED_TABLES, PENDING, Store

DATA_SUFFIXES = (".parquet", PENDING, MATRIX_SUFFIX)


def verify(store: Store, zoo: str | None = None, repair: bool = True) -> Verification:
    """Check every data file of `store` (or of one zoo's folders, plus the tables' base files).
    With `repair`, damaged files go to quarantine/ and incomplete models are un-stored."""
    report = Verification()
    root = store.root
    touched: set[str] = set()  # zoos that lost rows of a packed table
    if repair:
        Store(root, create=True)  # a read-only root: one clear error before any work
    # repairing holds the packer's lock (no pack moves under it); a report only holds off removals
    with store.packing(wait=True) if repair else store.reading():
        report.swept = store.sweep(zoo) if repair else 0
        for table_dir in sorted(p for p in (root / "tables").iterdir() if p.is_dir()):
            folders = [table_dir] + ([table_dir / zoo] if zoo else sorted(p for p in table_dir.iterdir() if p.is_dir()))
            for folder in (f for f in folders if f.is_dir()):
                records = recorded(folder)
                for path in sorted(folder.iterdir()):
                    if path.name.startswith(".") or not path.name.endswith(DATA_SUFFIXES):
                        continue
                    on_record = records.get(path.name)
                    if path.is_symlink() or not path.is_file():  # a zoo from elsewhere may point out of its root
                        problem, rows = f"not a regular file ({'a link to ' + os.readlink(path) if path.is_symlink() else 'a folder or device'})", 0
                    else:
                        problem, rows = check_file(path, on_record, table_dir.name)
                    report.checked += 1
                    report.recorded += bool(on_record)
                    report.weight_rows += rows
                    if problem is None:
                        continue
                    report.damaged.append(Damage(path.relative_to(root), problem))
                    if repair:
                        with store.removing():
                            report.quarantined.append(quarantine(root, path, problem))
                        if table_dir.name in PACKED_TABLES and folder != table_dir and not path.name.endswith(MATRIX_SUFFIX):
                            touched.add(folder.name)
        if repair and report.damaged:
            Store(root, create=True)  # puts back a quarantined base file (_empty.parquet)
            for name in sorted(touched):
                lost = _incomplete_models(store, name)
                if lost:
                    _unstore(store, name, lost)
                    report.unstored[name] = sorted(lost)
    if repair:
        store.write_index()
    return report


def _incomplete_models(store: Store, zoo: str) -> set[str]:
    """Stored models (a `models` row) lacking their rows in another packed table."""
    stored = store.stored_ids("models", zoo)
    lost: set[str] = set()
    for table in PACKED_TABLES:
        if table != "models":
            lost |= stored - store.stored_ids(table, zoo)
    return lost


def _unstore(store: Store, zoo: str, model_ids: set[str]) -> None:
    """Remove the `models` rows of `model_ids`, so the next generate retrains them: a per-model
    part goes to quarantine; a pack that holds some is moved to quarantine and its other rows
    written back as a new pack (moved first: a crash in between loses rows that a rerun
    retrains, never duplicates them)."""
    store.finish_packs(zoo)
    folder = store.zoo_dir("models", zoo)
    reason = "un-stored: the model's rows in another table were in a damaged file"
    for model_id in sorted(model_ids):
        part = store.part_path("models", zoo, model_id)
        if part.exists():
            with store.removing():
                quarantine(store.root, part, reason)
    for pack in sorted(folder.glob(f"{PACK_PREFIX}*.parquet")):
        data = pq.read_table(pack)
        keep = pc.invert(pc.is_in(data.column("model_id"), value_set=pa.array(sorted(model_ids), pa.string())))
        if pc.all(keep).as_py():
            continue
        rest = data.filter(keep)
        with store.removing():
            quarantine(store.root, pack, reason)
        if len(rest):
            members = "\n".join(sorted(set(rest.column("model_id").to_pylist())))
            key = PACK_PREFIX + hashlib.sha256(members.encode()).hexdigest()[:16]
            store._write_atomic(folder / f"{key}.parquet", rest)


def describe(report: Verification, root: Path) -> list[str]:
    """The lines `zoo verify` prints."""
    lines = [f"verified {report.checked} files in {root}: {report.recorded} against recorded checksums, "
             f"{report.checked - report.recorded} decoded in full; {report.weight_rows} checkpoint weight hashes recomputed"]
    quarantined = iter(report.quarantined)
    for damage in report.damaged:
        target = next(quarantined, None)
        lines.append(f"damaged  {damage.path}: {damage.problem}" + (f" -> moved to {os.path.relpath(target, root)}" if target else ""))
    for zoo, ids in report.unstored.items():
        lines.append(f"un-stored {len(ids)} models of {zoo} that lost rows: `zoo generate {zoo}` retrains them (the same weights)")
    if report.swept:
        lines.append(f"removed {report.swept} temporary files left by killed writers")
    lines.append("intact" if report.intact else f"{len(report.damaged)} damaged files"
                 + (" quarantined; the rest of the zoo is queryable" if report.quarantined else " (not moved: --report-only)"))
    return lines
