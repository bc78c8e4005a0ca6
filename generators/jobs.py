"""The job function: train a list of models and store each one. Safe to run twice.

A job skips every model already stored, stores each group the moment it is trained (a stack as
one pack per table, a single model as per-model parts; so a killed job loses at most the group in
progress, and of a single model only the epochs since its last saved state: `resume.py`), and
records a failure instead of raising, so one bad model never takes the rest of its job down.
Because part files are named by model id and replaced atomically, and packs are written under the
packer's lock after a last look at what is stored, a job that runs twice (a requeue, two runs at
once) never duplicates rows.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import submitit

import zoo
from zoo.catalog import ModelSpec
from zoo.datasets import load_dataset
from zoo.errors import StorageError
from zoo.launch import current_job_id, in_job_process, keep_freed_memory, leaving_without_teardown
from zoo.rows import TrainedModel, write_failure, write_model, write_models
from zoo.storage import Store, pyarrow_without_pandas

from .plan import group_into_stacks, shape_key, stack_key

STORE_THREADS = 4  # models written at once, while the next stack trains


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
        # A trained group's models are stored in a thread while the next group trains (a stack's
        # as one pack per table, `write_models`; a single model as parts), so a job of several
        # stacks waits for the disk once, at its end, instead of once per stack.
        with ThreadPoolExecutor(STORE_THREADS) as writers:
            storing: list[tuple[list[TrainedModel], Future]] = []
            while queue:
                for _, writing in storing:  # a full disk or a read-only root: no other model can be stored
                    if writing.done() and isinstance(writing.exception(), StorageError):
                        raise writing.exception()
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
                except StorageError:
                    raise  # a full disk or a read-only root: no other model can be stored either
                except Exception as e:
                    if len(group) > 1:
                        queue[:0] = [replace(item, models=(spec,), store=(spec.model_id,))
                                     for spec in group if spec.model_id in wanted]
                        continue
                    _fail(store, report, group[0], e, job_id)
                    continue
                stored = store.stored_ids("models", group[0].zoo)  # another run may have stored some meanwhile
                new = [t for t in results if t.spec.model_id in wanted and t.spec.model_id not in stored]
                storing.append((new, writers.submit(_store, store, new, version)))
                kept = {t.spec.model_id for t in new}
                for trained in results:
                    if trained.spec.model_id not in kept:  # (trained for its company's sake: nothing to keep)
                        store.resume_path(trained.spec.zoo, trained.spec.model_id).unlink(missing_ok=True)
            for new, writing in storing:
                try:
                    ids = set(writing.result())
                except StorageError:
                    raise
                except Exception as e:
                    for trained in new:
                        _fail(store, report, trained.spec, e, job_id)
                    continue
                report.trained += [t.spec.model_id for t in new if t.spec.model_id in ids]
                report.skipped += [t.spec.model_id for t in new if t.spec.model_id not in ids]
                report.resumed.update({t.spec.model_id: t.resumed_from for t in new
                                       if t.spec.model_id in ids and t.resumed_from is not None})
        return report
    finally:
        torch.set_num_threads(previous)


def _store(store: Store, models: list[TrainedModel], version: str) -> list[str]:
    """Store trained models (several, a stack: one pack per table, which `Store.pack` merges with
    the run's other small packs at its end; one: its parts), then drop the training states they
    may have saved (`resume.py`); returns the ids stored."""
    if len(models) > 1:
        ids = write_models(store, models, version)
    else:
        for trained in models:
            write_model(store, trained, version)
        ids = [t.spec.model_id for t in models]
    for trained in models:
        store.resume_path(trained.spec.zoo, trained.spec.model_id).unlink(missing_ok=True)
    return ids


def _fail(store: Store, report: JobReport, spec: ModelSpec, e: Exception, job_id: str) -> None:
    message = f"{type(e).__name__}: {e}"
    write_failure(store, spec.zoo, spec.model_id, message + "\n" + traceback.format_exc(), job_id)
    report.failed[spec.model_id] = message


class TrainAndStore(submitit.helpers.Checkpointable):
    """`train_and_store` as a checkpointable submitit job. When SLURM is about to stop the job
    (its time limit, a preemption), submitit calls `checkpoint`, which requeues the same call;
    since stored models are skipped, the requeued job resumes after the last model it stored,
    and a model cut off mid-training continues from its last saved state (`resume.py`)."""

    def __call__(self, root: str, items: Sequence[TrainingItem | str], threads: int = 1) -> JobReport:
        if in_job_process():
            pyarrow_without_pandas()
            keep_freed_memory()  # (the allocator's settings are the job's own: not in the launcher's process)
        with leaving_without_teardown():  # (entered before `train_and_store` imports torch)
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
