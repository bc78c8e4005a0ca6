"""Hessian top eigenvalue + trace: our path (Lanczos + Hutch++) against pyhessian's defaults, both
against the exact Hessian, on small digits MLPs over several seeds, in one process run.

    python perf/hessian_vs_pyhessian.py [--widths 32] [--seeds 10] [--samples 640]

Prints per width: seconds per model for each path (top eigenvalue + trace), their ratio, and
the median and maximum relative errors of each against `torch.autograd.functional.hessian`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from generators.training import train
from metrics.hessian import exact_hessian, hessian_top_eigenvalues, hessian_trace, hutchpp_trace, lanczos_top_eigenvalues
from zoo.architectures import build_model
from zoo.catalog import parse_zoo
from zoo.datasets import load_dataset
from zoo.weights import unflatten


def exact(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(top eigenvalue, trace) of the exact Hessian."""
    hessian = exact_hessian(model, x, y)
    return float(torch.linalg.eigvalsh(hessian)[-1]), float(torch.trace(hessian))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[32])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--samples", type=int, default=640)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"digits MLP 64-w-w-10, 50 epochs SGD lr 0.05 batch 32; {args.samples} training samples; {args.seeds} seeds; 1 thread")
    for width in args.widths:
        zoo = parse_zoo("perf", {
            "description": "perf", "dataset": {"name": "digits"}, "architecture": {"name": "mlp", "width": width},
            "load": {"name": "width", "values": [width]}, "temperature": {"name": "batch_size", "values": [32]},
            "seeds": list(range(args.seeds)), "training": {"lr": 0.05, "epochs": 50}, "checkpoints": [0, 50],
        })
        rows = []
        for spec in zoo.models():
            data = load_dataset(spec.dataset)
            trained = train(spec, data)
            model = build_model(spec.architecture, spec.input_shape, spec.n_classes)
            model.load_state_dict(unflatten(trained.checkpoints[50], trained.index))
            x, y = data.x_train[: args.samples], data.y_train[: args.samples]
            top_exact, trace_exact = exact(model, x, y)
            batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(x), 64)]  # the paper's 10 x 64
            start = time.perf_counter()
            top_py = hessian_top_eigenvalues(model, batches).eigenvalues[0]
            trace_py = hessian_trace(model, batches).trace
            seconds_py = time.perf_counter() - start
            start = time.perf_counter()
            top_ours = lanczos_top_eigenvalues(model, [(x, y)], n_iter=30).eigenvalues[0]
            trace_ours = hutchpp_trace(model, [(x, y)], tol=0.02, max_probes=200).trace
            seconds_ours = time.perf_counter() - start
            rows.append((seconds_py, seconds_ours, abs(top_py / top_exact - 1), abs(trace_py / trace_exact - 1),
                         abs(top_ours / top_exact - 1), abs(trace_ours / trace_exact - 1)))
        r = np.array(rows)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"width {width} ({n_params} parameters):")
        print(f"  pyhessian : {r[:, 0].mean():.3f} s/model; top-eig error median {np.median(r[:, 2]):.2%} max {r[:, 2].max():.2%}; "
              f"trace error median {np.median(r[:, 3]):.2%} max {r[:, 3].max():.2%}")
        print(f"  ours      : {r[:, 1].mean():.3f} s/model; top-eig error median {np.median(r[:, 4]):.2%} max {r[:, 4].max():.2%}; "
              f"trace error median {np.median(r[:, 5]):.2%} max {r[:, 5].max():.2%}")
        print(f"  speed ours / pyhessian: {r[:, 0].mean() / r[:, 1].mean():.2f}x")


if __name__ == "__main__":
    main()
