"""Shared fixtures: a catalog with the shipped zoos, and one smoke zoo trained once per session."""

from __future__ import annotations

from pathlib import Path

import os

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parent.parent

# CI replays the same fuzzing examples every run (a random failure there would block a landing);
# a developer's run explores new ones and keeps the failures it finds in .hypothesis/.
settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory) -> Path:
    """The shipped `smoke` zoo, generated in-process once (debug executor). Read-only for tests."""
    from generators.launcher import LaunchOptions, generate
    from zoo.catalog import load_catalog
    from zoo.storage import Store

    root = tmp_path_factory.mktemp("smoke")
    report = generate(
        load_catalog(REPO / "catalog.yaml")["smoke"],
        Store(root, create=True),
        LaunchOptions(executor="debug", jobs_dir=tmp_path_factory.mktemp("jobs")),
        progress=False,
    )
    assert report.trained == 8 and not report.failed
    return root


# what the crash and concurrency tests run: generate, then metrics, then a benchmark task
STAGES = {
    "generate": ["generate", "smoke", "--executor", "debug", "--no-progress"],
    "metrics": ["metrics", "smoke", "--executor", "debug", "--no-progress", "--only", "performance,hessian,spectral,weightspace"],
    "bench": ["bench", "pruning", "--zoo", "smoke", "--no-progress"],
}


@pytest.fixture(scope="session")
def smoke_reference(smoke_root, tmp_path_factory) -> Path:
    """The smoke zoo after one clean run of every stage (in-process). Read-only for tests."""
    import shutil

    from zoo.cli import main

    root = tmp_path_factory.mktemp("reference") / "root"
    shutil.copytree(smoke_root, root)
    for stage in ("metrics", "bench"):
        assert main([*STAGES[stage], "--root", str(root)]) == 0
    return root
