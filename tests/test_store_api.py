"""The stored zoo: schema, read-only SQL, load_model, weights as N x P, safetensors export."""

from __future__ import annotations

import json

import duckdb
import pytest
import torch

import zoo
from zoo.cli import main
from zoo.errors import ZooError
from zoo.evaluation import evaluate
from zoo.storage import INDEX_FILE, Store
from zoo.weights import sha256


def test_tables_hold_the_documented_columns(smoke_root):
    z = zoo.open(smoke_root)
    models = z.models("smoke")
    assert len(models) == 8 and set(models["status"]) == {"done"}
    for column in ("model_id", "zoo", "arch", "dataset", "seed", "load_name", "load", "temperature_name",
                   "temperature", "n_params", "train_seconds", "created_at", "code_version", "width", "batch_size",
                   "lr", "momentum", "epochs", "config"):
        assert column in models.columns, column
    assert set(models["load_name"]) == {"width"} and set(models["load"]) == {8.0, 32.0}
    curves = z.sql("select * from curves")
    assert len(curves) == 8 * 4 and list(curves.columns) == ["model_id", "epoch", "train_loss", "train_acc", "test_loss", "test_acc"]
    checkpoints = z.sql("select model_id, epoch, n_params, sha256 from checkpoints")
    assert len(checkpoints) == 8 * 3 and set(checkpoints["epoch"]) == {0, 1, 3}


def test_index_file_opens_in_any_duckdb_client(smoke_root):
    con = duckdb.connect(str(smoke_root / INDEX_FILE), read_only=True)
    assert con.execute("select count(*) from models").fetchone()[0] == 8
    assert con.execute("select count(*) from checkpoints where epoch = 0").fetchone()[0] == 8
    con.close()


def test_load_model_reproduces_stored_test_accuracy(smoke_root):
    # the smoke zoo trains stacked: its curves are evaluated for the whole stack at once, equal to
    # the one-model evaluation to float rounding
    z = zoo.open(smoke_root)
    rows = z.sql("select m.model_id, c.test_acc, c.test_loss from models m join curves c using (model_id) where c.epoch = m.epochs")
    for model_id, test_acc, test_loss in rows.itertuples(index=False):
        data = z.data(model_id)
        loss, acc = evaluate(z.load_model(model_id), data.x_test, data.y_test, z.spec(model_id).training.eval_batch_size)
        assert abs(acc - test_acc) <= 1 / len(data.y_test) and abs(loss - test_loss) <= 1e-5 * max(1.0, loss)


def test_weights_load_as_one_matrix_in_the_requested_order(smoke_root):
    z = zoo.open(smoke_root)
    ids = list(z.sql("select model_id from models where width = 32 order by model_id desc")["model_id"])
    matrix = z.weights(ids)
    n_params = int(z.sql("select max(n_params) n from models where width = 32")["n"][0])
    assert matrix.shape == (len(ids), n_params) and matrix.dtype == torch.float32
    for row, model_id in zip(matrix, ids):
        expected = torch.cat([p.detach().reshape(-1) for p in z.load_model(model_id).parameters()])
        assert torch.equal(row, expected)
    at_init = z.weights(ids, epoch=0)
    assert not torch.equal(at_init, matrix)
    stored = z.sql("select model_id, sha256 from checkpoints where epoch = 0").set_index("model_id")["sha256"]
    assert sha256(z.weights(ids[:1], epoch=0, buffers=True)[0].numpy()) == stored[ids[0]]
    with pytest.raises(ZooError, match="different parameter counts"):
        z.weights(list(z.models()["model_id"]))
    with pytest.raises(ZooError, match="no model"):
        z.weights(["0123456789abcdef0123"])
    with pytest.raises(ZooError, match="no checkpoint at epoch 2"):
        z.weights(ids, epoch=2)


def test_export_writes_safetensors_with_metadata(smoke_root, tmp_path, monkeypatch):
    from safetensors import safe_open

    monkeypatch.chdir(tmp_path)
    z = zoo.open(smoke_root)
    model_id = z.models()["model_id"][0]
    path = z.export(model_id, "m.safetensors")
    model = z.load_model(model_id)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert meta["model_id"] == model_id and json.loads(meta["config"])["seed"] in (0, 1)
        for name, tensor in model.state_dict().items():
            assert torch.equal(f.get_tensor(name), tensor)


@pytest.mark.parametrize(
    "query",
    [
        "CREATE TABLE t AS SELECT 1",
        "DROP VIEW models",
        "INSERT INTO models SELECT * FROM models",
        "COPY (SELECT * FROM models) TO 'out.csv'",
        "COPY models TO 'out.parquet' (FORMAT parquet)",
        "ATTACH 'other.duckdb' AS other",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "SELECT 1; DROP VIEW models",
        "PRAGMA enable_profiling",
    ],
)
def test_sql_refuses_every_write_and_nothing_changes(smoke_root, tmp_path, monkeypatch, capsys, query):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.relative_to(smoke_root) for p in smoke_root.rglob("*"))
    assert main(["sql", query, "--root", str(smoke_root)]) == 2
    assert "refused" in capsys.readouterr().err
    assert sorted(p.relative_to(smoke_root) for p in smoke_root.rglob("*")) == before
    assert list(tmp_path.iterdir()) == []
    assert len(zoo.open(smoke_root).sql("select * from models")) == 8


def test_sql_cannot_read_outside_the_root(smoke_root, tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    with pytest.raises(ZooError, match="SQL error"):
        zoo.open(smoke_root).sql(f"select * from read_csv('{secret}')")


def test_sql_formats_and_output_file(smoke_root, tmp_path, capsys):
    query = "select width, batch_size, count(*) n from models group by all order by all"
    assert main(["sql", query, "--root", str(smoke_root), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["width,batch_size,n", "8,32,2", "8,128,2", "32,32,2", "32,128,2"]
    assert main(["sql", query, "--root", str(smoke_root), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0] == {"width": 8, "batch_size": 32, "n": 2}
    assert main(["sql", query, "--root", str(smoke_root), "--format", "parquet", "--out", str(tmp_path / "o.parquet")]) == 0
    import pandas as pd

    assert len(pd.read_parquet(tmp_path / "o.parquet")) == 4
    assert main(["sql", query, "--root", str(smoke_root), "--format", "parquet"]) == 2
    assert main(["sql", "select nonsense from models", "--root", str(smoke_root)]) == 2
    assert "SQL error" in capsys.readouterr().err


def test_catalog_command_counts_stored_models(smoke_root, capsys):
    assert main(["catalog", "--root", str(smoke_root)]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("smoke "))
    assert line.split()[-2:] == ["8", "8"]


def test_opening_a_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(ZooError, match="no zoo at"):
        zoo.open(tmp_path / "nothing")


def test_model_ids_with_path_traversal_are_rejected(smoke_root):
    z = zoo.open(smoke_root)
    for bad in ("../../etc/passwd", "..", "a/b", ".hidden"):
        with pytest.raises(ZooError, match="invalid model id"):
            z.load_model(bad)


def test_no_pickle_files_in_the_root(smoke_root):
    suffixes = {p.suffix for p in smoke_root.rglob("*") if p.is_file() and p.name != ".checksums"}
    assert suffixes <= {".parquet", ".safetensors", ".duckdb", ".lock"}  # .pack.lock: an empty lock file
    manifests = list(smoke_root.rglob(".checksums"))  # text: sha256, size, name per line
    assert manifests and all(line.count("\t") == 2 for m in manifests for line in m.read_text().splitlines())


def test_empty_root_views_answer_with_zero_rows(tmp_path):
    Store(tmp_path / "r", create=True).write_index()
    z = zoo.open(tmp_path / "r")
    assert len(z.sql("select * from models")) == 0 and len(z.sql("select * from checkpoints")) == 0
