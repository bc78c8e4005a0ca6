"""A metric family that raises on a model stores a failed status with the error, not NaN values
that look computed; `zoo metrics` reports the failed unit; the next run computes it again."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np

import zoo
from metrics.families import FAMILIES
from metrics.runner import run_metrics
from zoo.catalog import load_catalog
from zoo.cli import main
from zoo.launch import LaunchOptions
from zoo.storage import Store

from .conftest import REPO


def test_a_failed_family_is_stored_as_failed_and_computed_again_next_run(smoke_root, tmp_path, monkeypatch, capsys):
    root = tmp_path / "root"
    shutil.copytree(smoke_root, root)
    config = load_catalog(REPO / "catalog.yaml")["smoke"]
    victim = zoo.open(root).sql("SELECT model_id FROM models ORDER BY model_id LIMIT 1").model_id[0]
    family = FAMILIES["weightspace"]

    def flaky(contexts, settings):  # a transient error on one model (out of memory, a killed node)
        if any(c.model_id == victim for c in contexts):
            raise MemoryError("simulated: out of memory")
        return family.compute(contexts, settings)

    monkeypatch.setitem(FAMILIES._entries, "weightspace", dataclasses.replace(family, compute=flaky))
    options = LaunchOptions(executor="debug", jobs_dir=tmp_path / "jobs")
    report = run_metrics(config, Store(root, create=True), ["weightspace"], "final", options, progress=False)
    assert report.computed == 7 and len(report.failed) == 1 and victim in report.failed[0]
    assert "MemoryError: simulated: out of memory" in report.failed[0]
    z = zoo.open(root)
    assert z.sql("SELECT count(*) AS n FROM metrics WHERE model_id = ? AND family = 'weightspace'", [victim])["n"][0] == 0
    failures = z.sql("SELECT model_id, family, error FROM metric_failures")
    assert failures.to_dict("records") == [{"model_id": victim, "family": "weightspace", "error": "MemoryError: simulated: out of memory"}]

    # the command line says so, and exits 1; still failing, nothing else is recomputed
    assert main(["metrics", "smoke", "--only", "weightspace", "--executor", "debug", "--no-progress", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "computed 0, skipped 7 (already stored), failed 1" in err and f"failed (computed again on the next run): weightspace on {victim}" in err

    monkeypatch.setitem(FAMILIES._entries, "weightspace", family)  # the error has passed
    again = run_metrics(config, Store(root), ["weightspace"], "final", options, progress=False)
    assert again.computed == 1 and again.skipped == 7 and not again.failed
    z = zoo.open(root)
    values = z.sql("SELECT name, value FROM metrics WHERE model_id = ? AND family = 'weightspace'", [victim])
    assert len(values) > 0 and np.isfinite(values["value"]).all()
    assert len(z.sql("SELECT * FROM metric_failures")) == 0
