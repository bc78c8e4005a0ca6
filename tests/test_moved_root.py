"""A copied or moved root (issue #16): zoo.duckdb's views hold the absolute path of the root they
were written in, so a plain DuckDB client finds no files in a moved root until
`Store.repair_index` rewrites the index, which it does only when the index points elsewhere and
the root is writable."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import duckdb
import pytest

from zoo.storage import INDEX_FILE, Store

SHA_ROWS = "select model_id, epoch, sha256 from checkpoints order by model_id, epoch"


def plain(root: Path, sql: str) -> list[tuple]:
    """`sql` on the root's zoo.duckdb through plain DuckDB: no project code."""
    con = duckdb.connect(str(root / INDEX_FILE), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def stamp(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


@pytest.fixture
def original(smoke_root, tmp_path) -> Path:
    """A copy of the smoke root with an index written for where it is."""
    root = tmp_path / "original"
    shutil.copytree(smoke_root, root)
    Store(root).write_index()
    return root


def move(root: Path, to: Path) -> Path:
    """`cp -r` then removal of the original: a `mv` across file systems."""
    shutil.copytree(root, to)
    shutil.rmtree(root)
    return to


def test_a_moved_root_is_repaired_and_queryable_with_plain_duckdb(original, tmp_path):
    assert plain(original, "select count(*) from models") == [(8,)]
    shas = plain(original, SHA_ROWS)
    assert len(shas) == 8 * 3
    new = move(original, tmp_path / "elsewhere" / "moved")

    with pytest.raises(duckdb.Error, match="No files found"):
        plain(new, "select count(*) from models")
    store = Store(new)
    assert store.index_points_elsewhere() and store.indexed_root() == str(original.resolve())

    assert store.repair_index() is True
    assert plain(new, "select count(*) from models") == [(8,)]
    assert plain(new, SHA_ROWS) == shas
    assert not store.index_points_elsewhere() and store.indexed_root() == str(new.resolve())
    assert store.repair_index() is False  # (once repaired, nothing more to do)


def test_a_copy_beside_its_original_is_repaired_to_read_its_own_files(original, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    for path in (copy / "tables" / "models").rglob("*.parquet"):
        if path.name != "_empty.parquet":
            path.unlink()  # the copy differs: its index must not read the original's files
    assert plain(copy, "select count(*) from models") == [(8,)]  # (the original's rows, before repair)
    assert Store(copy).repair_index() is True
    assert plain(copy, "select count(*) from models") == [(0,)]
    assert plain(original, "select count(*) from models") == [(8,)]


def test_an_unmoved_root_is_left_alone(original):
    store = Store(original)
    before = stamp(original / INDEX_FILE)
    assert store.index_points_elsewhere() is False
    assert store.repair_index() is False
    assert stamp(original / INDEX_FILE) == before


def test_a_read_only_moved_root_is_left_alone(original, tmp_path, monkeypatch):
    new = move(original, tmp_path / "moved")
    before = stamp(new / INDEX_FILE)
    listing = sorted(p.relative_to(new) for p in new.rglob("*"))
    modes = {}
    for path in [new, *new.rglob("*")]:
        modes[path] = path.stat().st_mode
        path.chmod(stat.S_IMODE(modes[path]) & ~0o222)
    try:
        if os.access(new, os.W_OK):  # (running as root: chmod does not stop writes)
            monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
        store = Store(new)
        assert store.index_points_elsewhere() is True
        assert store.repair_index() is False
        assert stamp(new / INDEX_FILE) == before
        assert sorted(p.relative_to(new) for p in new.rglob("*")) == listing
    finally:
        monkeypatch.undo()
        for path, mode in modes.items():
            path.chmod(stat.S_IMODE(mode))
    with pytest.raises(duckdb.Error, match="No files found"):
        plain(new, "select count(*) from models")


def test_a_garbage_index_counts_as_elsewhere_and_is_repaired(original):
    (original / INDEX_FILE).write_bytes(os.urandom(64 * 1024))
    store = Store(original)
    assert store.indexed_root() is None
    assert store.index_points_elsewhere() is True  # (no traceback: stale)
    assert store.repair_index() is True
    assert plain(original, "select count(*) from models") == [(8,)]


def test_an_index_without_the_record_counts_as_elsewhere(original):
    index = original / INDEX_FILE
    index.unlink()
    con = duckdb.connect(str(index))  # an index as written before the record existed: views only
    Store(original).create_views(con)
    con.close()
    store = Store(original)
    assert store.index_points_elsewhere() is True and store.repair_index() is True
    assert store.indexed_root() == str(original.resolve())


def test_a_missing_index_is_not_elsewhere(original):
    (original / INDEX_FILE).unlink()
    store = Store(original)
    assert store.index_points_elsewhere() is False and store.repair_index() is False
    assert not (original / INDEX_FILE).exists()


def test_the_record_stays_out_of_user_queries(original):
    assert plain(original, "show tables") == plain(original, "select view_name from duckdb_views() where not internal "
                                                             "and schema_name = 'main' order by view_name")
    views = {v for (v,) in plain(original, "select view_name from duckdb_views() where not internal")}
    assert "zoo_index" not in views and {"models", "curves", "checkpoints"} <= views
    assert plain(original, "select root, written_by like 'phase-zoo %' from zoo_meta.zoo_index") == [
        (str(original.resolve()), True)]
