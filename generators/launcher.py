"""Launch the missing models of a zoo as submitit jobs, with a progress bar.

Executors: `local` (default; worker processes on this machine, at most `workers` at once),
`debug` (in this process, one job after another; for tests and debugging) and `slurm`
(a job array with a parallelism cap). The plan is always "what the store lacks": rerunning
trains only what is missing, and failed models are retried.

submitit pickles each job's function and arguments into the jobs folder and reads its results
back from there; that folder is our own scratch space, kept outside the zoo root (a zoo root
never holds pickles), under `--jobs-dir` / env ZOO_JOBS_DIR, default ~/.cache/zoo/jobs.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import submitit
from tqdm import tqdm

from zoo.catalog import Launch, ModelSpec, ZooConfig
from zoo.errors import ZooError
from zoo.storage import Store

from .jobs import JobReport, train_and_store

EXECUTORS = ("local", "debug", "slurm")


@dataclass
class LaunchOptions:
    executor: str = "local"
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    models_per_job: int | None = None
    limit: int | None = None
    jobs_dir: Path | None = None
    slurm: Launch = field(default_factory=Launch)
    poll_seconds: float = 0.5


@dataclass
class GenerateReport:
    zoo: str
    n_models: int
    planned: int
    trained: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def models_per_second(self) -> float:
        return self.trained / self.seconds if self.seconds > 0 else 0.0


def missing_models(zoo: ZooConfig, store: Store, models: list[ModelSpec] | None = None) -> list[ModelSpec]:
    stored = store.stored_ids("models", zoo.name)
    return [spec for spec in (zoo.models() if models is None else models) if spec.model_id not in stored]


def generate(
    zoo: ZooConfig, store: Store, options: LaunchOptions, progress: bool = True, models: list[ModelSpec] | None = None
) -> GenerateReport:
    """Train and store every model of `zoo` (or of `models`, a subset of it) that `store` lacks,
    at most `options.limit` of them."""
    if options.executor not in EXECUTORS:
        raise ZooError(f"unknown executor {options.executor!r}; known: {', '.join(EXECUTORS)}")
    if options.workers < 1:
        raise ZooError("--workers must be at least 1")
    models = zoo.models() if models is None else models
    missing = missing_models(zoo, store, models)
    plan = missing if options.limit is None else missing[: max(options.limit, 0)]
    report = GenerateReport(zoo.name, len(models), len(plan))
    start = time.perf_counter()
    if plan:
        chunks = _chunks(plan, _models_per_job(options, len(plan)))
        run_dir = _run_dir(options, zoo.name)
        executor = _executor(options, run_dir)
        bar = tqdm(
            total=len(models), initial=len(models) - len(missing),
            desc=f"generate {zoo.name}", unit="model", disable=not progress, dynamic_ncols=True,
        )
        try:
            _run(executor, chunks, store, options, bar, report)
        finally:
            bar.close()
        if not report.failed:
            shutil.rmtree(run_dir, ignore_errors=True)
    store.write_index()
    report.seconds = time.perf_counter() - start
    return report


def _models_per_job(options: LaunchOptions, n: int) -> int:
    if options.models_per_job is not None:
        if options.models_per_job < 1:
            raise ZooError("--models-per-job must be at least 1")
        return options.models_per_job
    if options.executor == "local":
        return math.ceil(n / options.workers)  # one job per worker: torch is imported once per job
    if options.executor == "slurm":
        return options.slurm.models_per_job or 1
    return 1


def _chunks(plan: list[ModelSpec], size: int) -> list[list[ModelSpec]]:
    """Split round-robin, so each job gets a similar mix of cheap and expensive models."""
    n_jobs = math.ceil(len(plan) / size)
    return [plan[i::n_jobs] for i in range(n_jobs)]


def _run_dir(options: LaunchOptions, zoo: str) -> Path:
    base = Path(options.jobs_dir or os.environ.get("ZOO_JOBS_DIR") or Path.home() / ".cache" / "zoo" / "jobs")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return base / f"{zoo}-{stamp}-{os.getpid()}"


def _executor(options: LaunchOptions, folder: Path) -> submitit.Executor:
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=options.executor)
    s = options.slurm
    if options.executor == "slurm":
        executor.update_parameters(
            timeout_min=s.timeout_min,
            gpus_per_node=s.gpus_per_node,
            cpus_per_task=s.cpus_per_task,
            slurm_array_parallelism=s.array_parallelism,
            **({"slurm_partition": s.partition} if s.partition else {}),
            **({"mem_gb": s.mem_gb} if s.mem_gb else {}),
            **({"slurm_account": s.account} if s.account else {}),
            **({"slurm_qos": s.qos} if s.qos else {}),
            **({"slurm_constraint": s.constraint} if s.constraint else {}),
            **({"slurm_additional_parameters": dict(s.extra)} if s.extra else {}),
        )
    elif options.executor == "local":
        executor.update_parameters(timeout_min=s.timeout_min)
    return executor


def _run(executor, chunks, store: Store, options: LaunchOptions, bar, report: GenerateReport) -> None:
    """Submit the chunks (at most `workers` running at once on this machine), collect the job
    reports, and move the bar by what the store holds."""
    root = str(store.root)
    queue = [[spec.to_json() for spec in chunk] for chunk in chunks]
    planned = {spec.model_id for chunk in chunks for spec in chunk}
    done_before = bar.n
    running: list[tuple[submitit.Job, list[str]]] = []
    if options.executor == "slurm":
        with executor.batch():
            running = [(executor.submit(train_and_store, root, specs), specs) for specs in queue]
        queue = []
    limit = options.workers if options.executor == "local" else 1
    while queue or running:
        while queue and len(running) < limit:
            specs = queue.pop(0)
            running.append((executor.submit(train_and_store, root, specs), specs))
        for job, specs in [r for r in running if _finished(r[0])]:
            running.remove((job, specs))
            _collect(job, specs, report)
        stored = done_before + len(planned & store.stored_ids("models", report.zoo))
        if stored != bar.n:
            bar.update(stored - bar.n)
        if running:
            time.sleep(options.poll_seconds)


def _finished(job: submitit.Job) -> bool:
    try:
        return job.done()
    except Exception:  # the debug executor runs the job inside done() and may raise there
        return True


def _collect(job: submitit.Job, specs: list[str], report: GenerateReport) -> None:
    try:
        result: JobReport = job.result()
    except Exception as e:  # the whole job died (killed, out of memory, node failure)
        first_line = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        for text in specs:
            report.failed.setdefault(ModelSpec.from_json(text).model_id, f"job {job.job_id} failed: {first_line}")
        return
    report.trained += len(result.trained)
    report.skipped += len(result.skipped)
    report.failed.update(result.failed)
