"""`zoo sql`, `Root.sql()` and a task's `select:` are read-only by construction (zoo/sql.py): every
DuckDB statement type, plain and wrapped, and a generated corpus, run against a root whose every
file is hashed before and after; the second wall (the connection cannot write) tested on its own
by running writes past the first; limits (time, memory, Ctrl-C); and the readers of an untrusted
root (links, pipes, malformed files, glob characters, side matrices)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zoo
from zoo.cli import main
from zoo.storage import Store
from zoo.errors import ZooError


@pytest.fixture(scope="module")
def attacked(smoke_root, tmp_path_factory) -> Path:
    """A copy of the smoke zoo, shared by the statement tests (each checks it is unchanged)."""
    root = tmp_path_factory.mktemp("attacked") / "root"
    shutil.copytree(smoke_root, root)
    Store(root).write_index()  # (a copy's index points to the original: opening would repair it)
    return root


@pytest.fixture()
def root(smoke_root, tmp_path) -> Path:
    copy = tmp_path / "root"
    shutil.copytree(smoke_root, copy)
    Store(copy).write_index()  # (a copy's index points to the original: opening would repair it)
    return copy


def snapshot(*folders: Path) -> dict[str, str]:
    """Every entry under `folders`: a file's sha256, a folder, a link's target."""
    out = {}
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                if path.is_symlink():
                    out[str(path)] = "link:" + os.readlink(path)
                elif path.is_dir():
                    out[str(path)] = "dir"
                else:
                    out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def targets(root: Path) -> list[str]:
    """Where a write might be aimed: inside the root (its data, its index, relative to the working
    folder), through the root's own file system, and outside."""
    pack = next((root / "tables" / "checkpoints" / "smoke").glob("pack-*.parquet"))
    return [str(root / "x.csv"), str(pack), str(root / "zoo.duckdb"), str(root / "tables"), "x.csv",
            ".tmp/x.csv", "zoo://x.csv", "zoo://" + str(pack.relative_to(root)), "zoo://tables", str(root.parent / "out.csv")]


# One statement of every DuckDB statement type that can change something, each aimed at a target.
def dangerous(target: str) -> list[str]:
    t = target.replace("'", "''")
    return [
        f"COPY (SELECT 42 AS x) TO '{t}'",
        f"COPY (SELECT 1 AS a, 2 AS b) TO '{t}' (FORMAT parquet, PARTITION_BY (a), OVERWRITE true)",
        f"COPY models TO '{t}' (FORMAT csv)",
        f"COPY models FROM '{t}'",
        f"EXPORT DATABASE '{t}'",
        f"IMPORT DATABASE '{t}'",
        f"ATTACH '{t}' AS other",
        f"ATTACH '{t}' AS other (READ_ONLY)",
        "DETACH other",
        "COPY FROM DATABASE memory TO other",
        "CREATE TABLE t AS SELECT 1 AS a",
        "CREATE OR REPLACE VIEW models AS SELECT 1 AS model_id",
        "CREATE VIEW v AS SELECT 1",
        "CREATE MACRO m(a) AS a",
        "CREATE FUNCTION f(x) AS x + 1",
        "CREATE SEQUENCE s",
        "CREATE SCHEMA sc",
        "CREATE TYPE ty AS INTEGER",
        "CREATE SECRET sec (TYPE s3, KEY_ID 'a', SECRET 'b')",
        "CREATE INDEX i ON models (model_id)",
        "DROP VIEW models",
        "DROP TABLE IF EXISTS t",
        "ALTER VIEW models RENAME TO m2",
        "COMMENT ON VIEW models IS 'x'",
        "INSERT INTO models (model_id) VALUES ('x')",
        "UPDATE models SET seed = 0",
        "DELETE FROM models",
        "TRUNCATE models",
        "MERGE INTO models USING (SELECT 'x' AS model_id) s ON (models.model_id = s.model_id) WHEN MATCHED THEN DELETE",
        "INSTALL httpfs",
        "LOAD httpfs",
        "UPDATE EXTENSIONS",
        "FORCE INSTALL json",
        "SET enable_external_access = true",
        "SET allowed_directories = ['/']",
        "RESET memory_limit",
        "SET VARIABLE x = 1",
        "USE memory",
        "PRAGMA enable_profiling",
        f"PRAGMA profiling_output = '{t}'",
        "CALL pragma_version()",
        "CHECKPOINT",
        "VACUUM",
        "ANALYZE",
        "PREPARE p AS SELECT 1",
        "EXECUTE p",
        "DEALLOCATE p",
        "BEGIN TRANSACTION",
        "COMMIT",
        "ROLLBACK",
        "PIVOT models ON zoo",  # (several statements: refused, named MULTI)
    ]


def wrapped(statement: str) -> list[str]:
    """The statement alone and in every wrapper the grammar may let it hide in."""
    return [statement, f"EXPLAIN {statement}", f"EXPLAIN ANALYZE {statement}", f"EXPLAIN (ANALYZE) {statement}",
            f"/* c */ explain\nanalyze {statement}", f"WITH w AS ({statement}) SELECT * FROM w",
            f"SELECT * FROM ({statement})", f"SELECT 1; {statement}", f"{statement}; SELECT 1",
            f"SELECT * FROM query('{statement.replace(chr(39), chr(39) * 2)}')"]


def refused_in_one_line(z, query: str) -> None:
    """The query is refused with one line, or (a harmless wrapper DuckDB itself rejects) fails
    with one line; either way it gives no result."""
    with pytest.raises(ZooError) as e:
        z.sql(query)
    assert "\n" not in str(e.value) and str(e.value).strip()


def test_every_statement_type_in_every_wrapper_is_refused_and_nothing_changes(attacked, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    watched = (attacked.parent, tmp_path)
    before = snapshot(*watched)
    z = zoo.open(attacked)
    n = 0
    for target in targets(attacked):
        for statement in dangerous(target):
            for query in wrapped(statement):
                refused_in_one_line(z, query)
                n += 1
    assert n > 5000
    # the views are still the zoo's, in this Python session too
    assert z.sql("SELECT count(*) AS n FROM models")["n"][0] == 8
    assert sorted(z.sql("SELECT view_name FROM duckdb_views() WHERE NOT internal")["view_name"]) == sorted(
        ["benchmark_results", "cells", "checkpoints", "curves", "densities", "failures", "jobs", "layer_metrics", "metric_failures",
         "metrics", "models", "pair_metrics", "tensors"])
    assert snapshot(*watched) == before


@pytest.mark.parametrize("query", [
    "SELECT count(*) FROM models", "WITH x AS (SELECT * FROM models) SELECT count(*) FROM x", "FROM models LIMIT 1",
    "DESCRIBE models", "SHOW TABLES", "SUMMARIZE curves", "VALUES (1)", "EXPLAIN SELECT * FROM models",
    "PIVOT (SELECT zoo, seed FROM models) ON seed IN (0, 1) USING count(*)", "SELECT 1; SELECT 2",
    "SELECT count(*) FROM read_parquet('zoo://tables/models/**/*.parquet')",
])
def test_queries_still_run(attacked, query):
    assert len(zoo.open(attacked).sql(query)) >= 1


def test_the_command_line_and_a_task_select_refuse_the_same_way(attacked, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = str(attacked / "x.csv")
    task = tmp_path / "evil.yaml"
    task.write_text(yaml.safe_dump({
        "task": "evil", "protocol": "prune", "zoo": "smoke", "metrics": ["test_acc"],
        "methods": [{"method": "magnitude_global", "sweep": {"sparsity": [0.5]}}],
        "select": f"EXPLAIN ANALYZE COPY (SELECT model_id FROM models) TO '{out}'"}))
    before = snapshot(attacked.parent, tmp_path)
    assert main(["sql", f"EXPLAIN ANALYZE COPY (SELECT 42 AS x) TO '{out}'", "--root", str(attacked)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo: error: refused") and err.count("\n") == 1
    assert main(["bench", str(task), "--root", str(attacked), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "field 'select'" in err and "refused" in err and err.count("\n") == 1
    assert snapshot(attacked.parent, tmp_path) == before


KEYWORDS = ["COPY", "EXPORT DATABASE", "ATTACH", "INSTALL", "LOAD", "CREATE TABLE t AS", "CREATE VIEW v AS",
            "DROP VIEW", "INSERT INTO models", "DELETE FROM", "SET", "PRAGMA", "CALL", "EXPLAIN ANALYZE",
            "EXPLAIN", "WITH x AS", "SELECT", "FROM", "(", ")", ";", "TO", "'", "x.csv", "models",
            "(FORMAT parquet, OVERWRITE true)", "PARTITION_BY", "read_parquet(", "zoo://", "../", "/tmp/",
            "query(", "VALUES (1)", "--", "/*", "*/", "\n", "ANALYZE", "UNION ALL", "SUMMARIZE", "DESCRIBE"]


@st.composite
def statements(draw, root: Path) -> str:
    """A dangerous statement with a random target and wrapper, in random case and layout, or a
    splice of keywords, quotes and paths."""
    if draw(st.booleans()):
        target = draw(st.sampled_from(targets(root) + ["/tmp/zoo-corpus.csv", "../../x.csv"]))
        query = draw(st.sampled_from(wrapped(draw(st.sampled_from(dangerous(target))))))
        if draw(st.booleans()):
            query = query.lower()
        if draw(st.booleans()):
            query = "/* a comment */ " + query.replace(" ", "\n  ", 1)
        return query
    return " ".join(draw(st.lists(st.sampled_from(KEYWORDS), min_size=1, max_size=12)))


def test_a_generated_corpus_of_statements_changes_nothing(attacked, tmp_path, monkeypatch):
    """At least 1,000 distinct generated statements: each runs (a query) or is refused in one
    line, and the root, its parent and the working folder are unchanged after all of them."""
    monkeypatch.chdir(tmp_path)
    watched = (attacked.parent, tmp_path)
    before = snapshot(*watched)
    z = zoo.open(attacked)
    seen = set()

    @settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(query=statements(attacked))
    def run(query):
        seen.add(query)
        try:
            z.sql(query)
        except ZooError as e:
            assert "\n" not in str(e) and str(e)

    run()
    assert len(seen) >= 1000
    assert snapshot(*watched) == before
    assert not Path("/tmp/zoo-corpus.csv").exists()


def test_the_connection_cannot_write_even_when_a_statement_slips_past_the_check(attacked, tmp_path, monkeypatch):
    """The second wall alone: writes executed on the DuckDB connection itself, past the
    statement check, reach no file."""
    monkeypatch.chdir(tmp_path)
    before = snapshot(attacked.parent, tmp_path, Path("/tmp") / "zoo-wall")
    con = zoo.open(attacked)._con.con
    for target in targets(attacked) + ["/tmp/zoo-wall/x.csv"]:
        t = target.replace("'", "''")
        for statement in [f"COPY (SELECT 42 AS x) TO '{t}'", f"EXPLAIN ANALYZE COPY (SELECT 42 AS x) TO '{t}'",
                          f"COPY (SELECT 1 AS a, 2 AS b) TO '{t}' (FORMAT parquet, PARTITION_BY (a), OVERWRITE true)",
                          f"COPY (SELECT 1 AS a) TO '{t}' (FORMAT parquet, USE_TMP_FILE false)",
                          f"ATTACH '{t}' AS db2", f"EXPORT DATABASE '{t}'", "SET enable_external_access = true",
                          "SET disabled_filesystems = ''", "INSTALL httpfs", "LOAD httpfs",
                          "SELECT * FROM read_text('/etc/hostname')", "SELECT * FROM read_text('.tmp/x')"]:
            with pytest.raises(duckdb.Error):
                con.execute(statement).fetchall()
    assert snapshot(attacked.parent, tmp_path, Path("/tmp") / "zoo-wall") == before
    assert not Path("/tmp/zoo-wall").exists()


def test_the_reported_attacks_leave_the_data_and_the_weights_as_they_were(root):
    """Issue 13's item 1, as reported: overwrite or delete every data file and manifest, zero a
    model's weights with a matching sha256, and persist a view in a Python session."""
    z = zoo.open(root)
    model_id = z.sql("SELECT model_id FROM models ORDER BY model_id LIMIT 1").model_id[0]
    weights = z.weights([model_id]).clone()
    tables = str(root / "tables")
    for query in [f"EXPLAIN ANALYZE COPY (SELECT 1 AS a, 'x' AS b) TO '{tables}' (FORMAT parquet, PARTITION_BY (a), OVERWRITE true)",
                  "EXPLAIN ANALYZE COPY (SELECT 1 AS a, 'x' AS b) TO 'zoo://tables' (FORMAT parquet, PARTITION_BY (a), OVERWRITE true)",
                  "EXPLAIN ANALYZE COPY (SELECT * REPLACE (list_transform(weights, x -> 0::FLOAT) AS weights) FROM checkpoints) TO 'zoo://tables/checkpoints/smoke/pack-0.parquet'",
                  f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{root / 'zoo.duckdb'}'",
                  "EXPLAIN ANALYZE CREATE OR REPLACE VIEW models AS SELECT 1 AS model_id",
                  "EXPLAIN ANALYZE DROP VIEW checkpoints"]:
        refused_in_one_line(z, query)
    assert z.sql("SELECT count(*) AS n FROM models")["n"][0] == 8
    assert len(z.sql("SELECT * FROM checkpoints")) == 24
    assert zoo.open(root).weights([model_id]).equal(weights)
    assert main(["verify", "--root", str(root)]) == 0


# --- limits --------------------------------------------------------------------------------

def test_a_query_stops_at_its_time_limit_with_one_line(attacked, capsys):
    start = time.monotonic()
    assert main(["sql", "SELECT count(*) FROM range(1000000000000)", "--timeout", "1.5", "--root", str(attacked)]) == 2
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert err == "zoo: error: query stopped after its time limit of 1.5 s (--timeout S, or env ZOO_SQL_TIMEOUT_S)\n"
    with pytest.raises(ZooError, match="time limit of 1 s"):
        zoo.open(attacked, timeout=1).sql("SELECT count(*) FROM range(1000000000000)")


def test_the_memory_limit_is_well_under_the_machine_and_settable(attacked, capsys, monkeypatch):
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    def limit() -> float:
        number, unit = zoo.open(attacked).sql("SELECT current_setting('memory_limit') AS m")["m"][0].split()
        return float(number) * {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]

    assert 2**30 <= limit() <= min(4 << 30, total / 4) * 1.01
    monkeypatch.setenv("ZOO_SQL_MEMORY", "64MB")
    assert limit() == pytest.approx(64e6, rel=0.01)
    query = "SELECT list(range) FROM range(200000000)"
    assert main(["sql", query, "--memory-limit", "32MB", "--root", str(attacked)]) == 2
    err = capsys.readouterr().err
    assert "memory" in err.lower() and err.count("\n") == 1
    assert main(["sql", "SELECT 1", "--memory-limit", "lots", "--root", str(attacked)]) == 2
    assert "invalid memory limit 'lots'" in capsys.readouterr().err


@pytest.mark.parametrize("ignored", [False, True], ids=["terminal", "background-job"])
@pytest.mark.parametrize("after", [0.5, 6.0], ids=["while-importing", "while-querying"])
def test_ctrl_c_ends_a_query_with_one_line_and_status_130(attacked, ignored, after):
    """Also when started with SIGINT ignored, as a non-interactive shell starts a background job,
    and at any point: during the imports, or once the query runs."""
    def start():
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    process = subprocess.Popen([sys.executable, "-m", "zoo", "sql", "SELECT count(*) FROM range(1000000000000)",
                                "--root", str(attacked)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=start)
    time.sleep(after)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130 and err == "zoo: interrupted\n" and out == ""


SWALLOWING_COMMAND = """
import sys, time
import zoo.cli
from zoo import __main__ as entry
def main(argv=None, own_process=False):  # a command whose code catches every exception, KeyboardInterrupt too
    print("running", flush=True)
    while True:
        try:
            time.sleep(60)
        except BaseException:
            pass
zoo.cli.main = main
entry.INTERRUPT_GRACE_S = 1.0
sys.exit(entry.run())
"""


def test_ctrl_c_ends_the_command_even_where_its_keyboard_interrupt_is_swallowed():
    # once, under load, a Ctrl-C during `zoo sql`'s imports left the query running (CI): the
    # interrupt also arms a timer that ends the process with the same line and status
    process = subprocess.Popen([sys.executable, "-c", SWALLOWING_COMMAND], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=Path(zoo.__file__).parent.parent)
    assert process.stdout.readline() == "running\n"
    start = time.monotonic()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130 and err == "zoo: interrupted\n" and out == ""
    assert 0.9 < time.monotonic() - start < 15


def test_a_query_over_the_memory_limit_stops_and_nothing_is_spilled_anywhere(attacked, tmp_path, monkeypatch):
    """DuckDB would spill to `.tmp/` in the working folder, which queries could read and write:
    here a query has to fit in its memory limit, and no temporary folder is readable."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "secret").write_text("x")
    z = zoo.open(attacked, memory_limit="40MB")
    with pytest.raises(ZooError, match="memory limit") as e:
        z.sql("SELECT count(*) AS n FROM (SELECT range, md5(range::VARCHAR) AS h FROM range(3000000) ORDER BY h)")
    assert "\n" not in str(e.value)
    assert os.listdir(tmp_path / ".tmp") == ["secret"] and os.listdir(tmp_path) == [".tmp"]
    for path in [".tmp/secret", str(tmp_path / ".tmp" / "secret")]:
        refused_in_one_line(z, f"SELECT * FROM read_text('{path}')")
    assert z.sql("SELECT current_setting('temp_directory') AS t")["t"][0] == ""


# --- readers of an untrusted root ------------------------------------------------------------

def test_a_folder_link_out_of_the_root_is_refused_by_sql_and_the_api(root, tmp_path):
    z0 = zoo.open(root)
    model_id = z0.sql("SELECT model_id FROM models LIMIT 1").model_id[0]
    folder = root / "tables" / "checkpoints" / "smoke"
    outside = tmp_path / "outside"
    shutil.move(folder, outside)
    folder.symlink_to(outside, target_is_directory=True)
    with pytest.raises(ZooError, match="symbolic link") as e:
        z = zoo.open(root)
        z.sql("SELECT count(*) FROM checkpoints")
    assert "\n" not in str(e.value)
    with pytest.raises(ZooError, match="symbolic link"):
        z0.load_model(model_id)
    with pytest.raises(ZooError, match="symbolic link"):
        z0.weights([model_id])
    with pytest.raises(ZooError, match="symbolic link"):
        z0.sql("SELECT count(*) FROM checkpoints")


def test_a_named_pipe_in_place_of_a_pack_is_refused_without_hanging(root):
    z = zoo.open(root)
    model_id = z.sql("SELECT model_id FROM models LIMIT 1").model_id[0]
    matrices = pack_of(root, "checkpoints", model_id).with_suffix(".safetensors")
    matrices.unlink()
    os.mkfifo(matrices)
    outcome = {}

    def read():
        try:
            z.weights([model_id])
        except ZooError as e:
            outcome["error"] = str(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(20)
    assert not reader.is_alive(), "weights() hung on a named pipe"
    assert "a named pipe" in outcome["error"] and "\n" not in outcome["error"]
    with pytest.raises(ZooError, match="named pipe"):
        z.load_model(model_id)


def test_side_matrices_that_disagree_with_the_recorded_sha256_are_refused(root):
    path = next((root / "tables" / "checkpoints" / "smoke").glob("pack-*.safetensors"))
    data = bytearray(path.read_bytes())
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    # the last epoch's matrix (at epoch 0, models of one seed share their initial weights)
    name = max((n for n in header if n.startswith("epoch") and header[n]["shape"][0] >= 2), key=lambda n: int(n[5:].split(".")[0]))
    rows, cols = header[name]["shape"]
    begin = 8 + size + header[name]["data_offsets"][0]
    matrix = np.frombuffer(bytes(data[begin:begin + 4 * rows * cols]), dtype="<f4").reshape(rows, cols)
    data[begin:begin + 4 * rows * cols] = matrix[[1, 0, *range(2, rows)]].tobytes()  # swap two models' rows
    path.write_bytes(bytes(data))
    epoch = int(name[len("epoch"):].split(".")[0])
    ids = json.loads(header["__metadata__"][name])  # (the models of one width: one matrix)
    swapped = ids[0]
    assert zoo.open(root).weights(ids[2:], epoch=epoch).shape[0] == rows - 2  # (the rows left alone still read)
    with pytest.raises(ZooError, match="do not match the sha256") as e:
        zoo.open(root).weights(ids, epoch=epoch)
    assert path.name in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ZooError, match="do not match the sha256"):
        zoo.open(root).load_model(swapped, epoch=epoch)


def pack_of(root, table: str, model_id: str):
    """The pack of `table` that holds `model_id`'s rows (a zoo has one per trained stack)."""
    [pack] = [p for p in (root / "tables" / table / "smoke").glob("pack-*.parquet")
              if model_id in pq.read_table(p, columns=["model_id"]).column("model_id").to_pylist()]
    return pack


@pytest.mark.parametrize("damage", ["huge-header", "bad-offsets", "garbage-header", "truncated-pack"])
def test_malformed_files_give_one_line(root, damage):
    z = zoo.open(root)
    model_id = z.sql("SELECT model_id FROM models LIMIT 1").model_id[0]
    matrices = pack_of(root, "checkpoints", model_id).with_suffix(".safetensors")
    data = matrices.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    if damage == "huge-header":  # a header size of 2**62 bytes
        matrices.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    elif damage == "bad-offsets":  # matrices far larger than the file
        for name, info in header.items():
            if name != "__metadata__":
                info["shape"] = [info["shape"][0], 10**15]
        text = json.dumps(header).encode()
        matrices.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size:])
    elif damage == "garbage-header":
        matrices.write_bytes(data[:8] + b"\xff" * size + data[8 + size:])
    else:
        tensors = pack_of(root, "tensors", model_id)
        tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    with pytest.raises(ZooError) as e:
        zoo.open(root).load_model(model_id)
    assert "\n" not in str(e.value) and ("damaged" in str(e.value) or "verify" in str(e.value))


def test_a_part_with_a_name_no_writer_makes_is_ignored_by_readers_and_generate(root, capsys):
    evil = root / "tables" / "models" / "smoke" / "evil..id.parquet"
    shutil.copy(next((root / "tables" / "models" / "smoke").glob("pack-*.parquet")), evil)
    from zoo.storage import Store

    assert len(Store(root).stored_ids("models", "smoke")) == 8
    assert main(["generate", "smoke", "--executor", "debug", "--no-progress", "--root", str(root)]) == 0
    assert "all 8 models already stored" in capsys.readouterr().err


def test_a_root_named_with_glob_characters_reads_only_its_own_files(root, tmp_path):
    """`r[o]ot` beside `root`: its views (zoo sql's, and zoo.duckdb's for any DuckDB client)
    read its own files, not its sibling's."""
    other = tmp_path / "r[o]ot"
    assert main(["generate", "smoke", "--executor", "debug", "--no-progress", "--limit", "2", "--root", str(other)]) == 0
    assert zoo.open(other).sql("SELECT count(*) AS n FROM models")["n"][0] == 2
    con = duckdb.connect(str(other / "zoo.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM models").fetchone()[0] == 2


def test_parallel_scans_through_the_root_file_system_read_the_right_bytes(tmp_path):
    """DuckDB reads one file from several threads through one handle (a seek, then a read):
    each thread keeps its own position (zoo.rootfs.PositionalFile), else a 1e6-row aggregation
    decodes another thread's bytes."""
    from zoo.schemas import SCHEMAS
    from zoo.storage import Store

    store = Store(tmp_path / "root", create=True)
    rng = np.random.default_rng(0)
    expected = 0.0
    for part in range(4):
        n = 250_000
        values = rng.standard_normal(n)
        expected += float(values.sum())
        table = pa.table({"model_id": np.char.add("m", (np.arange(n) % 5000).astype(str)), "zoo": ["z"] * n,
                          "epoch": pa.array(np.ones(n, np.int32)), "family": ["f"] * n,
                          "name": np.char.add("metric_", (np.arange(n) % 50).astype(str)), "value": values,
                          "settings_hash": ["0"] * n, "settings": ["{}"] * n}, schema=SCHEMAS["metrics"])
        pq.write_table(table, tmp_path / "root" / "tables" / "metrics" / f"part{part}.parquet", row_group_size=20_000)
    z = zoo.open(store.root)
    for _ in range(3):
        result = z.sql("SELECT name, sum(value) AS s, count(*) AS n FROM metrics GROUP BY name")
        assert result["n"].sum() == 1_000_000 and result["s"].sum() == pytest.approx(expected, abs=1e-6)
