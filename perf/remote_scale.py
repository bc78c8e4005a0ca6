"""A published index of 1,000,000 models (metadata only), queried over HTTP on loopback.

    python perf/remote_scale.py [--models 1000000]

Writes a published folder in the layout `zoo publish` writes (data/models.parquet and the checkpoint
index data/checkpoints.parquet, both sorted by grid position, in row groups of about
1 MB; a manifest with sizes and sha256) for a generated zoo: a 100 x 100 grid (load x temperature)
x 100 seeds, one final checkpoint each, every model with a realistic JSON config. No weights (the
shards are not needed to query). Serves it with Debian's nginx (tests/servers.py) and reports, from
nginx's access log, the bytes and the seconds of (a) a count of models per cell, (b) the ids of
a 1% selection (one load value) and (c) where that selection's weights lie, each through `zoo.open(URL).sql(...)` on a fresh connection.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zoo  # noqa: E402
from tests.servers import nginx_serving  # noqa: E402
from zoo.published import FORMAT  # noqa: E402

from zoo.publish import write_table as write  # noqa: E402  (the writer zoo publish uses)


def generate(folder: Path, n: int) -> None:
    side = round(n ** (1 / 3))
    load, temperature, seed = (a.ravel() for a in np.meshgrid(np.arange(side) * 4.0 + 4, np.arange(side) * 8.0 + 8,
                                                                np.arange(side), indexing="ij"))
    ids = [hashlib.sha256(f"{l}-{t}-{s}".encode()).hexdigest()[:20] for l, t, s in zip(load, temperature, seed)]
    config = [json.dumps({"zoo": "scale", "architecture": {"name": "mlp", "depth": 2, "width": int(l)},
                          "dataset": {"name": "digits"}, "training": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
                                                                      "epochs": 20, "batch_size": int(t)}, "seed": int(s)})
              for l, t, s in zip(load, temperature, seed)]
    models = pa.table({"model_id": ids, "zoo": ["scale"] * len(ids), "arch": ["mlp"] * len(ids), "seed": seed.astype(np.int64),
                       "load_name": ["width"] * len(ids), "load": load, "temperature_name": ["batch_size"] * len(ids),
                       "temperature": temperature, "width": load.astype(np.int64), "batch_size": temperature.astype(np.int64),
                       "n_params": (64 * load + load * load + 10 * load).astype(np.int64), "config": config})
    (folder / "data").mkdir(parents=True)
    write(models, folder / "data" / "models.parquet")
    n_values = models.column("n_params")
    index = pa.table({"model_id": ids, "epoch": pa.array(np.full(len(ids), 20), pa.int32()), "n_params": n_values,
                      "n_values": n_values, "sha256": [hashlib.sha256(i.encode()).hexdigest() for i in ids],
                      "file": [f"weights/epoch-20/values-{v}-0000.safetensors" for v in n_values.to_pylist()],
                      "byte_offset": pa.array(np.zeros(len(ids), np.int64)), "byte_length": pa.compute.multiply(n_values, 4),
                      "load": load, "temperature": temperature, "seed": seed.astype(np.int64)})
    write(index, folder / "data" / "checkpoints.parquet")  # (in grid order, with the grid columns, as zoo.publish)
    files = [{"path": p.relative_to(folder).as_posix(), "size": p.stat().st_size,
              "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in sorted(folder.rglob("*.parquet"))]
    (folder / "manifest.json").write_text(json.dumps({"format": FORMAT, "zoo": "scale", "files": files}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "scale"
        t = time.perf_counter()
        generate(folder, args.models)
        total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        print(f"generated {args.models:,} models' metadata in {time.perf_counter() - t:.1f} s: {total / 1e6:.1f} MB published")
        queries = {
            "count of models per cell": "select load, temperature, count(*) n from models group by all",
            "ids of a 1% selection (one load value)": "select model_id from models where load = 200",
            "checkpoint rows of that selection": "select model_id, file, byte_offset from checkpoints where load = 200",
        }
        print("| query (fresh connection over HTTP) | rows | bytes fetched | share of published | requests | seconds |")
        print("|---|---|---|---|---|---|")
        with nginx_serving(Path(tmp)) as web:
            for name, query in queries.items():
                web.reset_log()
                t = time.perf_counter()
                rows = zoo.open(f"{web.url}scale").sql(query)
                seconds = time.perf_counter() - t
                sent, requests = web.bytes_sent(), len(web.requests())
                print(f"| {name} | {len(rows):,} | {sent / 1e6:.2f} MB | {sent / total:.2%} | {requests} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
