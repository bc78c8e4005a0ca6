"""Run work items as submitit jobs, with a concurrency cap and a progress bar: the one launcher
that generation and metrics share.

Executors: `local` (default; worker processes on this machine, at most `workers` at once),
`debug` (in this process, one job after another; for tests and debugging) and `slurm` (a job
array with a parallelism cap). Work items are JSON strings; a job function receives the root,
a list of items and fixed keyword arguments, and must be idempotent (SLURM may run a job twice).

submitit pickles each job's function and arguments into the jobs folder and reads its results
back from there; that folder is our own scratch space, kept outside the zoo root (a zoo root
never holds pickles), under `--jobs-dir` / env ZOO_JOBS_DIR, default ~/.cache/zoo/jobs.

SLURM jobs are waited for with `zoo.slurm` (one `sacct` call for all of a launch's jobs at most
every ZOO_SACCT_INTERVAL_S seconds, `squeue` for a job that may have been requeued), not with
submitit's own watcher, whose interval is no public setting.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from . import slurm
from .catalog import Launch
from .errors import StorageError, ZooError

EXECUTORS = ("local", "debug", "slurm")


def current_job_id() -> str:
    """The id submitit gives the job this process runs in ("123_4" for an array task), or ""."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID", "")


def in_job_process() -> bool:
    """Whether this process is a submitit job's own, local or on SLURM (not the debug executor's,
    which is the launcher's)."""
    return os.environ.get("SUBMITIT_EXECUTOR") in ("local", "slurm")


# glibc's mallopt(3) parameters (<malloc.h>)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(trim_mb: int = 128, mmap_mb: int = 32) -> bool:
    """Have the C library's malloc keep the memory this process frees for its next allocations,
    instead of handing it back to the kernel at once: blocks under `mmap_mb` MB come from the
    heap, and the heap's free top is given back only beyond `trim_mb` MB. Returns whether the
    settings took (False where the C library has no `mallopt` or ignores it: macOS, musl).

    With glibc's defaults (blocks above a threshold that follows the largest block freed are
    mapped and unmapped one by one; the heap is trimmed past twice that threshold), a stacked CNN
    step's feature maps (6.4 MB each for 4 models of width 4, batch 128, 28 x 28) went back to the
    kernel and were faulted in page by page at every step: a step took 31-36 ms, and 15-19 ms with
    these settings (measured here; a plain one-model loop's step gained 0-9%, and its whole run,
    evaluation included, 1.2-1.5x at batch 128: `perf/population_speed.py`). Set by hand through
    ctypes, a few lines: no kept library sets allocator options, and preloading jemalloc or
    tcmalloc (PyTorch's tuning guide) needs a system package and the launch environment."""
    import ctypes

    try:
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    except (OSError, TypeError):  # (no process-wide symbol table to open, as on Windows)
        return False
    if mallopt is None:
        return False
    return mallopt(_M_MMAP_THRESHOLD, mmap_mb << 20) == 1 and mallopt(_M_TRIM_THRESHOLD, trim_mb << 20) == 1


@contextmanager
def leaving_without_teardown():
    """Wrap a job function's work so that its process, once the work returned and submitit saved
    the result, leaves without the interpreter's teardown (exit status 0, as it would have been).

    A process that imported torch took 0.5-0.8 s to tear down here (freeing its modules, and
    libtorch's static destructors): CPU taken from the job still running on the other core, and
    time before a pipe the job inherited closes. Entered before the work imports torch, the exit
    handler runs after the handlers that the work's imports register (LIFO); the ones registered
    before it (logging, at submitit's import) are done here. It leaves only when the work returned,
    the result file exists and no exception was printed (submitit re-raises after saving an error):
    any other ending takes Python's own exit, with its status. A no-op outside a job's process."""
    if not in_job_process():
        yield
        return
    import submitit

    returned: list[bool] = []
    atexit.register(_leave_once_saved, returned, submitit.JobEnvironment().paths.result_pickle)
    yield
    returned.append(True)


def _leave_once_saved(returned: list[bool], result: Path) -> None:
    if returned and result.exists() and not hasattr(sys, "last_value"):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@dataclass
class LaunchOptions:
    executor: str = "local"
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    items_per_job: int | None = None
    limit: int | None = None
    jobs_dir: Path | None = None
    slurm: Launch = field(default_factory=Launch)
    poll_seconds: float | None = None  # how often finished jobs are looked for (None: 0.1 s locally, where a short
    # job's result waits at most this; 0.5 s on SLURM, where each look touches every job's folder on a shared file system)
    progress_seconds: float = 0.5  # how often `on_poll` (a progress bar that lists the store) is called
    wait_timeout_min: float | None = None  # None: see `wait_limit`

    def wait_limit(self) -> float:
        """Seconds a job may go without a result before it is cancelled and reported failed:
        SLURM may requeue a job (node failure, preemption, a timeout with checkpointing), so
        there three of its time limits, plus 10 minutes for the queue."""
        if self.wait_timeout_min is not None:
            return self.wait_timeout_min * 60
        factor = 3 if self.executor == "slurm" else 1
        return (factor * self.slurm.timeout_min + 10) * 60

    def check(self) -> None:
        if self.executor not in EXECUTORS:
            raise ZooError(f"unknown executor {self.executor!r}; known: {', '.join(EXECUTORS)}")
        if self.workers < 1:
            raise ZooError("--workers must be at least 1")
        if self.items_per_job is not None and self.items_per_job < 1:
            raise ZooError("--models-per-job must be at least 1")
        if self.executor == "slurm":
            slurm.sacct_interval_s()  # a bad ZOO_SACCT_INTERVAL_S is refused before anything is submitted


@dataclass
class JobOutcome:
    items: list[str]
    result: Any = None
    error: str | None = None  # the job as a whole died (killed, out of memory, node failure)
    storage_error: str | None = None  # it stopped because the root could not be written (`StorageError`)


def run_jobs(
    function: Callable[..., Any],
    items: list[str],
    options: LaunchOptions,
    name: str,
    kwargs: dict | None = None,
    on_poll: Callable[[], None] | None = None,
    on_submit: Callable[[str, list[tuple[str, list[str]]]], None] | None = None,
) -> list[JobOutcome]:
    """Split `items` into jobs, run `function(items=chunk, **kwargs)` for each through submitit,
    and return every job's outcome. `on_poll` is called between polls (to move a progress bar).
    The jobs folder is removed when every job succeeded."""
    options.check()
    if not items:
        return []
    chunks = _chunks(items, _items_per_job(options, len(items)))
    folder = _run_dir(options, name)
    executor = _executor(options, folder)
    watch = SlurmWatch(slurm.sacct_interval_s()) if options.executor == "slurm" else None
    kwargs = kwargs or {}
    outcomes: list[JobOutcome] = []
    running: list[tuple[Any, list[str]]] = []
    queue = list(chunks)
    submitted: list[tuple[str, list[str]]] = []  # (job id, items) of this run, for on_submit

    def record(new: list[tuple[Any, list[str]]]) -> None:
        submitted.extend((str(job.job_id), chunk) for job, chunk in new)
        if on_submit:
            on_submit(folder.name, submitted)

    if options.executor == "slurm":
        with executor.batch():
            running = [(executor.submit(function, items=chunk, **kwargs), chunk) for chunk in queue]
        queue = []
        record(running)
    limit = options.workers if options.executor == "local" else 1
    started = {id(job): time.monotonic() for job, _ in running}
    polled = -math.inf
    while queue or running:
        new = []
        while queue and len(running) < limit:
            chunk = queue.pop(0)
            if options.executor == "local":
                # one executor per local job: submitit spaces one executor's submissions 0.2 s
                # apart (its guard for a cluster's scheduler), which started the second of two
                # local jobs 0.2 s late; a fresh one (same folder and parameters) starts at once
                executor = _executor(options, folder)
            running.append((executor.submit(function, items=chunk, **kwargs), chunk))
            started[id(running[-1][0])] = time.monotonic()
            new.append(running[-1])
        if new:  # (recorded once all are started: writing the record delayed the next start by 0.3-0.7 s)
            record(new)
        if watch is not None:
            watch.refresh([str(job.job_id) for job, _ in running])
        for job, chunk in [r for r in running if _finished(r[0], watch)]:
            running.remove((job, chunk))
            outcomes.append(_outcome(job, chunk, watch))
        for job, chunk in [r for r in running if time.monotonic() - started[id(r[0])] > options.wait_limit()]:
            running.remove((job, chunk))
            outcomes.append(_give_up(job, chunk, options.wait_limit()))
        if on_poll and (not running or time.monotonic() - polled >= options.progress_seconds):
            on_poll()
            polled = time.monotonic()
        if running:
            time.sleep(options.poll_seconds or (0.1 if options.executor == "local" else 0.5))
    if all(o.error is None for o in outcomes):
        shutil.rmtree(folder, ignore_errors=True)
    for outcome in outcomes:  # a full disk or a read-only root stops the command, as it stopped the job
        if outcome.storage_error is not None:
            raise StorageError(outcome.storage_error)
    return outcomes


def _items_per_job(options: LaunchOptions, n: int) -> int:
    if options.items_per_job is not None:
        return options.items_per_job
    if options.executor == "local":
        return math.ceil(n / options.workers)  # one job per worker: torch is imported once per job
    if options.executor == "slurm":
        return options.slurm.models_per_job or 1
    return 1


def _chunks(items: list[str], size: int) -> list[list[str]]:
    """Split round-robin, so each job gets a similar mix of cheap and expensive items."""
    n_jobs = math.ceil(len(items) / size)
    return [items[i::n_jobs] for i in range(n_jobs)]


def _run_dir(options: LaunchOptions, name: str) -> Path:
    base = Path(options.jobs_dir or os.environ.get("ZOO_JOBS_DIR") or Path.home() / ".cache" / "zoo" / "jobs")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return base / f"{name}-{stamp}-{os.getpid()}"


def _executor(options: LaunchOptions, folder: Path):
    import submitit

    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=options.executor)
    s = options.slurm
    if options.executor == "slurm":
        optional = {
            "slurm_partition": s.partition,
            "mem_gb": s.mem_gb,
            "slurm_account": s.account,
            "slurm_qos": s.qos,
            "slurm_constraint": s.constraint,
            "slurm_additional_parameters": dict(s.extra) or None,
        }
        executor.update_parameters(
            timeout_min=s.timeout_min,
            slurm_signal_delay_s=s.signal_delay_s,
            gpus_per_node=s.gpus_per_node,
            cpus_per_task=s.cpus_per_task,
            slurm_array_parallelism=s.array_parallelism,
            **{k: v for k, v in optional.items() if v is not None},
        )
    elif options.executor == "local":
        executor.update_parameters(timeout_min=s.timeout_min)
    return executor


@dataclass
class SlurmWatch:
    """What SLURM says about a launch's jobs: their states from one `sacct` call for all of them
    at most every `interval_s` seconds (ZOO_SACCT_INTERVAL_S, default 30), and, for a job that
    ended without a result, whether `squeue` lists it queued again (asked once per sacct answer).
    submitit's own watcher is not asked: it calls sacct 2, 4, 8 ... s after each submission and
    then only every 10 minutes, so a job that ended or was cancelled went unnoticed for minutes,
    and its interval is no public setting."""

    interval_s: float
    states: dict[str, str] = field(default_factory=dict)  # job id -> state, as last known
    queued_again: dict[str, bool] = field(default_factory=dict)  # job id -> in squeue again
    asked_at: float = -math.inf

    def refresh(self, job_ids: list[str]) -> None:
        if job_ids and time.monotonic() - self.asked_at >= self.interval_s:
            self.states.update(slurm.states_in_sacct(job_ids))  # no answer ({}) keeps what was known
            self.queued_again.clear()
            self.asked_at = time.monotonic()

    def state(self, job) -> str:
        return self.states.get(str(job.job_id), "")

    def finished(self, job) -> bool:
        """Whether a job's result is written, or it ended without one and is not queued again:
        SLURM requeues a job whose node failed (NODE_FAIL) or that was preempted, and sacct may
        report the ended run first. Such a job is waited for, not reported failed (its models
        would train twice); so is a job sacct does not know yet."""
        if _result_written(job):
            return True
        state = self.state(job)
        if not state or slurm.will_still_run(state):
            return False
        job_id = str(job.job_id)
        if job_id not in self.queued_again:
            self.queued_again[job_id] = slurm.is_queued_again(job_id)
        return not self.queued_again[job_id]


def _finished(job, watch: SlurmWatch | None) -> bool:
    if watch is not None:
        return watch.finished(job)
    if _local(job) and _result_written(job):  # (see `_outcome`)
        return True
    try:
        return job.done()
    except Exception:  # the debug executor runs the job inside done() and may raise there
        return True


def _local(job) -> bool:
    import submitit

    return isinstance(job, submitit.LocalJob)


def _result_written(job) -> bool:
    """Whether submitit wrote the job's result (or its error). The folder is touched first, as
    submitit's `done()` does, so that a network file system shows a file written elsewhere."""
    folder = job.paths.folder
    try:
        folder.chmod(folder.stat().st_mode)
    except OSError:
        pass
    return job.paths.result_pickle.exists()


def _give_up(job, chunk: list[str], seconds: float) -> JobOutcome:
    """A job with no result in time (lost by the scheduler, a node that never came back):
    cancel it and report its items failed; the next run retries them."""
    try:
        job.cancel(check=False)
    except Exception:  # already gone: nothing to cancel
        pass
    return JobOutcome(chunk, error=f"job {job.job_id}: no result after {seconds / 60:.1f} min; cancelled")


def _outcome(job, chunk: list[str], watch: SlurmWatch | None) -> JobOutcome:
    if watch is not None:  # submitit would wait 15 s for a result file that cannot come
        state = watch.state(job)
        if slurm.ended_without_completing(state) and not _result_written(job):
            return JobOutcome(chunk, error=f"job {job.job_id} ended without a result ({state})")
    if _local(job) and _result_written(job):
        # A local job is done once its result is written (atomically, by rename): submitit's own
        # `result()` waits for the process to exit, and a process that imported torch takes
        # 0.4-0.6 s to tear down here, which every `zoo generate` paid once more at its end.
        from submitit.core.utils import pickle_load

        outcome, value = pickle_load(job.paths.result_pickle)  # (the jobs folder is ours: see the module)
        if outcome == "success":
            return JobOutcome(chunk, result=value)
        return _failed(job, chunk, str(value), "no message")
    try:
        return JobOutcome(chunk, result=job.result())
    except Exception as e:
        return _failed(job, chunk, str(e), type(e).__name__)


def _failed(job, chunk: list[str], text: str, default: str) -> JobOutcome:
    """The outcome of a job that raised: the last line of its traceback, and, when that is a
    `StorageError`, its message (which stops the command: no other job could store either)."""
    text = text.strip()
    last = text.splitlines()[-1] if text else default
    name, _, message = last.partition(": ")
    storage = message if name in (f"{StorageError.__module__}.{StorageError.__name__}", StorageError.__name__) else None
    return JobOutcome(chunk, error=f"job {job.job_id} failed: {last}", storage_error=storage)
