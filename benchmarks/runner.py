"""Run a task on a zoo: select the models, cut them into units, score every method on every
unit, store the results.

The (method call, unit) pairs to score run in this process (`run_task` without launch options: the
API's default) or as jobs through the same launcher as `zoo generate` and `zoo metrics` (local
workers, or SLURM with several pairs per job): each job reloads the task from its file, cuts the
same units from the root, scores its pairs and returns their rows, which this process stores.

Results go to the `benchmark_results` table, one part per (task, version, method, parameters):
`tables/benchmark_results/<zoo>/<task>-v<version>-<hash>.parquet`. A rerun of an identical
configuration reads that part and computes only its missing or failed units. A method that
raises on one unit gives that unit a `failed` row (with the error) and the rest completes.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import pandas as pd
import pyarrow as pa
import torch

import zoo as zoo_package
from zoo.api import Root
from zoo.datasets import Data
from zoo.errors import ZooError
from zoo.launch import LaunchOptions, run_jobs
from zoo.population import UNLABELLED, phase_labels
from zoo.rows import benchmark_part_key
from zoo.schemas import SCHEMAS

from .evaluation import Holdout, holdout
from .tasks import MethodCall, Task, load_task

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
             progress: Callable[[str], None] | None = None, options: LaunchOptions | None = None) -> RunReport:
    """Score the task's methods (or those named) on every unit of `zoo_name`; store the rows.
    With `options`, the pairs run as launched jobs (see the module's docstring)."""
    calls = task.select(methods)
    todo, settings = units_and_settings(z, task, zoo_name)
    report = RunReport(task.name, zoo_name)
    stored_rows: dict[str, list[pd.DataFrame]] = {}
    missing: list[tuple[MethodCall, UnitContext]] = []
    for call in calls:
        stored = z.store.read_part("benchmark_results", zoo_name, part_key(task, call))
        stored = stored.to_pandas() if stored is not None else pd.DataFrame(columns=SCHEMAS["benchmark_results"].names)
        done = set(stored.loc[stored["status"] == "ok", "unit"])
        stored_rows[part_key(task, call)] = [stored[stored["unit"] == u.unit] for u in todo if u.unit in done]
        report.reused += sum(1 for u in todo if u.unit in done)
        missing += [(call, u) for u in todo if u.unit not in done]
    if options is None:
        _score_here(z, task, zoo_name, calls, missing, settings, stored_rows, report, progress)
    else:
        _score_in_jobs(z, task, zoo_name, calls, missing, stored_rows, report, options)
    z.store.sweep(zoo_name)  # temporary files of killed writers (a killed run's jobs, or its index write)
    z.store.write_index()
    return report


def units_and_settings(z: Root, task: Task, zoo_name: str) -> tuple[list[UnitContext], str]:
    """The task's units of `zoo_name`, and what a result row records of how it was computed: the
    same in the launching process and in every job of a run."""
    models = selected_models(z, task, zoo_name)
    settings = json.dumps({"protocol": task.protocol.name, "settings": task.settings.model_dump(mode="json"),
                           "metrics": list(task.metrics), "versions": versions(), "n_models": len(models)}, sort_keys=True)
    return units(z, task, models, int(getattr(task.settings, "seed", 0))), settings


def _store(z: Root, task: Task, zoo_name: str, call: MethodCall, kept: list[pd.DataFrame], rows: list[dict]) -> None:
    """The stored units and the new ones of one method call, rewritten as one part (atomic)."""
    new = pa.Table.from_pylist(rows, schema=SCHEMAS["benchmark_results"])
    table = pa.concat_tables([pa.Table.from_pandas(k, schema=SCHEMAS["benchmark_results"], preserve_index=False) for k in kept] + [new])
    z.store.write_part("benchmark_results", zoo_name, part_key(task, call), table)


def _score_here(z, task, zoo_name, calls, missing, settings, stored_rows, report, progress) -> None:
    for call in calls:
        key = part_key(task, call)
        rows: list[dict[str, Any]] = []
        saved, last_save = 0, time.monotonic()
        for unit in [u for c, u in missing if c is call]:
            if progress:
                progress(f"{task.name}: {call.label} on {unit.unit}")
            rows += score(task, call, unit, settings, report)
            report.computed += 1
            if time.monotonic() - last_save > SAVE_EVERY_S:  # a long run killed midway keeps its work
                _store(z, task, zoo_name, call, stored_rows[key], rows)
                saved, last_save = len(rows), time.monotonic()
        if len(rows) > saved:
            _store(z, task, zoo_name, call, stored_rows[key], rows)


@dataclass(frozen=True)
class BenchItem:
    """One (method call, unit) pair of a launched run. It becomes JSON text only where the launcher
    takes it; the task travels as its YAML file, the call as its parameters hash, the unit as its name."""

    task: str
    zoo: str
    call: str
    unit: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "BenchItem":
        return cls(**json.loads(text))


@dataclass
class BenchJobReport:
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # part key -> result rows
    computed: int = 0
    failed: list[str] = field(default_factory=list)


def score_items(root: str, items: Sequence[BenchItem | str], threads: int = 1) -> BenchJobReport:
    """The job function: score the pairs `items` names on the zoo at `root` and return their rows
    (the launching process stores them). Each task is loaded and its units are cut once per job.
    `threads` fixes torch's intra-op threads (1: the launcher runs a job per core)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _score_items(root, items)
    finally:
        torch.set_num_threads(previous)


def _score_items(root: str, items: Sequence[BenchItem | str]) -> BenchJobReport:
    from zoo.api import Root as RootHandle

    z = RootHandle(root)
    result, loaded = BenchJobReport(), {}
    for item in (BenchItem.from_json(i) if isinstance(i, str) else i for i in items):
        if (item.task, item.zoo) not in loaded:
            task = load_task(item.task)
            todo, settings = units_and_settings(z, task, item.zoo)
            calls = {c.parameters_hash: c for c in task.select(None)}
            loaded[item.task, item.zoo] = (task, {u.unit: u for u in todo}, calls, settings)
        task, todo, calls, settings = loaded[item.task, item.zoo]
        if item.call not in calls or item.unit not in todo:
            raise ZooError(f"{item.task}: no method call {item.call} or unit {item.unit!r} here (the task or the zoo changed)")
        report = RunReport(task.name, item.zoo)
        result.rows.setdefault(part_key(task, calls[item.call]), []).extend(score(task, calls[item.call], todo[item.unit], settings, report))
        result.computed += 1
        result.failed += report.failed
    return result


def _score_in_jobs(z, task, zoo_name, calls, missing, stored_rows, report, options: LaunchOptions) -> None:
    items = [BenchItem(str(task.path.resolve()), zoo_name, call.parameters_hash, unit.unit) for call, unit in missing]
    texts = [item.to_json() for item in items]
    by_text = dict(zip(texts, items))
    labels = {call.parameters_hash: call.label for call in calls}
    outcomes = run_jobs(score_items, texts, options, f"bench-{task.name}-{zoo_name}", kwargs={"root": str(z.root)}) if texts else []
    rows: dict[str, list[dict[str, Any]]] = {}
    for outcome in outcomes:
        if outcome.error is not None:  # the job died: its pairs are computed again on the next run
            report.failed += [f"{labels[by_text[t].call]} on {by_text[t].unit}: {outcome.error}" for t in outcome.items]
            continue
        for key, new in outcome.result.rows.items():
            rows.setdefault(key, []).extend(new)
        report.computed += outcome.result.computed
        report.failed += outcome.result.failed
    order = {u: k for k, u in enumerate(dict.fromkeys(unit.unit for _, unit in missing))}
    for call in calls:
        key = part_key(task, call)
        if rows.get(key):
            _store(z, task, zoo_name, call, stored_rows[key], sorted(rows[key], key=lambda r: order.get(r["unit"], 0)))


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
