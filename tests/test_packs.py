"""Packs: per-model parts merged into a few files, crash-safe, readable alongside per-model parts."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import zoo
from generators import jobs
from generators.launcher import missing_models
from generators.stacked import train_stack
from zoo import packing
from zoo.catalog import load_catalog
from zoo.datasets import load_dataset
from zoo.errors import ZooWarning
from zoo.rows import write_model
from zoo.storage import Store
from zoo.verify import verify

from .conftest import REPO
from .test_generate import fingerprint


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory):
    """The smoke zoo stored as one part per model and table, nothing packed (as a job stores
    single models; a job stores a stack as packs), trained as `zoo generate` trains it."""
    root = tmp_path_factory.mktemp("unpacked")
    specs = load_catalog(REPO / "catalog.yaml")["smoke"].models()
    store = Store(root, create=True)
    data = load_dataset(specs[0].dataset)
    for item in jobs.work_items(specs, {s.model_id for s in specs}):
        for trained in train_stack(list(item.models), data):
            write_model(store, trained, zoo.code_version())
    store.write_index()
    return root


def parts(root, table="checkpoints"):
    return sorted(p.name for p in Store(root).zoo_dir(table, "smoke").iterdir() if p.suffix != ".safetensors" and not p.name.startswith("."))


def test_generate_packs_the_zoo_and_nothing_changes_but_the_files(smoke_root, unpacked):
    assert all(name.startswith("pack-") for name in parts(smoke_root))
    assert len(parts(unpacked)) == 8
    assert fingerprint(smoke_root) == fingerprint(unpacked)
    a, b = zoo.open(smoke_root), zoo.open(unpacked)
    ids = list(b.models()["model_id"])
    widths = b.sql("select model_id, width from models").set_index("model_id")["width"]
    same = [m for m in ids if widths[m] == 8]
    assert np.array_equal(a.weights(same).numpy(), b.weights(same).numpy())
    for table in ("curves", "tensors", "models"):
        query = f"select * exclude (created_at, train_seconds) from {table} order by all" if table == "models" else f"select * from {table} order by all"
        assert a.sql(query).equals(b.sql(query))


def test_packed_and_per_model_parts_read_together(unpacked, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(unpacked, root)
    store = Store(root)
    ids = sorted(zoo.open(root).sql("select model_id from models where width = 32")["model_id"])
    before = zoo.open(root).weights(ids, epoch=1)
    for table in ("checkpoints", "curves", "tensors", "models"):  # half the models packed, by hand
        for model_id in ids[:2]:
            (store.zoo_dir(table, "smoke") / f"{model_id}.parquet").rename(tmp_path / f"{table}-{model_id}")
    assert store.pack("smoke") == 6
    for table in ("checkpoints", "curves", "tensors", "models"):
        for model_id in ids[:2]:
            (tmp_path / f"{table}-{model_id}").rename(store.zoo_dir(table, "smoke") / f"{model_id}.parquet")
    store.write_index()
    z = zoo.open(root)
    assert np.array_equal(z.weights(ids, epoch=1).numpy(), before.numpy())
    assert z.load_model(ids[0]) is not None and z.load_model(ids[-1]) is not None
    assert store.stored_ids("models", "smoke") == set(z.models()["model_id"]) and len(z.models()) == 8
    assert store.pack("smoke") == 2 and len(parts(root)) == 2  # a second pack for the rest


def test_a_crash_while_packing_loses_nothing_and_the_next_run_finishes_it(unpacked, tmp_path, monkeypatch):
    root = tmp_path / "r"
    shutil.copytree(unpacked, root)
    expected = fingerprint(root)
    store = Store(root)
    monkeypatch.setattr(Store, "finish_packs", lambda self, zoo: None)  # die after writing the pending packs
    store.pack("smoke")
    monkeypatch.undo()
    assert any(name.endswith(".pending") for name in parts(root))
    # and halfway through putting them in place: some tables' per-model parts already removed
    for name in parts(root, "curves"):
        if not name.startswith("pack-"):
            (store.zoo_dir("curves", "smoke") / name).unlink()
    zoo_config = load_catalog(REPO / "catalog.yaml")["smoke"]
    assert store.stored_ids("models", "smoke") == {s.model_id for s in zoo_config.models()}
    assert missing_models(zoo_config, store) == []  # finishes the packs; nothing to retrain
    assert not any(name.endswith(".pending") for name in parts(root))
    store.write_index()
    assert fingerprint(root) == expected
    assert len(zoo.open(root).sql("select * from curves")) == 8 * 4


def test_a_job_stores_each_stack_as_packs_and_small_packs_merge_safely(smoke_root, tmp_path, monkeypatch):
    root = tmp_path / "r"
    specs = load_catalog(REPO / "catalog.yaml")["smoke"].models()
    report = jobs.train_and_store(str(root), jobs.work_items(specs, {s.model_id for s in specs}))
    assert len(report.trained) == 8
    store = Store(root)
    for table in packing.PACKED_TABLES:  # 4 stacks of 2: one pack each, no part
        assert len(parts(root, table)) == 4 and all(n.startswith("pack-") for n in parts(root, table))
    store.write_index()
    assert fingerprint(root) == fingerprint(smoke_root)
    store.pack("smoke")
    assert len(parts(root)) == 4  # fewer small packs than MERGE_FROM: left as they are
    monkeypatch.setattr(packing, "MERGE_FROM", 2)
    real, renamed = packing.rename, []

    def rename(src, dst):  # die after the merged checkpoints pack is in place, before the rest
        if renamed:
            raise RuntimeError("killed")
        renamed.append(dst)
        real(src, dst)

    monkeypatch.setattr(packing, "rename", rename)
    with pytest.raises(RuntimeError):
        store.pack("smoke")
    monkeypatch.setattr(packing, "rename", real)
    assert parts(root) == [renamed[0].name]
    assert len(parts(root, "curves")) == 1 and parts(root, "curves")[0].endswith(".pending")  # (cut mid-rename)
    assert len(parts(root, "models")) == 5  # 4 small, 1 merged pending
    assert verify(Store(root), repair=False).intact
    store.recover()  # (a reader's recovery) puts the merged packs in place, the small ones go
    for table in packing.PACKED_TABLES:
        assert len(parts(root, table)) == 1 and parts(root, table)[0].startswith(packing.MERGED)
    assert len(list(store.zoo_dir("checkpoints", "smoke").glob("*.safetensors"))) == 1
    store.sweep("smoke")
    store.write_index()
    assert fingerprint(root) == fingerprint(smoke_root)
    assert verify(Store(root)).intact
    z = zoo.open(root)
    ids = sorted(z.sql("select model_id from models where width = 32")["model_id"])  # (read from the matrices)
    assert np.array_equal(z.weights(ids, epoch=3).numpy(), zoo.open(smoke_root).weights(ids, epoch=3).numpy())


def test_a_model_stored_again_by_a_second_run_is_not_packed_twice(unpacked, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(unpacked, root)
    store = Store(root)
    model_id = parts(root, "models")[0].removesuffix(".parquet")
    copies = {t: (store.zoo_dir(t, "smoke") / f"{model_id}.parquet").read_bytes() for t in ("checkpoints", "curves", "tensors", "models")}
    store.pack("smoke")
    for table, data in copies.items():  # a run that trained it at the same time stores it again
        (store.zoo_dir(table, "smoke") / f"{model_id}.parquet").write_bytes(data)
    store.pack("smoke")
    assert parts(root) == [p for p in parts(root) if p.startswith("pack-")] and len(parts(root)) == 1
    store.write_index()
    fingerprint(root)  # fails on any duplicate row


def test_the_packs_weight_matrices_hold_exactly_the_parquet_weights(smoke_root):
    store, z = Store(smoke_root), zoo.open(smoke_root)
    matrices = [p for p in store.zoo_dir("checkpoints", "smoke").iterdir() if p.suffix == ".safetensors"]
    assert len(matrices) == 4  # one beside each stack's pack
    widths = z.sql("select model_id, width from models order by model_id").set_index("model_id")["width"]
    for width in (8, 32):
        ids = [m for m in widths.index if widths[m] == width][::-1]  # not the stored order
        for epoch in (0, 1, 3):
            table = store.read_model_rows("checkpoints", "smoke", ids, ["model_id", "weights"], pc.field("epoch") == epoch)
            by_id = dict(zip(table.column("model_id").to_pylist(), table.column("weights").to_pylist()))
            expected = np.array([by_id[m] for m in ids], dtype=np.float32)
            got, lacking = store.read_weights("smoke", ids, epoch)
            assert not lacking and np.array_equal(got, expected)
            assert np.array_equal(store.read_weights("smoke", ids[1:2], epoch)[0], expected[1:2])  # one scattered row
    assert store.read_weights("smoke", [widths.index[0]], 2)[1] == [widths.index[0]]  # no checkpoint at epoch 2


def test_a_matrix_file_without_its_pack_is_never_read(unpacked, tmp_path):
    from zoo.matrices import write_matrices

    root = tmp_path / "r"
    shutil.copytree(unpacked, root)
    store = Store(root)
    folder = store.zoo_dir("checkpoints", "smoke")
    data = pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("*.parquet"))])
    garbage = data.set_column(data.schema.get_field_index("weights"), "weights",
                              pa.array([[7.0] * len(w) for w in data.column("weights").to_pylist()], pa.list_(pa.float32())))
    write_matrices(folder / "pack-0123456789abcdef.safetensors", garbage)  # a crash before its pack was written
    ids = list(zoo.open(root).models()["model_id"])
    widths = zoo.open(root).sql("select model_id, width from models").set_index("model_id")["width"]
    same = [m for m in ids if widths[m] == 8]
    assert not np.any(zoo.open(root).weights(same).numpy() == 7.0)


def test_a_reader_after_a_packer_killed_mid_rename_sees_every_row(unpacked, tmp_path, monkeypatch):
    """Killed between removing a pack's parts and renaming it, a packer leaves those rows in the
    pending file only: a reader that asks to recover finishes the pack before it looks; a plain
    reader writes nothing and warns (a read-only root waits for the next writer)."""
    root = tmp_path / "r"
    shutil.copytree(unpacked, root)
    expected = fingerprint(root)
    store = Store(root)
    monkeypatch.setattr(Store, "finish_packs", lambda self, zoo: None)
    store.pack("smoke")
    monkeypatch.undo()
    for table in ("checkpoints", "curves"):  # their parts removed, the packs not yet renamed
        for name in parts(root, table):
            if not name.startswith("pack-"):
                (store.zoo_dir(table, "smoke") / name).unlink()
    before = sorted(parts(root))
    with pytest.warns(ZooWarning, match="recover=True"):  # a plain reader writes nothing, and says why rows may be missing
        assert len(zoo.open(root).sql("select * from curves")) < 8 * 4
    assert sorted(parts(root)) == before
    z = zoo.open(root, recover=True)  # asked to, the reader finishes them
    assert not any(name.endswith(".pending") for name in parts(root))
    assert len(z.sql("select * from curves")) == 8 * 4
    assert fingerprint(root) == expected


def test_a_packs_model_ids_are_read_once_per_file_and_a_new_or_damaged_file_is_read_again(smoke_root, tmp_path, monkeypatch):
    """A job lists what its zoo stores before and after each stack: each pack's ids are read
    from the file once, kept by the pack's name and the file's identity, so the reads do not grow
    with the square of the stacks; the same file under another pack's name, touched, or another
    file under the same name is read again, and a file that cannot be read fails each time."""
    root = tmp_path / "r"
    shutil.copytree(smoke_root, root)
    store = Store(root)
    monkeypatch.setattr(packing, "_MODEL_IDS", {})  # (nothing kept from other tests)
    reads = []
    real = pq.read_table
    monkeypatch.setattr(packing.pq, "read_table", lambda path, *a, **k: reads.append(str(path)) or real(path, *a, **k))
    stored = store.stored_ids("models", "smoke")
    n_packs = len(reads)
    assert len(stored) == 8 and n_packs >= 1
    assert [store.stored_ids("models", "smoke") for _ in range(5)] == [stored] * 5
    assert len(reads) == n_packs  # (no second read of any pack)

    pack = store.zoo_dir("models", "smoke") / parts(root, "models")[0]
    moved = pack.with_name(pack.name + packing.PENDING)
    pack.rename(moved)  # the same file under its pending name (a rename into place, backwards): not read again
    ids = packing.model_ids_in(moved)
    assert set(ids) <= stored and len(ids) == 2 and len(reads) == n_packs
    other = pack.with_name("pack-0000000000000000.parquet")
    moved.rename(other)  # under another pack's name: read again (a name is a hash of the ids its pack holds)
    assert packing.model_ids_in(other) == ids and len(reads) == n_packs + 1
    other.rename(moved)
    stat = moved.stat()
    os.utime(moved, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched: read again
    assert packing.model_ids_in(moved) == ids and len(reads) == n_packs + 2
    n_packs += 2
    rows = real(moved)
    one = rows.filter(pc.equal(rows["model_id"], rows["model_id"][0]))
    tmp = moved.with_name(".new")
    pq.write_table(one, tmp)
    tmp.replace(moved)  # another file under the same name: read again, its own ids
    assert packing.model_ids_in(moved) == [rows["model_id"][0].as_py()] and len(reads) == n_packs + 1

    moved.write_bytes(b"PAR1 not a parquet file")
    for _ in range(2):  # a failed read is not kept
        with pytest.raises(zoo.errors.ZooError, match="damaged file"):
            packing.model_ids_in(moved)
    assert len(reads) == n_packs + 3
