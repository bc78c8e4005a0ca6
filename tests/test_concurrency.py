"""Concurrency: several processes writing to one zoo root (three generates, then two metrics
and two bench runs at once) while a reader process queries it in a loop. The reader never
fails and never sees a partial model or a duplicate row; the root ends equal to a clean run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import zoo
from zoo.storage import Store
from zoo.verify import verify

from .conftest import REPO, STAGES
from .test_crashes import same, state
from .test_generate import fingerprint

READER = r"""
import json, sys, time
import zoo
from zoo.errors import ZooError
root, stop = sys.argv[1], sys.argv[2]
import pathlib
queries, errors, seen = 0, [], 0
while not pathlib.Path(stop).exists():
    try:
        if not (pathlib.Path(root) / "tables" / "models").is_dir():
            time.sleep(0.05); continue
        z = zoo.open(root)
        models = z.sql("select model_id, load from models")
        assert models["model_id"].is_unique, "a model twice in models"
        assert len(models) >= seen, f"models went from {seen} to {len(models)}"
        seen = len(models)
        if seen:  # a stored model is complete: all its checkpoints and curves, readable weights
            n = z.sql("select m.model_id, (select count(*) from checkpoints c where c.model_id = m.model_id) k, "
                      "(select count(*) from curves c where c.model_id = m.model_id) e from models m")
            assert (n["k"] == 3).all() and (n["e"] == 4).all(), n.to_dict("records")
            ids = models[models["load"] == models["load"].iloc[0]]["model_id"].tolist()
            assert z.weights(ids).shape[0] == len(ids)
        for table in ("metrics", "benchmark_results"):
            key = "model_id, epoch, family, name" if table == "metrics" else "method, parameters_hash, unit, metric"
            d = z.sql(f"select {key}, count(*) n from {table} group by all having n > 1")
            assert d.empty, f"duplicate rows in {table}"
        queries += 1
    except (ZooError, AssertionError, OSError) as e:
        errors.append(f"{type(e).__name__}: {e}")
print(json.dumps({"queries": queries, "errors": errors[:5], "n_errors": len(errors), "models": seen}))
"""


def start(args, root, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), ZOO_JOBS_DIR=str(tmp_path / "jobs"))
    return subprocess.Popen([sys.executable, *args, "--root", str(root)] if args[0] == "-m" else [sys.executable, *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_several_writers_and_a_reader_on_one_root(smoke_root, smoke_reference, tmp_path):
    root = tmp_path / "root"
    stop = tmp_path / "stop"
    reader = start(["-c", READER, str(root), str(stop)], root, tmp_path)
    writers = [start(["-m", "zoo", *STAGES["generate"]], root, tmp_path) for _ in range(3)]
    for w in writers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    assert fingerprint(root) == fingerprint(smoke_root)  # each model stored once, the same bits
    bench = [*STAGES["bench"], "--method", "random", "--method", "magnitude_global"]
    second = [start(["-m", "zoo", *args], root, tmp_path) for args in (STAGES["metrics"], STAGES["metrics"], bench, bench)]
    for w in second:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    time.sleep(0.5)
    stop.touch()
    out, err = reader.communicate(timeout=120)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["n_errors"] == 0, result["errors"]
    assert result["queries"] >= 20 and result["models"] == 8, result
    assert len(writers) + len(second) == 7
    assert same(state(root, "metrics"), state(smoke_reference, "metrics"))  # equal to one clean run
    clean = {k: v for k, v in state(smoke_reference, "bench").items() if k[0] in ("random", "magnitude_global")}
    assert same(state(root, "bench"), clean)
    assert verify(Store(root)).intact
    assert zoo.open(root).sql("select count(distinct model_id) n from metrics")["n"][0] == 8
