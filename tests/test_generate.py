"""Generation end to end: idempotent reruns, kill -9 and resume, failures, limits."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import zoo
from generators import jobs
from generators.launcher import LaunchOptions, generate
from zoo.catalog import load_catalog
from zoo.storage import Store

from .conftest import REPO


def fingerprint(root) -> dict:
    """(model_id, epoch) -> weight sha256 over the whole root, failing on any duplicate row."""
    z = zoo.open(root)
    for table, key in (("models", "model_id"), ("checkpoints", "model_id, epoch"), ("curves", "model_id, epoch")):
        dupes = z.sql(f"select {key}, count(*) n from {table} group by all having n > 1")
        assert dupes.empty, f"duplicate rows in {table}"
    rows = z.sql("select model_id, epoch, sha256 from checkpoints")
    return {(m, int(e)): s for m, e, s in rows.itertuples(index=False)}


def zoo_cli(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, **kwargs.pop("env", {}), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "zoo", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)


@pytest.mark.slow
def test_local_executor_matches_debug_and_rerun_trains_nothing(smoke_root, tmp_path):
    root = tmp_path / "root"
    proc = zoo_cli("generate", "smoke", "--root", str(root), "--jobs-dir", str(tmp_path / "jobs"))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert fingerprint(root) == fingerprint(smoke_root)  # other processes, same bits
    files = sorted(p for p in root.rglob("*.parquet"))
    proc = zoo_cli("generate", "smoke", "--root", str(root), "--executor", "debug")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "already stored" in err
    assert sorted(p for p in root.rglob("*.parquet")) == files
    assert len(fingerprint(root)) == 8 * 3


@pytest.mark.slow
def test_kill_9_halfway_then_rerun_equals_an_uninterrupted_run(smoke_root, tmp_path):
    root = tmp_path / "root"
    models = root / "tables" / "models" / "smoke"
    proc = zoo_cli("generate", "smoke", "--root", str(root), "--workers", "1", "--models-per-job", "2",
                   "--jobs-dir", str(tmp_path / "jobs"))
    deadline = time.time() + 240
    # (a stack of 2 is stored as one pack per table)
    while time.time() < deadline and (not models.is_dir() or len(Store(root).stored_ids("models", "smoke")) < 2):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its running job
    proc.wait()
    stored = len(Store(root).stored_ids("models", "smoke"))
    assert 2 <= stored < 8, f"the kill came at {stored} of 8 models"
    proc = zoo_cli("generate", "smoke", "--root", str(root), "--jobs-dir", str(tmp_path / "jobs"))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"trained {8 - stored}," in err
    assert fingerprint(root) == fingerprint(smoke_root)
    assert not list(root.rglob("*.tmp"))


def test_a_job_run_twice_stores_each_model_once(smoke_root, tmp_path):
    specs = load_catalog(REPO / "catalog.yaml")["smoke"].models()
    items = jobs.work_items(specs, {s.model_id for s in specs[:2]})
    first = jobs.train_and_store(str(tmp_path / "r"), items)
    second = jobs.train_and_store(str(tmp_path / "r"), items)
    assert len(first.trained) == 2 and second.skipped == first.trained and not second.trained
    Store(tmp_path / "r").write_index()
    prints = fingerprint(tmp_path / "r")
    assert len(prints) == 2 * 3 and all(prints[k] == fingerprint(smoke_root)[k] for k in prints)


def test_a_failing_model_is_recorded_and_the_rest_complete(tmp_path, monkeypatch, capsys):
    zoo_config = load_catalog(REPO / "catalog.yaml")["smoke"]
    bad_id = zoo_config.models()[3].model_id
    from generators import stacked

    real_train = stacked.train_stack

    def flaky(specs, data):
        if bad_id in {s.model_id for s in specs}:
            raise RuntimeError("simulated divergence")
        return real_train(specs, data)

    monkeypatch.setattr(stacked, "train_stack", flaky)  # jobs import it when they train
    store = Store(tmp_path / "r", create=True)
    options = LaunchOptions(executor="debug", jobs_dir=tmp_path / "jobs")
    report = generate(zoo_config, store, options, progress=False)
    assert report.trained == 7 and list(report.failed) == [bad_id]
    failures = zoo.open(tmp_path / "r").sql("select model_id, error from failures")
    assert failures["model_id"].tolist() == [bad_id] and "simulated divergence" in failures["error"][0]
    from zoo.cli import main

    assert main(["status", "smoke", "--root", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "smoke: 7 done, 0 running, 1 failed, 0 missing of 8"
    assert out[1].startswith(f"failed   {bad_id}") and "RuntimeError: simulated divergence" in out[1]
    monkeypatch.setattr(stacked, "train_stack", real_train)
    report = generate(zoo_config, store, options, progress=False)  # the failed model is retried
    assert report.planned == 1 and report.trained == 1
    assert zoo.open(tmp_path / "r").sql("select count(*) n from failures")["n"][0] == 0


def test_limit_trains_at_most_n_missing_models(tmp_path):
    zoo_config = load_catalog(REPO / "catalog.yaml")["smoke"]
    store = Store(tmp_path / "r", create=True)
    options = LaunchOptions(executor="debug", limit=3, jobs_dir=tmp_path / "jobs")
    assert generate(zoo_config, store, options, progress=False).trained == 3
    assert generate(zoo_config, store, options, progress=False).trained == 3
    assert len(store.stored_ids("models", "smoke")) == 6
    from zoo.status import zoo_status

    status = zoo_status(zoo_config, store)
    assert len(status.done) == 6 and len(status.missing) == 2 and not status.failed and not status.running
    assert all(job == "never submitted" or job == "" for job in status.missing.values())


def test_bad_launch_options_are_clear_errors(tmp_path, capsys):
    from zoo.cli import main

    for args in (["--executor", "kubernetes"], ["--workers", "0"], ["--models-per-job", "0"], ["--sbatch", "novalue"]):
        assert main(["generate", "smoke", "--root", str(tmp_path / "r"), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("zoo: error:") and len(err.strip().splitlines()) == 1


JOB_WITHOUT_PANDAS = """
import os, sys
os.environ["SUBMITIT_EXECUTOR"] = sys.argv[2]
if sys.argv[2]:  # what else submitit tells a local job's process: where its folder is, its id
    os.environ.update(SUBMITIT_FOLDER=sys.argv[1] + "-jobs/%j", SUBMITIT_LOCAL_JOB_ID="1")
from generators.jobs import TrainAndStore, work_items
from zoo.catalog import load_catalog
specs = load_catalog(sys.argv[3])["smoke"].models()
report = TrainAndStore()(sys.argv[1], work_items(specs, {s.model_id for s in specs}))
assert len(report.trained) == len(specs) and not report.failed, report
print("pandas" in sys.modules)
from tests.test_generate import faults_per_step
print(faults_per_step())
if not sys.argv[2]:  # the launcher's own process: pyarrow still converts pandas objects as such
    import pandas as pd
    import pyarrow as pa
    frame = pd.DataFrame({"t": pd.to_datetime(["2026-01-01", None]).tz_localize("UTC")})
    assert pa.Table.from_pandas(frame, preserve_index=False).column("t").null_count == 1
"""


@pytest.mark.parametrize("executor", ["local", ""])
def test_a_job_process_stores_its_rows_without_pandas_and_keeps_the_memory_it_frees(smoke_root, tmp_path, executor):
    # pyarrow imports pandas at its first conversion (0.5 s of a job's CPU here); a job's own
    # process (submitit's, local or SLURM) tells it pandas is absent and stores the same rows; any
    # other process (the debug executor's: the launcher's) keeps pandas working with pyarrow.
    # A job's process also keeps the memory it frees (`keep_freed_memory`, next test)
    root = tmp_path / "root"
    out = subprocess.run([sys.executable, "-c", JOB_WITHOUT_PANDAS, str(root), executor, str(REPO / "catalog.yaml")],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    pandas, faults = out.stdout.split()
    assert pandas == ("False" if executor else "True")
    if executor and platform.libc_ver()[0] == "glibc":  # (glibc's mallopt)
        assert float(faults) < 100, faults
    assert fingerprint(root) == fingerprint(smoke_root)


def faults_per_step() -> float:
    """Page faults per step of twelve 6.4 MB blocks written and then freed (a CNN stack's feature
    maps at every step), in this process."""
    import resource

    import torch

    def step():
        blocks = [torch.ones(1_600_000) for _ in range(12)]  # noqa: F841

    for _ in range(3):  # (glibc's default thresholds follow the blocks freed)
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10


KEEPING_FREED_MEMORY = """
import ctypes
from tests.test_generate import faults_per_step
from zoo.launch import keep_freed_memory
libc = ctypes.CDLL(None)  # glibc's starting thresholds (128 KB), held: each block is mapped, then unmapped when freed
assert libc.mallopt(-3, 128 << 10) == 1 and libc.mallopt(-1, 128 << 10) == 1
before = faults_per_step()
assert keep_freed_memory()
print(before, faults_per_step())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keeping_freed_memory_spares_a_step_its_page_faults():
    # A CNN stack's job faulted its feature maps in again at every step (its 6.4 MB blocks went
    # back to the kernel when freed: glibc's thresholds follow the process's history, so the
    # state is set here by hand); with `keep_freed_memory` they stay with the process
    out = subprocess.run([sys.executable, "-c", KEEPING_FREED_MEMORY], capture_output=True, text=True, cwd=REPO, check=True)
    before, after = (float(v) for v in out.stdout.split())
    # 12 x 1,563 pages of 4 KB per step (fewer where transparent huge pages back some), then none
    assert before > 3000 and after < 100, (before, after)


def test_a_job_process_leaves_without_teardown_only_once_its_result_is_saved(tmp_path):
    # A job's process that imported torch spent 0.5-0.8 s tearing down after its result was
    # saved; it now leaves at once, but only when the work returned and submitit saved the
    # result: a job that raised tears down as Python does (and exits with status 1)
    from tests.exiting_job import record_and_return
    from zoo.launch import LaunchOptions, run_jobs

    options = LaunchOptions(executor="local", workers=2, items_per_job=1, jobs_dir=tmp_path / "jobs", poll_seconds=0.05)
    outcomes = run_jobs(record_and_return, ["fine", "raise"], options, "teardown", kwargs={"folder": str(tmp_path)})
    by_item = {o.items[0]: o for o in outcomes}
    assert by_item["fine"].result == ["fine"] and by_item["fine"].error is None
    assert "ValueError: asked to raise" in by_item["raise"].error
    for item in ("fine", "raise"):
        pid = int((tmp_path / f"pid-{item}").read_text())
        deadline = time.monotonic() + 60
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{pid}").exists()
    assert not (tmp_path / "torn-down-fine").exists()  # left without the teardown
    assert (tmp_path / "torn-down-raise").read_text() == "torn down"  # Python's own exit

    # in any other process (the debug executor's is the launcher's) it changes nothing
    debug = LaunchOptions(executor="debug", jobs_dir=tmp_path / "jobs")
    assert run_jobs(record_and_return, ["here"], debug, "teardown", kwargs={"folder": str(tmp_path)})[0].result == ["here"]


def test_the_generate_command_stores_its_rows_without_importing_pandas(smoke_root, tmp_path):
    # the command's pyarrow would import pandas (0.5 s of CPU) while its jobs start on both cores
    # (as `python -m zoo` runs it, `own_process`, without leaving early: then the modules are seen)
    command = ("import sys; from zoo.cli import main; assert main(sys.argv[1:], own_process=True) == 0; "
               "print(sorted({'pandas', 'torch'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", command, "generate", "smoke", "--root", str(tmp_path / "r"), "--executor", "debug",
                          "--no-progress"], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split() == ["['torch']"]  # (the debug executor trained here)
    assert fingerprint(tmp_path / "r") == fingerprint(smoke_root)
