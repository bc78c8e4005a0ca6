"""Run a task on a zoo: select the models, cut them into units, score every method on every
unit, store the results.

Results go to the `benchmark_results` table, one part per (task, version, method, parameters):
`tables/benchmark_results/<zoo>/<task>-v<version>-<hash>.parquet`. A rerun of an identical
configuration reads that part and computes only its missing or failed units. A method that
raises on one unit gives that unit a `failed` row (with the error) and the rest completes.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import pandas as pd
import pyarrow as pa
import torch

import zoo as zoo_package
from zoo.api import Root
from zoo.datasets import Data
from zoo.errors import ZooError
from zoo.population import UNLABELLED, phase_labels
from zoo.rows import benchmark_part_key
from zoo.schemas import SCHEMAS

from .evaluation import Holdout, holdout
from .tasks import MethodCall, Task

SAVE_EVERY_S = 30.0  # how often a long method call stores the units it has scored (a kill keeps them)


@dataclass
class UnitContext:
    """What a protocol gets for one unit: the zoo, the unit's models and where they sit."""

    handle: Root
    zoo_name: str
    unit: str
    model_ids: list[str]
    load: float | None
    temperature: float | None
    phase: str | None
    models: pd.DataFrame  # the unit's rows of `models` (with `phase`), in model_ids order
    seed: int
    _data: dict = field(default_factory=dict, repr=False)

    def data(self) -> Data:
        spec = self.handle.spec(self.model_ids[0])
        key = json.dumps(spec.dataset, sort_keys=True)
        if key not in self._data:
            self._data[key] = self.handle.data(self.model_ids[0])  # (never a path stored in the zoo)
        return self._data[key]

    def holdout(self) -> Holdout:
        return holdout(self.data(), self.seed)


@dataclass
class RunReport:
    task: str
    zoo: str
    computed: int = 0  # (method call, unit) pairs computed now
    reused: int = 0  # ... read from stored results
    failed: list[str] = field(default_factory=list)  # "method on unit: error"


def versions() -> dict[str, str]:
    return zoo_package.library_versions("scipy", "scikit-learn")


def selected_models(z: Root, task: Task, zoo_name: str) -> pd.DataFrame:
    """The models the task's SQL selects in `zoo_name` (default: all of them), with their
    grid position and phase (from the `cells` table of the last labelled epoch, if any)."""
    query = task.config.select or "SELECT model_id FROM models WHERE zoo = $zoo"
    try:
        chosen = z.sql(query, {"zoo": zoo_name} if "$zoo" in query else None)
    except ZooError as e:
        raise ZooError(f"{task.path}, field 'select': {e}") from None
    if "model_id" not in chosen.columns:
        raise ZooError(f"{task.path}, field 'select': the query must return a model_id column")
    ids = list(dict.fromkeys(chosen["model_id"]))
    if not ids:
        raise ZooError(f"{task.path}, field 'select': the query selects no models of zoo {zoo_name!r} in {z.root}")
    models = z.sql(
        "select model_id, zoo, load_name, load, temperature_name, temperature, seed "
        "from models where model_id in (select unnest(?)) and zoo = ? order by load, temperature, seed",
        [ids, zoo_name],
    )
    if models.empty:
        raise ZooError(f"{task.path}, field 'select': the query selects no models of zoo {zoo_name!r} in {z.root}")
    labels = phase_labels(z)
    models["phase"] = [labels.get((zoo_name, l, t), UNLABELLED) for l, t in zip(models["load"], models["temperature"])]
    return models.reset_index(drop=True)


def units(z: Root, task: Task, models: pd.DataFrame, seed: int) -> list[UnitContext]:
    kind = task.protocol.unit
    zoo_name = models["zoo"].iloc[0]

    def make(name, frame, load, temperature, phase):
        return UnitContext(z, zoo_name, name, list(frame["model_id"]), load, temperature, phase, frame.reset_index(drop=True), seed)

    if kind == "population":
        return [make("population", models, None, None, None)]
    if kind == "model":
        return [make(r.model_id, models.iloc[[k]], r.load, r.temperature, r.phase) for k, r in enumerate(models.itertuples())]
    return [make(f"load={_fmt(l)},temperature={_fmt(t)}", frame, float(l), float(t), frame["phase"].iloc[0])
            for (l, t), frame in models.groupby(["load", "temperature"], sort=True)]


def run_task(z: Root, task: Task, zoo_name: str, methods: list[str] | None = None,
             progress: Callable[[str], None] | None = None) -> RunReport:
    """Score the task's methods (or those named) on every unit of `zoo_name`; store the rows."""
    calls = task.select(methods)
    seed = int(getattr(task.settings, "seed", 0))
    models = selected_models(z, task, zoo_name)
    todo = units(z, task, models, seed)
    report = RunReport(task.name, zoo_name)
    settings = json.dumps({"protocol": task.protocol.name, "settings": task.settings.model_dump(mode="json"),
                           "metrics": list(task.metrics), "versions": versions(),
                           "n_models": len(models)}, sort_keys=True)
    for call in calls:
        key = part_key(task, call)
        stored = z.store.read_part("benchmark_results", zoo_name, key)
        stored = stored.to_pandas() if stored is not None else pd.DataFrame(columns=SCHEMAS["benchmark_results"].names)
        done = set(stored.loc[stored["status"] == "ok", "unit"])
        kept = [stored[stored["unit"] == u.unit] for u in todo if u.unit in done]
        rows: list[dict[str, Any]] = []
        saved, last_save = 0, time.monotonic()

        def save():  # the stored units and the new ones, rewritten as one part (atomic)
            new = pa.Table.from_pylist(rows, schema=SCHEMAS["benchmark_results"])
            table = pa.concat_tables([pa.Table.from_pandas(k, schema=SCHEMAS["benchmark_results"], preserve_index=False) for k in kept] + [new])
            z.store.write_part("benchmark_results", zoo_name, key, table)

        for unit in todo:
            if unit.unit in done:
                report.reused += 1
                continue
            if progress:
                progress(f"{task.name}: {call.label} on {unit.unit}")
            rows += score(task, call, unit, settings, report)
            report.computed += 1
            if time.monotonic() - last_save > SAVE_EVERY_S:  # a long run killed midway keeps its work
                save()
                saved, last_save = len(rows), time.monotonic()
        if len(rows) > saved:
            save()
    z.store.write_index()
    return report


def part_key(task: Task, call: MethodCall) -> str:
    return benchmark_part_key(task.name, task.config.version, call.parameters_hash)


def score(task: Task, call: MethodCall, unit: UnitContext, settings: str, report: RunReport) -> list[dict[str, Any]]:
    """The result rows of one method call on one unit (failed rows if it raises)."""
    base = dict(task=task.name, task_version=task.config.version, method=call.method.name,
                parameters=call.parameters_json, parameters_hash=call.parameters_hash, zoo=unit.zoo_name,
                unit=unit.unit, load=unit.load, temperature=unit.temperature, phase=unit.phase,
                seed=unit.seed, settings=settings, code_version=zoo_package.code_version(),
                created_at=datetime.now(timezone.utc))
    higher = task.higher_is_better
    try:
        with torch.random.fork_rng():  # a method's own randomness must not leak into the next
            torch.manual_seed(unit.seed)
            out = task.protocol.function(unit, call, task.settings)
        rows = _normalise(out)
    except Exception as e:  # any error of a method is that unit's failure, reported and stored
        message = f"{type(e).__name__}: {e}".strip()
        report.failed.append(f"{call.label} on {unit.unit}: {message}")
        detail = traceback.format_exc(limit=-3)
        return [dict(base, metric=m, value=float("nan"), higher_is_better=higher[m], status="failed", error=message + "\n" + detail)
                for m in higher]
    return [dict(base, phase=r.get("phase", unit.phase), metric=r["metric"], value=float(r["value"]),
                 higher_is_better=higher[r["metric"]], status="ok", error="")
            for r in rows if r["metric"] in higher]


def _normalise(out) -> list[dict[str, Any]]:
    if isinstance(out, dict):
        return [{"metric": k, "value": v} for k, v in out.items()]
    return list(out)


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
