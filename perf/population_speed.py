"""Training a population: `zoo generate`, wall time from the command to its exit, against the best
plain PyTorch loop a user would write, one process per core, in the same run.

    python perf/population_speed.py [--sizes 64 256] [--epochs 20]

The population (as issue #17 measured it): the digits MLP 64-32-32-10, batch 32, SGD with momentum,
20 epochs, train and test evaluation after every epoch; a momentum x learning-rate grid, 4 seeds
(64 models: 4 x 4 x 4; 256: 8 x 8 x 4). The baseline is written here without any project code: an
nn.Sequential, torch.optim.SGD, a shuffled index per epoch, `.item()` reads of the evaluation. It
runs as one process per core with 1 thread each, and as one process with all threads; the faster
is the baseline. `zoo generate` runs as users run it (`python -m zoo generate ...`, default local
executor), so job start-up counts.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

MOMENTA = [0.0, 0.5, 0.8, 0.9, 0.95, 0.3, 0.7, 0.85]
RATES = [0.01, 0.02, 0.05, 0.1, 0.005, 0.03, 0.07, 0.15]


def grid(size: int) -> tuple[list[float], list[float], list[int]]:
    side = {64: 4, 256: 8}[size]
    return sorted(MOMENTA[:side]), sorted(RATES[:side]), [0, 1, 2, 3]


def plain_worker(jobs: list[tuple[float, float, int]], epochs: int, threads: int, done) -> None:
    """Train `jobs` (momentum, lr, seed) one after another: the plain loop, no project code."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from torch import nn

    torch.set_num_threads(threads)
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x_test, y_test, x_train, y_train = x[order[:360]], y[order[:360]], x[order[360:]], y[order[360:]]
    for momentum, lr, seed in jobs:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        for _ in range(epochs):
            model.train()
            for idx in torch.randperm(len(x_train)).split(32):
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            model.eval()
            with torch.no_grad():
                for xs, ys in ((x_train, y_train), (x_test, y_test)):
                    logits = model(xs)
                    F.cross_entropy(logits, ys).item(), (logits.argmax(1) == ys).float().mean().item()
        done.value += 1


def plain(size: int, epochs: int, processes: int, threads: int) -> float:
    """Wall seconds of the plain loop over the population, `processes` at once."""
    momenta, rates, seeds = grid(size)
    jobs = [(m, r, s) for m in momenta for r in rates for s in seeds]
    done = mp.get_context("spawn").Value("i", 0)
    workers = [mp.get_context("spawn").Process(target=plain_worker, args=(jobs[i::processes], epochs, threads, done))
               for i in range(processes)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert done.value == len(jobs)
    return time.perf_counter() - start


def zoo_generate(size: int, epochs: int, tmp: Path) -> float:
    """Wall seconds of `python -m zoo generate` of the same population into a fresh root."""
    momenta, rates, seeds = grid(size)
    catalog = tmp / f"catalog-{size}.yaml"
    catalog.write_text(yaml.safe_dump({"zoos": {f"pop{size}": {
        "description": "issue #17's population", "dataset": {"name": "digits"},
        "architecture": {"name": "mlp", "depth": 2, "width": 32},
        "load": {"name": "momentum", "values": momenta}, "temperature": {"name": "lr", "values": rates},
        "seeds": seeds, "training": {"optimizer": "sgd", "batch_size": 32, "epochs": epochs},
        "checkpoints": [0, epochs]}}}))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "zoo", "generate", f"pop{size}", "--catalog", str(catalog),
                    "--root", str(tmp / f"root-{size}"), "--no-progress"], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"{cores} cores; digits MLP 64-32-32-10, batch 32, {args.epochs} epochs, evaluation every epoch")
    print("| models | plain loop, 1 process x all threads | plain loops, one process per core x 1 thread | "
          "`zoo generate` (wall, command to exit) | ratio to the best plain |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            one = size / plain(size, args.epochs, 1, cores)
            per_core = size / plain(size, args.epochs, cores, 1)
            ours = size / zoo_generate(size, args.epochs, Path(tmp))
            best = max(one, per_core)
            print(f"| {size} | {one:.2f} models/s | {per_core:.2f} models/s | {ours:.2f} models/s | **{ours / best:.2f}x** |",
                  flush=True)


if __name__ == "__main__":
    main()
