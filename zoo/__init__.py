"""zoo: populations of trained models over a load x temperature grid, stored as Parquet and
queried with SQL.

    import zoo
    z = zoo.open("zoo-data")
    z.sql("select width, batch_size, avg(test_acc) from ...")
    model = z.load_model(model_id)
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

__version__ = "0.1.0"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The package version, plus the git commit (and '-dirty') when run from a checkout."""
    here = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    if not commit:
        return __version__
    return f"{__version__}+{commit}{'-dirty' if dirty else ''}"


def library_versions(*packages: str) -> dict[str, str]:
    """The versions a stored number depends on: this code's, torch's, numpy's, and those of
    `packages` that are installed."""
    from importlib import metadata

    import numpy
    import torch

    out = {"zoo": code_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    for package in packages:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def open(root=None, timeout: float | None = None, memory_limit: str | None = None, recover: bool = False,  # noqa: A001 - reads as a sentence, like `duckdb.connect`
         storage_options: dict | None = None):
    """Open a zoo root for reading (default: env ZOO_ROOT, else ./zoo-data), or a published zoo
    (zoo.publish) at a URL (`http(s)://`, `s3://`, `hf://datasets/ORG/NAME`, any fsspec URL;
    `storage_options` go to its file system, e.g. an S3 endpoint) or in a local folder: read-only,
    fetching only the bytes a query or the models asked for need. Each query stops
    after `timeout` seconds (default env ZOO_SQL_TIMEOUT_S, else 300); `memory_limit` caps DuckDB
    (e.g. "2GB"; default env ZOO_SQL_MEMORY, else a quarter of RAM, at most 4 GB).

    Opening writes no stored row unless `recover=True`: then it first finishes the packs a killed
    packer left pending (zoo.packing), whose models' rows queries would otherwise miss; without
    it, such packs are reported by a `ZooWarning` naming the way to finish them. The one file it
    may rewrite is the derived index zoo.duckdb, when the root was moved or copied (its views
    would point to the old place) and the root is writable (`zoo index` does it by hand)."""
    from .api import Root

    return Root(root, timeout=timeout, memory_limit=memory_limit, recover=recover, storage_options=storage_options)
