"""Generation and metrics on a real single-node SLURM (scripts/slurm-single-node.sh), and the
faults the SLURM path must survive. The cluster is started once per session (the script is
idempotent: under `.ci/run` it is already up). Deselect with -m "not slurm"."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import zoo
from zoo.cli import main
from zoo.storage import Store

from .conftest import REPO

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SCRIPT = REPO / "scripts" / "slurm-single-node.sh"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    """The environment a SLURM client needs (SLURM_CONF), with the cluster up."""
    base = os.environ.get("ZOO_SLURM_BASE", "/tmp/zoo-slurm")
    run = subprocess.run(["bash", str(SCRIPT), "up", base], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"could not start the single-node SLURM (needs root and Debian's slurm-wlm):\n{run.stderr[-3000:]}"
    conf = f"{base}/slurm/slurm.conf"
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    os.environ["ZOO_SACCT_INTERVAL_S"] = "3"  # notice ended jobs within seconds (a test cluster minds no load)
    yield {**os.environ, "SLURM_CONF": conf, "ZOO_JOBS_DIR": str(tmp_path_factory.mktemp("slurm-jobs"))}
    os.environ.pop("ZOO_SACCT_INTERVAL_S", None)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


@pytest.fixture(autouse=True)
def empty_queue_after(slurm):
    """Each test leaves the queue empty: a job it left behind (a failed assertion, a requeued
    job held for 120 s) would otherwise run into the next test."""
    yield
    if squeue(slurm):
        subprocess.run(["scancel", "--full", "--quiet"] + [job for job, _ in squeue(slurm)], env=slurm, timeout=30)
        wait_for(lambda: not squeue(slurm), 150, "the queue to empty after the test")


def checkpoint_hashes(root: Path) -> list[tuple]:
    return sorted(zoo.open(root).sql("select model_id, epoch, sha256 from checkpoints").itertuples(index=False))


def row_counts(root: Path) -> tuple[int, int, int]:
    z = zoo.open(root)
    return tuple(int(z.sql(f"select count(*) from {t}").iloc[0, 0]) for t in ("models", "checkpoints", "curves"))


def zoo_command(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "zoo", *args, "--no-progress"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(condition, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def squeue(env) -> list[tuple[str, str]]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, env=env, timeout=30).stdout
    return [tuple(line.split()) for line in out.splitlines() if line.strip()]


def finish_releasing_requeued(run: subprocess.Popen, env, timeout: float) -> tuple[str, str]:
    """Wait for `run`, starting requeued jobs at once: SLURM holds a requeued job for 120 s
    (Reason=BeginTime), which says nothing about our code and would triple these tests' time."""
    deadline = time.monotonic() + timeout
    while run.poll() is None:
        assert time.monotonic() < deadline, f"generate did not finish within {timeout:.0f} s"
        out = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%i %r"], capture_output=True, text=True, env=env, timeout=30).stdout
        for job in (line.split()[0] for line in out.splitlines() if line.endswith("BeginTime")):
            subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=env, timeout=30)
        time.sleep(1)
    return run.communicate(timeout=60)


def test_slurm_gives_the_local_executors_zoo_and_metrics(slurm, smoke_root, tmp_path, capsys):
    root = tmp_path / "slurm"
    assert main(["generate", "smoke", "--root", str(root), "--executor", "slurm", "--models-per-job", "3",
                 "--array-parallelism", "2", "--timeout-min", "10", "--no-progress"]) == 0
    assert checkpoint_hashes(root) == checkpoint_hashes(smoke_root)
    assert row_counts(root) == row_counts(smoke_root) == (8, 24, 32)
    local = tmp_path / "local"
    shutil.copytree(smoke_root, local)
    families = "performance,weightspace,spectral"
    assert main(["metrics", "smoke", "--root", str(root), "--executor", "slurm", "--only", families, "--no-progress"]) == 0
    assert main(["metrics", "smoke", "--root", str(local), "--executor", "local", "--only", families, "--no-progress"]) == 0
    query = "select model_id, epoch, family, name, value from metrics order by all"
    a, b = zoo.open(root).sql(query), zoo.open(local).sql(query)
    assert len(a) > 100 and a.equals(b)
    capsys.readouterr()
    assert main(["status", "smoke", "--root", str(root)]) == 0
    assert capsys.readouterr().out.startswith("smoke: 8 done, 0 running, 0 failed, 0 missing of 8")


def test_a_job_that_raises_is_reported_and_the_others_complete(slurm, tmp_path, capsys):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"zoos": {"sizes": {
        "description": "digits MLPs over training-set sizes; the largest exceeds the data set, so its job raises",
        "dataset": {"name": "digits"}, "architecture": {"name": "mlp", "width": 8},
        "load": {"name": "train_size", "values": [100, 200, 100000]},
        "temperature": {"name": "batch_size", "values": [32]}, "seeds": [0, 1],
        "training": {"epochs": 1}, "checkpoints": [0, 1]}}}))
    common = ["--catalog", str(catalog), "--root", str(tmp_path / "root")]
    assert main(["generate", "sizes", *common, "--executor", "slurm", "--models-per-job", "2", "--no-progress"]) == 1
    capsys.readouterr()
    assert main(["status", "sizes", *common]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sizes: 4 done, 0 running, 2 failed, 0 missing of 6")
    failed = [line for line in out.splitlines() if line.startswith("failed")]
    assert len(failed) == 2 and all("train_size 100000 exceeds" in line and "job " in line for line in failed)
    assert all(line.split("job ")[1].split()[0] not in ("", "?") for line in failed)  # the SLURM job id
    # retried on the next run (and failing again the same way)
    assert main(["generate", "sizes", *common, "--executor", "slurm", "--no-progress"]) == 1
    assert "trained 0, skipped 0, failed 2 of 2 planned" in capsys.readouterr().err


def test_scancel_of_a_running_array_then_a_rerun_completes_exactly_the_missing(slurm, smoke_root, tmp_path):
    root = tmp_path / "root"
    run = zoo_command("generate", "smoke", "--root", str(root), "--executor", "slurm", "--models-per-job", "1",
                      "--array-parallelism", "1", env=slurm)
    store = Store
    wait_for(lambda: (root / "tables").is_dir() and len(store(root).stored_ids("models", "smoke")) >= 2, 240,
             "two models stored")
    jobs = zoo.open(root).sql("select distinct job_id from jobs")["job_id"]
    array = sorted({j.split("_")[0] for j in jobs})
    subprocess.run(["scancel", *array], env=slurm, check=True, timeout=30)
    run.communicate(timeout=240)
    stored_before = store(root).stored_ids("models", "smoke")
    assert 2 <= len(stored_before) < 8
    status = subprocess.run([sys.executable, "-m", "zoo", "status", "smoke", "--root", str(root)], env=slurm,
                            capture_output=True, text=True, timeout=120).stdout
    assert status.startswith(f"smoke: {len(stored_before)} done, 0 running, 0 failed, {8 - len(stored_before)} missing")
    assert main(["generate", "smoke", "--root", str(root), "--executor", "slurm", "--models-per-job", "4", "--no-progress"]) == 0
    assert store(root).stored_ids("models", "smoke") - stored_before == set(checkpoint_ids(smoke_root)) - stored_before
    assert checkpoint_hashes(root) == checkpoint_hashes(smoke_root) and row_counts(root) == (8, 24, 32)


def checkpoint_ids(root: Path) -> list[str]:
    return list(zoo.open(root).sql("select model_id from models")["model_id"])


def test_two_generates_of_one_zoo_at_once_store_each_model_once(slurm, smoke_root, tmp_path):
    root = tmp_path / "root"
    runs = [zoo_command("generate", "smoke", "--root", str(root), "--executor", "slurm", "--models-per-job", "2", env=slurm)
            for _ in range(2)]
    for run in runs:
        run.communicate(timeout=300)
        assert run.returncode == 0
    assert checkpoint_hashes(root) == checkpoint_hashes(smoke_root) and row_counts(root) == (8, 24, 32)


def wide_mlps(tmp_path: Path, name: str, seeds: int) -> Path:
    """A catalog of `seeds` wide digits MLPs: each takes the reference path (~6 s here), so a
    fault can land while a job is mid-way, however fast job start and end become."""
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"zoos": {name: {
        "description": f"{seeds} wide digits MLPs (reference path, ~6 s each)", "dataset": {"name": "digits"},
        "architecture": {"name": "mlp", "depth": 2}, "load": {"name": "width", "values": [512]},
        "temperature": {"name": "batch_size", "values": [16]}, "seeds": list(range(seeds)),
        "training": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "epochs": 20}, "checkpoints": [0, 20]}}}))
    return catalog


def test_a_node_failure_requeues_the_job_and_the_zoo_completes(slurm, tmp_path):
    """Kill slurmd, its step daemons and the job's processes once the job has stored its first
    model and trains its second: SLURM marks the job NODE_FAIL and requeues it once slurmd is
    back; the launch waits for the requeued run, each model is stored once, and the zoo is the one
    a clean run stores."""
    catalog = wide_mlps(tmp_path, "wide", seeds=2)
    root = tmp_path / "root"
    run = zoo_command("generate", "wide", "--catalog", str(catalog), "--root", str(root), "--executor", "slurm",
                      "--models-per-job", "2", env=slurm)
    first = wait_for(lambda: (root / "tables").is_dir() and Store(root).stored_ids("models", "wide"), 180,
                     "a first model", poll=0.2)
    for how, pattern in (("-x", "slurmd"), ("-x", "slurmstepd"), ("-f", "submitit.core._submit")):
        subprocess.run(["pkill", "-9", how, pattern], timeout=30)
    # after SlurmdTimeout (10 s here) without an answer, slurmctld declares the node down: NODE_FAIL
    wait_for(lambda: "down" in subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                                              env=slurm, timeout=30).stdout, 180, "the node to be declared down", poll=2)
    base = os.environ.get("ZOO_SLURM_BASE", "/tmp/zoo-slurm")
    up = subprocess.run(["bash", str(SCRIPT), "up", base], capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr[-2000:]
    out, err = finish_releasing_requeued(run, slurm, 400)
    history = subprocess.run(["sacct", "-n", "-P", "-D", "-o", "JobID,State"], capture_output=True, text=True,
                             env=slurm, timeout=30).stdout
    assert "NODE_FAIL" in history, history  # the job was requeued, not just restarted by us
    # the launch waits for the requeued job (it does not report it failed and train its models twice)
    assert run.returncode == 0 and re.search(r"trained \d+, skipped \d+, failed 0 of 2", err), err[-2000:]
    assert len(first) == 1 and row_counts(root) == (2, 4, 42), history  # each model once: 2 checkpoints, 21 curve rows
    clean = tmp_path / "clean"
    assert main(["generate", "wide", "--catalog", str(catalog), "--root", str(clean), "--executor", "debug",
                 "--no-progress"]) == 0
    assert checkpoint_hashes(root) == checkpoint_hashes(clean)


def sleepy(items: list[str], seconds: float) -> list[str]:
    time.sleep(seconds)
    return items


def test_a_job_without_a_result_in_time_is_cancelled_and_reported(slurm, tmp_path):
    from zoo.launch import LaunchOptions, run_jobs

    options = LaunchOptions(executor="slurm", jobs_dir=tmp_path / "jobs", wait_timeout_min=0.1, poll_seconds=0.5)
    start = time.monotonic()
    outcomes = run_jobs(sleepy, ["a", "b"], options, "sleepy", kwargs={"seconds": 300})
    assert time.monotonic() - start < 60
    assert len(outcomes) == 2 and all("no result after 0.1 min; cancelled" in o.error for o in outcomes)
    try:
        # (a job killed while a node recovers from the failure test can sit in COMPLETING for a minute)
        wait_for(lambda: not squeue(slurm), 150, "the cancelled jobs to leave the queue")
    except AssertionError as e:  # say what SLURM still shows, and why
        nodes = subprocess.run(["sinfo", "-N", "-o", "%N %T %E"], capture_output=True, text=True, env=slurm, timeout=30).stdout
        raise AssertionError(f"{e}: squeue {squeue(slurm)}; sinfo {nodes.strip()}") from None


def test_a_job_warned_of_its_time_limit_requeues_and_resumes_from_its_last_saved_epoch(slurm, tmp_path):
    """SLURM warns a job `signal_delay_s` before its time limit with SIGUSR2 (`--signal`, set
    by submitit); the job then checkpoints and requeues itself, and the requeued run trains only
    the models not yet stored, while those stored before keep their rows, and the model cut off
    mid-training continues from its last saved epoch. SLURM sends that warning with a 60 s
    resolution, so the test sends the same signal itself once a first model is stored and the
    next has saved an epoch, under a limit long enough that SLURM's own warning does not come first."""
    catalog = wide_mlps(tmp_path, "slow", seeds=6)
    root = tmp_path / "root"
    run = zoo_command("generate", "slow", "--catalog", str(catalog), "--root", str(root), "--executor", "slurm",
                      "--models-per-job", "6", "--timeout-min", "10", "--signal-delay-s", "90",
                      env={**slurm, "ZOO_RESUME_EVERY_S": "0"})  # (sbatch passes the environment on)
    first = wait_for(lambda: (root / "tables").is_dir() and Store(root).stored_ids("models", "slow"), 120, "a first model")
    saved = wait_for(lambda: [p.stem for p in (root / "resume" / "slow").glob("*.safetensors")
                              if p.stem not in Store(root).stored_ids("models", "slow")], 60, "a saved epoch", poll=0.1)
    early = zoo.open(root).sql("select model_id, created_at from models").set_index("model_id")["created_at"]
    job = zoo.open(root).sql("select distinct job_id from jobs")["job_id"].iloc[0]
    script = next(Path(slurm["ZOO_JOBS_DIR"]).rglob(f"{job.split('_')[0]}*submission.sh"), None) or \
        next(p for p in Path(slurm["ZOO_JOBS_DIR"]).rglob("*submission.sh") if "slow" in str(p))
    assert "--signal=USR2@90" in script.read_text()  # the warning SLURM itself sends at the limit
    subprocess.run(["scancel", "--signal=USR2", job], env=slurm, check=True, timeout=30)
    out, err = finish_releasing_requeued(run, slurm, 400)
    assert run.returncode == 0, err[-2000:]
    history = subprocess.run(["sacct", "-n", "-P", "-D", "-j", job, "-o", "JobID,State"], capture_output=True, text=True,
                             env=slurm, timeout=30).stdout
    assert "REQUEUED" in history, history  # it checkpointed and requeued itself
    assert row_counts(root) == (6, 12, 126)  # every model once: 6 x 2 checkpoints, 6 x 21 curve rows
    later = zoo.open(root).sql("select model_id, created_at from models").set_index("model_id")["created_at"]
    assert first and len(early) < 6 and all(later[m] == early[m] for m in early.index)  # not trained again
    resumed = re.findall(r"resumed (\S+) after its saved epoch (\d+)", err)  # the model cut off, or the next
    assert saved and len(resumed) == 1 and resumed[0][0] not in early.index and int(resumed[0][1]) >= 1, err[-2000:]
    assert not list((root / "resume" / "slow").glob("*.safetensors"))


def test_zoo_bench_on_slurm_gives_the_local_runs_rows(slurm, smoke_root, tmp_path):
    """`zoo bench --executor slurm` spreads the (method, unit) pairs over array jobs, several per
    job, and stores the rows a local run stores."""
    task = tmp_path / "prune.yaml"
    task.write_text(yaml.safe_dump({"task": "prune-slurm", "protocol": "prune", "zoo": "smoke",
                                    "methods": [{"method": "magnitude_global", "sweep": {"sparsity": [0.3, 0.6]}}],
                                    "metrics": ["test_acc"]}))
    roots = {kind: tmp_path / kind for kind in ("slurm", "local")}
    for kind, root in roots.items():
        shutil.copytree(smoke_root, root)
    assert main(["bench", str(task), "--root", str(roots["slurm"]), "--executor", "slurm", "--pairs-per-job", "5",
                 "--timeout-min", "10", "--no-progress"]) == 0
    assert main(["bench", str(task), "--root", str(roots["local"]), "--no-progress"]) == 0
    query = "select method, parameters_hash, unit, metric, value, status from benchmark_results order by all"
    a, b = (zoo.open(root).sql(query) for root in roots.values())
    assert len(a) >= 16 and (a["status"] == "ok").all() and a.equals(b)
