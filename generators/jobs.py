"""The job function: train a list of models and store each one. Safe to run twice.

A job skips every model already stored, stores each model the moment it is trained (so a killed
job loses at most the model in progress), and records a failure instead of raising, so one bad
model never takes the rest of its job down. Because part files are named by model id and
replaced atomically, a job that runs twice (a requeue, two runs at once) never duplicates rows.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field

import torch

import zoo
from zoo.catalog import ModelSpec
from zoo.datasets import load_dataset
from zoo.storage import Store, write_failure, write_model

from .training import train


@dataclass
class JobReport:
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # model_id -> error


def train_and_store(root: str, items: list[str], threads: int = 1) -> JobReport:
    """Train and store the models whose JSON specs are given, skipping those already stored.

    `threads` fixes torch's intra-op threads (1 by default: results then do not depend on how
    many jobs share the machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        store = Store(root, create=True)
        report = JobReport()
        job_id = os.environ.get("SLURM_JOB_ID", os.environ.get("SUBMITIT_LOCAL_JOB_ID", ""))
        for text in items:
            spec = ModelSpec.from_json(text)
            model_id = spec.model_id
            if store.part_path("models", spec.zoo, model_id).exists():
                report.skipped.append(model_id)
                continue
            try:
                trained = train(spec, load_dataset(spec.dataset))
                write_model(store, trained, zoo.code_version())
                report.trained.append(model_id)
            except Exception as e:  # recorded per model: the rest of the job goes on
                message = f"{type(e).__name__}: {e}"
                write_failure(store, spec.zoo, model_id, message + "\n" + traceback.format_exc(), job_id)
                report.failed[model_id] = message
        return report
    finally:
        torch.set_num_threads(previous)
