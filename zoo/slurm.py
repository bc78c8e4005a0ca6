"""SLURM asked about jobs: the one module that knows SLURM's job states and calls `sacct` and
`squeue`. (Submitting and cancelling go through submitit: `zoo.launch`.)

A job's state is the first word of sacct's or squeue's State column ("CANCELLED by 1000" is
CANCELLED). It falls in one of three sets, or says nothing:

    WILL_STILL_RUN            queued, running, held, or requeued: a result may still come
    ENDED_WITHOUT_COMPLETING  ended other than by its script finishing (cancelled, failed, killed,
                              timed out, preempted, its node failed): no result unless written first
    COMPLETED                 its script exited 0
    ""                        SLURM does not know the job (yet), or could not be asked

`zoo status` calls a job in WILL_STILL_RUN running; a launch waits for it. A job that ended
without completing may be requeued (NODE_FAIL, PREEMPTED, a job requeueing itself), and sacct
may report the ended run first: `squeue` (the controller itself) says whether it is queued again.
"""

from __future__ import annotations

import math
import os
import subprocess

from submitit.slurm.slurm import read_job_id

from .errors import ZooError

COMPLETED = "COMPLETED"
WILL_STILL_RUN = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING",
    "STAGE_OUT", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SPECIAL_EXIT", "RESV_DEL_HOLD",
})
ENDED_WITHOUT_COMPLETING = frozenset({
    "CANCELLED", "FAILED", "NODE_FAIL", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED",
})

SACCT_TIMEOUT_S = 30.0
SACCT_INTERVAL_ENV = "ZOO_SACCT_INTERVAL_S"
SACCT_INTERVAL_DEFAULT_S = 30.0


def will_still_run(state: str) -> bool:
    return state in WILL_STILL_RUN


def ended_without_completing(state: str) -> bool:
    return state in ENDED_WITHOUT_COMPLETING


def states_in_sacct(job_ids: list[str], timeout: float = SACCT_TIMEOUT_S) -> dict[str, str]:
    """Job id ("123", "123_4") -> state, from one `sacct` call for all of them; {} when SLURM
    cannot be asked (no sacct, no answer within `timeout`). Array jobs are asked as a whole (as
    submitit does): sacct then lists every task, pending ones as one range."""
    arrays = sorted({array_of(job) for job in job_ids if job})
    if not arrays:
        return {}
    return states_in_lines(output_of(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(arrays)], timeout))


def states_in_squeue(job_ids: list[str], timeout: float = SACCT_TIMEOUT_S) -> dict[str, str]:
    """Job id -> state of the jobs still in SLURM's queue, one line per array task; {} when
    SLURM cannot be asked (and for a job it no longer lists)."""
    job_ids = [job for job in job_ids if job]
    if not job_ids:
        return {}
    return states_in_lines(output_of(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(job_ids)], timeout))


def is_queued_again(job_id: str, timeout: float = SACCT_TIMEOUT_S) -> bool:
    """Whether squeue lists the job in a state that will still run (it was requeued)."""
    return will_still_run(states_in_squeue([job_id], timeout).get(job_id, ""))


def output_of(command: list[str], timeout: float) -> str:
    """A SLURM client's standard output, "" when it is missing, fails to start or times out.
    (An unknown job id makes squeue exit 1; what it printed still counts.)"""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def states_in_lines(out: str) -> dict[str, str]:
    """"JOBID|STATE" lines -> {job id: first word of the state}, array ranges expanded."""
    states = {}
    for line in out.splitlines():
        job, _, state = line.partition("|")
        if not state.strip():
            continue
        for one in expand_job_id(job.strip()):
            states[one] = state.split()[0]
    return states


def expand_job_id(job: str) -> list[str]:
    """sacct's and squeue's "123_[0-3,5%2]" (pending array tasks) -> ["123_0", ..., "123_3",
    "123_5"]; "123_4" and "123" stay as they are. Parsed by submitit's own `read_job_id` (the
    function its watcher reads sacct with); an id it cannot read is kept as it is."""
    if not job:
        return []
    try:
        parsed = read_job_id(job)
    except ValueError:  # "123_4+0" (a heterogeneous job), or ids newer SLURMs may print
        return [job]
    out = []
    for main, *tasks in parsed:
        if not tasks:
            out.append(main)
        else:
            out += [f"{main}_{k}" for k in range(int(tasks[0]), int(tasks[-1]) + 1)]
    return out


def array_of(job_id: str) -> str:
    """"123_4" -> "123": the job id sacct lists all of an array's tasks under."""
    return job_id.split("_")[0]


def sacct_interval_s() -> float:
    """Seconds between two `sacct` calls of a launch that waits for SLURM jobs: env
    ZOO_SACCT_INTERVAL_S, default 30, at least 1 (one call per launch, for all its jobs)."""
    text = os.environ.get(SACCT_INTERVAL_ENV, "").strip()
    if not text:
        return SACCT_INTERVAL_DEFAULT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ZooError(f"env {SACCT_INTERVAL_ENV}={text!r} is not a positive number of seconds")
    return max(1.0, seconds)
