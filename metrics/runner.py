"""`zoo metrics`: compute the metric families for every stored model of a zoo, cell by cell.

The unit of work is a cell of the grid (its seeds are needed together for pair metrics and
partner distances), launched through the same submitit launcher as generation. Each result is
one part file per (family, model or pair, epoch) whose name carries the hash of its settings:
what is stored with identical settings is skipped, a result recomputed with other settings
replaces the old one, and a killed run resumes where it stopped.

A model with NaN or inf weights gets NaN rows and a warning; a family that raises on one model
gets NaN rows for that model and a warning. Neither stops the run.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

import zoo
from zoo.catalog import ZooConfig
from zoo.errors import ZooError, one_line
from zoo.launch import LaunchOptions, run_jobs
from zoo.rows import metric_part_key
from zoo.schemas import SCHEMAS
from zoo.storage import Store

from .families import FAMILIES, Family, ModelContext, Result, cell_contexts, get_families, settings_hash


@dataclass(frozen=True)
class MetricsCell:
    """One unit of a metrics job: a cell of the grid (a load and a temperature of a zoo) at one
    epoch, with its stored models in seed order (pair metrics need them together).

    A cell becomes text only where it is handed to the submitit launcher (`zoo.launch` takes JSON
    strings, and submitit pickles them with the job): `to_json`/`from_json` are that boundary,
    and the text is `{"zoo", "load", "temperature", "epoch", "models"}`, as it always was."""

    zoo: str
    load: float
    temperature: float
    epoch: int
    models: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps({"zoo": self.zoo, "load": self.load, "temperature": self.temperature, "epoch": self.epoch,
                           "models": list(self.models)})

    @classmethod
    def from_json(cls, text: str) -> "MetricsCell":
        data = json.loads(text)
        return cls(data["zoo"], data["load"], data["temperature"], data["epoch"], tuple(data["models"]))


@dataclass
class MetricsReport:
    computed: int = 0
    skipped: int = 0
    warnings: list[str] = field(default_factory=list)
    seconds_by_family: dict[str, float] = field(default_factory=dict)
    failed_jobs: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # "family on model(s) at epoch: error", recomputed next run

    def merge(self, other: "MetricsReport") -> None:
        self.computed += other.computed
        self.skipped += other.skipped
        self.warnings += other.warnings
        self.failed += other.failed
        for name, seconds in other.seconds_by_family.items():
            self.seconds_by_family[name] = self.seconds_by_family.get(name, 0.0) + seconds


def versions() -> dict[str, str]:
    """The library versions and the device a stored metric depends on."""
    from zoo.device import run_device

    device = run_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {**zoo.library_versions("pyhessian", "scipy"), "device": name}


def compute_cells(root: str, items: Sequence[MetricsCell | str], families: list[str], settings: dict[str, dict],
                  threads: int = 1) -> MetricsReport:
    """Job function: compute `families` for the cells `items` (`MetricsCell`s, or their JSON as the
    launcher hands them over) and store them. Idempotent."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        handle = zoo.open(root)
        report = MetricsReport()
        record = versions()
        cells = [MetricsCell.from_json(item) if isinstance(item, str) else item for item in items]  # text: parsed once
        for cell in cells:
            contexts = cell_contexts(handle, list(cell.models), cell.epoch)  # models load once per cell
            for family in get_families(families):
                resolved = family.resolve(settings.get(family.name))
                started = time.perf_counter()
                _compute_family(handle, cell, contexts, family, resolved, record, report)
                report.seconds_by_family[family.name] = report.seconds_by_family.get(family.name, 0.0) + time.perf_counter() - started
        return report
    finally:
        torch.set_num_threads(previous)


def _compute_family(handle, cell: MetricsCell, contexts: list[ModelContext], family: Family, settings, record: dict,
                    report: MetricsReport) -> None:
    store, zoo_name, epoch = handle.store, cell.zoo, cell.epoch
    digest = settings_hash(family.name, settings)
    settings_json = json.dumps({"family": family.name, "settings": settings.model_dump(), "versions": record}, default=str)
    if family.level == "model":
        todo = [c for c in contexts if not store.has_part("metrics", zoo_name, metric_part_key(family.name, [c.model_id], epoch, digest))]
        report.skipped += len(contexts) - len(todo)
        if not todo:
            return
        results = _model_results(family, settings, todo, report)
        for ctx, result in zip(todo, results):
            key = metric_part_key(family.name, [ctx.model_id], epoch, digest)
            if isinstance(result, Exception):  # no rows: a failed status, and the next run tries again
                _record_failure(store, zoo_name, family, [ctx], result, key, digest, report)
                continue
            _write_model_result(store, zoo_name, family, ctx, epoch, result, digest, settings_json)
            store.remove_part("metric_failures", zoo_name, key)
            report.computed += 1
        return
    for a, b in itertools.combinations(contexts, 2):
        key = metric_part_key(family.name, [a.model_id, b.model_id], epoch, digest)
        if store.has_part("pair_metrics", zoo_name, key):
            report.skipped += 1
            continue
        values = _pair_values(family, settings, a, b, report)
        if isinstance(values, Exception):
            _record_failure(store, zoo_name, family, [a, b], values, key, digest, report)
            continue
        rows = [{"model_a": a.model_id, "model_b": b.model_id, "zoo": zoo_name, "epoch": epoch, "family": family.name,
                 "name": name, "value": values.get(name, np.nan), "settings_hash": digest, "settings": settings_json}
                for name in family.names(settings)]
        store.write_part("pair_metrics", zoo_name, key, pa.Table.from_pylist(rows, schema=SCHEMAS["pair_metrics"]))
        store.remove_parts_like("pair_metrics", zoo_name, metric_part_key(family.name, [a.model_id, b.model_id], epoch, ""), keep=key)
        store.remove_part("metric_failures", zoo_name, key)
        report.computed += 1


def _model_results(family: Family, settings, contexts: list[ModelContext], report: MetricsReport) -> list[Result | Exception]:
    """The family's results: NaN for models with non-finite weights (what the model is, stored as
    such), and the exception for models the family raised on (stored as a failure, not as values)."""
    finite = [c for c in contexts if _finite(family, [c], report)]
    results: dict[str, Result | Exception] = {}
    try:
        results = dict(zip([c.model_id for c in finite], family.compute(finite, settings))) if finite else {}
    except Exception:  # retry one by one, so that one bad model does not take its cell down
        for ctx in finite:
            try:
                results[ctx.model_id] = family.compute([ctx], settings)[0]
            except Exception as e:
                traceback.print_exc(file=sys.stderr)
                results[ctx.model_id] = e
    return [results.get(c.model_id) or Result({n: np.nan for n in family.names(settings)}) for c in contexts]


def _pair_values(family: Family, settings, a: ModelContext, b: ModelContext, report: MetricsReport) -> dict[str, float] | Exception:
    if not _finite(family, [a, b], report):
        return {}
    try:
        return family.compute(a, b, settings)
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        return e


def _finite(family: Family, contexts: list[ModelContext], report: MetricsReport) -> bool:
    if family.name == "performance" or all(c.finite for c in contexts):
        return True
    ids = ", ".join(c.model_id for c in contexts)
    report.warnings.append(f"{ids} epoch {contexts[0].epoch}: non-finite weights, {family.name} metrics are NaN")
    return False


def _record_failure(store: Store, zoo_name: str, family: Family, contexts: list[ModelContext], error: Exception,
                    key: str, digest: str, report: MetricsReport) -> None:
    """Store that `family` failed on this model (or pair), with the error: no metric rows, so the
    next `zoo metrics` computes it again (a transient error, out of memory or a killed node, must
    not become a permanent NaN)."""
    text = f"{type(error).__name__}: {one_line(error)}"
    ids = [c.model_id for c in contexts]
    store.write_part("metric_failures", zoo_name, key, pa.Table.from_pylist(
        [{"model_id": ids[0], "model_b": ids[1] if len(ids) > 1 else "", "zoo": zoo_name, "epoch": contexts[0].epoch,
          "family": family.name, "error": text, "settings_hash": digest, "failed_at": datetime.now(timezone.utc)}],
        schema=SCHEMAS["metric_failures"]))
    report.failed.append(f"{family.name} on {', '.join(ids)} at epoch {contexts[0].epoch}: {text}")


def _write_model_result(store: Store, zoo_name: str, family: Family, ctx: ModelContext, epoch: int, result: Result,
                        digest: str, settings_json: str) -> None:
    key = metric_part_key(family.name, [ctx.model_id], epoch, digest)
    base = {"model_id": ctx.model_id, "zoo": zoo_name, "epoch": epoch, "family": family.name, "settings_hash": digest}
    if result.layers:
        rows = [{**base, "layer": layer, "name": name, "value": float(value)}
                for layer, values in result.layers.items() for name, value in values.items()]
        store.write_part("layer_metrics", zoo_name, key, pa.Table.from_pylist(rows, schema=SCHEMAS["layer_metrics"]))
    if result.densities:
        rows = [{"model_id": ctx.model_id, "zoo": zoo_name, "epoch": epoch, "split": split, "eigenvalue": e, "weight": w,
                 "settings_hash": digest} for split, e, w in result.densities]
        store.write_part("densities", zoo_name, key, pa.Table.from_pylist(rows, schema=SCHEMAS["densities"]))
    rows = [{**base, "name": name, "value": float(value), "settings": settings_json} for name, value in result.metrics.items()]
    store.write_part("metrics", zoo_name, key, pa.Table.from_pylist(rows, schema=SCHEMAS["metrics"]))  # the commit
    prefix = metric_part_key(family.name, [ctx.model_id], epoch, "")
    for table in ("metrics", "layer_metrics", "densities"):
        store.remove_parts_like(table, zoo_name, prefix, keep=key)


# --- orchestration -------------------------------------------------------------------------


def plan_cells(handle, config: ZooConfig, epochs: list[int]) -> list[MetricsCell]:
    models = handle.sql("select model_id, load, temperature, seed from models where zoo = ? order by load, temperature, seed", [config.name])
    if models.empty:
        raise ZooError(f"zoo {config.name!r} has no stored models in {handle.root}; run `zoo generate {config.name}` first")
    cells = []
    for (load, temperature), group in models.groupby(["load", "temperature"], sort=True):
        for epoch in epochs:
            cells.append(MetricsCell(config.name, float(load), float(temperature), int(epoch),
                                     tuple(group["model_id"])))
    return cells


def run_metrics(config: ZooConfig, store: Store, families: list[str] | None, epoch: str, options: LaunchOptions,
                progress: bool = True) -> MetricsReport:
    """Compute and store the chosen families (default all) for every stored model of `config`."""
    chosen = get_families(families)
    unknown = [k for k in config.metrics if k not in FAMILIES and k != "phases"]
    if unknown:
        raise ZooError(f"metrics.{unknown[0]}: unknown metric family in the catalog; known: {', '.join(FAMILIES)}, phases")
    overrides = {k: v for k, v in config.metrics.items() if k in FAMILIES}
    # a bad setting fails here, before any job
    digests = {f.name: settings_hash(f.name, f.resolve(overrides.get(f.name))) for f in chosen}
    handle = zoo.open(store.root)
    cells = plan_cells(handle, config, config.select_epochs(epoch))
    sizes = [len(cell.models) for cell in cells]
    total = sum(n if f.level == "model" else n * (n - 1) // 2 for n in sizes for f in chosen)
    report = MetricsReport()
    started = time.perf_counter()
    bar = tqdm(total=total, desc=f"metrics {config.name}", unit="result", disable=not progress, dynamic_ncols=True)

    def show_progress() -> None:
        done = 0
        for table in ("metrics", "pair_metrics"):
            names = store.stored_ids(table, config.name)
            done += sum(1 for n in names for f in chosen if n.startswith(f"{f.name}-") and n.endswith(f"-{digests[f.name]}"))
        done = min(done, total)
        if done != bar.n:
            bar.update(done - bar.n)

    try:
        # the launcher takes (and submitit pickles) items as JSON text: cells become text here only
        outcomes = run_jobs(compute_cells, [cell.to_json() for cell in cells], options, f"metrics-{config.name}",
                            kwargs={"root": str(store.root), "families": [f.name for f in chosen], "settings": overrides},
                            on_poll=show_progress)
    finally:
        bar.close()
    for outcome in outcomes:
        if outcome.error is not None:
            report.failed_jobs.append(outcome.error)
        else:
            report.merge(outcome.result)
    store.sweep(config.name)  # temporary files of killed workers
    store.write_index()
    report.seconds_by_family["total"] = time.perf_counter() - started
    return report
