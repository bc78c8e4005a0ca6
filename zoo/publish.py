"""Publish a zoo (or an SQL selection of its models) as a self-contained folder of static files
that any host can serve: a web server, an S3 bucket, a Hugging Face dataset repository.

    README.md                          dataset card; its YAML header is what Hugging Face
                                       `datasets` reads (one config per table)
    manifest.json                      every other file's path, size and sha256; the zoo's
                                       catalog entry, the selection, the versions that wrote it
    data/<table>.parquet               the metadata tables (models, curves, metrics, ...), sorted,
                                       in row groups of about 1 MB so a remote query reads few
    data/checkpoints.parquet           the weight index: model_id, epoch, sha256, and where the
                                       row lies (file, byte_offset, byte_length)
    weights/epoch-E/values-P-K.safetensors   N x P float32 matrices, one per epoch and length
                                       (cut at SHARD_BYTES), rows in the order of the grid, so
                                       one model is one byte range and one cell a few adjacent ones

Publishing reads the root (never writes it) and is deterministic: the same zoo and selection,
with the same library versions, give the same bytes (no timestamps; every table sorted).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from .errors import ZooError
from .integrity import write_error
from .published import FORMAT, MANIFEST, PUBLISHED_TABLES, at_epochs, rows_of, shared_rows, table_path
from .schemas import SCHEMAS
from .storage import Store

SHARD_BYTES = 256 << 20
ROW_GROUP_BYTES = 1 << 20
# the columns of the published checkpoint index (the weights themselves are in the shards), then
# the model's grid position (load, temperature, seed), by which the index is sorted
INDEX_COLUMNS = ("model_id", "epoch", "n_params", "n_values", "sha256", "file", "byte_offset", "byte_length")

COLUMN_DOCS = {
    "model_id": "the model's id: a hash of its full configuration",
    "zoo": "the zoo's name (catalog.yaml)",
    "arch": "architecture", "dataset": "data set", "seed": "training seed",
    "load_name": "the load-like axis (width, data size)", "load": "its value",
    "temperature_name": "the temperature-like axis (batch size, learning rate)", "temperature": "its value",
    "n_params": "trainable parameters", "status": "training outcome", "train_seconds": "training time",
    "created_at": "when the model was stored", "code_version": "the code that trained it",
    "torch_version": "torch that trained it", "config": "the full configuration (JSON)",
    "epoch": "epoch (0: initialisation)", "train_loss": "mean training loss", "train_acc": "training accuracy",
    "test_loss": "mean test loss", "test_acc": "test accuracy",
    "n_values": "length of the flat state (parameters, then buffers)", "sha256": "sha256 of the float32 little-endian state",
    "file": "the safetensors shard holding the state (tensor `weights`, one row per checkpoint)",
    "byte_offset": "where the row starts in that file", "byte_length": "its length in bytes",
    "position": "order of the tensor in the state", "name": "tensor or metric name", "shape": "tensor shape",
    "offset": "where the tensor starts in the flat state", "numel": "its number of values", "dtype": "stored dtype",
    "kind": "parameter or buffer", "family": "metric family", "value": "metric value",
    "settings_hash": "hash of the settings that computed it", "settings": "those settings and versions (JSON)",
    "layer": "layer name", "model_a": "first model of the pair", "model_b": "second model of the pair",
    "split": "train or test", "eigenvalue": "eigenvalue (a node of the density)", "weight": "its weight",
    "n_models": "models in the cell", "n_pairs": "seed pairs in the cell", "phase": "phase label",
    "phase_margin": "distance to the nearest rule threshold", "phase_agreement": "share of seeds agreeing",
    "rules": "the phase rules (JSON)", "task": "benchmark task", "task_version": "its version", "method": "method",
    "parameters": "the method's parameters (JSON)", "parameters_hash": "their hash",
    "unit": "what was scored: a model id, a cell, or the population", "metric": "benchmark metric",
    "higher_is_better": "the metric's direction", "error": "the error, if the method raised",
}
TABLE_DOCS = {
    "models": "one row per model: grid position, seed, size, configuration",
    "curves": "per model and epoch: training and test loss and accuracy",
    "checkpoints": "per model and stored epoch: where its weights lie in `weights/`, and their sha256",
    "tensors": "per model: the layout of its flat state (name, shape, offset)",
    "metrics": "per model and epoch: landscape, spectral and weight-space statistics",
    "layer_metrics": "per model, epoch and layer: spectral and weight statistics",
    "pair_metrics": "per seed pair: CKA, mode connectivity",
    "densities": "per model: the Hessian eigenvalue density (SLQ)",
    "cells": "per grid cell: the phase label and the rules that gave it",
    "benchmark_results": "downstream methods scored per model, cell or population",
}


@dataclass
class PublishReport:
    out: Path
    zoo: str
    models: int
    checkpoints: int
    files: int
    bytes: int

    def summary(self) -> str:
        return (f"{self.zoo}: published {self.models} models, {self.checkpoints} checkpoints in {self.files} files "
                f"({self.bytes / 1e6:.1f} MB) to {self.out}")


def publish(z, zoo: str, out: str | os.PathLike, catalog_entry: dict | None = None, where: str | None = None,
            epochs: str = "final", license: str = "cc-by-4.0") -> PublishReport:
    """Write the models of `zoo` in the root `z` (a zoo.api.Root) that `where` selects (an SQL
    condition on the `models` view), at `epochs` ("final", "all", or "0,5,20"), to the folder
    `out`, which must not exist or be empty."""
    store: Store = z.store
    if not isinstance(store, Store):
        raise ZooError("publish reads a zoo root on this machine (pull a published zoo first)")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ZooError(f"{out} exists and is not an empty folder: publish writes a new folder")
    condition = f" and ({where})" if where else ""
    models = z.sql(f"select model_id from models where zoo = $zoo{condition}", {"zoo": zoo})
    ids = set(models["model_id"])
    if not ids:
        raise ZooError(f"no models of zoo {zoo!r} in {store.root}" + (f" where {where}" if where else ""))
    tables = {t: store.read_zoo(t, zoo) for t in PUBLISHED_TABLES if t != "checkpoints"}
    every = tables["models"]
    tables["models"] = rows_of(every, "model_id", ids).sort_by([("load", "ascending"), ("temperature", "ascending"),
                                                             ("seed", "ascending"), ("model_id", "ascending")])
    order = tables["models"].column("model_id").to_pylist()
    checkpoints = store.read_model_rows("checkpoints", zoo, order, ["model_id", "epoch", "n_params", "n_values", "sha256"])
    checkpoints = at_epochs(checkpoints, epochs, strict=True)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        (partial / "data").mkdir(parents=True)
        index = _write_shards(store, zoo, tables["models"], checkpoints, partial)
        tables["checkpoints"] = index
        for table, rows in _selected(tables, every, ids).items():
            if rows is not None and len(rows):
                write_table(rows, partial / table_path(table))
        files = sorted(p.relative_to(partial).as_posix() for p in partial.rglob("*") if p.is_file())
        card = _card(zoo, catalog_entry, [t for t in PUBLISHED_TABLES if table_path(t) in files], partial, license,
                     len(order), len(index), where, epochs)
        (partial / "README.md").write_text(card)
        files = sorted([*files, "README.md"])
        entries = [{"path": f, "size": (partial / f).stat().st_size, "sha256": _sha256_file(partial / f)} for f in files]
        manifest = {"format": FORMAT, "zoo": zoo, "selection": {"where": where, "epochs": epochs},
                    "counts": {"models": len(order), "checkpoints": len(index)}, "catalog": catalog_entry,
                    "versions": _versions(), "files": entries}
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(partial, out)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise write_error(partial, e) from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    total = sum(e["size"] for e in entries) + (out / MANIFEST).stat().st_size
    return PublishReport(out, zoo, len(order), len(index), len(entries) + 1, total)


def _write_shards(store: Store, zoo: str, models: pa.Table, checkpoints: pa.Table, out: Path) -> pa.Table:
    """The weights of the selected checkpoints as N x P shards, rows in the order of `models`;
    returns the checkpoint index (with each model's grid position, for pruning by it)."""
    from safetensors.numpy import save_file

    order = models.column("model_id").to_pylist()
    grid = {r["model_id"]: {g: r[g] for g in GRID_ORDER} for r in models.select(["model_id", *GRID_ORDER]).to_pylist()}
    rank = {m: i for i, m in enumerate(order)}
    rows = sorted(checkpoints.to_pylist(), key=lambda r: (r["epoch"], r["n_values"], rank[r["model_id"]]))
    groups: dict[tuple[int, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["epoch"], row["n_values"]), []).append(row)
    index = []
    for (epoch, n_values), members in sorted(groups.items()):
        per_shard = max(1, SHARD_BYTES // (4 * n_values))
        for k, start in enumerate(range(0, len(members), per_shard)):
            shard = members[start:start + per_shard]
            matrix, lacking = store.read_weights(zoo, [r["model_id"] for r in shard], epoch)
            if lacking:
                raise ZooError(f"no checkpoint at epoch {epoch} for model {lacking[0]!r}")
            relative = f"weights/epoch-{epoch}/values-{n_values}-{k:04d}.safetensors"
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            save_file({"weights": np.ascontiguousarray(matrix, dtype="<f4")}, str(out / relative))
            with open(out / relative, "rb") as f:
                data_start = 8 + int.from_bytes(f.read(8), "little")
            for i, row in enumerate(shard):
                index.append({**row, "file": relative, "byte_offset": data_start + 4 * n_values * i,
                              "byte_length": 4 * n_values})
    schema = pa.schema([SCHEMAS["checkpoints"].field(c) for c in INDEX_COLUMNS[:5]]
                       + [("file", pa.string()), ("byte_offset", pa.int64()), ("byte_length", pa.int64())]
                       + [SCHEMAS["models"].field(c) for c in GRID_ORDER])
    return pa.Table.from_pylist([{**r, **grid[r["model_id"]]} for r in index], schema=schema)


def _selected(tables: dict[str, pa.Table | None], every: pa.Table, ids: set[str]) -> dict[str, pa.Table | None]:
    """Each table's rows that refer only to the selected models, sorted."""
    out = {"models": tables["models"], "checkpoints": tables["checkpoints"]}
    for table in ("curves", "tensors", "metrics", "layer_metrics", "densities"):
        out[table] = rows_of(tables[table], "model_id", ids)
    out.update(shared_rows(tables, every, ids))
    return {t: _sorted(rows) for t, rows in out.items()}


GRID_ORDER = ("load", "temperature", "seed")


def _sorted(table: pa.Table | None) -> pa.Table | None:
    """Rows in a fixed order, schema metadata dropped: by grid position first where the table has
    it (so a query for a part of the grid reads only the row groups that hold it), then by every
    other sortable column, left to right."""
    if table is None:
        return None
    names = [f.name for f in table.schema if not pa.types.is_nested(f.type)]
    keys = [(n, "ascending") for n in [*[g for g in GRID_ORDER if g in names], *[n for n in names if n not in GRID_ORDER]]]
    return table.sort_by(keys).replace_schema_metadata(None) if keys else table


def write_table(table: pa.Table, path: Path) -> None:
    """A published table: zstd, statistics and page checksums, row groups of about ROW_GROUP_BYTES."""
    row_bytes = max(1, table.nbytes // max(1, len(table)))
    pq.write_table(table, path, compression="zstd", row_group_size=max(1, ROW_GROUP_BYTES // row_bytes),
                   write_statistics=True, write_page_checksum=True)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    from importlib import metadata

    from . import code_version

    out = {"zoo": code_version()}
    for package in ("pyarrow", "safetensors", "duckdb"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def _card(zoo: str, entry: dict | None, tables: list[str], folder: Path, license: str, n_models: int,
          n_checkpoints: int, where: str | None, epochs: str) -> str:
    """The dataset card: the YAML header Hugging Face datasets reads, then what each table holds."""
    header = {
        "license": license,
        "pretty_name": f"phase-zoo {zoo}",
        "tags": ["model-zoo", "weight-space-learning", "loss-landscape", "phase-zoo"],
        "configs": [{"config_name": t, "data_files": table_path(t)} for t in tables],
    }
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
             f"# {zoo}: a published model zoo", "",
             (entry or {}).get("description", "").strip() or f"The models of zoo `{zoo}`.", "",
             f"{n_models} models, {n_checkpoints} checkpoints"
             + (f" (selection: `{where}`" if where else " (selection: all") + f"; epochs: {epochs}).", "",
             "Open it with the project (`zoo.open(URL)`, `zoo sql --root URL`, `zoo pull URL --where ...`),",
             "with `datasets.load_dataset(URL_OR_FOLDER, \"models\")`, or with any Parquet reader:",
             "`duckdb -c \"SELECT count(*) FROM 'data/models.parquet'\"`. One model's weights at one epoch are",
             "the bytes `byte_offset` to `byte_offset + byte_length` of `file` (a row of tensor `weights`,",
             "float32 little-endian), as `checkpoints` records; `manifest.json` lists every file's sha256.", ""]
    if entry:
        lines += ["## Catalog entry", "", "```yaml", yaml.safe_dump({zoo: entry}, sort_keys=False).strip(), "```", ""]
    lines += ["## Tables", ""]
    for table in tables:
        schema = pq.read_schema(folder / table_path(table))
        lines += [f"### {table}", "", TABLE_DOCS.get(table, ""), "", "| column | type | meaning |", "|---|---|---|"]
        lines += [f"| `{f.name}` | {f.type} | {COLUMN_DOCS.get(f.name, 'a hyperparameter of the zoo (see `config`)')} |"
                  for f in schema]
        lines.append("")
    return "\n".join(lines)
