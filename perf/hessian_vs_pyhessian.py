"""Hessian top eigenvalue + trace: our path against pyhessian's defaults, all against the exact
Hessian, on small digits MLPs over several seeds, in one process run.

    python perf/hessian_vs_pyhessian.py [--widths 32] [--seeds 10] [--samples 640]

Ours is `krylov_top_eigenvalues_and_trace` with the hessian family's default settings (one block
Krylov space for both numbers, products a block at a time); the previous path, Lanczos (30 steps)
+ Hutch++, is timed too. Prints per width: seconds per model for each path (top eigenvalue +
trace), their speed ratios against pyhessian, and the median and maximum relative errors of each
against the exact Hessian (`metrics.hessian.exact_hessian`; above 8000 parameters the same
float64 loss matrix-free: the diagonal from every unit vector, the top eigenvalue by ARPACK). It
costs one product per parameter (several minutes per model at width 128): use fewer --seeds there.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import scipy.sparse.linalg
import torch

from generators.training import train
from metrics.families import HessianSettings
from metrics.hessian import (hvp_block, exact_hessian, hessian_top_eigenvalues, hessian_trace, hutchpp_trace, hvp,
                             krylov_top_eigenvalues_and_trace, lanczos_top_eigenvalues)
from metrics.modes import eval_mode
from zoo.architectures import build_model
from zoo.catalog import parse_zoo
from zoo.datasets import load_dataset
from zoo.weights import unflatten


def exact(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(top eigenvalue, trace) of the exact Hessian."""
    n_params = sum(p.numel() for p in model.parameters())
    if n_params <= 8000:
        hessian = exact_hessian(model, x, y)
        return float(torch.linalg.eigvalsh(hessian)[-1]), float(torch.trace(hessian))
    # Beyond that, the dense Hessian (5.5 GB at width 128) and autograd's construction of it need
    # more memory than a 23 GB machine has: the same float64 loss, matrix-free. The trace is the
    # sum of e_i^T H e_i (every unit vector, in blocks), the top eigenvalue ARPACK's to 1e-10.
    m64 = copy.deepcopy(model).double()
    params, batches = list(m64.parameters()), [(x.double(), y)]
    diagonal = torch.empty(n_params, dtype=torch.float64)
    with eval_mode(m64):
        for start in range(0, n_params, 256):
            rows = torch.arange(start, min(start + 256, n_params))
            units = torch.zeros(n_params, len(rows), dtype=torch.float64)
            units[rows, torch.arange(len(rows))] = 1
            diagonal[rows] = hvp_block(m64, params, batches, len(x), units)[rows, torch.arange(len(rows))]
    operator = scipy.sparse.linalg.LinearOperator(
        (n_params, n_params), dtype=np.float64,
        matvec=lambda v: hvp(m64, batches, torch.from_numpy(np.ascontiguousarray(v).reshape(-1))).numpy())
    top = scipy.sparse.linalg.eigsh(operator, k=1, which="LA", tol=1e-10, return_eigenvectors=False)
    return float(top[0]), float(diagonal.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[32])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--samples", type=int, default=640)
    args = parser.parse_args()
    torch.set_num_threads(1)
    s = HessianSettings()
    print(f"digits MLP 64-w-w-10, 50 epochs SGD lr 0.05 batch 32; {args.samples} training samples; {args.seeds} seeds; 1 thread")
    print(f"ours: krylov_top_eigenvalues_and_trace(block={s.krylov_block}, eig_tol={s.eig_tol}, "
          f"max_blocks={s.krylov_max_blocks}, trace_tol={s.trace_tol}, max_probes={s.trace_max_probes}), one batch; "
          f"previous: lanczos_top_eigenvalues(n_iter=30) + hutchpp_trace(tol=0.02, max_probes=200), one batch; "
          f"pyhessian: defaults, 64-sample batches")
    for width in args.widths:
        zoo = parse_zoo("perf", {
            "description": "perf", "dataset": {"name": "digits"}, "architecture": {"name": "mlp", "width": width},
            "load": {"name": "width", "values": [width]}, "temperature": {"name": "batch_size", "values": [32]},
            "seeds": list(range(args.seeds)), "training": {"lr": 0.05, "epochs": 50}, "checkpoints": [0, 50],
        })
        rows, products = [], []
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
            top_prev = lanczos_top_eigenvalues(model, [(x, y)], n_iter=30).eigenvalues[0]
            trace_prev = hutchpp_trace(model, [(x, y)], tol=0.02, max_probes=200).trace
            seconds_prev = time.perf_counter() - start
            start = time.perf_counter()
            ours = krylov_top_eigenvalues_and_trace(
                model, [(x, y)], block=s.krylov_block, eig_tol=s.eig_tol, max_blocks=s.krylov_max_blocks,
                trace_tol=s.trace_tol, max_probes=s.trace_max_probes)
            seconds_ours = time.perf_counter() - start
            products.append(ours.n_probes)
            rows.append((seconds_py, seconds_prev, seconds_ours,
                         abs(top_py / top_exact - 1), abs(trace_py / trace_exact - 1),
                         abs(top_prev / top_exact - 1), abs(trace_prev / trace_exact - 1),
                         abs(ours.eigenvalues[0] / top_exact - 1), abs(ours.trace / trace_exact - 1)))
        r = np.array(rows)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"width {width} ({n_params} parameters):")
        for k, name in enumerate(("pyhessian", "previous", "ours")):
            top, trace = r[:, 3 + 2 * k], r[:, 4 + 2 * k]
            print(f"  {name:9s} : {r[:, k].mean():.3f} s/model; top-eig error median {np.median(top):.2%} max {top.max():.2%}; "
                  f"trace error median {np.median(trace):.2%} max {trace.max():.2%}")
        print(f"  ours: {np.mean(products):.1f} Hessian-vector products per model (min {min(products)}, max {max(products)})")
        print(f"  speed previous / pyhessian: {r[:, 0].mean() / r[:, 1].mean():.2f}x")
        print(f"  speed ours / pyhessian: {r[:, 0].mean() / r[:, 2].mean():.2f}x")


if __name__ == "__main__":
    main()
