"""Publishing a zoo as static files, reading it where it lies, and pulling selections of it
(zoo.publish, zoo.published, zoo.pull) on a local folder; test_remote.py does the same over
HTTP (nginx) and S3 (moto)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import duckdb
import numpy as np
import pytest

import zoo
from zoo.cli import main
from zoo.storage import Store

from .conftest import REPO
from .test_generate import fingerprint


def tree_hashes(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(smoke_reference, tmp_path_factory):
    """The smoke zoo with its model metrics, seed-pair CKA and benchmark results."""
    root = tmp_path_factory.mktemp("source") / "root"
    shutil.copytree(smoke_reference, root)
    assert main(["metrics", "smoke", "--root", str(root), "--executor", "debug", "--no-progress", "--only", "cka"]) == 0
    return root


@pytest.fixture(scope="module")
def published(source, tmp_path_factory):
    """`source` published with every epoch."""
    out = tmp_path_factory.mktemp("pub") / "smoke"
    assert main(["publish", "smoke", "--root", str(source), "--out", str(out), "--epochs", "all"]) == 0
    return out


def test_publishing_is_deterministic_self_described_and_leaves_the_root_alone(source, published, tmp_path):
    before = tree_hashes(source)
    again = tmp_path / "again"
    assert main(["publish", "smoke", "--root", str(source), "--out", str(again), "--epochs", "all"]) == 0
    assert tree_hashes(again) == tree_hashes(published)  # the same zoo gives the same bytes
    assert tree_hashes(source) == before
    manifest = json.loads((published / "manifest.json").read_text())
    listed = {e["path"]: e for e in manifest["files"]}
    assert set(listed) == set(tree_hashes(published)) - {"manifest.json"}
    for path, entry in listed.items():
        data = (published / path).read_bytes()
        assert len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert manifest["catalog"]["architecture"]["name"] == "mlp" and manifest["versions"]["zoo"]
    card = (published / "README.md").read_text()
    assert card.startswith("---\n") and "config_name: models" in card and "| `test_acc` |" in card
    # metadata and weights apart: no Parquet file holds a weight
    assert all(not p.startswith("data/") or p.endswith(".parquet") for p in listed)
    assert duckdb.connect().execute(f"select count(*) from read_parquet('{published}/data/checkpoints.parquet') "
                      "where file like 'weights/%'").fetchone()[0] == 24


def test_a_refused_selection_or_folder_is_one_line(source, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for argv, message in (
        (["--out", str(tmp_path / "full")], "not an empty folder"),
        (["--out", str(tmp_path / "a"), "--where", "width = 12345"], "no models of zoo 'smoke'"),
        (["--out", str(tmp_path / "b"), "--epochs", "7"], "no stored checkpoint at epoch 7"),
        (["--out", str(tmp_path / "c"), "--epochs", "x,y"], "give final, all, or a list"),
        (["--out", str(tmp_path / "d"), "--where", "1=1; drop table models"], "SQL error"),
    ):
        assert main(["publish", "smoke", "--root", str(source), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob("*.partial"))


def test_a_published_folder_answers_queries_and_loads_models_like_the_root(source, published):
    local, remote = zoo.open(source), zoo.open(published)
    for query in ("select * from models order by model_id",
                  "select * from curves order by model_id, epoch",
                  "select model_id, epoch, family, name, value from metrics order by all",
                  "select * from pair_metrics order by all",
                  "select * from benchmark_results order by all"):
        a, b = local.sql(query), remote.sql(query)
        assert len(a) and a.equals(b), query
    ids = list(local.models()["model_id"])
    for epoch in (0, 1, 3):
        same = [m for m in ids if local.spec(m).architecture["width"] == 8]
        assert np.array_equal(local.weights(same, epoch=epoch).numpy(), remote.weights(same, epoch=epoch).numpy())
    a, b = local.load_model(ids[0]), remote.load_model(ids[0])
    assert all(np.array_equal(x.detach().numpy(), y.detach().numpy()) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert remote.data(ids[0]).x_test.shape == local.data(ids[0]).x_test.shape
    with pytest.raises(zoo.errors.ZooError, match="refused"):  # read-only, as a root is
        remote.sql(f"copy (select 1) to '{published}/x.csv'")


def test_a_pull_copies_exactly_the_selection_and_the_root_works_with_every_command(source, published, tmp_path, capsys):
    root = tmp_path / "mine"
    assert main(["pull", str(published), "--where", "width = 8", "--root", str(root), "--no-progress"]) == 0
    local, mine = zoo.open(source), zoo.open(root)
    want = set(local.sql("select model_id from models where width = 8")["model_id"])
    assert set(mine.models()["model_id"]) == want
    expected = {k: v for k, v in fingerprint(source).items() if k[0] in want}
    assert fingerprint(root) == expected
    # the rows that refer only to pulled models come along; a pair or cell with an absent model does not
    q = "select model_id, epoch, family, name, value from metrics where model_id in (select unnest(?)) order by all"
    assert mine.sql(q, [sorted(want)]).equals(local.sql(q, [sorted(want)]))
    pairs = mine.sql("select model_a, model_b from pair_metrics")
    assert len(pairs) and set(pairs["model_a"]) | set(pairs["model_b"]) <= want
    units = set(mine.sql("select distinct unit from benchmark_results")["unit"])
    assert units and units <= want  # (the pruning task scores models one by one)
    assert main(["verify", "--root", str(root)]) == 0
    capsys.readouterr()
    # pulled metrics are not recomputed; the rest of the zoo's families still run
    assert main(["metrics", "smoke", "--root", str(root), "--executor", "debug", "--no-progress",
                 "--only", "performance,hessian"]) == 0
    assert "computed 0, skipped 8" in capsys.readouterr().err
    # a second pull of the same is a no-op; another selection adds, without duplicates
    assert main(["pull", str(published), "--where", "width = 8", "--root", str(root), "--no-progress"]) == 0
    assert "pulled 0, 4 already here" in capsys.readouterr().out
    assert main(["pull", str(published), "--root", str(root), "--no-progress"]) == 0
    assert fingerprint(root) == fingerprint(source)  # (fails on a duplicate row)
    q = "select unit, method, parameters_hash, metric, value from benchmark_results order by all"
    assert mine.sql(q).equals(local.sql(q)) and len(mine.sql(q))


def test_a_pull_killed_midway_resumes_where_it_stopped(published, tmp_path):
    root = tmp_path / "r"
    killer = (
        "import os, signal, sys, zoo.pull as p\n"
        "real, done = p._store_model, []\n"
        "def dying(*a, **k):\n"
        "    real(*a, **k); done.append(1)\n"
        "    if len(done) == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
        "p._store_model = dying\n"
        "from zoo.cli import main\n"
        f"sys.exit(main(['pull', {str(published)!r}, '--root', {str(root)!r}, '--no-progress']))\n"
    )
    run = subprocess.run([sys.executable, "-c", killer], env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    assert run.returncode == -signal.SIGKILL
    assert main(["pull", str(published), "--root", str(root), "--no-progress"]) == 0
    assert len(fingerprint(root)) == 24 and main(["verify", "--root", str(root)]) == 0


@pytest.mark.parametrize("damage, refused", [
    ("flip a byte of data/curves.parquet", "data/curves.parquet"),
    ("flip a byte of a weight row", "do not match the sha256"),
    ("list ../outside in the manifest", "'../outside'"),
    ("list /etc/passwd in the manifest", "'/etc/passwd'"),
    ("grow data/tensors.parquet", "data/tensors.parquet"),
    ("remove data/metrics.parquet", "data/metrics.parquet"),
])
def test_a_tampered_file_is_refused_in_one_line_and_the_rest_is_pulled(published, tmp_path, capsys, damage, refused):
    copy = tmp_path / "pub"
    shutil.copytree(published, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    if damage.startswith("flip a byte of data"):
        path = copy / "data/curves.parquet"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
    elif damage == "flip a byte of a weight row":
        row = duckdb.connect().execute(f"select file, byte_offset, model_id from read_parquet('{copy}/data/checkpoints.parquet') "
                         "order by model_id, epoch limit 1").fetchone()
        path = copy / row[0]
        data = bytearray(path.read_bytes())
        data[row[1] + 5] ^= 1
        path.write_bytes(bytes(data))
    elif damage.startswith("list"):
        manifest["files"].append({"path": damage.split()[1], "size": 1, "sha256": "0" * 64})
    elif damage.startswith("grow"):
        with open(copy / "data/tensors.parquet", "ab") as f:
            f.write(b"\0" * 10)
    else:
        (copy / "data/metrics.parquet").unlink()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    root = tmp_path / "r"
    assert main(["pull", str(copy), "--root", str(root), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and refused in err[0] and err[0].startswith("zoo: refused"), err
    stored = fingerprint(root)
    if damage == "flip a byte of a weight row":
        assert len({m for m, _ in stored}) == 7 and row[2] not in {m for m, _ in stored}  # only that model is left out
    else:
        assert len(stored) == 24
    table = {"curves": "curves", "tensors": "tensors", "metrics": "metrics"}.get(refused.split("/")[-1].split(".")[0])
    if table:
        assert zoo.open(root).sql(f"select count(*) n from {table}")["n"][0] == 0  # nothing of the refused file kept
    assert main(["verify", "--root", str(root)]) == 0


def test_hugging_face_datasets_and_plain_duckdb_read_the_published_folder(published):
    import datasets  # (a test dependency: pyproject's [test] extra)
    local = zoo.open(published)
    for table in ("models", "curves", "metrics"):
        loaded = datasets.load_dataset(str(published), table, split="train")
        assert loaded.num_rows == local.sql(f"select count(*) n from {table}")["n"][0] > 0
    count = duckdb.connect().execute(f"select count(*) from '{published}/data/models.parquet' where width = 32").fetchone()[0]
    assert count == 4


def test_a_moved_root_is_repaired_on_open_and_a_plain_duckdb_client_reads_it(smoke_root, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(smoke_root, tmp_path / "first")
    Store(tmp_path / "first").write_index()  # (its index now points to "first", which is then moved)
    (tmp_path / "first").rename(moved)
    with pytest.raises(duckdb.IOException, match="No files found"):
        duckdb.connect(str(moved / "zoo.duckdb"), read_only=True).execute("select count(*) from models").fetchone()
    zoo.open(moved)
    con = duckdb.connect(str(moved / "zoo.duckdb"), read_only=True)
    assert con.execute("select count(*) from models").fetchone()[0] == 8
