"""Models per second: `zoo generate` (local executor, stacked and reference path) against a plain
one-process loop of the reference path, all in this one process run.

The loop is what the published zoos did: one model after another, one process, one thread.
`--every K` keeps every K-th model of the grid (a sample across all widths and batch sizes).
The script checks that the local reference run gives bitwise the loop's weights, and reports how
far the stacked models are from them after epoch 1 (float rounding, ~1e-7) and at the end.

    python perf/generate_throughput.py [--zoo digits-mlp] [--every 1] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import zoo
from generators.jobs import train_and_store, work_items
from generators.launcher import generate
from zoo.catalog import load_catalog
from zoo.launch import LaunchOptions
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
    ids = {s.model_id for s in specs}
    print(f"{args.zoo}: {len(specs)} of {config.grid_size} models; {os.cpu_count()} cores; torch {torch.__version__}")

    with tempfile.TemporaryDirectory() as tmp:
        roots = {name: Path(tmp) / name for name in ("loop", "local-reference", "local-stacked")}
        seconds = {}
        start = time.perf_counter()
        report = train_and_store(str(roots["loop"]), work_items(specs, ids, stacked=False), threads=1)
        Store(roots["loop"]).write_index()
        seconds["loop"] = time.perf_counter() - start
        assert not report.failed, report.failed
        for name, stacked in (("local-reference", False), ("local-stacked", True)):
            options = LaunchOptions(executor="local", workers=args.workers, jobs_dir=Path(tmp) / "jobs")
            start = time.perf_counter()
            done = generate(config, Store(roots[name], create=True), options, progress=False, models=specs, stacked=stacked)
            seconds[name] = time.perf_counter() - start
            assert done.trained == len(specs) and not done.failed, done.failed

        rates = {name: len(specs) / s for name, s in seconds.items()}
        for name in roots:
            label = f"{name} ({args.workers} workers)" if name != "loop" else "one-process loop"
            print(f"{label:<28} {seconds[name]:7.1f} s  {rates[name]:6.2f} models/s  {rates[name] / rates['loop']:5.2f}x")
        same = _weights(roots["loop"], None) == _weights(roots["local-reference"], None)
        print(f"local reference == loop, bitwise: {same}")
        loop, stacked = _weights(roots["loop"], 1), _weights(roots["local-stacked"], 1)
        gaps = np.array([np.abs(loop[k] - stacked[k]).max() for k in loop])
        print(f"stacked vs loop after epoch 1, max |dw| per model: median {np.median(gaps):.1e}, "
              f"{(gaps < 1e-5).mean():.0%} of models below 1e-5, max {gaps.max():.1e}")
        accuracy = {n: zoo.open(roots[n]).sql("select avg(test_acc) a from curves c join models m using (model_id) where c.epoch = m.epochs")["a"][0]
                    for n in ("loop", "local-stacked")}
        print(f"mean final test accuracy: loop {accuracy['loop']:.4f}, stacked {accuracy['local-stacked']:.4f}")


def _weights(root: Path, epoch: int | None) -> dict:
    z = zoo.open(root)
    if epoch is None:
        rows = z.sql("select model_id, epoch, sha256 from checkpoints")
        return {(m, int(e)): s for m, e, s in rows.itertuples(index=False)}
    ids = list(z.sql("select model_id from models order by model_id")["model_id"])
    return {m: z.weights([m], epoch=epoch).numpy()[0] for m in ids}


if __name__ == "__main__":
    main()
