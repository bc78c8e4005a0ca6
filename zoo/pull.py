"""Pull an SQL selection of a published zoo (zoo.publish) into a local root.

The selected models are copied with their rows of every table, their weights at the published
epochs, and the cells, metric and benchmark rows that refer only to pulled models (a cell's or
the population's only when all of its models are in the root). Every metadata file is fetched
whole and checked against the manifest's size and sha256; every weight row against the sha256
the checkpoint index records; a file or row that fails is refused in one line, none of it kept,
and the rest of the pull goes on. Each model is written as a generated one is (its parts, the
`models` row last: the commit), so a pull is idempotent, resumes after `kill -9` where it
stopped, and a second pull of another selection adds to the same root without duplicates; the
pulled rows of metrics and benchmarks go under the part names `zoo metrics` and `zoo bench` use,
so neither recomputes them.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ZooError, one_line
from .published import PublishedStore, at_epochs, read_rows, shared_rows, table_path
from .rows import benchmark_part_key, cells_part_key, metric_part_key
from .schemas import SCHEMAS, empty_rows
from .storage import Store


@dataclass
class PullReport:
    source: str
    selected: int = 0
    pulled: int = 0
    skipped: int = 0  # already in the root
    refused: list[str] = field(default_factory=list)
    bytes: int = 0

    def summary(self) -> str:
        refused = f", {len(self.refused)} refused" if self.refused else ""
        return (f"{self.source}: selected {self.selected} models, pulled {self.pulled}, {self.skipped} already here"
                f"{refused} ({self.bytes / 1e6:.1f} MB fetched)")


def pull(z, where: str | None, store: Store, epochs: str = "all", progress: bool = True) -> PullReport:
    """Copy the models of the published zoo `z` (a zoo.api.Root opened on it) that `where` (an SQL
    condition on its `models` view) selects into `store`, at `epochs` ("all" published, "final",
    or "0,5,20")."""
    published: PublishedStore = z.store
    if not isinstance(published, PublishedStore):
        raise ZooError(f"{z.root} is a zoo root, not a published zoo: pull takes a published one (zoo publish)")
    source = published.source
    report = PullReport(source.url, refused=list(source.manifest.refused))
    condition = f"where {where}" if where else ""
    models = z.sql(f"select model_id, zoo from models {condition} order by load, temperature, seed, model_id")
    report.selected = len(models)
    if models.empty:
        raise ZooError(f"no published model in {source.url}" + (f" where {where}" if where else ""))
    tables = _fetch_tables(source, report)
    if "models" not in tables or "checkpoints" not in tables:
        raise ZooError(f"{source.url}: cannot pull without its models and checkpoints tables ({report.refused[-1]})")
    zoo_names = set(models["zoo"])
    stored = {m for zoo in zoo_names for m in store.stored_ids("models", zoo)}
    wanted = [m for m in models["model_id"] if m not in stored]
    report.skipped = len(models) - len(wanted)
    per_model = {t: _split_by_model(tables.get(t)) for t in PER_MODEL_TABLES}  # (once: not a scan per model)
    index = at_epochs(tables["checkpoints"], epochs)
    by_model: dict[str, list[dict]] = {}
    for row in index.to_pylist():
        by_model.setdefault(row["model_id"], []).append(row)
    bar = _bar(progress, len(wanted), source.url)
    try:
        for chunk in _chunks(wanted, by_model):
            weights = _fetch_weights(source, chunk, by_model, report)
            for model_id in chunk:
                try:
                    if isinstance(weights.get(model_id), ZooError):
                        raise weights[model_id]
                    _store_model(store, per_model, model_id, weights.get(model_id, {}))
                    report.pulled += 1
                except ZooError as e:
                    report.refused.append(f"model {model_id}: {e}")
                if bar is not None:
                    bar.set_postfix_str(f"{report.bytes / 1e6:.1f} MB")
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    here = {m for zoo in zoo_names for m in store.stored_ids("models", zoo)}
    _pull_shared_rows(store, tables, here)
    for zoo in sorted(zoo_names):
        store.pack(zoo)
    store.write_index()
    return report


def _fetch_tables(source, report: PullReport) -> dict[str, pa.Table]:
    """Every published metadata table, fetched whole and checked (a refused one is left out)."""
    tables = {}
    for table in source.manifest.tables:
        try:
            data = source.fetch_checked(table_path(table))
            tables[table] = pq.read_table(io.BytesIO(data))
            report.bytes += len(data)
        except (ZooError, pa.ArrowException) as e:
            report.refused.append(f"{table_path(table)}: {one_line(e)}")
    return tables


CHUNK_BYTES = 64 << 20  # weights fetched at once: adjacent rows of the models of a chunk are one range


def _chunks(ids: list[str], by_model: dict[str, list[dict]]) -> list[list[str]]:
    chunks, chunk, size = [], [], 0
    for model_id in ids:
        chunk.append(model_id)
        size += sum(r["byte_length"] for r in by_model.get(model_id, []))
        if size >= CHUNK_BYTES:
            chunks.append(chunk)
            chunk, size = [], 0
    return chunks + ([chunk] if chunk else [])


def _fetch_weights(source, chunk: list[str], by_model: dict[str, list[dict]], report: PullReport) -> dict:
    """model id -> {epoch: (index row, vector)} for the models of `chunk`, each run of adjacent
    rows one byte range; if a run is refused, its models are read one by one, so that only the
    damaged one is refused (its entry is then the ZooError)."""
    out: dict[str, dict | ZooError] = {}
    try:
        for run in read_rows(source, [r for m in chunk for r in by_model.get(m, [])]):
            for row, vector in run:
                out.setdefault(row["model_id"], {})[row["epoch"]] = (row, vector)
                report.bytes += vector.nbytes
        return out
    except ZooError:
        out = {}
    for model_id in chunk:
        try:
            for run in read_rows(source, by_model.get(model_id, [])):
                for row, vector in run:
                    out.setdefault(model_id, {})[row["epoch"]] = (row, vector)
                    report.bytes += vector.nbytes
        except ZooError as e:
            out[model_id] = e
    return out


PER_MODEL_TABLES = ("models", "tensors", "curves", "metrics", "layer_metrics", "densities")


def _split_by_model(table: pa.Table | None) -> dict[str, pa.Table]:
    """model id -> its rows of `table` (slices of one sorted copy)."""
    if table is None or not len(table):
        return {}
    table = table.sort_by("model_id")
    ids = table.column("model_id").to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    return {ids[a]: table.slice(a, b - a) for a, b in zip(starts, ends)}


def _store_model(store: Store, per_model: dict[str, dict[str, pa.Table]], model_id: str, weights: dict) -> None:
    """One model's parts, the `models` row last (the commit)."""
    if not weights:
        raise ZooError("no published checkpoint at the epochs asked for")
    model = per_model["models"].get(model_id)
    if model is None or len(model) != 1:
        raise ZooError("not in the published models table")
    zoo = model.column("zoo")[0].as_py()
    checkpoints = pa.Table.from_pylist(
        [{"model_id": model_id, "epoch": e, "n_params": row["n_params"], "n_values": row["n_values"], "sha256": row["sha256"],
          "weights": vector} for e, (row, vector) in sorted(weights.items())],
        schema=SCHEMAS["checkpoints"])
    for table in ("tensors", "curves"):
        store.write_part(table, zoo, model_id, per_model[table].get(model_id, empty_rows(table)))
    store.write_part("checkpoints", zoo, model_id, checkpoints)
    metrics = per_model["metrics"].get(model_id)
    # a densities row names no family: it is the family whose metrics rows share its settings
    families = {(r["epoch"], r["settings_hash"]): r["family"] for r in metrics.to_pylist()} if metrics is not None else {}
    for table in ("layer_metrics", "densities", "metrics"):  # metrics last: the runner's commit
        rows = per_model[table].get(model_id)
        if rows is not None and "family" not in rows.column_names:
            known = [(r["epoch"], r["settings_hash"]) in families for r in rows.to_pylist()]
            rows = rows.filter(pa.array(known, pa.bool_()))
            rows = rows.append_column("family", pa.array([families[(r["epoch"], r["settings_hash"])] for r in rows.to_pylist()], pa.string()))
        for key, part in _by_metric_part(rows, lambda r: [r["model_id"]]):
            store.write_part(table, zoo, key, part.select([c for c in SCHEMAS[table].names if c in part.column_names]))
    store.write_part("models", zoo, model_id, model)  # the commit


def _by_metric_part(rows: pa.Table | None, ids_of) -> list[tuple[str, pa.Table]]:
    """Rows grouped under the part names the metrics runner gives them (family, ids, epoch, settings)."""
    if rows is None or not len(rows):
        return []
    groups: dict[str, list[dict]] = {}
    for r in rows.to_pylist():
        groups.setdefault(metric_part_key(r["family"], ids_of(r), r["epoch"], r["settings_hash"]), []).append(r)
    return [(key, pa.Table.from_pylist(members, schema=rows.schema)) for key, members in sorted(groups.items())]


def _pull_shared_rows(store: Store, tables: dict[str, pa.Table], here: set[str]) -> None:
    """Pair metrics of two models here, cells all of whose models are here, and benchmark rows
    whose unit (a model, a cell, the population) is wholly here."""
    shared = shared_rows(tables, tables["models"], here)
    if (pairs := shared["pair_metrics"]) is not None:
        for zoo, zoo_pairs in _grouped(pairs, ("zoo",)):
            for key, part in _by_metric_part(zoo_pairs, lambda r: [r["model_a"], r["model_b"]]):
                if not store.has_part("pair_metrics", zoo, key):
                    store.write_part("pair_metrics", zoo, key, part)
    if (table := shared.get("cells")) is not None:
        for (zoo, epoch), part in _grouped(table, ("zoo", "epoch")):
            if not store.has_part("cells", zoo, cells_part_key(epoch)):
                store.write_part("cells", zoo, cells_part_key(epoch), part)
    if (table := shared.get("benchmark_results")) is not None:
        for (zoo, task, version, digest), part in _grouped(table, ("zoo", "task", "task_version", "parameters_hash")):
            key = benchmark_part_key(task, version, digest)
            stored = store.read_part("benchmark_results", zoo, key)
            if stored is not None:  # the units scored here already stay; the pulled ones are added
                done = set(stored.column("unit").to_pylist())
                part = part.filter(pa.array([u not in done for u in part.column("unit").to_pylist()], pa.bool_()))
                if not len(part):
                    continue
                part = pa.concat_tables([stored, part.cast(stored.schema)], promote_options="permissive")
            store.write_part("benchmark_results", zoo, key, part)


def _grouped(table: pa.Table, keys: tuple[str, ...]) -> list[tuple[tuple, pa.Table]]:
    groups: dict[tuple, list[dict]] = {}
    for r in table.to_pylist():
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return [(k if len(k) > 1 else k[0], pa.Table.from_pylist(v, schema=table.schema)) for k, v in sorted(groups.items())]


def _bar(progress: bool, total: int, url: str):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"pull {url}", unit="model")


def storage_options_from_env() -> dict | None:
    """Options for the source's file system from env ZOO_STORAGE_OPTIONS (JSON), e.g. an S3
    endpoint: {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}."""
    import os

    text = os.environ.get("ZOO_STORAGE_OPTIONS", "").strip()
    if not text:
        return None
    try:
        options = json.loads(text)
    except ValueError as e:
        raise ZooError(f"env ZOO_STORAGE_OPTIONS is not JSON: {one_line(e)}") from None
    if not isinstance(options, dict):
        raise ZooError("env ZOO_STORAGE_OPTIONS must be a JSON object")
    return options
