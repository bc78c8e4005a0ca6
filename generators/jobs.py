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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import submitit

import zoo
from zoo.catalog import ModelSpec
from zoo.datasets import load_dataset
from zoo.errors import StorageError
from zoo.launch import current_job_id
from zoo.rows import write_failure, write_model
from zoo.storage import Store

from .plan import group_into_stacks, shape_key, stack_key

STORE_THREADS = 4  # models written at once after a stack trains


@dataclass(frozen=True)
class TrainingItem:
    """One unit of a training job: a group of models trained together and the members of it to
    store. `models` is a stack of same-shape MLPs trained as one computation (`stacked.py`), or a
    single model on the reference path; the whole group is trained (its company fixes its bits),
    `store` names the members wanted, and `stacked` says whether the group trains as a stack.

    An item becomes text only where it is handed to the submitit launcher (`zoo.launch` takes
    JSON strings, and submitit pickles them with the job): `to_json`/`from_json` are that
    boundary, and the text is `{"models": [spec JSON, ...], "store": [model_id, ...], "stacked": bool}`,
    as it always was, so the pickles of a launch in flight still read."""

    models: tuple[ModelSpec, ...]
    store: tuple[str, ...]
    stacked: bool = True

    def to_json(self) -> str:
        return json.dumps({"models": [spec.to_json() for spec in self.models], "store": list(self.store),
                           "stacked": self.stacked})

    @classmethod
    def from_json(cls, text: str) -> "TrainingItem":
        data = json.loads(text)
        return cls(tuple(ModelSpec.from_json(spec) for spec in data["models"]), tuple(data["store"]),
                   data.get("stacked", True))


@dataclass
class JobReport:
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # model_id -> error
    resumed: dict[str, int] = field(default_factory=dict)  # model_id -> the saved epoch it continued after


def train_and_store(root: str, items: Sequence[TrainingItem | str], threads: int = 1) -> JobReport:
    """Train the groups of models that `items` describe and store their missing members.

    Each item (a `TrainingItem`, or its JSON as the launcher hands it over) is a group of models
    trained together; only the members in its `store` that are not yet stored are written. If a
    stack raises, its members are retried one by one, so one bad model fails alone. `threads`
    fixes torch's intra-op threads (1 by default: results then do not depend on how many jobs
    share the machine)."""
    import torch  # here, not at the top: the launching process imports this module without training

    from .stacked import train_stack
    from .training import train

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        store = Store(root, create=True)
        report = JobReport()
        job_id = current_job_id()
        queue = [TrainingItem.from_json(item) if isinstance(item, str) else item for item in items]  # text: parsed once
        version = zoo.code_version()  # (two git calls: once per job, not once per model)
        while queue:
            item = queue.pop(0)
            group = list(item.models)
            stored = store.stored_ids("models", group[0].zoo)
            wanted = [m for m in item.store if m not in stored]
            report.skipped += [m for m in item.store if m not in wanted]
            if not wanted:
                continue
            try:
                data = load_dataset(group[0].dataset)
                stacked = item.stacked and shape_key(group[0]) is not None
                if stacked:
                    results = train_stack(group, data)
                else:  # the reference path saves its state now and then, and resumes from it
                    results = [train(group[0], data, resume=store.resume_path(group[0].zoo, group[0].model_id))]
                stored = store.stored_ids("models", group[0].zoo)  # another run may have stored some meanwhile
                new = [t for t in results if t.spec.model_id in wanted and t.spec.model_id not in stored]
                # in threads: a model's four parts cost ~10 fsyncs, which wait on the disk, not the
                # CPU (32 models: 0.65-0.8 s with 4-8 threads against 1.1-1.3 s one by one, here)
                with ThreadPoolExecutor(STORE_THREADS) as pool:
                    list(pool.map(lambda trained: write_model(store, trained, version), new))
                for trained in new:
                    report.trained.append(trained.spec.model_id)
                    if trained.resumed_from is not None:
                        report.resumed[trained.spec.model_id] = trained.resumed_from
                for trained in results:
                    store.resume_path(trained.spec.zoo, trained.spec.model_id).unlink(missing_ok=True)
            except StorageError:
                raise  # a full disk or a read-only root: no other model can be stored either
            except Exception as e:
                if len(group) > 1:
                    queue[:0] = [replace(item, models=(spec,), store=(spec.model_id,))
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

    def __call__(self, root: str, items: Sequence[TrainingItem | str], threads: int = 1) -> JobReport:
        return train_and_store(root, items, threads)


def work_items(
    specs: list[ModelSpec], missing: set[str], stacked: bool = True, limit: int | None = None,
) -> list[TrainingItem]:
    """The job items that train the `missing` models of `specs` (a whole zoo, or a subset of
    it), at most `limit` stored: stacks cut from `specs` (see `group_into_stacks`), or one model
    per item on the reference path when `stacked` is False."""
    groups = group_into_stacks(specs) if stacked else [[spec] for spec in specs]
    items, budget = [], float("inf") if limit is None else max(limit, 0)
    for group in groups:
        store = [spec.model_id for spec in group if spec.model_id in missing][: int(min(budget, len(group)))]
        if store:
            on_stack = stacked and stack_key(group[0]) is not None  # decided where the zoo is planned
            items.append(TrainingItem(tuple(group), tuple(store), on_stack))
            budget -= len(store)
    return items
