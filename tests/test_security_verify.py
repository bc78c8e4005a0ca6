"""Issue 13, the writers and `zoo verify` against an untrusted or tampered root: `zoo report` writes
only inside --out, exports refuse `..` and absolute paths, and `zoo verify` finds files deleted
behind its manifest, links to folders, unsafe part names, a planted zoo.duckdb, and gives up on
a reader that holds the root after its --timeout."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import time

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import zoo
from generators.launcher import LaunchOptions, generate
from zoo.catalog import load_catalog
from zoo.cli import main
from zoo.errors import ZooError
from zoo.schemas import SCHEMAS
from zoo.storage import Store

from .conftest import REPO


@pytest.fixture
def copy(smoke_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(smoke_root, root)
    Store(root).write_index()  # (a copy's index points to the original: opening would repair it)
    return root


def tree(base, skip=None) -> dict[str, str]:
    """Every entry under `base` (not following links) -> its sha256, link target or 'dir'."""
    out = {}
    for path in sorted(base.rglob("*")):
        if skip and path.is_relative_to(skip):
            continue
        key = str(path.relative_to(base))
        if path.is_symlink():
            out[key] = "-> " + str(path.readlink())
        elif path.is_dir():
            out[key] = "dir"
        else:
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def contents(root) -> dict[str, list[str]]:
    """What the zoo stores (row by row, in a fixed order), minus the times a rerun changes."""
    z = zoo.open(root)
    columns = {"models": "model_id, zoo, n_params, status, config", "curves": "*",
               "checkpoints": "model_id, epoch, n_values, sha256", "tensors": "*"}
    return {t: sorted(map(str, z.sql(f"select {c} from {t}").itertuples(index=False))) for t, c in columns.items()}


def regenerate(root, tmp_path) -> int:
    report = generate(load_catalog(REPO / "catalog.yaml")["smoke"], Store(root),
                      LaunchOptions(executor="debug", jobs_dir=tmp_path / "jobs"), progress=False)
    assert not report.failed
    return report.trained


@contextlib.contextmanager
def holding(path, kind):
    """A flock on `path`, as another process (a query, a packer) holds it: a separate open file."""
    with open(path, "a") as handle:
        fcntl.flock(handle, kind)
        yield


# --- zoo report --------------------------------------------------------------------------


def test_report_writes_only_inside_its_folder_whatever_the_stored_names(copy, tmp_path, capsys):
    site = tmp_path / "site"
    out = site / "report"
    (site / "outside").mkdir(parents=True)  # where '../../outside/pwn' leads from out/img
    absolute = tmp_path / "abs" / "pwn"
    absolute.parent.mkdir()
    evil = ["../../outside/pwn", str(absolute), "<img src=x onerror=alert(1)>"]
    rows = [{"task": task, "task_version": 1, "method": "m", "parameters": json.dumps({"p": p}), "parameters_hash": str(p),
             "zoo": zoo_name, "unit": "population", "load": None, "temperature": None, "phase": "I", "metric": "acc",
             "value": p, "higher_is_better": True, "status": "ok", "error": None, "seed": 0,
             "settings": json.dumps({"metrics": ["acc"]}), "code_version": "x", "created_at": None}
            for task, zoo_name in [(evil[0], "smoke"), (evil[1], "smoke"), ("t", evil[0]), ("t", evil[1]), (evil[2], evil[2])]
            for p in (0.1, 0.5)]
    Store(copy).write_part("benchmark_results", "smoke", "evil", pa.Table.from_pylist(rows, schema=SCHEMAS["benchmark_results"]))
    before = tree(tmp_path, skip=out)
    try:
        rc = main(["report", "--root", str(copy), "--out", str(out)])
    except Exception as e:  # (before the fix, some names also crashed it: look at what it wrote first)
        rc = repr(e)
    assert tree(tmp_path, skip=out) == before  # nothing written, moved or removed outside --out
    assert rc == 0, capsys.readouterr().err
    page = (out / "index.html").read_text()
    images = page.split("<img src='img/")[1:]
    assert len(images) == 5 * 2  # a heatmap and a sweep per (task, zoo)
    assert all((out / "img" / name.split("'")[0]).is_file() for name in images)
    assert sorted(p.parent for p in out.rglob("*.png")) == [out / "img"] * 10
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page  # zoo text is escaped


# --- Root.export ----------------------------------------------------------------------------


def test_export_refuses_an_absolute_path_and_a_dotdot_component(copy, tmp_path, monkeypatch):
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    z = zoo.open(copy)
    model_id = z.sql("select model_id from models limit 1").model_id[0]
    for path in ("../x.safetensors", "a/../../x.safetensors", str(tmp_path / "abs.safetensors")):
        with pytest.raises(ZooError) as e:
            z.export(model_id, path)
        assert "\n" not in str(e.value) and repr(path) in str(e.value)
    assert sorted(p.name for p in tmp_path.rglob("*.safetensors") if not p.is_relative_to(copy)) == []
    z.export(model_id, "m.safetensors")  # a plain relative path is written
    assert (work / "m.safetensors").stat().st_size > 0


# --- zoo verify: files gone behind the manifest ---------------------------------------------------


def test_verify_reports_a_deleted_pack_and_generate_restores_its_models(copy, smoke_root, tmp_path, capsys):
    pack = min((copy / "tables" / "curves" / "smoke").glob("pack-*.parquet"))  # (one per trained stack)
    held = pq.read_table(pack, columns=["model_id"]).column("model_id").unique().to_pylist()
    pack.unlink()
    assert main(["verify", "--root", str(copy)]) == 1
    out = capsys.readouterr().out
    assert f"damaged  {pack.relative_to(copy)}: listed in the manifest but missing\n" in out
    assert f"un-stored {len(held)} models of smoke" in out
    stored = zoo.open(copy).sql("select model_id from models")["model_id"]  # `zoo status` no longer says 8 done
    assert len(stored) == 8 - len(held) and not set(held) & set(stored)
    assert regenerate(copy, tmp_path) == len(held)
    assert contents(copy) == contents(smoke_root)  # the same bits, no duplicate rows
    assert main(["verify", "--root", str(copy)]) == 0 and capsys.readouterr().out.strip().endswith("intact")


def test_verify_reports_a_deleted_part_and_generate_restores_its_model(smoke_root, tmp_path, capsys):
    root = tmp_path / "root"
    Store(root, create=True)
    with holding(root / ".pack.lock", fcntl.LOCK_EX):  # (a packer is busy: the models stay in per-model parts)
        assert regenerate(root, tmp_path) == 8
    [part, *_] = sorted((root / "tables" / "checkpoints" / "smoke").glob("[!p]*.parquet"))
    part.unlink()
    assert main(["verify", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"damaged  {part.relative_to(root)}: listed in the manifest but missing\n" in out
    assert "un-stored 1 models of smoke" in out
    assert part.stem not in set(zoo.open(root).sql("select model_id from models").model_id)
    assert regenerate(root, tmp_path) == 1
    assert contents(root) == contents(smoke_root)


# --- zoo verify: links, unsafe names -------------------------------------------------------------


def test_verify_quarantines_links_to_folders_at_any_level_never_their_targets(copy, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    zoo_folder = copy / "tables" / "checkpoints" / "smoke"
    shutil.move(zoo_folder, outside / "smoke")  # the weights now live out of the root, reached by a link
    zoo_folder.symlink_to(outside / "smoke", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    (copy / "resume").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (copy / "quarantine").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # moves must not go through it
    before = tree(tmp_path, skip=copy)
    assert main(["verify", "--root", str(copy)]) == 1
    out = capsys.readouterr().out
    for link in ("tables/checkpoints/smoke", "resume", "quarantine"):
        assert f"damaged  {link}: not a regular file (a link to {tmp_path}/" in out, out
        assert not (copy / link).is_symlink()
    assert "un-stored 8 models of smoke" in out
    assert tree(tmp_path, skip=copy) == before  # the targets untouched, nothing written through a link
    moved = sorted(p.name.split(".")[0] for p in (copy / "quarantine").rglob("*") if p.is_symlink())
    assert moved == ["quarantine", "resume", "smoke"]
    assert zoo.open(copy).sql("select count(*) n from checkpoints")["n"][0] == 0


def test_verify_quarantines_a_part_with_an_unsafe_name_and_goes_on(copy, tmp_path, capsys):
    folder = copy / "tables" / "models" / "smoke"
    pack = min(folder.glob("pack-*.parquet"))
    evil = folder / "evil..id.parquet"
    shutil.copyfile(pack, evil)
    curves = min((copy / "tables" / "curves" / "smoke").glob("pack-*.parquet"))
    held = pq.read_table(curves, columns=["model_id"]).column("model_id").unique()
    curves.write_bytes(curves.read_bytes()[:-100])  # damage too, so verify has models to un-store
    assert main(["verify", "--root", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "damaged  tables/models/smoke/evil..id.parquet: an unsafe name" in out
    assert f"un-stored {len(held)} models of smoke" in out and not evil.exists()
    assert len(list((copy / "quarantine" / "tables" / "models" / "smoke").glob("evil..id.parquet.*"))) == 1
    assert main(["sql", "select count(*) n from models", "--root", str(copy), "--format", "csv"]) == 0
    assert capsys.readouterr().out.split() == ["n", str(8 - len(held))]


# --- zoo verify: a reader that holds the root ----------------------------------------------------


@pytest.mark.parametrize("lock, kind", [(".read.lock", fcntl.LOCK_SH), (".pack.lock", fcntl.LOCK_EX)])
def test_verify_gives_up_on_a_reader_or_packer_after_its_timeout_changing_nothing(copy, capsys, lock, kind):
    curves = min((copy / "tables" / "curves" / "smoke").glob("pack-*.parquet"))
    curves.write_bytes(curves.read_bytes()[:-100])  # damage: verify must take the lock to move it
    before = tree(copy)
    with holding(copy / lock, kind):
        start = time.monotonic()
        assert main(["verify", "--root", str(copy), "--timeout", "2"]) == 2
        took = time.monotonic() - start
        captured = capsys.readouterr()
    assert 2 <= took < 5, took
    [line] = captured.err.splitlines()
    assert line.startswith("zoo: error: ") and "holds" in line and "retry" in line and captured.out == ""
    assert tree(copy) == before  # nothing moved, nothing written
    assert main(["verify", "--root", str(copy), "--timeout", "2"]) == 1  # once it is free, the repair goes through
    assert "moved to quarantine/" in capsys.readouterr().out


# --- zoo verify: a planted zoo.duckdb ----------------------------------------------------------


def test_verify_replaces_a_planted_index(copy, tmp_path, capsys):
    secret = tmp_path / "secret.csv"
    secret.write_text("password\nhunter2\n")
    (copy / "zoo.duckdb").unlink()
    con = duckdb.connect(str(copy / "zoo.duckdb"))
    con.execute(f"CREATE VIEW evil AS SELECT * FROM read_csv('{secret}')")
    con.close()
    assert main(["verify", "--root", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "rewrote the index zoo.duckdb" in out and out.strip().endswith("intact")
    con = duckdb.connect(str(copy / "zoo.duckdb"), read_only=True)
    views = {v for (v,) in con.execute("select view_name from duckdb_views() where not internal").fetchall()}
    con.close()
    assert "evil" not in views and {"models", "curves", "checkpoints", "tensors", "benchmark_results"} <= views
