"""Spectral alpha over a population: our batched path against WeightWatcher 0.7.7, in one process run.

    python perf/spectral_vs_weightwatcher.py [--widths 32 128 512] [--seeds 8] [--batch-sizes 16 32 64 128]
                                             [--epochs 5] [--threads 1] [--repeats 2] [--json FILE]

The population: digits MLPs 64-w-w-10, one per (width, batch size, seed), trained briefly by the
reference path (`generators.training.train`, SGD lr 0.05 momentum 0.9), not left at random
initialisation: heavy tails appear with training, and the shape of the ESD decides how much of
the xmin search our pruned KS fit can skip. Then, on the same weights and the same layers (every
nn.Linear):

* ours: `metrics.spectral.spectral_metrics_many` over all models at once (same-shape layers'
  spectra batched), with `farms_window=None` (like for like: WeightWatcher computes no FARMS);
  the time with FARMS on (the default window) is reported separately;
* WeightWatcher: `WeightWatcher(model=m).analyze()` with its defaults, model by model.

Both run under the same thread count (torch.set_num_threads, and threadpoolctl for the BLAS that
scipy, hence WeightWatcher, calls); the measurements are interleaved over `--repeats` rounds and
each keeps its fastest round. Prints time per model for each, the speed ratio, and the
largest |alpha_ours - alpha_ww| over layers with >= 20 eigenvalues; below 20 eigenvalues
WeightWatcher switches to a small-sample estimator (alpha = 1 + (n-1)/sum, xmin with >= 8 tail
points), so those layers (the 10-output layers here) are counted but not compared.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from generators.training import train
from metrics.spectral import layer_eigenvalues, layer_matrices, spectral_metrics_many
from zoo.architectures import build_model
from zoo.catalog import parse_zoo
from zoo.datasets import load_dataset
from zoo.weights import unflatten

SMALL_N = 20  # WeightWatcher's SMALL_N_CUTOFF (weightwatcher/WW_powerlaw.py)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def population(widths: list[int], batch_sizes: list[int], seeds: int, epochs: int) -> dict[int, list[torch.nn.Module]]:
    """Trained digits MLPs by width, (batch size, seed) order inside a width."""
    models: dict[int, list[torch.nn.Module]] = {}
    for width in widths:
        zoo = parse_zoo("perf", {
            "description": "perf", "dataset": {"name": "digits"}, "architecture": {"name": "mlp", "width": width},
            "load": {"name": "width", "values": [width]}, "temperature": {"name": "batch_size", "values": batch_sizes},
            "seeds": list(range(seeds)), "training": {"lr": 0.05, "momentum": 0.9, "epochs": epochs},
            "checkpoints": [0, epochs],
        })
        models[width] = []
        for spec in zoo.models():
            trained = train(spec, load_dataset(spec.dataset))
            model = build_model(spec.architecture, spec.input_shape, spec.n_classes)
            model.load_state_dict(unflatten(trained.checkpoints[epochs], trained.index))
            models[width].append(model.eval())
    return models


def weightwatcher_alphas(ww, model: torch.nn.Module) -> list[tuple[str, float, int]]:
    """(layer name, alpha, eigenvalue count) per layer from WeightWatcher's defaults."""
    with contextlib.redirect_stdout(io.StringIO()):  # its small-sample fit prints a line per layer
        details = ww.WeightWatcher(model=model).analyze()
    return [(row.longname, float(row.alpha), int(row.num_evals)) for row in details.itertuples()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--seeds", type=int, default=8, help="seeds per (width, batch size)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved timing rounds (the fastest is kept)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file (perf/speed_targets.py reads it)")
    args = parser.parse_args()

    logging.getLogger("weightwatcher").setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import weightwatcher as ww  # prints its SVD backend on import
    from threadpoolctl import threadpool_info, threadpool_limits  # installed with scikit-learn

    # After the imports: scipy (WeightWatcher's SVD) loads its own OpenBLAS, which a limit set
    # before would miss.
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    pools = threadpool_info()
    assert all(pool["num_threads"] == args.threads for pool in pools), pools

    print(f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; {cpu_model()}, {os.cpu_count()} cores; "
          f"torch {torch.__version__}, numpy {np.__version__}, weightwatcher {ww.__version__}; "
          f"{args.threads} thread(s) for torch and for every BLAS/OpenMP pool "
          f"({', '.join(sorted(pool['internal_api'] for pool in pools))})")
    start = time.perf_counter()
    by_width = population(args.widths, args.batch_sizes, args.seeds, args.epochs)
    models = [m for width in args.widths for m in by_width[width]]
    print(f"population: digits MLP 64-w-w-10, widths {args.widths} x batch sizes {args.batch_sizes} x {args.seeds} seeds "
          f"= {len(models)} models, {args.epochs} epochs SGD lr 0.05 momentum 0.9 "
          f"(trained in {time.perf_counter() - start:.0f} s)")

    # Warm-up (not timed): first calls pay for lazy imports and allocator growth.
    spectral_metrics_many(models[:1], farms_window=None)
    weightwatcher_alphas(ww, models[0])

    # The machine is shared: the three measurements are interleaved, `--repeats` rounds, and
    # each keeps its fastest round (per width likewise).
    seconds_ours, seconds_farms, seconds_ww = np.inf, np.inf, np.full(len(models), np.inf)
    seconds_width = dict.fromkeys(args.widths, np.inf)
    # The floor of each side: the spectra alone, ours (float64 Gram + LAPACK syevd, batched) and
    # WeightWatcher's (scipy.linalg.svd, float64 gesdd, one matrix at a time), same matrices.
    matrices = {width: [w for m in by_width[width] for _, ws in layer_matrices(m) for w in ws] for width in args.widths}
    seconds_spectra = dict.fromkeys(args.widths, np.inf)
    seconds_svd = dict.fromkeys(args.widths, np.inf)
    for _ in range(args.repeats):
        start = time.perf_counter()
        ours = spectral_metrics_many(models, farms_window=None)
        seconds_ours = min(seconds_ours, time.perf_counter() - start)
        start = time.perf_counter()
        spectral_metrics_many(models)
        seconds_farms = min(seconds_farms, time.perf_counter() - start)
        for width in args.widths:
            start = time.perf_counter()
            spectral_metrics_many(by_width[width], farms_window=None)
            seconds_width[width] = min(seconds_width[width], time.perf_counter() - start)
            start = time.perf_counter()
            layer_eigenvalues(matrices[width])
            seconds_spectra[width] = min(seconds_spectra[width], time.perf_counter() - start)
            arrays = [w.double().numpy() for w in matrices[width]]
            start = time.perf_counter()
            for w in arrays:
                scipy.linalg.svd(w, compute_uv=False)
            seconds_svd[width] = min(seconds_svd[width], time.perf_counter() - start)
        theirs = []
        for k, model in enumerate(models):
            start = time.perf_counter()
            theirs.append(weightwatcher_alphas(ww, model))
            seconds_ww[k] = min(seconds_ww[k], time.perf_counter() - start)

    diffs, small, worst = [], 0, None
    alphas: dict[int, list[float]] = {width: [] for width in args.widths}
    widths = [width for width in args.widths for _ in by_width[width]]
    for width, mine, rows in zip(widths, ours, theirs):
        assert len(rows) == len(mine), (list(mine), rows)  # the same layers
        for name, alpha, n_eigs in rows:
            assert mine[name]["n_eigs"] == n_eigs, (name, mine[name]["n_eigs"], n_eigs)
            if n_eigs < SMALL_N:
                small += 1
                continue
            alphas[width].append(mine[name]["alpha"])
            diff = abs(mine[name]["alpha"] - alpha)
            diffs.append(diff)
            if worst is None or diff > worst[0]:
                worst = (diff, n_eigs, mine[name]["alpha"], alpha)
    diffs = np.array(diffs)

    n = len(models)
    print(f"timings: fastest of {args.repeats} interleaved rounds")
    print("per width (ours: one spectral_metrics_many call per width, FARMS off):")
    pos = 0
    for width in args.widths:
        size = len(by_width[width])
        mine = seconds_width[width] / size
        other = seconds_ww[pos : pos + size].mean()
        pos += size
        print(f"  width {width:4d}: ours {mine * 1e3:7.2f} ms/model  WeightWatcher {other * 1e3:7.2f} ms/model  "
              f"speed ours / WW {other / mine:6.2f}x;  alpha (layers >= {SMALL_N} eigenvalues) median "
              f"{np.median(alphas[width]):.2f}, range {min(alphas[width]):.2f}-{max(alphas[width]):.2f}")
        print(f"              of which spectra alone: ours (Gram + syevd) {seconds_spectra[width] / size * 1e3:7.2f} ms/model, "
              f"WW (scipy svd) {seconds_svd[width] / size * 1e3:7.2f} ms/model; "
              f"WW total / our spectra {other / (seconds_spectra[width] / size):6.2f}x (the most batching could give)")
    print(f"whole population ({n} models, {sum(len(m) for m in ours)} layers):")
    print(f"  ours, FARMS off : {seconds_ours / n * 1e3:7.2f} ms/model ({seconds_ours:.2f} s)")
    print(f"  ours, FARMS on  : {seconds_farms / n * 1e3:7.2f} ms/model ({seconds_farms:.2f} s; default window 100 x 200, 10 x 10 positions)")
    print(f"  WeightWatcher   : {seconds_ww.mean() * 1e3:7.2f} ms/model ({seconds_ww.sum():.2f} s; analyze() defaults, model by model)")
    print(f"  speed ours / WW : {seconds_ww.sum() / seconds_ours:.2f}x (FARMS off; target >= 5x), "
          f"{seconds_ww.sum() / seconds_farms:.2f}x with FARMS on")
    spectra = sum(seconds_spectra.values())
    print(f"  WW / our spectra alone: {seconds_ww.sum() / spectra:.2f}x ({spectra / n * 1e3:.2f} ms/model): the most a "
          f"zero-cost fit could give over this population (perf/eigensolvers.py times each solver for one layer)")
    print(f"alpha agreement on the {len(diffs)} layers with >= {SMALL_N} eigenvalues: max |ours - WW| = {diffs.max():.2e} "
          f"(target <= 1e-3), median {np.median(diffs):.1e}; {np.sum(diffs > 1e-3)} layers above 1e-3")
    if worst is not None:
        print(f"  worst layer: {worst[1]} eigenvalues, alpha ours {worst[2]:.6f}, WW {worst[3]:.6f}")
    print(f"  {small} layers have < {SMALL_N} eigenvalues (WeightWatcher's small-sample fit): not comparable, not counted")
    if args.json:
        args.json.write_text(json.dumps({"models": n, "ours_ms_per_model": seconds_ours / n * 1e3,
                                         "weightwatcher_ms_per_model": float(seconds_ww.mean()) * 1e3,
                                         "ratio": float(seconds_ww.sum() / seconds_ours), "alpha_max_difference": float(diffs.max()),
                                         "ratio_bound_spectra_alone": float(seconds_ww.sum() / spectra),
                                         "layers_compared": len(diffs), "threads": args.threads}, indent=1))


if __name__ == "__main__":
    main()
