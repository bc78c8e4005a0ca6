"""The job function: train a list of models and store each one. Safe to run twice.

A job skips every model already stored, stores each model the moment it is trained (so a killed
job loses at most the model in progress, and of that only the epochs since its last saved state:
`resume.py`), and records a failure instead of raising, so one bad
model never takes the rest of its job down. Because part files are named by model id and
replaced atomically, a job that runs twice (a requeue, two runs at once) never duplicates rows.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass, field

import submitit
import torch

import zoo
from zoo.catalog import ModelSpec
from zoo.datasets import load_dataset
from zoo.errors import StorageError
from zoo.launch import current_job_id
from zoo.rows import write_failure, write_model
from zoo.storage import Store

from .stacked import group_into_stacks, shape_key, stack_key, train_stack
from .training import train


@dataclass
class JobReport:
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # model_id -> error
    resumed: dict[str, int] = field(default_factory=dict)  # model_id -> the saved epoch it continued after


def train_and_store(root: str, items: list[str], threads: int = 1) -> JobReport:
    """Train the groups of models that `items` describe and store their missing members.

    An item is JSON `{"models": [spec, ...], "store": [model_id, ...]}`: a stack of same-shape
    MLPs trained as one computation (`stacked.py`), or a single model on the reference path.
    The whole group is trained (its company fixes its bits) and only the members in `store` that
    are not yet stored are written. If a stack raises, its members are retried one by one, so one
    bad model fails alone. `threads` fixes torch's intra-op threads (1 by default: results then
    do not depend on how many jobs share the machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        store = Store(root, create=True)
        report = JobReport()
        job_id = current_job_id()
        queue = [json.loads(text) for text in items]
        while queue:
            item = queue.pop(0)
            group = [ModelSpec.from_json(text) for text in item["models"]]
            stored = store.stored_ids("models", group[0].zoo)
            wanted = [m for m in item["store"] if m not in stored]
            report.skipped += [m for m in item["store"] if m not in wanted]
            if not wanted:
                continue
            try:
                data = load_dataset(group[0].dataset)
                stacked = item.get("stacked", True) and shape_key(group[0]) is not None
                if stacked:
                    results = train_stack(group, data)
                else:  # the reference path saves its state now and then, and resumes from it
                    results = [train(group[0], data, resume=store.resume_path(group[0].zoo, group[0].model_id))]
                stored = store.stored_ids("models", group[0].zoo)  # another run may have stored some meanwhile
                for trained in results:
                    model_id = trained.spec.model_id
                    if model_id in wanted and model_id not in stored:
                        write_model(store, trained, zoo.code_version())
                        report.trained.append(model_id)
                        if trained.resumed_from is not None:
                            report.resumed[model_id] = trained.resumed_from
                    store.resume_path(trained.spec.zoo, model_id).unlink(missing_ok=True)
            except StorageError:
                raise  # a full disk or a read-only root: no other model can be stored either
            except Exception as e:
                if len(group) > 1:
                    queue[:0] = [{**item, "models": [spec.to_json()], "store": [spec.model_id]}
                                 for spec in group if spec.model_id in wanted]
                    continue
                message = f"{type(e).__name__}: {e}"
                write_failure(store, group[0].zoo, group[0].model_id, message + "\n" + traceback.format_exc(), job_id)
                report.failed[group[0].model_id] = message
        return report
    finally:
        torch.set_num_threads(previous)


class TrainAndStore(submitit.helpers.Checkpointable):
    """`train_and_store` as a checkpointable submitit job. When SLURM is about to stop the job
    (its time limit, a preemption), submitit calls `checkpoint`, which requeues the same call;
    since stored models are skipped, the requeued job resumes after the last model it stored,
    and a model cut off mid-training continues from its last saved state (`resume.py`)."""

    def __call__(self, root: str, items: list[str], threads: int = 1) -> JobReport:
        return train_and_store(root, items, threads)


def work_items(specs: list[ModelSpec], missing: set[str], stacked: bool = True, limit: int | None = None) -> list[str]:
    """The job items that train the `missing` models of `specs` (a whole zoo, or a subset of
    it), at most `limit` stored: stacks cut from `specs` (see `group_into_stacks`), or one model
    per item on the reference path when `stacked` is False."""
    groups = group_into_stacks(specs) if stacked else [[spec] for spec in specs]
    items, budget = [], float("inf") if limit is None else max(limit, 0)
    for group in groups:
        store = [spec.model_id for spec in group if spec.model_id in missing][: int(min(budget, len(group)))]
        if store:
            on_stack = stacked and stack_key(group[0]) is not None  # decided where the zoo is planned
            items.append(json.dumps({"models": [spec.to_json() for spec in group], "store": store, "stacked": on_stack}))
            budget -= len(store)
    return items
