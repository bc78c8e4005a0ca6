"""A published zoo queried and pulled over real servers on loopback: Debian's nginx (HTTP, range
requests) and moto's standalone S3 server (an emulator); tests/servers.py starts them."""

from __future__ import annotations

import json

import numpy as np
import pytest

import zoo
from zoo.cli import main

from .servers import nginx_serving, s3_serving
from .test_generate import fingerprint

QUERIES = ("select * from models order by model_id",
           "select * from curves order by model_id, epoch",
           "select model_id, epoch, family, name, value from metrics order by all",
           "select width, batch_size, round(avg(test_acc), 9) acc from models m join curves c using (model_id) "
           "where c.epoch = 3 group by all order by all")


@pytest.fixture(scope="module")
def published(smoke_reference, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    assert main(["publish", "smoke", "--root", str(smoke_reference), "--out", str(folder / "smoke"), "--epochs", "all"]) == 0
    return folder


def _same_as_local(local, remote) -> None:
    for query in QUERIES:
        a, b = local.sql(query), remote.sql(query)
        assert len(a) and a.equals(b), query
    ids = list(local.models()["model_id"])
    same = [m for m in ids if local.spec(m).architecture["width"] == 32]
    assert np.array_equal(local.weights(same).numpy(), remote.weights(same).numpy())


def test_http_queries_and_pulls_read_only_what_they_need(smoke_reference, published, tmp_path, capsys, monkeypatch):
    with nginx_serving(published) as web:
        url = f"{web.url}smoke"
        remote = zoo.open(url)
        _same_as_local(zoo.open(smoke_reference), remote)
        assert main(["sql", "--root", url, "--format", "json", "select count(*) as n from models where width = 8"]) == 0
        assert json.loads(capsys.readouterr().out) == [{"n": 4}]
        web.reset_log()
        remote.sql("select count(*) from models")  # (a fresh query of one small table)
        total = sum(e["size"] for e in json.loads((published / "smoke" / "manifest.json").read_text())["files"])
        requests = web.requests()
        assert all(r["uri"].startswith("/smoke/data/") or r["uri"].endswith("manifest.json") for r in requests)
        assert web.bytes_sent() < total
        web.reset_log()
        root = tmp_path / "pulled"
        assert main(["pull", url, "--where", "width = 32 and batch_size = 32", "--root", str(root), "--no-progress"]) == 0
        expected = {k: v for k, v in fingerprint(smoke_reference).items()
                    if k[0] in set(zoo.open(smoke_reference).sql("select model_id from models where width = 32 and batch_size = 32")["model_id"])}
        assert fingerprint(root) == expected and len(expected) == 6
        weight_requests = [r for r in web.requests() if "/weights/" in r["uri"] and r["method"] == "GET"]
        assert weight_requests and all(r["status"] == 206 for r in weight_requests)  # byte ranges, never a whole shard
        fetched = sum(r["bytes"] for r in weight_requests)
        assert fetched == 6 * 3466 * 4  # exactly the two models' rows at three epochs
        assert len(weight_requests) == 3  # the two seeds' rows lie side by side: one range per epoch


def test_s3_queries_and_pulls_match_the_local_root(smoke_reference, published, tmp_path, monkeypatch, capsys):
    with s3_serving(published) as s3:
        url = f"{s3.url}smoke"
        remote = zoo.open(url, storage_options=s3.storage_options)
        _same_as_local(zoo.open(smoke_reference), remote)
        monkeypatch.setenv("ZOO_STORAGE_OPTIONS", json.dumps(s3.storage_options))
        root = tmp_path / "pulled"
        assert main(["pull", url, "--where", "width = 8", "--root", str(root), "--no-progress"]) == 0
        want = set(zoo.open(smoke_reference).sql("select model_id from models where width = 8")["model_id"])
        assert fingerprint(root) == {k: v for k, v in fingerprint(smoke_reference).items() if k[0] in want}
        assert main(["verify", "--root", str(root)]) == 0
        capsys.readouterr()
        monkeypatch.setenv("ZOO_STORAGE_OPTIONS", "{not json")
        assert main(["sql", "--root", url, "select 1"]) == 2
        assert "ZOO_STORAGE_OPTIONS is not JSON" in capsys.readouterr().err


def test_an_unreachable_or_foreign_url_is_one_line(tmp_path, capsys):
    with nginx_serving(tmp_path) as web:
        (tmp_path / "notazoo").mkdir()
        (tmp_path / "notazoo" / "manifest.json").write_text('{"format": "something else"}')
        for url, message in ((f"{web.url}missing", "no published zoo"), (f"{web.url}notazoo", "not a published zoo"),
                             ("nosuch://x/y", "Protocol not known")):
            assert main(["sql", "--root", url, "select 1"]) == 2
            err = capsys.readouterr().err
            assert message in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_digits_mlp_over_http_a_metadata_query_and_a_one_width_pull_fetch_their_share(tmp_path):
    """The issue's byte budgets, measured by nginx: a metadata query under 1% of the published bytes;
    pulling one width (24 of 192 models) at most 1.5x that selection's share of the weights plus the
    metadata (perf/remote_bytes.py prints the same figures)."""
    root = tmp_path / "root"
    assert main(["generate", "digits-mlp", "--root", str(root), "--no-progress"]) == 0
    served = tmp_path / "served"
    assert main(["publish", "digits-mlp", "--root", str(root), "--out", str(served / "d"), "--epochs", "all"]) == 0
    manifest = json.loads((served / "d" / "manifest.json").read_text())
    total = sum(e["size"] for e in manifest["files"])
    metadata = sum(e["size"] for e in manifest["files"] if not e["path"].startswith("weights/"))
    index = zoo.open(served / "d").sql("select sum(byte_length) b from checkpoints c join models m using (model_id) where m.width = 128")
    share = float(index["b"][0])
    with nginx_serving(served) as web:
        url = f"{web.url}d"
        local = zoo.open(root)
        web.reset_log()
        query = ("select width, batch_size, round(avg(test_acc), 9) acc from models m join curves c using (model_id) "
                 "group by all order by all")  # (rounded: a float sum depends on the threads' order)
        assert zoo.open(url).sql(query).equals(local.sql(query))
        assert web.bytes_sent() < 0.01 * total
        web.reset_log()
        assert main(["pull", url, "--where", "width = 128", "--root", str(tmp_path / "mine"), "--no-progress"]) == 0
        weights = web.bytes_sent("/d/weights/")
        assert weights <= 1.5 * share and web.bytes_sent() <= 1.5 * share + metadata + 1_000_000
    want = set(local.sql("select model_id from models where width = 128")["model_id"])
    assert len(want) == 24
    assert fingerprint(tmp_path / "mine") == {k: v for k, v in fingerprint(root).items() if k[0] in want}
