"""Training a population: `zoo generate`, wall time from the command to its exit, against the best
plain PyTorch loop a user would write, one process per core, in the same run.

    python perf/population_speed.py [--sizes 64 256] [--epochs 20] [--single-process-sizes 64]

The population (as issue #17 measured it): the digits MLP 64-32-32-10, batch 32, SGD with momentum,
20 epochs, train and test evaluation after every epoch; a momentum x learning-rate grid, 4 seeds
(64 models: 4 x 4 x 4; 256: 8 x 8 x 4). The baseline is written here without any project code: an
nn.Sequential, torch.optim.SGD, a shuffled index per epoch, `.item()` reads of the evaluation. It
runs as one process per core with 1 thread each, and (at `--single-process-sizes`) as one process
with all threads; the faster is the baseline. `zoo generate` runs as users run it (`python -m zoo
generate ...`, default local executor), so job start-up counts.

Then the stacked engine alone (the project's `train_stack`, after imports and a warm-up), to say
where the time goes and how stacks should fill the cores: all stacks in one process with all
threads, against one process per core with 1 thread each. Each row gives the population's
arithmetic (training: 3 x the forward multiply-adds per sample; evaluation: the forward pass over
train and test after every epoch; x 2 FLOP per multiply-add) per wall second, as a share of this
machine's float32 matmul peak measured in the same run (a 2048^2 matmul, 1 thread, times cores).
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


def write_catalog(size: int, epochs: int, tmp: Path) -> Path:
    momenta, rates, seeds = grid(size)
    catalog = tmp / f"catalog-{size}.yaml"
    catalog.write_text(yaml.safe_dump({"zoos": {f"pop{size}": {
        "description": "issue #17's population", "dataset": {"name": "digits"},
        "architecture": {"name": "mlp", "depth": 2, "width": 32},
        "load": {"name": "momentum", "values": momenta}, "temperature": {"name": "lr", "values": rates},
        "seeds": seeds, "training": {"optimizer": "sgd", "batch_size": 32, "epochs": epochs},
        "checkpoints": [0, epochs]}}}))
    return catalog


def zoo_generate(size: int, epochs: int, tmp: Path) -> float:
    """Wall seconds of `python -m zoo generate` of the same population into a fresh root."""
    catalog = write_catalog(size, epochs, tmp)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "zoo", "generate", f"pop{size}", "--catalog", str(catalog),
                    "--root", str(tmp / f"root-{size}"), "--no-progress"], check=True, capture_output=True)
    return time.perf_counter() - start


FORWARD_MACS = 64 * 32 + 32 * 32 + 32 * 10  # one sample through the MLP 64-32-32-10
N_TRAIN, N_TEST = 1437, 360  # digits, as the zoo splits it


def population_flops(size: int, epochs: int) -> float:
    training = epochs * N_TRAIN * 3 * FORWARD_MACS
    evaluation = (epochs + 1) * (N_TRAIN + N_TEST) * FORWARD_MACS
    return 2.0 * size * (training + evaluation)


def matmul_peak(size: int = 2048, repeats: int = 8) -> float:
    """float32 GFLOP/s of one large square matmul on 1 thread (best of `repeats`)."""
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def engine_worker(catalog: str, zoo: str, share: int, of: int, threads: int, ready, go, done) -> None:
    """Train every `of`-th stack of the population (from `share`) with `threads` threads, timed
    between the start signal and the end (imports, data and a warm-up before it)."""
    import torch

    from generators.plan import group_into_stacks
    from generators.stacked import train_stack
    from zoo.catalog import load_catalog
    from zoo.datasets import load_dataset

    torch.set_num_threads(threads)
    specs = load_catalog(catalog)[zoo].models()
    data = load_dataset(specs[0].dataset)
    stacks = group_into_stacks(specs)[share::of]
    if stacks:
        train_stack(stacks[0][:2], data)  # warm-up
    ready.release()
    go.wait()
    for stack in stacks:
        train_stack(stack, data)
    done.put(time.perf_counter())


def engine(size: int, epochs: int, tmp: Path, processes: int, threads: int) -> float:
    """Wall seconds of the stacked engine over the population: `processes` x `threads`."""
    context = mp.get_context("spawn")
    catalog = write_catalog(size, epochs, tmp)
    ready, go, done = context.Semaphore(0), context.Event(), context.Queue()
    workers = [context.Process(target=engine_worker, args=(str(catalog), f"pop{size}", i, processes, threads, ready, go, done))
               for i in range(processes)]
    for w in workers:
        w.start()
    for _ in workers:
        ready.acquire()
    start = time.perf_counter()
    go.set()
    ends = [done.get() for _ in workers]
    for w in workers:
        w.join()
    return max(ends) - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--single-process-sizes", type=int, nargs="*", default=[64],
                        help="sizes at which the plain loop also runs as one process with all threads")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with mp.get_context("spawn").Pool(1) as pool:
        peak = pool.apply(matmul_peak)
    print(f"{cores} cores; float32 matmul peak {peak:.1f} GFLOP/s per core ({peak * cores:.0f} for {cores}); "
          f"digits MLP 64-32-32-10, batch 32, {args.epochs} epochs, evaluation every epoch")
    print("| models | plain loop, 1 process x all threads | plain loops, one process per core x 1 thread | "
          "`zoo generate` (wall, command to exit) | ratio to the best plain | share of the matmul peak |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            one = size / plain(size, args.epochs, 1, cores) if size in args.single_process_sizes else None
            per_core = size / plain(size, args.epochs, cores, 1)
            seconds = zoo_generate(size, args.epochs, Path(tmp))
            ours = size / seconds
            best = max(one or 0.0, per_core)
            share = population_flops(size, args.epochs) / seconds / 1e9 / (peak * cores)
            one_text = f"{one:.2f} models/s" if one is not None else "not run"
            print(f"| {size} | {one_text} | {per_core:.2f} models/s | {ours:.2f} models/s | **{ours / best:.2f}x** | {share:.1%} |",
                  flush=True)
        print()
        print("The stacked engine alone (train_stack, after start-up), the same populations:")
        print("| models | 1 process x all threads | one process per core x 1 thread | share of the matmul peak (the faster) |")
        print("|---|---|---|---|")
        for size in args.sizes:
            threads = size / engine(size, args.epochs, Path(tmp), 1, cores)
            processes = size / engine(size, args.epochs, Path(tmp), cores, 1)
            share = population_flops(size, args.epochs) * max(threads, processes) / size / 1e9 / (peak * cores)
            print(f"| {size} | {threads:.1f} models/s | {processes:.1f} models/s | {share:.1%} |", flush=True)


if __name__ == "__main__":
    main()
