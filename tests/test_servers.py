"""The loopback servers of tests/servers.py (nginx over HTTP, moto's S3 emulator), and the clients the
remote-zoo code reads them with: fsspec's HTTP file system, s3fs, pyarrow, DuckDB (issue #16)."""

from __future__ import annotations

import datetime
import email.utils
import urllib.error
import urllib.request
from pathlib import Path

import duckdb
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.http import HTTPFileSystem

from zoo.rootfs import ThreadPositionedFile

from . import servers
from .servers import nginx_serving, s3_serving

BIG = "blobs/big.bin"  # 1,000,000 random bytes
PARQUET = "tables/t.parquet"  # 200,000 rows in 8 row groups: id, x, y, s


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("served")
    rng = np.random.default_rng(16)
    (root / BIG).parent.mkdir()
    (root / BIG).write_bytes(rng.bytes(1_000_000))
    n = 200_000
    table = pa.table(
        {
            "id": np.arange(n, dtype=np.int64),
            "x": rng.random(n),
            "y": rng.random(n),
            "s": [f"model-{i % 997}" for i in range(n)],
        }
    )
    (root / PARQUET).parent.mkdir()
    pq.write_table(table, root / PARQUET, row_group_size=n // 8)
    return root


@pytest.fixture(scope="module")
def web(folder):
    with nginx_serving(folder) as server:
        yield server


@pytest.fixture(scope="module")
def s3(folder):
    with s3_serving(folder) as server:
        yield server


def get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    with servers.urlopen(urllib.request.Request(url, headers=headers or {})) as r:
        return r.status, r.read()


def http_fs() -> HTTPFileSystem:
    return fsspec.filesystem("http", skip_instance_cache=True)


# ------------------------------------------------------------------------------------ nginx


def test_nginx_serves_the_folder_with_ranges_and_logs_bytes(web, folder):
    data = (folder / BIG).read_bytes()
    web.reset_log()
    assert get(web.url + BIG) == (200, data)
    assert get(web.url + BIG, {"Range": "bytes=100-199"}) == (206, data[100:200])
    with pytest.raises(urllib.error.HTTPError) as missing:
        get(web.url + "blobs/absent.bin")
    assert missing.value.code == 404

    log = web.requests()
    assert [(r["method"], r["uri"], r["status"], r["bytes"], r["range"]) for r in log] == [
        ("GET", "/" + BIG, 200, 1_000_000, None),
        ("GET", "/" + BIG, 206, 100, "bytes=100-199"),
        ("GET", "/blobs/absent.bin", 404, log[2]["bytes"], None),
    ]
    assert web.bytes_sent("/" + BIG) == 1_000_100
    assert web.bytes_sent() == 1_000_100 + log[2]["bytes"]  # (nginx's small 404 page)


def test_fsspec_http_reads_one_byte_range(web, folder):
    data = (folder / BIG).read_bytes()
    fs = http_fs()
    web.reset_log()
    assert fs.cat_file(web.url + BIG, start=100, end=200) == data[100:200]
    assert fs.size(web.url + BIG) == len(data)
    ranged = [r for r in web.requests() if r["method"] == "GET"]
    assert [(r["status"], r["bytes"], r["range"]) for r in ranged] == [(206, 100, "bytes=100-199")]


def test_nginx_stops_and_cleans_up(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    with nginx_serving(tmp_path) as server:
        assert get(server.url + "a.txt") == (200, b"a")
        proc, workdir = server.proc, server.workdir
        assert (workdir / "nginx.pid").read_text().strip() == str(proc.pid)
    assert proc.poll() is not None
    assert not workdir.exists()
    with pytest.raises(OSError):
        get(server.url + "a.txt")


def test_missing_nginx_fails_with_the_install_line(tmp_path, monkeypatch):
    monkeypatch.setattr(servers.shutil, "which", lambda name: None)
    monkeypatch.setattr(servers.os, "access", lambda path, mode: False)
    with pytest.raises(RuntimeError, match=r"apt-get install .*nginx-light"):
        with nginx_serving(tmp_path):
            pass


# ------------------------------------------------------------------------------------ S3 (moto)


def test_s3_serves_the_folder_with_ranges(s3, folder):
    import s3fs

    fs = s3fs.S3FileSystem(**s3.storage_options, skip_instance_cache=True)
    data = (folder / BIG).read_bytes()
    assert sorted(fs.find(s3.bucket)) == sorted(f"zoo/{p}" for p in (BIG, PARQUET))
    assert fs.size(f"zoo/{BIG}") == len(data)
    assert fs.cat_file(f"zoo/{BIG}", start=100, end=200) == data[100:200]
    assert fs.cat_file(s3.url + BIG) == data
    assert {"method": "GET", "uri": f"/zoo/{BIG}", "status": 206} in s3.requests()


# ------------------------------------------------------------------------------------ Parquet


def test_pyarrow_reads_the_same_table_from_both_servers(web, s3, folder):
    import s3fs

    local = pq.read_table(folder / PARQUET)
    over_http = pq.read_table(web.url + PARQUET, filesystem=http_fs())
    over_s3 = pq.read_table(s3.url + PARQUET, filesystem=s3fs.S3FileSystem(**s3.storage_options, skip_instance_cache=True))
    assert over_http.equals(local) and over_s3.equals(local)


class RangeFile(ThreadPositionedFile):
    """A remote file for DuckDB: each read is one ranged GET of exactly the bytes asked for, the
    position each thread's own (zoo.rootfs.ThreadPositionedFile says why)."""

    def __init__(self, fs: HTTPFileSystem, url: str, size: int):
        self.fs, self.url = fs, url
        super().__init__(url, size)

    def read_at(self, offset: int, size: int) -> bytes:
        return self.fs.cat_file(self.url, start=offset, end=offset + size)


class DuckHTTPFileSystem(HTTPFileSystem):
    """fsspec's HTTP file system as DuckDB needs it (`con.register_filesystem(...)`), with no httpfs
    extension. As is, fsspec's fails in DuckDB ("http: modified() is not implemented"); `exists` is
    an unranged GET (nginx logs ~4 MB sent before the client hangs up) and reads go through 5 MB
    read-ahead blocks (a one-column query fetched the whole file). Here: modified() from the
    Last-Modified header, exists() by HEAD, and reads of exactly the bytes DuckDB asks for."""

    async def _exists(self, path, **kwargs) -> bool:
        try:
            await self._info(path, **kwargs)
            return True
        except FileNotFoundError:
            return False

    def modified(self, path) -> datetime.datetime:
        stamp = self.info(path).get("Last-Modified")
        if stamp:
            return email.utils.parsedate_to_datetime(stamp)
        return datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)

    def _open(self, path, mode="rb", **kwargs):
        if mode != "rb":
            raise PermissionError(f"{path}: read-only")
        return RangeFile(self, path, self.size(path))


def test_duckdb_queries_parquet_over_http_through_fsspec(web, folder):
    """DuckDB reads only the row groups and columns a query needs, in ranged GETs (the access log)."""
    url = web.url + PARQUET
    meta = pq.ParquetFile(folder / PARQUET).metadata
    column_bytes = {
        meta.schema.column(c).name: sum(meta.row_group(g).column(c).total_compressed_size for g in range(meta.num_row_groups))
        for c in range(meta.num_columns)
    }
    file_bytes = (folder / PARQUET).stat().st_size
    # (an exact, order-free digest of every value: float sums differ in the last digit by thread order)
    everything = "select count(*), sum(id), min(s), max(s), bit_xor(hash(id, x, y, s)) from read_parquet('{}')"
    expected = duckdb.connect().sql(everything.format(folder / PARQUET)).fetchall()

    def query(sql: str):
        con = duckdb.connect()  # a fresh connection each time: nothing from DuckDB's file cache
        con.register_filesystem(DuckHTTPFileSystem(skip_instance_cache=True))
        web.reset_log()
        rows = con.sql(sql).fetchall()
        log = web.requests()
        assert all(r["range"] for r in log if r["method"] == "GET"), log  # no whole-file GET
        return rows, web.bytes_sent()

    for _ in range(3):  # every column, from DuckDB's threads at once, gives the local answer
        rows, sent = query(everything.format(url))
        assert rows == expected
        assert sent <= 1.05 * file_bytes

    rows, sent = query(f"select count(*) from read_parquet('{url}')")
    assert rows == [(200_000,)] and sent < 0.05 * file_bytes  # the footer only

    rows, sent = query(f"select sum(x) from read_parquet('{url}')")
    assert sent < column_bytes["x"] + 0.05 * file_bytes  # one column of four

    rows, sent = query(f"select s from read_parquet('{url}') where id = 5")
    assert rows == [("model-5",)] and sent < 0.35 * file_bytes  # one row group of eight (min/max of id)
