"""Bytes a remote query and a remote pull fetch from a published zoo, counted by the server.

    python -m zoo generate digits-mlp --root R        # (and `zoo metrics digits-mlp --root R` for metadata)
    python perf/remote_bytes.py --root R [--zoo digits-mlp] [--where "width = 128"] [--epochs all]

Publishes the zoo into a temporary folder, serves it with Debian's nginx on loopback (tests/servers.py)
and reads the bytes each step made nginx send from its own access log:
  1. a metadata query over HTTP (`zoo.open(URL).sql(...)`: mean final test accuracy per cell, a join
     of models and curves), against all the published bytes;
  2. `zoo pull URL --where ...` of one width, split into weight bytes (against the selection's share
     of the weights, from the checkpoint index) and metadata bytes (the fixed cost: the manifest and
     the metadata tables, fetched whole to be checked against their sha256).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zoo  # noqa: E402
from tests.servers import nginx_serving  # noqa: E402
from zoo.cli import main as zoo_cli  # noqa: E402

QUERY = ("select m.width, m.batch_size, avg(c.test_acc) as acc from models m join curves c "
         "on c.model_id = m.model_id and c.epoch = m.epochs group by all order by all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--zoo", default="digits-mlp")
    parser.add_argument("--where", default="width = 128")
    parser.add_argument("--epochs", default="all")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        assert zoo_cli(["publish", args.zoo, "--root", args.root, "--out", str(tmp / "pub"), "--epochs", args.epochs]) == 0
        print(f"published in {time.perf_counter() - started:.1f} s")
        manifest = json.loads((tmp / "pub" / "manifest.json").read_text())
        total = sum(e["size"] for e in manifest["files"]) + (tmp / "pub" / "manifest.json").stat().st_size
        weights_total = sum(e["size"] for e in manifest["files"] if e["path"].startswith("weights/"))
        index = f"{tmp}/pub/data/checkpoints.parquet"
        models = f"{tmp}/pub/data/models.parquet"
        selected_weights, n_selected, n_all = duckdb.connect().execute(
            f"select sum(byte_length), count(distinct c.model_id), (select count(*) from '{models}') from '{index}' c "
            f"join '{models}' m using (model_id) where {args.where}").fetchone()
        with nginx_serving(tmp) as web:
            url = f"{web.url}pub"
            web.reset_log()
            t = time.perf_counter()
            rows = zoo.open(url).sql(QUERY)
            query_s = time.perf_counter() - t
            query_bytes, query_requests = web.bytes_sent(), len(web.requests())
            web.reset_log()
            t = time.perf_counter()
            assert zoo_cli(["pull", url, "--where", args.where, "--root", str(tmp / "local"), "--no-progress",
                            "--epochs", args.epochs]) == 0
            pull_s = time.perf_counter() - t
            served = web.requests()
        weight_bytes = sum(r["bytes"] for r in served if "/weights/" in r["uri"])
        meta_bytes = sum(r["bytes"] for r in served if "/weights/" not in r["uri"])
        print(f"\n{args.zoo}: {n_all} models, published {total / 1e6:.1f} MB ({weights_total / 1e6:.1f} MB of weights, "
              f"{(total - weights_total) / 1e6:.2f} MB of metadata), epochs {args.epochs}")
        print("| step | bytes fetched | share | requests | seconds |")
        print("|---|---|---|---|---|")
        print(f"| metadata query ({len(rows)} cells: mean final test accuracy per cell) | {query_bytes / 1e3:.1f} kB | "
              f"{query_bytes / total:.3%} of the published bytes | {query_requests} | {query_s:.2f} |")
        print(f"| pull `{args.where}` ({n_selected} of {n_all} models): weights | {weight_bytes / 1e6:.2f} MB | "
              f"{weight_bytes / selected_weights:.3f}x the selection's {selected_weights / 1e6:.2f} MB "
              f"({selected_weights / weights_total:.1%} of the weights) | {sum('/weights/' in r['uri'] for r in served)} | {pull_s:.2f} |")
        print(f"| the same pull: metadata (fixed: manifest and tables, fetched whole and checked) | {meta_bytes / 1e6:.2f} MB | "
              f"{meta_bytes / total:.2%} of the published bytes | {sum('/weights/' not in r['uri'] for r in served)} | |")


if __name__ == "__main__":
    main()
