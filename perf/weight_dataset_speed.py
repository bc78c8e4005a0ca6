"""WeightDataset: construction time, and items per second through a torch DataLoader, against
plain loops over the same weights already in memory (the floor), in the same run.

    python perf/weight_dataset_speed.py [--root ROOT] [--zoo digits-mlp] [--width 64] [--epochs 40]

ROOT defaults to $ZOO_ROOT, else ./zoo-data; it is only read. Construction: `WeightDataset(z,
"select model_id from models where zoo = ... and load = WIDTH")` on an open root, the first call
and the best of 3; then over all the zoo's models, which WeightDataset refuses when their widths
differ (one parameter count per dataset), so every width is built on its own and the sum given.

Iteration: `DataLoader(ds, batch_size=32, num_workers=W, shuffle=True)` with torch's default
collate (it handles the items: strings become lists, numbers tensors, the `layers=True` state
dict a dict of stacked tensors), for W = 0 and 2, with `layers=False, permute=False` and then
`layers=True, permute=True`. One warm-up epoch, then the clock runs over whole epochs (at least
`--epochs`, and at least `--min-seconds`), worker start-up of every epoch included, as a
training loop pays it; a row with `persistent_workers=True` gives the steady state. The fastest
of 3 rounds is reported. Threads: the main process runs torch with `--threads` (default 1);
DataLoader workers are forked and run 1 thread each (set again in worker_init_fn).

The floors use no project code in the timed loop: the same (N, P) weights as one tensor in
memory, a random index batch per step (`matrix[idx]`); and for the permuted rows, the same
state-dict layout cut from that tensor with a fresh random permutation of every hidden layer per
item, applied to the whole batch at once by indexing (MLPs only: 2-D weight layers in a chain).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import platform
import shlex
import sys
import time
from datetime import date

import torch
from torch.utils.data import DataLoader

import zoo
from zoo.errors import ZooError
from zoo.population import WeightDataset


def one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)  # (DataLoader sets it too; said here so the setting is explicit)


def rounds(epoch, n_items: int, epochs: int, min_seconds: float, repeats: int = 3) -> float:
    """Items per second of `epoch()` (one pass, returns the items it saw): a warm-up epoch, then
    whole epochs until both `epochs` and `min_seconds` are reached; the fastest of `repeats`."""
    best = 0.0
    for _ in range(repeats):
        epoch()
        seen, done, start = 0, 0, time.perf_counter()
        while done < epochs or time.perf_counter() - start < min_seconds:
            seen += epoch()
            done += 1
        best = max(best, seen / (time.perf_counter() - start))
    return best


def loader_epoch(loader: DataLoader):
    def epoch() -> int:
        seen = 0
        for batch in loader:
            seen += len(batch["model_id"])
        return seen
    return epoch


def floor_flat(matrix: torch.Tensor, batch_size: int):
    """The plain loop: random index batches from the weights already in memory."""
    def epoch() -> int:
        seen = 0
        for idx in torch.randperm(len(matrix)).split(batch_size):
            seen += len(matrix[idx])
        return seen
    return epoch


def floor_permuted(matrix: torch.Tensor, layers: list[tuple[str, tuple, int, str, tuple, int]], batch_size: int):
    """The plain loop with the augmentation: per batch, the chain's layers cut from the in-memory
    rows, and every hidden layer's units reordered by a fresh random permutation per item
    (weight rows and bias of a layer, the matching input columns of the next)."""
    def epoch() -> int:
        seen = 0
        for idx in torch.randperm(len(matrix)).split(batch_size):
            rows, b = matrix[idx], len(idx)
            items = torch.arange(b)
            state, previous = {}, None
            for k, (w_name, w_shape, w_offset, b_name, b_shape, b_offset) in enumerate(layers):
                w = rows[:, w_offset : w_offset + math.prod(w_shape)].reshape(b, *w_shape)
                bias = rows[:, b_offset : b_offset + math.prod(b_shape)]
                out = torch.rand(b, w_shape[0]).argsort(1) if k < len(layers) - 1 else None
                if out is not None:
                    w, bias = w[items[:, None], out], bias[items[:, None], out]
                if previous is not None:
                    w = w[items[:, None, None], torch.arange(w_shape[0])[None, :, None], previous[:, None, :]]
                state[w_name], state[b_name], previous = w, bias, out
            seen += b
        return seen
    return epoch


def chain(index) -> list | None:
    """(weight name, shape, offset, bias name, shape, offset) per layer, if the parameters are a
    chain of 2-D weights each followed by its bias (an MLP); else None."""
    params = [e for e in index if e.kind == "parameter"]
    if len(params) % 2:
        return None
    layers = []
    for w, b in zip(params[::2], params[1::2]):
        if len(w.shape) != 2 or b.shape != (w.shape[0],) or not w.name.endswith("weight") or not b.name.endswith("bias"):
            return None
        if layers and layers[-1][1][0] != w.shape[1]:
            return None
        layers.append((w.name, w.shape, w.offset, b.name, b.shape, b.offset))
    return layers


def build(z, query: str, repeats: int = 3, **options) -> tuple[WeightDataset, float, float]:
    """(dataset, first construction seconds, best of `repeats`)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        ds = WeightDataset(z, query, **options)
        times.append(time.perf_counter() - start)
    return ds, times[0], min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=os.environ.get("ZOO_ROOT", "./zoo-data"), help="zoo root (default: $ZOO_ROOT, else ./zoo-data)")
    parser.add_argument("--zoo", default="digits-mlp")
    parser.add_argument("--width", type=float, default=None,
                        help="the `load` value (MLP width) of the models iterated (default: all the zoo's models "
                             "when they share one shape, as in teacher-student, else 64)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=40, help="timed epochs per round, at least")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="timed seconds per round, at least")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    print(f"{date.today()}  {cpu}  {os.cpu_count()} cores  torch {torch.__version__}  python {platform.python_version()}")
    print(f"command: python {shlex.join(sys.argv)}")
    print(f"threads: main process torch.set_num_threads({args.threads}); DataLoader workers: "
          f"'{multiprocessing.get_start_method()}' processes, 1 thread each")

    z = zoo.open(args.root)
    where = f"zoo = '{args.zoo}'"
    widths = [float(w) for w in z.sql(f"select distinct load from models where {where} order by load")["load"]]
    n_all = int(z.sql(f"select count(*) from models where {where}").iloc[0, 0])
    shapes = int(z.sql(f"select count(distinct n_params) from models where {where}").iloc[0, 0])
    if args.width is None and shapes == 1:
        query, label = f"select model_id from models where {where}", "all (one shape)"
    else:
        args.width = 64.0 if args.width is None else args.width
        if args.width not in widths:
            raise SystemExit(f"no models of width {args.width:g} in zoo {args.zoo!r} (widths: {', '.join(f'{w:g}' for w in widths)})")
        query, label = f"select model_id from models where {where} and load = {args.width}", f"width {args.width:g}"

    print()
    print("Construction (an open root; first call, best of 3):")
    ds, first, best = build(z, query)
    print(f"- {label}: {len(ds)} models x {ds.n_params:,} parameters: {first * 1000:.0f} ms first, {best * 1000:.0f} ms best")
    start = time.perf_counter()
    try:
        WeightDataset(z, f"select model_id from models where {where}")
        print(f"- all {n_all} models at once: accepted ({(time.perf_counter() - start) * 1000:.0f} ms)")
    except ZooError as e:
        print(f"- all {n_all} models at once: refused after {(time.perf_counter() - start) * 1000:.0f} ms: ZooError: {e}")
    total_first = total_best = 0.0
    for width in widths:
        _, f, b = build(z, f"select model_id from models where {where} and load = {width}")
        total_first, total_best = total_first + f, total_best + b
    print(f"- all {n_all} models, one dataset per width ({len(widths)} widths): {total_first * 1000:.0f} ms first, "
          f"{total_best * 1000:.0f} ms best (sums over widths)")

    print()
    n, bs = len(ds), args.batch_size
    print(f"Iteration: {label}, {n} items, batch {bs}: {math.ceil(n / bs)} batch{'es' if n > bs else ''} per epoch"
          + (" (fewer items than a batch: with 2 workers only one of them loads per epoch)" if n <= bs else "")
          + f"; fastest of 3 rounds of >= {args.epochs} epochs and >= {args.min_seconds:g} s after a warm-up epoch")
    print()
    print("| setting | items/s |")
    print("|---|---|")
    matrix = z.weights(list(ds.properties["model_id"]))  # the same rows, read outside the clock
    row = lambda name, rate: print(f"| {name} | {rate:,.0f} |", flush=True)
    row("floor: plain loop, `matrix[idx]` from an (N, P) tensor in memory (no project code)",
        rounds(floor_flat(matrix, bs), n, args.epochs, args.min_seconds))
    for layers, permute in ((False, False), (True, True)):
        ds = WeightDataset(z, query, layers=layers, permute=permute)
        label = f"layers={layers}, permute={permute}"
        if permute:
            layout = chain(ds.index)
            if layout is None:
                print("| floor with permutation | not run: not an MLP chain |")
            else:
                row("floor: plain loop, per-item random hidden-unit permutation by batched indexing (no project code)",
                    rounds(floor_permuted(matrix, layout, bs), n, args.epochs, args.min_seconds))
        for workers in args.workers:
            for persistent in ((False, True) if workers else (False,)):
                loader = DataLoader(ds, batch_size=bs, num_workers=workers, shuffle=True,
                                    worker_init_fn=one_thread if workers else None, persistent_workers=persistent)
                name = f"WeightDataset {label}, DataLoader W={workers}" + (", persistent_workers=True" if persistent else "")
                row(name, rounds(loader_epoch(loader), n, args.epochs, args.min_seconds))
                del loader


if __name__ == "__main__":
    main()
