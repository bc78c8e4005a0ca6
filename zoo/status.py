"""Where a zoo's generation stands: done, running, failed and missing models, with job ids.

    done     the model is stored
    running  not stored, and its latest job is still alive: pending or running under SLURM
             (asked with `sacct`, with a timeout: `zoo.slurm`), or a local job whose process lives
    failed   not stored, and its last training raised (the `failures` table: error, job id);
             the next `zoo generate` retries it
    missing  everything else: never submitted, or its job ended without storing it (cancelled,
             killed, timed out); the next `zoo generate` trains it
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import slurm
from .catalog import ZooConfig
from .integrity import pid_alive
from .storage import Store


@dataclass
class ZooStatus:
    zoo: str
    total: int
    done: list[str] = field(default_factory=list)
    running: dict[str, str] = field(default_factory=dict)  # model id -> "job 123_4 RUNNING"
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)  # model id -> (job id, error)
    missing: dict[str, str] = field(default_factory=dict)  # model id -> its last job, if any

    def summary(self) -> str:
        return (f"{self.zoo}: {len(self.done)} done, {len(self.running)} running, {len(self.failed)} failed, "
                f"{len(self.missing)} missing of {self.total}")


def zoo_status(config: ZooConfig, store: Store, sacct_timeout: float = slurm.SACCT_TIMEOUT_S) -> ZooStatus:
    ids = [spec.model_id for spec in config.models()]
    stored = store.stored_ids("models", config.name)
    status = ZooStatus(config.name, len(ids), done=[m for m in ids if m in stored])
    jobs = _latest_jobs(store, config.name)  # model id -> (job id, executor)
    failures = _failures(store, config.name)
    states = slurm.states_in_sacct(sorted({j for j, e in jobs.values() if e == "slurm"}), sacct_timeout)
    for model_id in ids:
        if model_id in stored:
            continue
        job_id, executor = jobs.get(model_id, ("", ""))
        state = states.get(job_id, "") if executor == "slurm" else ("RUNNING" if executor == "local" and _alive(job_id) else "")
        if model_id in failures and failures[model_id][0] == job_id:  # its latest job got to it, and it raised
            status.failed[model_id] = failures[model_id]
        elif slurm.will_still_run(state):
            status.running[model_id] = f"job {job_id} {state}"
        elif model_id in failures:
            status.failed[model_id] = failures[model_id]
        else:
            status.missing[model_id] = f"job {job_id} {state}".strip() if job_id else ""
    return status


def _latest_jobs(store: Store, zoo: str) -> dict[str, tuple[str, str]]:
    table = store.read_zoo("jobs", zoo)
    if table is None or not len(table):
        return {}
    rows = table.sort_by([("submitted_at", "ascending"), ("run", "ascending")]).to_pylist()
    return {r["model_id"]: (r["job_id"], r["executor"]) for r in rows}


def _failures(store: Store, zoo: str) -> dict[str, tuple[str, str]]:
    table = store.read_zoo("failures", zoo)
    rows = table.sort_by("failed_at").to_pylist() if table is not None else []
    return {r["model_id"]: (r["job_id"], (r["error"] or "").splitlines()[0] if r["error"] else "") for r in rows}


def _alive(job_id: str) -> bool:
    """A local submitit job's id is its process id."""
    return job_id.isdigit() and pid_alive(int(job_id))
