"""The spectrum of one layer, solver by solver: what bounds `metrics.spectral` against WeightWatcher.

    python perf/eigensolvers.py [--sizes 128 512] [--threads 1] [--repeats 20] [--rounds 3]

Spectral alpha needs every eigenvalue of W^T W. Ours forms the float64 Gram and diagonalises it
with a symmetric eigensolver (`metrics.spectral._gram_eigvalsh`: numpy's matmul and `eigvalsh`,
LAPACK syevd from the OpenBLAS that numpy ships); WeightWatcher takes the singular values of W
(`scipy.linalg.svd`, gesdd). This times, on the same trained-like matrices (Gaussian, a few
columns scaled up for a heavy tail), one matrix at a time:

* the Gram W^T W (numpy, float64);
* its eigenvalues by numpy `eigvalsh` (ours), torch `linalg.eigvalsh` (the MKL in torch's CPU
  wheels), scipy `eigh(eigvals_only=True)` with each LAPACK driver (`ev`, `evd`, `evr`, `evx`),
  and LAPACK's two-stage `dsyevd_2stage` (eigenvalues only, the driver meant for this case),
  called through ctypes from numpy's OpenBLAS, which scipy does not wrap;
* `scipy.linalg.svd(W, compute_uv=False)`, WeightWatcher's route.

Every solver's eigenvalues are checked against numpy's (relative to the largest, <= 1e-12).
The rounds are interleaved and each solver keeps its fastest; BLAS and torch run with `--threads`.
"""

from __future__ import annotations

import argparse
import ctypes
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits


def two_stage_solver():
    """LAPACKE_dsyevd_2stage from the OpenBLAS bundled with numpy (64-bit integers, symbol
    prefix `scipy_`, suffix `64_`), or None where this numpy has no such library."""
    libs = sorted((Path(np.__file__).parent.parent / "numpy.libs").glob("libscipy_openblas64_*.so"))
    if not libs:
        return None
    function = getattr(ctypes.CDLL(str(libs[0])), "scipy_LAPACKE_dsyevd_2stage64_", None)
    if function is None:
        return None
    function.restype = ctypes.c_int64
    function.argtypes = [ctypes.c_int, ctypes.c_char, ctypes.c_char, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                         ctypes.c_void_p]

    def eigenvalues(gram: np.ndarray) -> np.ndarray:
        a = np.array(gram, dtype=np.float64, order="C")  # (overwritten by LAPACK)
        values = np.empty(len(a))
        info = function(101, b"N", b"L", len(a), a.ctypes.data, len(a), values.ctypes.data)  # row-major, values only
        if info != 0:
            raise RuntimeError(f"dsyevd_2stage returned info={info}")
        return values

    return eigenvalues


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20, help="calls per timing")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the fastest is kept)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    two_stage = two_stage_solver()
    print(f"numpy {np.__version__}, scipy {scipy.__version__}, torch {torch.__version__}; {args.threads} thread(s); "
          f"fastest of {args.rounds} interleaved rounds of {args.repeats} calls; ms per matrix")
    rng = np.random.default_rng(0)
    for n in args.sizes:
        w = rng.standard_normal((n, n)) / np.sqrt(n)
        w[:, :5] *= 10  # a few large singular values, like a trained layer's tail
        gram = w.T @ w
        solvers = {
            "Gram W^T W (numpy matmul)": lambda: w.T @ w,
            "numpy eigvalsh (ours)": lambda: np.linalg.eigvalsh(gram),
            "torch linalg.eigvalsh": lambda: torch.linalg.eigvalsh(torch.from_numpy(gram)).numpy(),
            **{f"scipy eigh, driver {d}": (lambda d=d: scipy.linalg.eigh(gram, eigvals_only=True, driver=d))
               for d in ("ev", "evd", "evr", "evx")},
            "LAPACK dsyevd_2stage (ctypes)": two_stage and (lambda: two_stage(gram)),
            "scipy svd(W), values only (WeightWatcher's route)": lambda: scipy.linalg.svd(w, compute_uv=False),
        }
        reference = np.linalg.eigvalsh(gram)
        for name, solve in solvers.items():
            if solve is None or name.startswith("Gram"):
                continue
            values = np.sort(solve() ** 2 if "svd" in name else solve())
            error = np.abs(values - reference).max() / reference[-1]
            assert error <= 1e-12, (name, error)
        best = dict.fromkeys(solvers, np.inf)
        for _ in range(args.rounds):
            for name, solve in solvers.items():
                if solve is None:
                    continue
                start = time.perf_counter()
                for _ in range(args.repeats):
                    solve()
                best[name] = min(best[name], (time.perf_counter() - start) / args.repeats * 1e3)
        print(f"\n{n} x {n}:")
        for name, ms in best.items():
            print(f"  {name:52s} {'not available' if not np.isfinite(ms) else f'{ms:8.2f}'}")


if __name__ == "__main__":
    main()
