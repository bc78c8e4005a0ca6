"""Generate a zoo: launch the models the store lacks as jobs (see `zoo.launch`), with a progress
bar of models stored / total. Rerunning trains only what is missing; failed models are retried."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from tqdm import tqdm

from zoo.catalog import ModelSpec, ZooConfig
from zoo.launch import LaunchOptions, run_jobs
from zoo.rows import write_jobs
from zoo.storage import Store

from .jobs import TrainAndStore, work_items
from .resume import save_interval_s

__all__ = ["GenerateReport", "LaunchOptions", "generate", "missing_models"]


@dataclass
class GenerateReport:
    zoo: str
    n_models: int
    planned: int
    trained: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    resumed: dict[str, int] = field(default_factory=dict)  # model_id -> the saved epoch it continued after
    seconds: float = 0.0

    @property
    def models_per_second(self) -> float:
        return self.trained / self.seconds if self.seconds > 0 else 0.0


def missing_models(config: ZooConfig, store: Store, models: list[ModelSpec] | None = None) -> list[ModelSpec]:
    with store.packing() as locked:  # (held by another packer: it finishes what is pending itself)
        if locked:
            store.finish_packs(config.name)
    stored = store.stored_ids("models", config.name)
    return [spec for spec in (config.models() if models is None else models) if spec.model_id not in stored]


def generate(
    config: ZooConfig, store: Store, options: LaunchOptions, progress: bool = True, models: list[ModelSpec] | None = None,
    stacked: bool = True,
) -> GenerateReport:
    """Train and store every model of `config` (or of `models`, a subset of it) that `store` lacks,
    at most `options.limit` of them. Same-shape MLPs train as stacks unless `stacked` is False
    (then every model takes the one-model reference path)."""
    options.check()
    save_interval_s()  # a bad $ZOO_RESUME_EVERY_S is refused here, not in every job
    models = config.models() if models is None else models
    missing = missing_models(config, store, models)
    items = work_items(models, {spec.model_id for spec in missing}, stacked, options.limit)
    if options.items_per_job is not None:  # --models-per-job counts models; a stack goes to one job whole
        per_item = sum(len(item.models) for item in items) / max(len(items), 1)
        options = replace(options, items_per_job=max(1, round(options.items_per_job / per_item)))
    plan = [m for item in items for m in item.store]
    report = GenerateReport(config.name, len(models), len(plan))
    start = time.perf_counter()
    if plan:
        # the launcher takes (and submitit pickles) items as JSON text: they become text here only,
        # and each text leads back to its item
        texts = [item.to_json() for item in items]
        by_text = dict(zip(texts, items))
        planned = set(plan)
        done_before = len(models) - len(missing)
        bar = tqdm(total=len(models), initial=done_before, desc=f"generate {config.name}", unit="model",
                   disable=not progress, dynamic_ncols=True)

        def show_progress() -> None:
            stored = done_before + len(planned & store.stored_ids("models", config.name))
            if stored != bar.n:
                bar.update(stored - bar.n)

        def record_jobs(run: str, submitted: list[tuple[str, list[str]]]) -> None:
            write_jobs(store, config.name, run, options.executor,
                       [(m, job_id) for job_id, chunk in submitted for text in chunk for m in by_text[text].store])

        try:
            outcomes = run_jobs(TrainAndStore(), texts, options, config.name, kwargs={"root": str(store.root)},
                                on_poll=show_progress if progress else None, on_submit=record_jobs)
        finally:
            bar.close()
        for outcome in outcomes:
            if outcome.error is not None:
                for text in outcome.items:
                    for model_id in by_text[text].store:
                        report.failed.setdefault(model_id, outcome.error)
            else:
                report.trained += len(outcome.result.trained)
                report.skipped += len(outcome.result.skipped)
                report.failed.update(outcome.result.failed)
                report.resumed.update(outcome.result.resumed)
    store.pack(config.name)  # many small per-model parts -> a few packs (fast to read and query)
    store.sweep(config.name)  # temporary files of killed writers, saved states of stored models
    store.write_index()
    report.seconds = time.perf_counter() - start
    return report
