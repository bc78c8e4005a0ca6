"""The zoo root on disk: Parquet part files written atomically, and a DuckDB index of views.

Layout of a root:

    zoo.duckdb                              views over the tables below (any DuckDB client), and
                                            zoo_meta.zoo_index: the root it was written for
    tables/<table>/_empty.parquet           zero rows, the table's base schema (so empty views work)
    tables/<table>/<zoo>/<model_id>.parquet one part per model and table, as jobs write them
    tables/<table>/<zoo>/pack-<hash>.parquet many models' rows in one file (`Store.pack`)
    tables/checkpoints/<zoo>/pack-<hash>.safetensors   the same weights as N x P matrices (zoo.matrices)
    resume/<zoo>/<model_id>.safetensors     a model in training's saved state, until it is stored

One part per model and table, named by the model's id, is what makes generation idempotent: a
job that runs twice, or two runs at once, write the same file name, and the atomic rename means
the last complete write wins and no row is ever duplicated. A model counts as stored once its
`models` part exists; that part is written last, after its curves, tensors and checkpoints.

Once a run has stored its models, their per-model parts are merged into packs (zoo.packing).

Writes go to a temporary name in the same folder, are fsynced, and are renamed into place, so no
reader ever sees half a file. Nothing here unpickles anything.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import StorageError, ZooError, one_line
from .integrity import compact_manifest, sweep_temporary, temporary_name, write_atomically, write_error
from . import packing
from .matrices import read_rows
from .packing import MATRIX_SUFFIX, PACK_PREFIX, PACKED_TABLES, PENDING, model_ids_in
from .locks import exclusive_lock, shared_lock
from .rootfs import RootFileSystem, entries
from .schemas import SCHEMA_VERSION, SCHEMAS, empty_rows
from .weights import sha256

if TYPE_CHECKING:  # (imported where used: a training job needs neither, and they cost it ~0.15 s)
    import duckdb
    import pyarrow.compute as pc

INDEX_FILE = "zoo.duckdb"
# zoo.duckdb's record of the root it was written for, one row: a table in a schema of its own, so
# `SHOW TABLES` and `duckdb_views()` list only the tables' views
INDEX_SCHEMA = "zoo_meta"
INDEX_RECORD = "zoo_index"
# how the record is read: nothing fetched or loaded, whatever a planted file asks for
_PROBE_CONFIG = {"enable_external_access": "false", "autoinstall_known_extensions": "false",
                 "autoload_known_extensions": "false"}
RESUME_DIR = "resume"

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def part_key(name: str) -> str | None:
    """The key (model id) of a per-model part's file name, or None if the name is not one (a
    pack, a temporary file, or a name no writer makes: `zoo verify` quarantines those)."""
    if not name.endswith(".parquet") or name.startswith(PACK_PREFIX):
        return None
    key = name[: -len(".parquet")]
    return key if is_safe_name(key) else None


def is_safe_name(name: str) -> bool:
    """Whether `name` may be a path component: no separators, no '..', no hidden files."""
    return isinstance(name, str) and bool(_SAFE_NAME.match(name)) and ".." not in name


def safe_name(kind: str, name: str) -> str:
    """A zoo name or model id used as a path component (`is_safe_name`), or one line saying not."""
    if not is_safe_name(name):
        raise ZooError(f"invalid {kind} {name!r}: use letters, digits, '.', '_' and '-'")
    return name


def default_root() -> Path:
    return Path(os.environ.get("ZOO_ROOT", "zoo-data"))


def empty_view_sql(con: duckdb.DuckDBPyConnection, table: str) -> str:
    """A view with the table's base schema and no rows, for a table that has no file yet."""
    empty = con.from_arrow(empty_rows(table))
    columns = ", ".join(f'CAST(NULL AS {kind}) AS "{name}"' for name, kind in zip(empty.columns, empty.types))
    return f"CREATE OR REPLACE VIEW {table} AS SELECT {columns} LIMIT 0"


class Store:
    """Reads and writes the part files of one zoo root."""

    def __init__(self, root: str | os.PathLike | None = None, create: bool = False):
        self.root = Path(root if root is not None else default_root()).resolve()
        self.lock_timeout: float | None = None  # seconds a lock may be waited for (None: for ever)
        if create:
            self._create()
        elif not (self.root / "tables").is_dir():
            raise ZooError(f"no zoo at {self.root} (run `zoo generate ZOO --root {self.root}` first)")

    def _create(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.root / ".read.lock", "a"):  # a writable root, found before any work is done
                pass
            for table in SCHEMAS:
                folder = self.root / "tables" / table
                folder.mkdir(parents=True, exist_ok=True)
                if not (folder / "_empty.parquet").exists():
                    self.write_file(folder / "_empty.parquet", empty_rows(table))
        except OSError as e:
            raise write_error(self.root, e) from None

    # --- paths ---------------------------------------------------------------------------

    def table_dir(self, table: str) -> Path:
        return self.root / "tables" / table

    def part_path(self, table: str, zoo: str, key: str) -> Path:
        return self.table_dir(table) / safe_name("zoo name", zoo) / f"{safe_name('model id', key)}.parquet"

    def zoo_dir(self, table: str, zoo: str) -> Path:
        return self.table_dir(table) / safe_name("zoo name", zoo)

    def resume_path(self, zoo: str, model_id: str) -> Path:
        """Where the training state of a model in training is saved (generators/resume.py)."""
        return self.root / RESUME_DIR / safe_name("zoo name", zoo) / f"{safe_name('model id', model_id)}.safetensors"

    def tables(self) -> list[str]:
        """Tables present in this root: folders holding at least one Parquet file (a writer killed
        between creating a table's folder and committing its first file leaves an empty one)."""
        return sorted(folder.name for folder in self.folders(self.root / "tables") if self._holds_parquet(folder))

    def _holds_parquet(self, folder: Path) -> bool:
        return "_empty.parquet" in self.names(folder) or any(self._holds_parquet(f) for f in self.folders(folder))

    def names(self, folder: Path) -> set[str]:
        """The names of the regular files in `folder` (none if it is absent). Every reader lists a
        folder of the root through this or `folders`: a symbolic link (to a file or a folder, on
        the way to `folder` or in it), a named pipe or a device is refused in one line, since a
        root may come from someone else (zoo.rootfs)."""
        return {e.name for e in entries(self.root, folder) if e.is_file(follow_symlinks=False)}

    def folders(self, folder: Path) -> list[Path]:
        """The subfolders of `folder`, checked like `names`."""
        return sorted(Path(e.path) for e in entries(self.root, folder) if e.is_dir(follow_symlinks=False))

    # --- writing -------------------------------------------------------------------------

    def write_part(self, table: str, zoo: str, key: str, data: pa.Table) -> Path:
        path = self.part_path(table, zoo, key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(path.parent, e) from None
        self.write_file(path, data)
        return path

    def remove_part(self, table: str, zoo: str, key: str) -> None:
        path = self.part_path(table, zoo, key)
        if path.exists():
            with self.removing():
                path.unlink(missing_ok=True)

    def remove_parts_like(self, table: str, zoo: str, prefix: str, keep: str) -> None:
        """Remove the parts whose key starts with `prefix`, except `keep` (a result recomputed
        with other settings replaces the old one once the new part is in place)."""
        folder = self.table_dir(table) / safe_name("zoo name", zoo)
        old = [p for p in (folder.glob(f"{safe_name('key', prefix)}*.parquet") if folder.is_dir() else ()) if p.name != f"{keep}.parquet"]
        if old:
            with self.removing():
                for path in old:
                    path.unlink(missing_ok=True)

    @staticmethod
    def write_file(path: Path, data: pa.Table, **options) -> None:
        """Write `data` to `path` atomically (temporary name, fsync, rename), stamped with the
        schema version; zstd and page checksums unless `options` say otherwise."""
        data = data.replace_schema_metadata({**(data.schema.metadata or {}), b"zoo_schema_version": SCHEMA_VERSION.encode()})
        write_atomically(path, lambda tmp: pq.write_table(
            data, tmp, **{"compression": "zstd", "write_page_checksum": True, **options}))

    # --- reading -------------------------------------------------------------------------

    def stored_ids(self, table: str, zoo: str) -> set[str]:
        """Ids with a part in `table` for `zoo` (for `models`: the stored models), including the
        models in packs, finished or pending."""
        with self.reading():
            return self._stored_ids(self.zoo_dir(table, zoo))

    def _stored_ids(self, folder: Path) -> set[str]:
        ids = set()
        for name in self.names(folder):
            if name.startswith(PACK_PREFIX) and name.endswith((".parquet", PENDING)):
                ids.update(model_ids_in(folder / name))
            elif key := part_key(name):
                ids.add(key)
        return ids

    def read_part(self, table: str, zoo: str, key: str) -> pa.Table | None:
        """The rows of one part (None if it is absent), read under the read lock."""
        folder = self.zoo_dir(table, zoo)
        with self.reading(), _damage_named(folder):
            name = self.part_path(table, zoo, key).name
            return pq.read_table(folder / name) if name in self.names(folder) else None

    def read_zoo(self, table: str, zoo: str) -> pa.Table | None:
        """Every row of `table` for `zoo` (its parts and packs; None if it has none), read under
        the read lock."""
        folder = self.zoo_dir(table, zoo)
        with self.reading(), _damage_named(folder):
            files = sorted(str(folder / n) for n in self.names(folder) if n.endswith(".parquet") and not n.startswith("."))
            return pq.ParquetDataset(files).read() if files else None

    def read_model_rows(self, table: str, zoo: str, model_ids: list[str], columns: list[str] | None = None,
                        filter: pc.Expression | None = None) -> pa.Table:
        """The rows of `table` for the models `model_ids` of `zoo`, from their per-model parts
        and from packs (only the needed row groups of a pack are read)."""
        with self.reading(), _damage_named(self.zoo_dir(table, zoo)):
            return self._read_model_rows(table, zoo, model_ids, columns, filter)

    def _read_model_rows(self, table, zoo, model_ids, columns, filter) -> pa.Table:
        import pyarrow.compute as pc
        import pyarrow.dataset as ds  # here: it imports pandas, half a second of every job's start-up

        folder = self.zoo_dir(table, zoo)
        for model_id in model_ids:
            safe_name("model id", model_id)
        # one listing of the folder, not a stat per model (10,000 stats cost 0.2 s here)
        present = self.names(folder)
        singles = [m for m in model_ids if f"{m}.parquet" in present]
        packed = sorted(set(model_ids) - set(singles))
        pieces = []
        if singles:
            pieces.append(ds.dataset([str(folder / f"{m}.parquet") for m in singles], format="parquet")
                          .to_table(columns=columns, filter=filter))
        packs = sorted(str(folder / n) for n in present if n.startswith(PACK_PREFIX) and n.endswith(".parquet")) if packed else []
        if packs:
            read = None if columns is None else list(dict.fromkeys(["model_id", *columns]))
            if len(packed) <= 64:  # a few models: the filter also skips row groups by their statistics
                wanted = pc.field("model_id").isin(packed)
                found = ds.dataset(packs, format="parquet").to_table(columns=read, filter=wanted if filter is None else wanted & filter)
            else:  # many: one hash lookup per row after the scan (a long isin list in the scan is slow)
                found = ds.dataset(packs, format="parquet").to_table(columns=read, filter=filter)
                wanted = pc.is_in(found.column("model_id"), value_set=pa.array(packed))
                if not pc.all(wanted).as_py():  # (filtering copies every row: skip it when all are wanted)
                    found = found.filter(wanted)
            pieces.append(found.select(columns) if columns is not None else found)
        if not pieces:
            return empty_rows(table).select(columns) if columns else empty_rows(table)
        return pa.concat_tables(pieces, promote_options="permissive")

    def read_weights(self, zoo: str, model_ids: list[str], epoch: int) -> tuple[np.ndarray | None, list[str]]:
        """The flat weights of `model_ids` at `epoch` as one (N, n_values) float32 matrix in the
        given order, and the ids that have no such checkpoint (their rows are zero). Packed
        models come from the packs' weight matrices (`zoo.matrices`), the rest from Parquet."""
        with self.reading(), _damage_named(self.zoo_dir("checkpoints", zoo)):
            return self._read_weights(zoo, model_ids, epoch)

    def _read_weights(self, zoo: str, model_ids: list[str], epoch: int) -> tuple[np.ndarray | None, list[str]]:
        import pyarrow.compute as pc

        folder = self.zoo_dir("checkpoints", zoo)
        wanted = set(model_ids)
        blocks: list[tuple[list[str], np.ndarray]] = []
        names = self.names(folder)
        for name in sorted(names):
            if name.startswith(PACK_PREFIX) and name.endswith(MATRIX_SUFFIX) and wanted:
                pack = name[: -len(MATRIX_SUFFIX)] + ".parquet"
                if pack in names:  # only beside a pack in place
                    found = read_rows(folder / name, wanted, epoch)
                    if found:
                        _check_hashes(folder / name, folder / pack, found, epoch)
                    for ids, block in found:
                        blocks.append((ids, block))
                        wanted.difference_update(ids)
        if wanted:
            rest = [m for m in model_ids if m in wanted]
            table = self._read_model_rows("checkpoints", zoo, rest, ["model_id", "weights"], pc.field("epoch") == epoch)
            if len(table):
                weights = table.column("weights").combine_chunks()
                ids = table.column("model_id").to_pylist()
                lengths = set(weights.value_lengths().to_numpy().tolist())
                if len(lengths) > 1:
                    raise ZooError(f"checkpoints of zoo {zoo!r} at epoch {epoch} have different lengths")
                blocks.append((ids, weights.values.to_numpy(zero_copy_only=False).reshape(len(ids), -1)))
                wanted.difference_update(ids)
        if not blocks:
            return None, list(model_ids)
        if len({b.shape[1] for _, b in blocks}) > 1:
            raise ZooError(f"checkpoints of zoo {zoo!r} at epoch {epoch} have different lengths")
        if len(blocks) == 1 and blocks[0][0] == list(model_ids):
            return np.array(blocks[0][1], copy=True), []
        position = {m: i for i, m in enumerate(model_ids)}
        out = np.zeros((len(model_ids), blocks[0][1].shape[1]), dtype=np.float32)
        for ids, block in blocks:
            out[np.fromiter((position[m] for m in ids), dtype=np.int64, count=len(ids))] = block
        return out, [m for m in model_ids if m in wanted]

    # Each lock below waits for ever, or at most `lock_timeout` seconds (`zoo verify --timeout`
    # sets it), then raises a one-line ZooError.

    def reading(self):
        """Held by every read (SQL queries, stored ids, rows, weights): files are removed or
        renamed only between reads, so a reader never finds a listed file gone, a model in two
        files at once, or in none (the lock is `.read.lock`; a query holds it for its duration)."""
        return shared_lock(self.root / ".read.lock", timeout=self.lock_timeout)

    def removing(self):
        """Held, exclusively and briefly, while part files are removed or packs renamed."""
        return shared_lock(self.root / ".read.lock", exclusive=True, timeout=self.lock_timeout)

    def packing(self, wait: bool = False):
        """The packer's lock: whoever holds it may rewrite and remove packs."""
        return exclusive_lock(self.root / ".pack.lock", wait, self.lock_timeout)

    # --- packing (the work itself is zoo.packing's) ---------------------------------------

    def pack(self, zoo: str) -> int:
        """Merge the per-model parts of `zoo`'s stored models into packs (zoo.packing.pack)."""
        return packing.pack(self, zoo)

    def write_pack(self, table: str, zoo: str, data: pa.Table, pending: bool = False) -> Path:
        """Write several models' rows as one pack of `table` (zoo.packing.write_pack)."""
        return packing.write_pack(self, table, zoo, data, pending)

    def finish_packs(self, zoo: str) -> None:
        """Put `zoo`'s pending packs in place (zoo.packing.finish_packs)."""
        packing.finish_packs(self, zoo)

    def pending_zoos(self) -> list[str]:
        """The zoos with a pack a killed packer left pending (zoo.packing.pending_zoos)."""
        return packing.pending_zoos(self)

    def recover(self) -> None:
        """Finish every pending pack (zoo.packing.recover): the only write a reader may ask for."""
        packing.recover(self)

    def has_part(self, table: str, zoo: str, key: str) -> bool:
        """Whether the part `key` of `table` for `zoo` is stored."""
        return self.part_path(table, zoo, key).is_file()

    def sweep(self, zoo: str | None = None) -> int:
        """Remove temporary files of dead writers and the saved training states of stored
        models, and compact the checksum manifests of the packed tables (of one zoo, or all);
        returns how many temporary files went."""
        removed = sweep_temporary(self.root)
        for folder in _zoo_folders(self.root / RESUME_DIR, zoo):
            removed += sweep_temporary(folder)
            stored = self.stored_ids("models", folder.name)
            for path in folder.glob("*.safetensors"):
                if path.stem in stored:  # (its job was killed between storing the model and removing this)
                    path.unlink(missing_ok=True)
        for table_dir in (self.root / "tables").iterdir():
            removed += sweep_temporary(table_dir)
            for folder in _zoo_folders(table_dir, zoo):
                if table_dir.name in PACKED_TABLES:  # first: a record of a commit cut short goes
                    compact_manifest(folder)  # before the temporary file that explains it
                removed += sweep_temporary(folder)
        return removed

    def filesystem(self) -> RootFileSystem:
        """The root as the read-only, confined `zoo://` file system the SQL connection reads."""
        return RootFileSystem(self.root)

    def view_sql(self, table: str, base: str) -> str:
        """The view of `table` over its files under `base`: the root as DuckDB reaches it (an
        absolute path for zoo.duckdb, `zoo://` for zoo.sql's confined file system)."""
        path = f"{base}tables/{table}/**/*.parquet".replace("'", "''")
        return f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM read_parquet('{path}', union_by_name = true)"

    def create_views(self, con: duckdb.DuckDBPyConnection, base: str | None = None) -> None:
        """One view per table; `base` defaults to the root's absolute path, its glob characters
        escaped (a root named `r[o]ot` must not read the files of a sibling `root`)."""
        import duckdb

        if base is None:
            base = re.sub(r"([*?\[\]])", r"[\1]", f"{self.root}/")
        present = self.tables()
        for table in SCHEMAS.keys() - set(present):  # (a root whose creation was killed half-way)
            con.execute(empty_view_sql(con, table))
        for table in present:
            try:
                con.execute(self.view_sql(table, base))
            except duckdb.Error as e:  # (a view reads every file's schema: a damaged file stops it)
                raise ZooError(f"table {table}: {one_line(e)} (a damaged file, or a link out of the root: run "
                               f"`zoo verify --root {self.root}` to move it to quarantine/)") from None

    def write_index(self) -> Path:
        """(Re)write zoo.duckdb: one view per table, re-globbing the part files at every query,
        and the record `zoo_meta.zoo_index(root, written_by)` of the root it was written for (its
        views hold that root's absolute path: `index_points_elsewhere`, `repair_index`).
        Writes that file only (`sweep` removes what killed writers left behind).

        Written under a temporary name and renamed, so concurrent writers never collide on
        DuckDB's file lock and readers never see a half-written index."""
        import duckdb
        from . import __version__

        path = self.root / INDEX_FILE
        tmp = temporary_name(path)
        try:
            con = duckdb.connect(str(tmp))
            try:
                with self.reading():  # (a view reads every file's schema: no packer may remove one meanwhile)
                    self.create_views(con)
                con.execute(f"CREATE SCHEMA {INDEX_SCHEMA}")
                con.execute(f"CREATE TABLE {INDEX_SCHEMA}.{INDEX_RECORD} (root VARCHAR, written_by VARCHAR)")
                con.execute(f"INSERT INTO {INDEX_SCHEMA}.{INDEX_RECORD} VALUES (?, ?)",
                            [str(self.root), f"phase-zoo {__version__}"])
            finally:
                con.close()
            os.replace(tmp, path)
        except (OSError, duckdb.Error) as e:
            raise write_error(path, e) from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
                tmp.with_name(tmp.name + ".wal").unlink(missing_ok=True)
        return path

    def indexed_root(self) -> str | None:
        """The root zoo.duckdb records it was written for; None when it records none: no such
        file, a damaged one, one written before the record existed, or one planted by hand."""
        return self._index_record()[1]

    def index_points_elsewhere(self) -> bool:
        """Whether zoo.duckdb exists and was not written for this root: its views hold the absolute
        path of the root it was written in, so after `cp -r` or `mv` of a root a plain DuckDB client
        finds no files (or, worse, the original's). A damaged index, or one without the record
        `write_index` keeps, counts as written elsewhere (`repair_index` rewrites it); a missing
        one does not (nothing to repair: `write_index` makes one), nor does one in use (another
        process holding it open for writing, as a DuckDB shell does, or this process holding it
        open with another configuration: left alone). Never raises."""
        state, root = self._index_record()
        return state == "read" and root != str(self.root)

    def _index_record(self) -> tuple[str, str | None]:
        """("missing", None), ("in use", None), or ("read", the recorded root or None), read
        through a read-only connection that neither fetches nor loads anything; raises nothing."""
        import duckdb

        path = self.root / INDEX_FILE
        try:
            if not path.is_file():
                return "missing", None
            con = duckdb.connect(str(path), read_only=True, config=_PROBE_CONFIG)
        except (duckdb.Error, OSError, RuntimeError, ValueError) as e:
            # open for writing elsewhere (a DuckDB shell's lock), or in this process with another
            # configuration: in use, so left alone; anything else is damaged or not DuckDB's
            in_use = "Conflicting lock" in str(e) or "different configuration" in str(e)
            return ("in use" if in_use else "read"), None
        try:
            # a base table only: a planted file's view of that name would run a query of its choosing
            if not con.execute("SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
                               "AND schema_name = ? AND table_name = ?", [INDEX_SCHEMA, INDEX_RECORD]).fetchone()[0]:
                return "read", None
            rows = con.execute(f"SELECT root FROM {INDEX_SCHEMA}.{INDEX_RECORD} LIMIT 2").fetchall()
            return "read", (rows[0][0] if len(rows) == 1 and isinstance(rows[0][0], str) else None)
        except (duckdb.Error, OSError, RuntimeError, ValueError, TypeError):
            return "read", None
        finally:
            with contextlib.suppress(duckdb.Error):
                con.close()

    def repair_index(self) -> bool:
        """Rewrite zoo.duckdb (`write_index`, atomically) when it points elsewhere
        (`index_points_elsewhere`: a copied or moved root, a damaged index) and the root is
        writable; returns whether it did. A read-only root is left as it is, and False returned
        (`write_index`, from a writable copy or once the root is writable, repairs it). Meant for
        every open of a root: an index written for this root costs one read-only look. A damaged
        part file still raises `create_views`' one-line ZooError, as any query of the root would."""
        if not self.index_points_elsewhere():
            return False
        if not os.access(self.root, os.W_OK | os.X_OK):
            return False
        try:
            self.write_index()
        except (OSError, StorageError):
            return False
        return True


def _zoo_folders(base: Path, zoo: str | None) -> list[Path]:
    """The folder of `zoo` under `base`, or (None) every zoo's: those that exist."""
    folders = [base / zoo] if zoo else (list(base.iterdir()) if base.is_dir() else [])
    return [f for f in folders if f.is_dir()]


def _check_hashes(matrices: Path, pack: Path, blocks: list[tuple[list[str], np.ndarray]], epoch: int) -> None:
    """Check rows read from a pack's weight matrices against the sha256 its Parquet pack records
    (the record SQL and `zoo verify` see): matrices edited to disagree with it are refused. Costs
    one sha256 pass over the rows read (perf/storage_read.py gives the figure)."""
    recorded = pq.read_table(pack, columns=["model_id", "sha256"], filters=[("epoch", "==", int(epoch))])
    expected = dict(zip(recorded.column("model_id").to_pylist(), recorded.column("sha256").to_pylist()))
    for ids, block in blocks:
        for model_id, row in zip(ids, block):
            if sha256(row) != expected.get(model_id):
                raise ZooError(f"damaged file {matrices}: the weights of model {model_id!r} at epoch {epoch} do not match "
                               f"the sha256 recorded in {pack.name} (run `zoo verify --root {pack.parents[3]}`)")


@contextlib.contextmanager
def _damage_named(folder: Path):
    """Turns what a malformed file makes a reader raise (a file's own bad sizes, offsets or
    fields) into one line naming the folder and the way to recover."""
    try:
        yield
    except (OSError, pa.ArrowException, MemoryError, OverflowError, KeyError, ValueError, TypeError, struct.error) as e:
        if isinstance(e, ZooError):
            raise
        raise ZooError(f"damaged file in {folder} ({type(e).__name__}: {one_line(e)}): run `zoo verify` to quarantine it") from None


def pyarrow_without_pandas() -> None:
    """Set pyarrow up in this process without importing pandas: for a training job's own process
    and the `zoo generate` command's, which hand pyarrow lists and NumPy arrays only.

    pyarrow imports pandas where these never need it: when `pyarrow.dataset` is first imported
    (by the first `pq.read_table`: a job's first look at what is stored), or else at its first
    conversion of Python objects (`pa.array`, `Table.from_pylist`: every row `zoo.rows` builds),
    only to ask whether they are pandas objects. That import cost 0.5-0.6 s of CPU per training
    job here, taken from training on the same core, and as much in the command, while its jobs
    start on both cores. This takes both first steps with pandas made unimportable, then lets it
    be imported again: pyarrow asks once per process, and `pyarrow.dataset` works without pandas.
    The rows are the same (a test compares them). Afterwards pyarrow takes pandas objects for plain
    sequences in this process (`Table.from_pandas` of a null timestamp fails), so a process that
    hands pyarrow pandas objects must not call this. Nothing happens if pandas is imported already.
    """
    import sys

    if "pandas" in sys.modules:
        return

    class _NoPandas:
        def find_spec(self, name, path=None, target=None):
            if name == "pandas":
                raise ModuleNotFoundError("pandas is not imported by a job (zoo.storage.pyarrow_without_pandas)")
            return None

    finder = _NoPandas()
    sys.meta_path.insert(0, finder)
    try:
        import pyarrow.dataset  # noqa: F401

        pa.array([0])  # pyarrow's one look for pandas, now
    finally:
        sys.meta_path.remove(finder)
