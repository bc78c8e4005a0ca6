"""`zoo verify [ZOO]`: check every file of a root, quarantine the damaged ones, un-store the
models they took rows from (so `zoo generate` retrains them), and keep the rest queryable.

What counts as damage, and how files are checked, is `zoo.integrity`'s; this module walks the
root and repairs. First it only looks: a symbolic link anywhere in the root (to a file or a
folder; never followed), a file or folder under tables/ or resume/ whose name no writer makes (an
unsafe model id or zoo name), a data file that fails its check, and a file that a packed table's
`.checksums` manifest lists but that is gone. Then, with `repair`, it moves all of them to
quarantine/ at once, under the exclusive read lock, un-stores the models that lost rows, and
rewrites zoo.duckdb (a planted index, whose views could read any file, is replaced).

It holds the packer's lock throughout, so no pack moves under it; every wait on another process
(a packer, a reader) is bounded by `timeout`, past which it stops with one line, having changed
nothing if that was the wait before the repair.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .integrity import (QUARANTINE, Damage, Verification, check_file, digest, quarantine, recorded, temporary_name,
                        temporary_name_of, write_error)
from .packing import MATRIX_SUFFIX, PACK_PREFIX, PACKED_TABLES, PENDING
from .storage import INDEX_FILE, RESUME_DIR, Store, is_safe_name

DATA_SUFFIXES = (".parquet", PENDING, MATRIX_SUFFIX)
MISSING = "listed in the manifest but missing"
UNSAFE = "an unsafe name (model ids and zoo names are letters, digits, '.', '_' and '-', without '..'): no writer makes it"
EVERY_ZOO = "*"  # (not a valid zoo name)


def verify(store: Store, zoo: str | None = None, repair: bool = True, timeout: float | None = None) -> Verification:
    """Check every data file of `store` (or of one zoo's folders, plus the tables' base files).
    With `repair`, damaged files go to quarantine/ and incomplete models are un-stored. No wait
    on another process lasts more than `timeout` seconds (None: no limit)."""
    if timeout is not None:
        store = Store(store.root)
        store.lock_timeout = timeout  # (read by the store's locks: every wait below is bounded)
    report = Verification(repaired=repair)
    root = store.root
    if repair:
        _probe(root)  # a read-only root: one clear error before any work
    # repairing holds the packer's lock (no pack moves under it); a report only holds off removals
    with store.packing(wait=True) if repair else store.reading():
        found = _not_regular(root, zoo) + _check_tables(root, zoo, report)  # (links first: nothing below follows one)
        report.damaged = [Damage(path.relative_to(root), problem) for path, problem in found]
        if repair:
            _repair(store, zoo, report, found)
    if repair:
        store.write_index()
        report.index_rewritten = True
    return report


def _probe(root: Path) -> None:
    """Create and remove a file in the root (following no link), or raise the one-line error."""
    probe = temporary_name(root / "verify")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))
        probe.unlink()
    except OSError as e:
        raise write_error(root, e) from None


def _not_regular(root: Path, zoo: str | None) -> list[tuple[Path, str]]:
    """Every entry under the root, at any depth, that is neither a regular file nor a folder: a
    symbolic link (to a file or a folder: none is followed), a named pipe (it would hang a reader),
    a socket or a device. Not in a real quarantine/ folder, where earlier ones rest, nor (with
    `zoo`) in other zoos' folders."""
    def other_zoo(path: Path) -> bool:
        parts = path.relative_to(root).parts
        if zoo is None or parts[0] not in ("tables", RESUME_DIR):
            return False
        depth = 2 if parts[0] == "tables" else 1  # (tables/<table>/<zoo>, resume/<zoo>)
        return len(parts) > depth and parts[depth] != zoo and (len(parts) > depth + 1 or path.is_dir())

    found = []
    for folder, dirs, files in os.walk(root):  # (os.walk lists a link to a folder but does not enter it)
        here = Path(folder)
        if here == root and QUARANTINE in dirs and not (root / QUARANTINE).is_symlink():
            dirs.remove(QUARANTINE)
        dirs[:] = sorted(d for d in dirs if not other_zoo(here / d))
        for path in (here / name for name in sorted(dirs + files) if not other_zoo(here / name)):
            mode = _mode(path)
            if mode is None:  # (gone meanwhile: a writer's temporary file)
                continue
            if stat.S_ISLNK(mode):
                found.append((path, f"not a regular file (a link to {os.readlink(path)})"))
            elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                found.append((path, f"not a regular file ({'a named pipe' if stat.S_ISFIFO(mode) else 'a socket or a device'})"))
    return found


def _check_tables(root: Path, zoo: str | None, report: Verification) -> list[tuple[Path, str]]:
    """The problems of tables/ (one zoo's folders, or all) and of resume/'s folder names."""
    found: list[tuple[Path, str]] = []

    def folders(base: Path) -> list[Path]:  # real subfolders; those with unsafe names are reported
        subs = [p for p in sorted(base.iterdir()) if p.is_dir() and not p.is_symlink()] if _real_dir(base) else []
        found.extend((p, UNSAFE) for p in subs if not is_safe_name(p.name))
        return [p for p in subs if is_safe_name(p.name)]

    folders(root / RESUME_DIR)
    for table_dir in folders(root / "tables"):
        zoo_dirs = [table_dir / zoo] if zoo else folders(table_dir)
        for folder in [table_dir] + [f for f in zoo_dirs if _real_dir(f)]:
            records = recorded(folder)
            names = set(os.listdir(folder))
            for path in (folder / name for name in sorted(names)):
                mode = _mode(path)
                if path.name.startswith(".") or mode is None or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                    continue  # (hidden: temporaries, the manifest; links, pipes and devices: found above)
                if stat.S_ISDIR(mode):  # (in a table's folder: a zoo's folder, checked in its turn)
                    if folder != table_dir:
                        found.append((path, "a folder inside a zoo's folder (no writer makes one; queries would read it)"))
                    continue
                if not path.name.endswith(DATA_SUFFIXES):
                    continue
                if folder != table_dir and not is_safe_name(_stem(path.name)):  # (readers take it for a model id)
                    found.append((path, UNSAFE))
                    continue
                on_record = records.get(path.name)
                problem, rows = check_file(path, on_record, table_dir.name)
                report.checked += 1
                report.recorded += bool(on_record)
                report.weight_rows += rows
                if problem is not None:
                    found.append((path, problem))
            if folder != table_dir and table_dir.name in PACKED_TABLES:
                found += [(folder / name, MISSING) for name in _missing(folder, records.keys() - names, names, records)]
    return found


def _missing(folder: Path, gone: set[str], names: set[str], records: dict) -> list[str]:
    """The names a packed table's manifest lists that are truly missing. Those manifests are
    compacted at the end of every writing command, so a listed file is there unless someone
    removed it, or a crash kept the record of a file removed on purpose (a part whose rows a pack
    now holds, a pending pack renamed into place, matrices whose pack was never written) or of a
    file that never came into place: a writer killed between recording a checksum and renaming
    its file (`integrity.commit`, `integrity.rename`) leaves the file, with that very checksum,
    under its temporary or pending name."""
    members: set[str] | None = None
    lost = []
    for name in sorted(n for n in gone if n.endswith(DATA_SUFFIXES) and not n.startswith(".")):
        if _cut_short(folder, name, names, records[name]):
            continue
        if name.endswith(PENDING):
            missing = name[: -len(PENDING)] not in names
        elif name.endswith(MATRIX_SUFFIX):
            missing = name[: -len(MATRIX_SUFFIX)] + ".parquet" in names
        elif name.startswith(PACK_PREFIX):
            missing = True
        else:
            members = _pack_members(folder, names) if members is None else members
            missing = name[: -len(".parquet")] not in members
        if missing:
            lost.append(name)
    return lost


def _cut_short(folder: Path, name: str, names: set[str], on_record: set[tuple[str, int]]) -> bool:
    """Whether `name`'s record is that of a commit or a rename cut short: a file under its
    temporary name (or, for a pack, its pending one) has the recorded size and checksum."""
    candidates = [n for n in names if n.startswith(f".{name}.") and temporary_name_of(n)]
    if name.startswith(PACK_PREFIX) and name + PENDING in names:
        candidates.append(name + PENDING)
    sizes = {size for _, size in on_record}
    for candidate in candidates:
        path = folder / candidate
        with contextlib.suppress(OSError):
            if path.stat().st_size in sizes and digest(path) in on_record:
                return True
    return False


def _pack_members(folder: Path, names: set[str]) -> set[str]:
    """The model ids in the packs of `folder` that can be read (a damaged one is reported apart)."""
    ids: set[str] = set()
    for name in names:
        path = folder / name
        if name.startswith(PACK_PREFIX) and name.endswith((".parquet", PENDING)) and path.is_file() and not path.is_symlink():
            with contextlib.suppress(Exception):
                ids.update(pq.read_table(path, columns=["model_id"]).column(0).to_pylist())
    return ids


def _repair(store: Store, zoo: str | None, report: Verification, found: list[tuple[Path, str]]) -> None:
    """Move what was found to quarantine/ (under one exclusive read lock: the one wait on readers),
    put back the base files, and un-store the models that lost rows of a packed table."""
    root = store.root
    present = [(damage, path) for damage, (path, _) in zip(report.damaged, found) if os.path.lexists(path)]
    if present:  # (a missing file has nothing to move)
        with store.removing():
            for damage, path in present:
                damage.moved = quarantine(root, path, damage.problem)
                report.quarantined.append(damage.moved)
    Store(root, create=True)  # puts back a quarantined base file (_empty.parquet) or table folder
    report.swept = store.sweep(zoo)
    touched = set().union(*(_touched(d.path) for d in report.damaged))
    if EVERY_ZOO in touched:
        touched = {p.name for p in store.table_dir("models").iterdir() if p.is_dir()}
    for name in sorted(filter(is_safe_name, touched)):
        lost = _incomplete_models(store, name)
        if lost:
            _unstore(store, name, lost)
            report.unstored[name] = sorted(lost)


def _touched(relative: Path) -> set[str]:
    """The zoos that may have lost rows of a packed table with the entry at `relative`: a file or
    folder of a zoo's (tables/<table>/<zoo>...), or all of a table (tables/<table>, tables/)."""
    parts = relative.parts
    if parts[0] != "tables" or (len(parts) > 1 and parts[1] not in PACKED_TABLES):
        return set()
    return {parts[2]} if len(parts) > 2 else {EVERY_ZOO}  # (a base file's name is no zoo's: none is stored)


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
    reason = "un-stored: the model's rows in another table were in a damaged or missing file"
    for model_id in sorted(m for m in model_ids if is_safe_name(m)):
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
            store.write_pack("models", zoo, rest)


def _stem(name: str) -> str:
    """A data file's name without its suffix: a model id, `pack-<hash>` or `_empty`."""
    for suffix in (".parquet" + PENDING, ".parquet", MATRIX_SUFFIX):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _mode(path: Path) -> int | None:
    """The entry's own mode (a link's, not its target's), or None once it is gone."""
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return None


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def describe(report: Verification, root: Path) -> list[str]:
    """The lines `zoo verify` prints."""
    lines = [f"verified {report.checked} files in {root}: {report.recorded} against recorded checksums, "
             f"{report.checked - report.recorded} decoded in full; {report.weight_rows} checkpoint weight hashes recomputed"]
    for damage in report.damaged:
        lines.append(f"damaged  {damage.path}: {damage.problem}"
                     + (f" -> moved to {os.path.relpath(damage.moved, root)}" if damage.moved else ""))
    for zoo, ids in report.unstored.items():
        lines.append(f"un-stored {len(ids)} models of {zoo} that lost rows: `zoo generate {zoo}` retrains them (the same weights)")
    if report.swept:
        lines.append(f"removed {report.swept} temporary files left by killed writers")
    if report.index_rewritten:
        lines.append(f"rewrote the index {INDEX_FILE}: one view per table of this root, nothing else")
    lines.append("intact" if report.intact else f"{len(report.damaged)} damaged files"
                 + (f", {len(report.quarantined)} moved to quarantine/; the rest of the zoo is queryable" if report.repaired
                    else " (not moved: --report-only)"))
    return lines
