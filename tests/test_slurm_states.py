"""zoo.slurm without a SLURM: fake `sacct`, `squeue` and `sbatch` executables on PATH print canned
answers (and log how they were called), so the parsing of job ids and states, the timeout, a
missing client, and a SLURM launch's waiting are checked on any machine."""

from __future__ import annotations

import ast
import os
import stat
import time
from pathlib import Path

import pytest

from zoo import slurm
from zoo.errors import ZooError

from .conftest import REPO


def fake(bin_dir: Path, name: str, script: str) -> Path:
    """An executable `name` in `bin_dir` that logs its arguments to `name`.log, then runs `script`."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{bin_dir / name}.log"\n{script}\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def calls(bin_dir: Path, name: str) -> list[str]:
    log = bin_dir / f"{name}.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def bin_dir(tmp_path, monkeypatch) -> Path:
    """A folder of fake SLURM clients, first on PATH."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    return folder


SACCT = """cat <<'EOF'
123_0|COMPLETED
123_1|RUNNING
123_2|CANCELLED by 1000
123_[3-5,7%2]|PENDING
124|NODE_FAIL
125|OUT_OF_MEMORY
126_4+0|RUNNING
|
EOF"""


def test_one_sacct_call_asks_whole_arrays_and_expands_pending_ranges(bin_dir):
    fake(bin_dir, "sacct", SACCT)
    states = slurm.states_in_sacct(["123_0", "123_4", "123_7", "124", "125", "123_1"])
    assert calls(bin_dir, "sacct") == ["-n -P -X -o JobID,State -j 123,124,125"]
    assert states == {"123_0": "COMPLETED", "123_1": "RUNNING", "123_2": "CANCELLED", "123_3": "PENDING",
                      "123_4": "PENDING", "123_5": "PENDING", "123_7": "PENDING", "124": "NODE_FAIL",
                      "125": "OUT_OF_MEMORY", "126_4+0": "RUNNING"}


def test_no_job_ids_ask_nothing(bin_dir):
    fake(bin_dir, "sacct", SACCT)
    assert slurm.states_in_sacct([]) == {} and slurm.states_in_sacct([""]) == {}
    assert slurm.states_in_squeue([]) == {}
    assert calls(bin_dir, "sacct") == []


@pytest.mark.parametrize("job, expanded", [
    ("123", ["123"]),
    ("123_4", ["123_4"]),
    ("123_[0-3,5%2]", ["123_0", "123_1", "123_2", "123_3", "123_5"]),
    ("123_[8]", ["123_8"]),
    ("123_[10-11]", ["123_10", "123_11"]),
    ("123_4+0", ["123_4+0"]),  # submitit cannot read it: kept as it is
    ("", []),
])
def test_array_ids_expand_to_one_id_per_task(job, expanded):
    assert slurm.expand_job_id(job) == expanded


def test_a_sacct_that_does_not_answer_in_time_gives_no_states(bin_dir):
    fake(bin_dir, "sacct", "exec sleep 20")
    start = time.monotonic()
    assert slurm.states_in_sacct(["123"], timeout=0.5) == {}
    assert time.monotonic() - start < 10


def test_without_slurm_clients_there_are_no_states(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert slurm.states_in_sacct(["123", "124_1"]) == {}
    assert slurm.states_in_squeue(["123"]) == {}
    assert not slurm.is_queued_again("123")


def test_squeue_says_whether_an_ended_job_is_queued_again(bin_dir):
    fake(bin_dir, "squeue", 'case "$*" in *124_1*) echo "124_1|REQUEUED";; *125*) echo "125|PENDING";; '
                            '*) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1;; esac')
    assert slurm.is_queued_again("124_1") and slurm.is_queued_again("125")
    assert not slurm.is_queued_again("126")
    assert calls(bin_dir, "squeue")[0] == "-h -r -o %i|%T -j 124_1"


def test_the_state_sets_are_one_consistent_definition():
    assert not slurm.WILL_STILL_RUN & slurm.ENDED_WITHOUT_COMPLETING
    assert slurm.COMPLETED not in slurm.WILL_STILL_RUN | slurm.ENDED_WITHOUT_COMPLETING
    assert {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "SUSPENDED"} <= slurm.WILL_STILL_RUN
    assert {"CANCELLED", "FAILED", "NODE_FAIL", "TIMEOUT", "OUT_OF_MEMORY", "PREEMPTED"} <= slurm.ENDED_WITHOUT_COMPLETING
    assert slurm.will_still_run("PENDING") and not slurm.will_still_run("")
    assert slurm.ended_without_completing("NODE_FAIL") and not slurm.ended_without_completing("COMPLETED")


@pytest.mark.parametrize("value, seconds", [(None, 30.0), ("", 30.0), ("5", 5.0), ("2.5", 2.5), ("0.2", 1.0)])
def test_sacct_interval_comes_from_the_environment(monkeypatch, value, seconds):
    if value is None:
        monkeypatch.delenv("ZOO_SACCT_INTERVAL_S", raising=False)
    else:
        monkeypatch.setenv("ZOO_SACCT_INTERVAL_S", value)
    assert slurm.sacct_interval_s() == seconds


@pytest.mark.parametrize("value", ["soon", "0", "-3", "nan", "inf"])
def test_a_bad_sacct_interval_is_one_clear_error(monkeypatch, value):
    monkeypatch.setenv("ZOO_SACCT_INTERVAL_S", value)
    with pytest.raises(ZooError) as e:
        slurm.sacct_interval_s()
    assert str(e.value) == f"env ZOO_SACCT_INTERVAL_S={value!r} is not a positive number of seconds"


def test_a_bad_sacct_interval_is_refused_before_anything_is_submitted(bin_dir, tmp_path, monkeypatch, capsys):
    from zoo.cli import main

    fake(bin_dir, "sbatch", "echo Submitted batch job 1")
    monkeypatch.setenv("ZOO_SACCT_INTERVAL_S", "soon")
    assert main(["generate", "smoke", "--root", str(tmp_path / "r"), "--executor", "slurm",
                 "--jobs-dir", str(tmp_path / "jobs")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "zoo: error: env ZOO_SACCT_INTERVAL_S='soon' is not a positive number of seconds"
    assert calls(bin_dir, "sbatch") == [] and not (tmp_path / "jobs").exists()


def echo_items(items: list[str]) -> list[str]:
    return items


def test_a_slurm_launch_polls_sacct_itself_and_waits_for_a_requeued_job(bin_dir, tmp_path, monkeypatch):
    """Two array tasks end without a result: the cancelled one is reported at once, the one whose
    node failed is waited for while squeue lists it queued again. States come from the launch's
    own sacct calls at ZOO_SACCT_INTERVAL_S; submitit's watcher is neither asked nor changed."""
    from submitit.slurm.slurm import SlurmJob

    from zoo.launch import LaunchOptions, run_jobs

    fake(bin_dir, "srun", "exit 0")  # submitit's SLURM executor refuses to start without one
    fake(bin_dir, "sbatch", "echo Submitted batch job 4242")
    fake(bin_dir, "sacct", "printf '4242_0|CANCELLED by 0\\n4242_1|NODE_FAIL\\n'")
    # queued again for the first three questions (one about each job, then two sacct answers), then gone
    fake(bin_dir, "squeue", f'n=$(wc -l < "{bin_dir}/squeue.log"); [ "$n" -le 3 ] && echo "4242_1|PENDING"; exit 0')
    monkeypatch.setenv("ZOO_SACCT_INTERVAL_S", "1")
    watcher_calls, watcher_delay = SlurmJob.watcher.num_calls, SlurmJob.watcher._delay_s
    options = LaunchOptions(executor="slurm", jobs_dir=tmp_path / "jobs", poll_seconds=0.05)
    start = time.monotonic()
    outcomes = run_jobs(echo_items, ["a", "b"], options, "fake")
    took = time.monotonic() - start
    errors = sorted(o.error for o in outcomes)
    assert errors == ["job 4242_0 ended without a result (CANCELLED)", "job 4242_1 ended without a result (NODE_FAIL)"]
    assert 1.5 < took < 30  # waited two more sacct answers for the requeued job
    assert len(calls(bin_dir, "sbatch")) == 1
    sacct = calls(bin_dir, "sacct")
    assert 3 <= len(sacct) <= 1 + took and all(c.endswith("-j 4242") for c in sacct)  # one call a second at most
    assert len(calls(bin_dir, "squeue")) == 4  # once per job per sacct answer: 4242_0 and 4242_1, then 4242_1 twice
    assert SlurmJob.watcher.num_calls == watcher_calls and SlurmJob.watcher._delay_s == watcher_delay


def test_launch_patches_no_private_attribute_of_submitit():
    tree = ast.parse((REPO / "zoo" / "launch.py").read_text())
    private = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Attribute)
               and node.attr.startswith("_") and not node.attr.startswith("__")]
    assert [name for name in private if name != "os._exit"] == []  # (os._exit: documented, public)


def test_only_zoo_slurm_calls_sacct_or_squeue():
    callers = set()
    for package in ("zoo", "generators", "metrics", "benchmarks", "perf"):
        for path in sorted((REPO / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in ("sacct", "squeue"):
                    callers.add(str(path.relative_to(REPO)))
    assert callers == {"zoo/slurm.py"}
