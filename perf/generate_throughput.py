"""Models per second: `zoo generate` with the local executor against a plain one-process loop.

Both train the same models of a zoo (default digits-mlp; `--every K` keeps every K-th model of
the grid, a sample across all widths and batch sizes) into fresh roots, in this one process run,
and the script prints both rates and their ratio, and checks that both roots hold the same
weights. The loop is what the published zoos did: one model after another, one process.

    python perf/generate_throughput.py [--zoo digits-mlp] [--every 1] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

import zoo
from generators.jobs import train_and_store
from generators.launcher import LaunchOptions, generate
from zoo.catalog import load_catalog
from zoo.storage import Store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default="digits-mlp")
    parser.add_argument("--catalog")
    parser.add_argument("--every", type=int, default=1, help="keep every K-th model of the grid")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    config = load_catalog(args.catalog)[args.zoo]
    specs = config.models()[:: args.every]
    print(f"{args.zoo}: {len(specs)} of {config.grid_size} models; {os.cpu_count()} cores; torch {torch.__version__}")

    with tempfile.TemporaryDirectory() as tmp:
        loop_root, local_root = Path(tmp) / "loop", Path(tmp) / "local"
        start = time.perf_counter()
        report = train_and_store(str(loop_root), [s.to_json() for s in specs], threads=1)
        Store(loop_root).write_index()
        loop_seconds = time.perf_counter() - start
        assert not report.failed, report.failed

        start = time.perf_counter()
        options = LaunchOptions(executor="local", workers=args.workers, jobs_dir=Path(tmp) / "jobs")
        generated = generate(config, Store(local_root, create=True), options, progress=False, models=specs)
        local_seconds = time.perf_counter() - start
        assert generated.trained == len(specs) and not generated.failed, generated.failed

        same = _fingerprint(loop_root) == _fingerprint(local_root)
        loop_rate, local_rate = len(specs) / loop_seconds, len(specs) / local_seconds
        print(f"one-process loop : {loop_seconds:7.1f} s  {loop_rate:6.2f} models/s")
        print(f"local executor   : {local_seconds:7.1f} s  {local_rate:6.2f} models/s  ({args.workers} workers)")
        print(f"ratio local/loop : {local_rate / loop_rate:.2f}x   identical weights: {same}")


def _fingerprint(root: Path) -> dict:
    rows = zoo.open(root).sql("select model_id, epoch, sha256 from checkpoints")
    return {(m, int(e)): s for m, e, s in rows.itertuples(index=False)}


if __name__ == "__main__":
    main()
