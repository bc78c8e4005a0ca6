"""Crash consistency: kill -9 at random points of generate, metrics and bench. After every
kill the root is intact (no damaged file, no duplicate row, nothing stored before lost, every
stored value equal to a clean run's), and the rerun after the last kill ends in the clean
run's state exactly."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

import zoo
import zoo.integrity
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


# Each trial forks a command from a process that has imported the project once: a trial then
# costs its work up to the kill, not 2-3 s of imports. (Forking is safe here: the server imports
# torch but runs nothing, so no thread pool exists to be copied half-way.)
SERVER = r"""
import json, os, signal, sys
import benchmarks.runner, benchmarks.tasks, generators.launcher, metrics.runner, zoo.cli  # noqa: F401
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reap themselves
for line in sys.stdin:
    argv, rc_file = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setsid()
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, 1)
        os.dup2(quiet, 2)
        try:
            rc = zoo.cli.main(argv)
        except BaseException:
            rc = 99
        with open(rc_file, "w") as f:
            f.write(str(rc))
        os._exit(0)
    print(pid, flush=True)
"""


class Forker:
    """Starts `zoo ARGS` as forked children of one server process."""

    def __init__(self, tmp_path):
        env = dict(os.environ, PYTHONPATH=str(REPO), ZOO_JOBS_DIR=str(tmp_path / "jobs"))
        self.server = subprocess.Popen([sys.executable, "-c", SERVER], env=env, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)
        self.tmp, self.count = tmp_path, 0

    def start(self, argv) -> tuple[int, object]:
        self.count += 1
        rc_file = self.tmp / f"rc-{self.count}"
        self.server.stdin.write(json.dumps([argv, str(rc_file)]) + "\n")
        self.server.stdin.flush()
        return int(self.server.stdout.readline()), rc_file

    def close(self):
        self.server.stdin.close()
        self.server.wait(timeout=60)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


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
    forker = Forker(tmp_path)
    for stage, args in STAGES.items():
        kills = 0
        before: dict = {}
        while kills < KILLS_PER_STAGE:
            start = files(root)
            pid, rc_file = forker.start([*args, "--root", str(root)])
            target = rng.randint(1, 2)  # kill once it has written 1-2 more files, after a random delay
            deadline = time.time() + 120
            while alive(pid) and files(root) < start + target and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.2))
            if rc_file.exists() or not alive(pid):  # it finished first: start the stage over on a copy
                deadline = time.time() + 30
                while not rc_file.exists() and time.time() < deadline:
                    time.sleep(0.01)
                assert rc_file.read_text() == "0", f"{stage} failed"
                shutil.rmtree(root)
                _reset(root, reference, stage)
                before = state(root, stage)
                continue
            os.killpg(pid, signal.SIGKILL)
            while alive(pid):
                time.sleep(0.01)
            kills += 1
            now = state(root, stage)
            assert before.keys() <= now.keys(), f"{stage}: a kill lost stored rows"
            assert all(now[k] == expected[stage][k] or now[k] != now[k] for k in now), f"{stage}: a stored value differs"
            if (root / "tables").is_dir():
                report = verify(Store(root), repair=False)
                assert report.intact, [f"{d.path}: {d.problem}" for d in report.damaged]
            before = now
        KILLED["kills"] += kills
        run(root, args, tmp_path)  # the rerun after the last kill completes the stage, in a process of its own
        assert same(state(root, stage), expected[stage]), stage
        assert not [p for p in root.rglob("*.tmp")], "temporary files left behind"
    forker.close()
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


# A child that runs `zoo generate smoke` and kills itself with SIGKILL at the moment a curves
# file is to be renamed into place: after its checksum is on record, before the file is there.
CUT_SHORT = r"""
import os, signal, sys
import zoo.cli
real, where = os.replace, sys.argv[1]
def replace(src, dst, *args, **kwargs):
    src, dst = str(src), str(dst)
    part = "/tables/curves/smoke/" in dst and not os.path.basename(dst).startswith("pack-")
    pending = "/tables/curves/smoke/" in dst and src.endswith(".pending")
    commit = "/tables/models/smoke/" in dst and dst.endswith(".pending")  # a stack's models pack, written
    if (where == "part" and part) or (where == "pack" and pending) or (where == "commit" and commit):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *args, **kwargs)
os.replace = replace
sys.exit(zoo.cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("where", ["part", "pack", "commit"])
def test_a_kill_between_recording_a_checksum_and_the_rename_is_no_damage(where, smoke_root, tmp_path):
    """`part`: a model's part (the reference path, `--no-stack`) recorded but not renamed; `pack`:
    a stack's pending pack recorded but not put in place; `commit`: a stack killed after writing
    its checkpoint, curve and tensor packs (pending) but before its `models` pack."""
    root = tmp_path / "root"
    env = dict(os.environ, PYTHONPATH=str(REPO), ZOO_JOBS_DIR=str(tmp_path / "jobs"))
    args = ["generate", "smoke", "--executor", "debug", "--no-progress", *(["--no-stack"] if where == "part" else []),
            "--root", str(root)]
    killed = subprocess.run([sys.executable, "-c", CUT_SHORT, where, *args], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    folder = root / "tables" / "curves" / "smoke"
    on_record = json.loads(json.dumps(sorted(zoo.integrity.recorded(folder))))
    gone = [n for n in on_record if not (folder / n).exists() and not n.endswith(".pending")]
    if where == "pack":  # one pending pack cut short (not the parts it replaces)
        assert len([n for n in gone if n.startswith("pack-")]) == 1
    elif where == "part":  # one commit cut short, or more: a job stores models in threads
        assert 1 <= len(gone) and not any(n.startswith("pack-") for n in gone)
    else:  # nothing cut short: a stack's packs pending, its models not stored
        assert not gone and any(n.endswith(".pending") for n in os.listdir(folder))
        assert len(Store(root).stored_ids("models", "smoke")) < 8
        Store(root).recover()  # a reader's recovery removes the dead writer's packs, never puts them in place
        assert not [p for p in root.rglob("*.pending")]
        lost = zoo.open(root).sql("select count(*) n from checkpoints where model_id not in (select model_id from models)")
        assert int(lost.n[0]) == 0
    report = verify(Store(root), repair=False)
    assert report.intact, [f"{d.path}: {d.problem}" for d in report.damaged]
    run(root, args[:-2], tmp_path)  # the rerun completes the zoo, the same bits as a clean run
    if where == "part":  # (the reference path: a clean run of it is the reference)
        run(tmp_path / "clean", args[:-2], tmp_path)
        assert fingerprint(root) == fingerprint(tmp_path / "clean")
    else:
        assert fingerprint(root) == fingerprint(smoke_root)
    assert not [p for p in root.rglob("*.pending")]
    assert all((folder / n).is_file() for n in zoo.integrity.recorded(folder))  # no stale record left
    assert not [p for p in root.rglob("*.tmp")]
    assert verify(Store(root)).intact
