"""Integrity: checksums recorded at write, `zoo verify` finds and quarantines damage, the rest
of the zoo stays queryable, and a rerun of generate restores the same bits."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import zoo
from generators.launcher import LaunchOptions, generate
from zoo.catalog import load_catalog
from zoo.cli import main
from zoo.errors import ZooError
from zoo.integrity import MANIFEST, check_file, digest, recorded, sweep_temporary, temporary_name
from zoo.schemas import SCHEMAS
from zoo.storage import Store
from zoo.verify import verify

from .conftest import REPO
from .test_generate import fingerprint

DAMAGE_COUNT = {"detected": 0}


def data_files(root):
    return sorted(p for p in (root / "tables").rglob("*") if p.is_file() and not p.name.startswith("."))


@pytest.fixture
def copy(smoke_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(smoke_root, root)
    return root


def damage(path, how: str, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    elif how == "truncate":
        data = data[: rng.randrange(len(data))]
    elif how == "append":
        data += b"\0" * rng.randrange(1, 64)
    elif how == "zero-block":
        i = rng.randrange(len(data))
        n = min(len(data) - i, 512)
        if any(data[i:i + n]):
            data[i:i + n] = bytes(n)
        else:  # (already zeros: zeroing would change nothing, so flip a bit instead)
            data[i] ^= 1
    path.write_bytes(bytes(data))


def test_every_file_a_generate_writes_has_its_checksum_on_record(copy):
    files = data_files(copy)
    for path in files:
        assert digest(path) in recorded(path.parent)[path.name], path
    report = verify(Store(copy))
    assert report.intact and report.checked == len(files) == report.recorded
    assert report.weight_rows == 8 * 3  # every checkpoint's weights hashed again


def test_random_damage_to_any_file_is_detected(copy):
    rng = random.Random(7)
    files = data_files(copy)
    for trial in range(60):
        path = rng.choice(files)
        original = path.read_bytes()
        how = ["flip", "truncate", "append", "zero-block"][trial % 4]
        damage(path, how, rng)
        if path.read_bytes() == original:
            continue
        table = path.relative_to(copy / "tables").parts[0]
        problem, _ = check_file(path, recorded(path.parent)[path.name], table)
        assert problem, f"{how} of {path.name} went unnoticed"
        DAMAGE_COUNT["detected"] += 1
        path.write_bytes(original)
    assert DAMAGE_COUNT["detected"] >= 55


def test_a_file_without_a_record_is_decoded_and_its_weight_hashes_checked(copy):
    """A zoo copied without its manifests: truncation is caught by decoding, and a weight
    changed in a re-encoded checkpoint file by the per-checkpoint sha256."""
    for manifest in (copy / "tables").rglob(MANIFEST):
        manifest.unlink()
    pack = min((copy / "tables" / "checkpoints" / "smoke").glob("pack-*.parquet"))  # (one per trained stack)
    table = pq.read_table(pack)
    weights = table.column("weights").to_pylist()
    weights[5][3] += 1e-3
    pq.write_table(table.set_column(table.column_names.index("weights"), "weights", pa.array(weights, pa.list_(pa.float32()))), pack)
    curves = min((copy / "tables" / "curves" / "smoke").glob("pack-*.parquet"))
    os.truncate(curves, curves.stat().st_size - 9)
    report = verify(Store(copy), repair=False)
    problems = {d.path.parts[1]: d.problem for d in report.damaged}
    assert problems.keys() == {"checkpoints", "curves"} and report.recorded == 0
    assert "checkpoint row 5: the weights do not match their sha256" == problems["checkpoints"]
    assert problems["curves"].startswith("unreadable")
    assert pack.exists() and curves.exists()  # --report-only moves nothing


def test_damaged_files_are_quarantined_the_rest_queryable_and_generate_restores_them(copy, smoke_root, tmp_path, capsys):
    rng = random.Random(3)
    folder = copy / "tables"
    ckpt = min((folder / "checkpoints" / "smoke").glob("pack-*.parquet"))  # one trained stack's
    matrix = ckpt.with_suffix(".safetensors")
    held = len(set(pq.read_table(ckpt, columns=["model_id"]).column("model_id").to_pylist()))
    damage(ckpt, "truncate", rng)
    damage(matrix, "flip", rng)
    damage(folder / "cells" / "_empty.parquet", "append", rng)
    with pytest.raises(ZooError, match="damaged file, or a link out of the root: run `zoo verify"):  # named
        zoo.open(copy)
    assert main(["verify", "--root", str(copy)]) == 1
    out = capsys.readouterr().out
    for path in (ckpt, matrix, folder / "cells" / "_empty.parquet"):
        assert f"damaged  {path.relative_to(copy)}:" in out and "moved to quarantine/" in out
    assert not ckpt.exists() and not matrix.exists()
    assert check_file(folder / "cells" / "_empty.parquet", None, "cells") == (None, 0)  # written anew
    assert f"un-stored {held} models of smoke" in out and 0 < held < 8
    assert len(list((copy / "quarantine").rglob("*.parquet.*"))) == 3  # two damaged + the un-stored models pack
    z = zoo.open(copy)  # the rest is queryable
    assert len(z.sql("select * from curves")) == 8 * 4 and z.sql("select count(*) n from models")["n"][0] == 8 - held
    assert z.sql("select count(*) n from cells")["n"][0] == 0  # the base file is back
    report = generate(load_catalog(REPO / "catalog.yaml")["smoke"], Store(copy),
                      LaunchOptions(executor="debug", jobs_dir=tmp_path / "jobs"), progress=False)
    assert report.trained == held
    assert fingerprint(copy) == fingerprint(smoke_root)  # the same bits, no duplicate rows
    assert len(zoo.open(copy).sql("select * from curves")) == 8 * 4
    assert main(["verify", "smoke", "--root", str(copy)]) == 0 and capsys.readouterr().out.strip().endswith("intact")


def test_a_link_out_of_the_root_is_refused_and_quarantined(copy, tmp_path, capsys):
    """A zoo from elsewhere (a tarball can hold links) never reads outside its root."""
    secret = tmp_path / "outside" / "secret.parquet"
    secret.parent.mkdir()
    pq.write_table(pa.table({"model_id": ["SECRET"], "zoo": ["smoke"]}), secret)
    link = copy / "tables" / "models" / "smoke" / "evil.parquet"
    link.symlink_to(secret)
    assert main(["sql", "select model_id from models", "--root", str(copy)]) == 2
    assert "evil.parquet" in capsys.readouterr().err
    assert main(["verify", "--root", str(copy)]) == 1
    assert "damaged  tables/models/smoke/evil.parquet: not a regular file (a link to" in capsys.readouterr().out
    assert not link.is_symlink() and secret.exists()  # the link moved to quarantine/, its target untouched
    assert "SECRET" not in zoo.open(copy).sql("select model_id from models")["model_id"].tolist()


def test_temporary_files_of_dead_writers_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    mine = temporary_name(tmp_path / "a.parquet")
    theirs = tmp_path / mine.name.replace(f".{os.getpid()}.", f".{int(dead.stdout)}.")
    mine.write_bytes(b"x")
    theirs.write_bytes(b"x")
    assert sweep_temporary(tmp_path) == 1
    assert mine.exists() and not theirs.exists()


def test_verify_of_a_missing_zoo_name_is_a_clear_error(copy, capsys):
    assert main(["verify", "../etc", "--root", str(copy)]) == 2
    assert "invalid zoo name" in capsys.readouterr().err


def test_a_root_whose_creation_was_killed_stays_queryable_and_a_rerun_completes_it(copy):
    # a writer killed between creating a table's folder and committing its first file
    folder = copy / "tables" / "benchmark_results"
    shutil.rmtree(folder)
    (folder / "smoke").mkdir(parents=True)
    temporary_name(folder / "smoke" / "x.parquet").write_bytes(b"half")
    shutil.rmtree(copy / "tables" / "cells")
    (copy / "tables" / "cells").mkdir()
    z = zoo.open(copy)
    assert "benchmark_results" not in z.store.tables()
    assert len(z.sql("select * from models")) == 8
    empty = z.sql("select * from cells")  # an empty view with the table's columns
    assert empty.empty and list(empty.columns) == SCHEMAS["cells"].names
    Store(copy, create=True)
    assert "benchmark_results" in zoo.open(copy).store.tables()
    assert len(zoo.open(copy).sql("select * from benchmark_results")) == 0


def test_every_data_file_gets_the_mode_the_umask_gives_new_files(smoke_root):
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in data_files(smoke_root)}
    assert any(name.endswith(".safetensors") for name in modes)  # (safetensors alone would make them 0600)
    assert set(modes.values()) == {0o666 & ~umask}, modes
