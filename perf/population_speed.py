"""Training a population: `zoo generate`, wall time from the command to its exit, against the best
plain PyTorch loop a user would write, one process per core, in the same run.

    python perf/population_speed.py [--sizes 64 256] [--epochs 20] [--single-process-sizes 64]
                                    [--cnn-cells 4x32 4x128 8x128] [--cnn-epochs 2] [--json FILE]

The population (as issue #17 measured it): the digits MLP 64-32-32-10, batch 32, SGD with momentum,
20 epochs, train and test evaluation after every epoch; a momentum x learning-rate grid, 4 seeds
(64 models: 4 x 4 x 4; 256: 8 x 8 x 4). The baseline is written here without any project code: an
nn.Sequential, torch.optim.SGD, a shuffled index per epoch, `.item()` reads of the evaluation. It
runs as one process per core with 1 thread each, with glibc's malloc defaults and again with freed
memory kept as `zoo generate`'s jobs keep it (`keep_freed_memory`, written out here), and (at
`--single-process-sizes`) as one process with all threads; the fastest is the baseline. `zoo generate` runs as users run it (`python -m zoo
generate ...`, default local executor), so job start-up counts.

Then the same for the BatchNorm CNNs of the fmnist-cnn zoo on its 28x28 Fashion-MNIST shape
(`--cnn-cells`, width x batch: conv(w) -> BN -> ReLU -> max-pool -> conv(2w) -> BN -> ReLU ->
average pool -> linear; the first 2,000 training and 1,000 test images, SGD with momentum and
weight decay 5e-4, `--cnn-epochs` epochs, train and test evaluation after every epoch; a momentum x
learning-rate grid x 4 seeds, 64 models). Its plain loop reads the Debian IDX files itself and
evaluates in batches of 1,000, one process per core x 1 thread, with both malloc settings.

Then the stacked engine alone (the project's `train_stack`, after imports and a warm-up), to say
where the time goes and how stacks should fill the cores: all stacks in one process with all
threads, against one process per core with 1 thread each; for the MLP populations and the CNN
cells. Each MLP row gives the population's arithmetic (training: 3 x the forward multiply-adds
per sample; evaluation: the forward pass over train and test after every epoch; x 2 FLOP per
multiply-add) per wall second, as a share of this machine's float32 matmul peak measured in the
same run (a 2048^2 matmul, 1 thread, times cores).
"""

from __future__ import annotations

import argparse
import json
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


def keep_freed_memory() -> None:
    """glibc's malloc keeps freed memory (blocks under 32 MB from the heap, trimmed past 128 MB),
    as `zoo generate`'s jobs set it: the plain loops run both with and without it, and the faster
    is the baseline. Written here, not imported: the baseline uses no project code."""
    import ctypes

    libc = ctypes.CDLL(None)
    assert libc.mallopt(-3, 32 << 20) == 1 and libc.mallopt(-1, 128 << 20) == 1  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


def plain_worker(jobs: list[tuple[float, float, int]], epochs: int, threads: int, done, keep_memory: bool = False) -> None:
    """Train `jobs` (momentum, lr, seed) one after another: the plain loop, no project code."""
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    if keep_memory:
        keep_freed_memory()
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
        plain_training(model, optimizer, (x_train, y_train), (x_test, y_test), epochs, 32, len(x))
        done.value += 1


def plain_training(model, optimizer, train, test, epochs: int, batch: int, eval_batch: int) -> None:
    """The plain loop: shuffled batches, zero_grad / backward / step, then the loss and accuracy
    on both splits in eval mode, read back with `.item()`, after every epoch."""
    import torch
    import torch.nn.functional as F

    x_train, y_train = train
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x_train)).split(batch):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for xs, ys in (train, test):
                losses, correct = 0.0, 0
                for start in range(0, len(xs), eval_batch):
                    logits = model(xs[start : start + eval_batch])
                    losses += F.cross_entropy(logits, ys[start : start + eval_batch], reduction="sum").item()
                    correct += (logits.argmax(1) == ys[start : start + eval_batch]).sum().item()


def plain(size: int, epochs: int, processes: int, threads: int, keep_memory: bool = False) -> float:
    """Wall seconds of the plain loop over the population, `processes` at once."""
    return run_plain(plain_worker, size, processes, lambda jobs, done: (jobs, epochs, threads, done, keep_memory))


def run_plain(worker, size: int, processes: int, arguments) -> float:
    """Wall seconds of `worker` over the population's (momentum, lr, seed) jobs, dealt out to
    `processes` spawned processes (`arguments(their jobs, shared counter)` -> worker arguments)."""
    momenta, rates, seeds = grid(size)
    jobs = [(m, r, s) for m in momenta for r in rates for s in seeds]
    context = mp.get_context("spawn")
    done = context.Value("i", 0)
    workers = [context.Process(target=worker, args=arguments(jobs[i::processes], done)) for i in range(processes)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert done.value == len(jobs)
    return time.perf_counter() - start


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def plain_cnn_worker(jobs: list[tuple[float, float, int]], epochs: int, width: int, batch: int, threads: int, done,
                     keep_memory: bool = False) -> None:
    """Train `jobs` (momentum, lr, seed) of the fmnist-cnn shape one after another: the plain loop,
    no project code."""
    import gzip

    import numpy as np
    import torch
    from torch import nn

    if keep_memory:
        keep_freed_memory()
    torch.set_num_threads(threads)

    def idx(name: str) -> np.ndarray:
        raw = gzip.open(FASHION_MNIST / f"{name}.gz").read()
        ndim = raw[3]
        dims = np.frombuffer(raw, ">u4", ndim, 4)
        return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)

    def images(a: np.ndarray) -> torch.Tensor:
        return (torch.tensor(a, dtype=torch.float32).unsqueeze(1) / 255.0 - 0.2860) / 0.3530

    x_train, y_train = images(idx("train-images-idx3-ubyte")[:CNN_TRAIN]), torch.tensor(idx("train-labels-idx1-ubyte")[:CNN_TRAIN], dtype=torch.int64)
    x_test, y_test = images(idx("t10k-images-idx3-ubyte")[:CNN_TEST]), torch.tensor(idx("t10k-labels-idx1-ubyte")[:CNN_TEST], dtype=torch.int64)
    for momentum, lr, seed in jobs:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=5e-4)
        plain_training(model, optimizer, (x_train, y_train), (x_test, y_test), epochs, batch, 1000)
        done.value += 1


CNN_TRAIN, CNN_TEST = 2000, 1000


def plain_cnn(width: int, batch: int, epochs: int, processes: int, keep_memory: bool = False) -> float:
    """Wall seconds of the plain CNN loop over the 64-model population, one process per core."""
    return run_plain(plain_cnn_worker, 64, processes, lambda jobs, done: (jobs, epochs, width, batch, 1, done, keep_memory))


def write_cnn_catalog(width: int, batch: int, epochs: int, tmp: Path) -> tuple[Path, str]:
    """A catalog holding the CNN population of one width x batch cell, and the zoo's name."""
    momenta, rates, seeds = grid(64)
    name = f"cnn{width}x{batch}"
    catalog = tmp / f"catalog-{name}.yaml"
    catalog.write_text(yaml.safe_dump({"zoos": {name: {
        "description": "issue #17's CNN population",
        "dataset": {"name": "fashion-mnist", "train_size": CNN_TRAIN, "test_size": CNN_TEST},
        "architecture": {"name": "cnn", "width": width, "depth": 2},
        "load": {"name": "momentum", "values": momenta}, "temperature": {"name": "lr", "values": rates},
        "seeds": seeds, "training": {"optimizer": "sgd", "batch_size": batch, "epochs": epochs, "weight_decay": 5e-4,
                                     "eval_batch_size": 1000},
        "checkpoints": [0, epochs]}}}))
    return catalog, name


def zoo_generate_cnn(width: int, batch: int, epochs: int, tmp: Path) -> float:
    """Wall seconds of `python -m zoo generate` of the same CNN population into a fresh root."""
    catalog, name = write_cnn_catalog(width, batch, epochs, tmp)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "zoo", "generate", name, "--catalog", str(catalog),
                    "--root", str(tmp / f"root-{name}"), "--no-progress"], check=True, capture_output=True)
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
    from zoo.launch import keep_freed_memory

    keep_freed_memory()  # as the project's training jobs do
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


def engine(catalog: Path, zoo: str, processes: int, threads: int) -> float:
    """Wall seconds of the stacked engine over the population of `zoo`: `processes` x `threads`."""
    context = mp.get_context("spawn")
    ready, go, done = context.Semaphore(0), context.Event(), context.Queue()
    workers = [context.Process(target=engine_worker, args=(str(catalog), zoo, i, processes, threads, ready, go, done))
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
    parser.add_argument("--cnn-cells", nargs="*", default=["4x32", "4x128", "8x128"],
                        help="fmnist-cnn cells (width x batch size) to measure; none: skip the CNNs")
    parser.add_argument("--cnn-epochs", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file (perf/speed_targets.py reads it)")
    args = parser.parse_args()
    figures: dict = {"peak_gflops_per_core": None, "mlp": {}, "cnn": {}, "engine_mlp": {}, "engine_cnn": {}}
    cores = os.cpu_count() or 1
    with mp.get_context("spawn").Pool(1) as pool:
        peak = pool.apply(matmul_peak)
    figures["peak_gflops_per_core"] = peak
    print(f"{cores} cores; float32 matmul peak {peak:.1f} GFLOP/s per core ({peak * cores:.0f} for {cores}); "
          f"digits MLP 64-32-32-10, batch 32, {args.epochs} epochs, evaluation every epoch")
    print("| models | plain loop, 1 process x all threads | plain loops, one process per core x 1 thread (glibc's malloc "
          "defaults / freed memory kept) | `zoo generate` (wall, command to exit) | ratio to the best plain | share of the matmul peak |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            one = size / plain(size, args.epochs, 1, cores) if size in args.single_process_sizes else None
            defaults, kept = size / plain(size, args.epochs, cores, 1), size / plain(size, args.epochs, cores, 1, keep_memory=True)
            per_core = max(defaults, kept)
            seconds = zoo_generate(size, args.epochs, Path(tmp))
            ours = size / seconds
            best = max(one or 0.0, per_core)
            share = population_flops(size, args.epochs) / seconds / 1e9 / (peak * cores)
            one_text = f"{one:.2f} models/s" if one is not None else "not run"
            figures["mlp"][size] = {"plain_one_process": one, "plain_per_core_defaults": defaults, "plain_per_core_kept": kept,
                                    "zoo_generate": ours, "ratio": ours / best, "peak_share": share}
            print(f"| {size} | {one_text} | {defaults:.2f} / {kept:.2f} models/s | {ours:.2f} models/s | **{ours / best:.2f}x** | "
                  f"{share:.1%} |", flush=True)
        if args.cnn_cells:
            print()
            print(f"fmnist-cnn's shape (28x28), 64 models, {args.cnn_epochs} epochs, evaluation every epoch:")
            print("| width x batch | plain loops, one process per core x 1 thread (malloc defaults / freed memory kept) | "
                  "`zoo generate` (wall) | ratio to the faster plain |")
            print("|---|---|---|---|")
            for cell in args.cnn_cells:
                width, batch = (int(v) for v in cell.split("x"))
                defaults = 64 / plain_cnn(width, batch, args.cnn_epochs, cores)
                kept = 64 / plain_cnn(width, batch, args.cnn_epochs, cores, keep_memory=True)
                ours = 64 / zoo_generate_cnn(width, batch, args.cnn_epochs, Path(tmp))
                figures["cnn"][cell] = {"plain_per_core_defaults": defaults, "plain_per_core_kept": kept, "zoo_generate": ours,
                                        "ratio": ours / max(defaults, kept)}
                print(f"| {width} x {batch} | {defaults:.2f} / {kept:.2f} models/s | {ours:.2f} models/s | "
                      f"**{ours / max(defaults, kept):.2f}x** |", flush=True)
        print()
        print("The stacked engine alone (train_stack, after start-up), the same populations:")
        print("| models | 1 process x all threads | one process per core x 1 thread | share of the matmul peak (the faster) |")
        print("|---|---|---|---|")
        for size in args.sizes:
            catalog = write_catalog(size, args.epochs, Path(tmp))
            threads = size / engine(catalog, f"pop{size}", 1, cores)
            processes = size / engine(catalog, f"pop{size}", cores, 1)
            share = population_flops(size, args.epochs) * max(threads, processes) / size / 1e9 / (peak * cores)
            print(f"| {size} | {threads:.1f} models/s | {processes:.1f} models/s | {share:.1%} |", flush=True)
            figures["engine_mlp"][size] = {"one_process": threads, "per_core": processes, "peak_share": share}
        if args.cnn_cells:  # memory-bound stacks: whether two processes or two threads fill the cores better
            print()
            print("The stacked engine alone, the fmnist-cnn populations (64 models):")
            print("| width x batch | 1 process x all threads | one process per core x 1 thread | faster |")
            print("|---|---|---|---|")
            for cell in args.cnn_cells:
                width, batch = (int(v) for v in cell.split("x"))
                catalog, name = write_cnn_catalog(width, batch, args.cnn_epochs, Path(tmp))
                threads = 64 / engine(catalog, name, 1, cores)
                processes = 64 / engine(catalog, name, cores, 1)
                faster = f"processes, {processes / threads:.2f}x" if processes >= threads else f"threads, {threads / processes:.2f}x"
                plain_best = max(figures["cnn"].get(cell, {}).get(k) or 0.0 for k in ("plain_per_core_defaults", "plain_per_core_kept"))
                figures["engine_cnn"][cell] = {"one_process": threads, "per_core": processes,
                                               "ratio_to_plain": max(threads, processes) / plain_best if plain_best else None}
                print(f"| {width} x {batch} | {threads:.2f} models/s | {processes:.2f} models/s | {faster} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
