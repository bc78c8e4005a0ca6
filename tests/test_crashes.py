"""Crash consistency: kill -9 at random points of generate, metrics and bench. After every
kill the root is intact (no damaged file, no duplicate row, nothing stored before lost, every
stored value equal to a clean run's), and the rerun after the last kill ends in the clean
run's state exactly."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

import zoo
from zoo.storage import Store
from zoo.verify import verify

from .conftest import REPO, STAGES
from .test_generate import fingerprint

KILLS_PER_STAGE = 7
KILLED = {"kills": 0}


def state(root, stage) -> dict:
    """What the stage stores, as key -> value, failing on a duplicate key."""
    if not (root / "tables").is_dir():
        return {}
    if stage == "generate":
        return fingerprint(root)
    z = zoo.open(root)
    if stage == "metrics":
        rows = z.sql("select model_id, epoch, family, name, value from metrics")
    else:
        rows = z.sql("select method, parameters_hash, unit, metric, value from benchmark_results where status = 'ok'")
    keys = [tuple(r[:-1]) for r in rows.itertuples(index=False)]
    assert len(keys) == len(set(keys)), f"duplicate {stage} rows"
    return dict(zip(keys, rows["value"].tolist()))


def run(root, args, tmp_path, wait=True):
    env = dict(os.environ, PYTHONPATH=str(REPO), ZOO_JOBS_DIR=str(tmp_path / "jobs"))
    proc = subprocess.Popen([sys.executable, "-m", "zoo", *args, "--root", str(root)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if wait:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    return proc


def files(root) -> int:
    tables = root / "tables"
    return sum(1 for p in tables.rglob("*") if p.is_file() and not p.name.startswith(".")) if tables.is_dir() else 0


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a)


@pytest.mark.slow
def test_kill_9_at_random_points_then_rerun_converges(smoke_reference, tmp_path):
    rng = random.Random(2026)
    reference, root = smoke_reference, tmp_path / "root"
    expected = {stage: state(reference, stage) for stage in STAGES}
    assert len(expected["generate"]) == 8 * 3 and len(expected["metrics"]) > 50 and len(expected["bench"]) > 50
    for stage, args in STAGES.items():
        kills = 0
        before: dict = {}
        while kills < KILLS_PER_STAGE:
            start = files(root)
            proc = run(root, args, tmp_path, wait=False)
            target = rng.randint(1, 2)  # kill once it has written 1-2 more files, after a random delay
            deadline = time.time() + 120
            while proc.poll() is None and files(root) < start + target and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.2))
            if proc.poll() is not None:  # it finished first: start the stage over on a copy
                assert proc.returncode == 0, proc.stderr.read()
                shutil.rmtree(root)
                _reset(root, reference, stage)
                before = state(root, stage)
                continue
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            now = state(root, stage)
            assert before.keys() <= now.keys(), f"{stage}: a kill lost stored rows"
            assert all(now[k] == expected[stage][k] or now[k] != now[k] for k in now), f"{stage}: a stored value differs"
            if (root / "tables").is_dir():
                report = verify(Store(root), repair=False)
                assert report.intact, [f"{d.path}: {d.problem}" for d in report.damaged]
            before = now
        KILLED["kills"] += kills
        run(root, args, tmp_path)  # the rerun after the last kill completes the stage
        assert same(state(root, stage), expected[stage]), stage
        assert not [p for p in root.rglob("*.tmp")], "temporary files left behind"
    assert verify(Store(root)).intact
    assert KILLED["kills"] >= 20


def _reset(root, reference, stage) -> None:
    """The state before `stage`: nothing for generate, the reference zoo without the stage's rows."""
    if stage == "generate":
        return
    shutil.copytree(reference, root)
    drop = {"metrics": ["metrics", "layer_metrics", "densities", "pair_metrics"], "bench": ["benchmark_results"]}[stage]
    for table in drop:
        shutil.rmtree(root / "tables" / table / "smoke", ignore_errors=True)
