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
