"""Hessian metrics of the training loss: top eigenvalues, trace and spectral density.

The loss is the mean cross-entropy over every sample of ``batches`` (a sequence of ``(x, y)``
pairs, ``y`` int64 class labels); a batch counts in proportion to its size. The Hessian is taken
with respect to the trainable parameters, in ``named_parameters()`` order, with the model in
``eval()`` mode (BatchNorm uses its running statistics, dropout is off). Every function restores
each submodule's training flag and the parameters' ``.grad`` as they were before the call.

- Top eigenvalues (power iteration) and trace (Hutchinson) go through PyHessian
  (Yao et al. 2020, "PyHessian: Neural Networks Through the Lens of the Hessian"): the
  published zoos' protocol.
- The accurate path, written here because PyHessian stops on relative change (it returns the
  second eigenvalue when the top two are close, and its trace stops after a few noisy probes):
  top eigenvalues by Lanczos (Ritz values converge to the extreme eigenvalues in far fewer
  products than power iteration) and the trace by Hutch++ (Meyer, Musco, Musco & Woodruff 2021:
  the trace of a low-rank sketch, exact, plus Hutchinson on the deflated rest; variance O(1/m^2)
  instead of O(1/m) for m products).
- The fast path, both at once: ``krylov_top_eigenvalues_and_trace`` builds one block Krylov space
  [S, HS, H^2 S, ...] from a Rademacher block S until the top Ritz values have converged
  (residual test); its Ritz values are the top eigenvalues, tr(Q^T H Q) is the trace on that
  space, exactly, and Hutchinson probes projected off it estimate the rest ("Krylov-aware" trace
  estimation, Chen & Hallman 2023). The space contains Hutch++'s sketch range(HS), so the same
  products serve both quantities, and they are computed a block at a time.
- The exact trace, ``exact_trace``: for models piecewise linear in each parameter (Linear, Conv,
  BatchNorm in eval mode, ReLU, pooling) the Hessian's diagonal is the Gauss-Newton diagonal, so
  tr(H) is a sum of squared per-sample gradient norms, which C backward passes for C classes give
  layer by layer, against one Hessian-vector product per parameter for the diagonal of H otherwise.
- Error bars: eigenvalue results carry their Ritz residuals ||H x - theta x|| (a bound on the
  distance to an eigenvalue of H; the Krylov and Lanczos paths take them on a float64 copy of the
  model, ``_float64_residuals``); trace results a ``stderr`` (0 when exact).
- The spectral density is stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao 2019,
  "An Investigation into Neural Net Optimization via Hessian Eigenvalue Density"), written
  here because PyHessian 0.1's ``density()`` calls ``torch.eig``, which torch removed.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import ClassVar

import numpy as np
import pyhessian
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .modes import eval_mode

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class _Result:
    """Base of the result records: values plus the settings that produced them."""

    _VALUE_FIELDS: ClassVar[tuple[str, ...]] = ()

    def settings(self) -> dict:
        """The settings actually used (every field except the computed values)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in self._VALUE_FIELDS}


@dataclass(frozen=True)
class TopEigenvalues(_Result):
    """Top Hessian eigenvalues by PyHessian's power iteration (with deflation for top_n > 1).

    ``iterations`` is the total number of Hessian-vector products over the whole data,
    summed over the ``top_n`` eigenvalues; ``n_samples`` is the number of data samples.
    """

    _VALUE_FIELDS: ClassVar[tuple[str, ...]] = ("eigenvalues", "residuals")

    eigenvalues: list[float]
    top_n: int
    max_iter: int
    tol: float
    seed: int
    n_samples: int
    iterations: int
    residuals: list[float] = field(default_factory=list, repr=False)  # ||H x - theta x|| per eigenvalue


@dataclass(frozen=True)
class HessianTrace(_Result):
    """Hutchinson estimate of tr(H): the mean of v^T H v over Rademacher probes v.

    ``vhv`` holds the individual probe values; ``n_probes == len(vhv)`` is the number of
    Hutchinson samples PyHessian drew before its relative-change test (``tol``) stopped it.
    """

    _VALUE_FIELDS: ClassVar[tuple[str, ...]] = ("trace", "vhv")

    trace: float
    vhv: list[float] = field(repr=False)
    n_probes: int
    max_iter: int
    tol: float
    seed: int
    n_samples: int

    @property
    def stderr(self) -> float:
        """The estimated standard error of ``trace``: the sample standard deviation of the probe
        values over sqrt(their number); 0 when no probe was needed (the trace is exact)."""
        return _stderr(self.vhv)


@dataclass(frozen=True)
class ExactTrace(_Result):
    """tr(H) computed exactly (see ``exact_trace``); ``stderr`` is 0."""

    _VALUE_FIELDS: ClassVar[tuple[str, ...]] = ("trace",)

    trace: float
    n_samples: int

    n_probes: ClassVar[int] = 0  # no Hessian-vector product probes
    stderr: ClassVar[float] = 0.0


@dataclass(frozen=True)
class TopEigenvaluesAndTrace(_Result):
    """Top Hessian eigenvalues and trace from one block Krylov space (see
    ``krylov_top_eigenvalues_and_trace``).

    ``residuals`` are the residual norms ||H x - theta x|| of the top Ritz pairs (each eigenvalue
    is within its residual of an eigenvalue of H); ``vhv`` the deflated Hutchinson probe values;
    ``krylov_dim`` the dimension of the Krylov space; ``n_probes`` the Hessian-vector products
    used in all (Krylov space + probes), as in ``hutchpp_trace``.
    """

    _VALUE_FIELDS: ClassVar[tuple[str, ...]] = ("eigenvalues", "trace", "residuals", "vhv")

    eigenvalues: list[float]
    trace: float
    residuals: list[float] = field(repr=False)
    vhv: list[float] = field(repr=False)
    top_n: int
    block: int
    eig_tol: float
    max_blocks: int
    trace_tol: float
    max_probes: int
    min_probes: int
    seed: int
    n_samples: int
    krylov_dim: int
    n_probes: int

    @property
    def stderr(self) -> float:
        """The estimated standard error of ``trace`` (given the Krylov space, on which the trace
        is exact): the deflated probe values' standard deviation over sqrt(their number)."""
        return _stderr(self.vhv)


@dataclass(frozen=True, eq=False)
class HessianDensity(_Result):
    """Stochastic Lanczos quadrature of the Hessian's eigenvalue density.

    The density is approximated by ``sum_k weights[k] * delta(lambda - eigenvalues[k])``:
    the Ritz values of every probe, concatenated, with weights (first eigenvector components
    of the tridiagonal matrix, squared) divided by ``n_v`` so that they sum to 1. Integrals of
    the density estimate (1/P) tr f(H); e.g. ``n_params * sum(weights * eigenvalues)``
    estimates tr(H). ``iterations`` holds the Lanczos steps actually taken for each probe
    (fewer than ``n_iter`` when the Krylov space is exhausted or ``n_iter > n_params``).
    """

    _VALUE_FIELDS: ClassVar[tuple[str, ...]] = ("eigenvalues", "weights")

    eigenvalues: np.ndarray = field(repr=False)
    weights: np.ndarray = field(repr=False)
    n_iter: int
    n_v: int
    seed: int
    n_samples: int
    n_params: int
    iterations: list[int]


def hessian_top_eigenvalues(model: nn.Module, batches: Batches, top_n: int = 1,
                            max_iter: int = 100, tol: float = 1e-3,
                            seed: int = 0) -> TopEigenvalues:
    """Top ``top_n`` Hessian eigenvalues by PyHessian's power iteration (Yao et al. 2020).

    Each eigenvalue stops after ``max_iter`` iterations or when the Rayleigh quotient changes
    by less than ``tol`` relatively between two iterations. With a small eigengap that test can
    fire early (the shared performance notes saw 0.45-16% errors at tol=1e-3); use a tighter
    ``tol`` when accuracy matters. Deterministic for a given ``seed``; the global torch RNG is
    left as it was.
    """
    _check_positive_int(top_n, "top_n")
    _check_iteration_settings(max_iter, tol)
    batches, n_samples = _check_batches(batches)
    params = _trainable_parameters(model)
    if top_n > sum(p.numel() for p in params):
        raise ValueError(f"top_n={top_n} exceeds the number of trainable parameters")
    _check_cpu(params)
    with _pyhessian_session(model, batches, seed) as hess:
        eigenvalues, vectors = hess.eigenvalues(maxIter=max_iter, tol=tol, top_n=top_n)
        iterations = hess.hvp_calls
    # the residual ||H x - theta x|| of each returned pair (one more product each, not counted)
    residuals = []
    with eval_mode(model):
        for theta, vector in zip(eigenvalues, vectors):
            x = torch.cat([v.detach().reshape(-1) for v in vector]).double()
            x = x / torch.linalg.vector_norm(x)
            hx = _hvp_flat(model, params, batches, n_samples, x)
            residuals.append(float(torch.linalg.vector_norm(hx - float(theta) * x)))
    return TopEigenvalues(eigenvalues=[float(e) for e in eigenvalues], top_n=top_n,
                          max_iter=max_iter, tol=tol, seed=seed, n_samples=n_samples,
                          iterations=iterations, residuals=residuals)


def hessian_trace(model: nn.Module, batches: Batches, max_iter: int = 100, tol: float = 1e-3,
                  seed: int = 0) -> HessianTrace:
    """Hessian trace by PyHessian's Hutchinson estimator (Yao et al. 2020).

    tr(H) = E[v^T H v] for Rademacher v. PyHessian stops after ``max_iter`` probes or when the
    running mean changes by less than ``tol`` relatively, which can happen after a handful of
    probes; ``n_probes`` in the result says how many were used. ``tol=0`` always uses
    ``max_iter`` probes. Deterministic for a given ``seed``; the global torch RNG is left as it was.
    """
    _check_iteration_settings(max_iter, tol)
    batches, n_samples = _check_batches(batches)
    _check_cpu(_trainable_parameters(model))
    with _pyhessian_session(model, batches, seed) as hess:
        vhv = [float(s) for s in hess.trace(maxIter=max_iter, tol=tol)]
    return HessianTrace(trace=float(np.mean(vhv)), vhv=vhv, n_probes=len(vhv),
                        max_iter=max_iter, tol=tol, seed=seed, n_samples=n_samples)


def hessian_density(model: nn.Module, batches: Batches, n_iter: int = 100, n_v: int = 1,
                    seed: int = 0) -> HessianDensity:
    """Eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al. 2019).

    For each of ``n_v`` probes v (Rademacher, normalised), ``n_iter`` Lanczos steps with full
    reorthogonalisation build a tridiagonal T; with T = U diag(theta) U^T, the Gauss quadrature
    of the probe's spectral measure has nodes theta_k and weights U[0, k]^2. Nodes and weights
    of all probes are concatenated and the weights divided by ``n_v``.
    """
    _check_positive_int(n_iter, "n_iter")
    _check_positive_int(n_v, "n_v")
    batches, n_samples = _check_batches(batches)
    params = _trainable_parameters(model)
    n_params = sum(p.numel() for p in params)
    generator = torch.Generator().manual_seed(seed)
    nodes, weights, iterations = [], [], []
    with eval_mode(model):
        graph = _gradient_graph(model, params, batches, n_samples)

        def matvec(v: torch.Tensor) -> torch.Tensor:
            return _hvp_flat(model, params, batches, n_samples, v, graph)

        for _ in range(n_v):
            start = torch.randint(0, 2, (n_params,), generator=generator,
                                  dtype=torch.float64) * 2 - 1
            alphas, betas, _ = _lanczos(matvec, start, n_iter)
            theta, u = torch.linalg.eigh(_tridiagonal(alphas, betas))
            nodes.append(theta)
            weights.append(u[0] ** 2 / n_v)
            iterations.append(len(alphas))
    return HessianDensity(eigenvalues=torch.cat(nodes).numpy(),
                          weights=torch.cat(weights).numpy(), n_iter=n_iter, n_v=n_v,
                          seed=seed, n_samples=n_samples, n_params=n_params,
                          iterations=iterations)


def lanczos_top_eigenvalues(model: nn.Module, batches: Batches, top_n: int = 1, n_iter: int = 40,
                            seed: int = 0) -> TopEigenvalues:
    """The ``top_n`` largest Ritz values after ``n_iter`` Lanczos steps (full reorthogonalisation)
    from one Rademacher start vector: the top eigenvalues of the Hessian, converged far sooner
    than power iteration when the top two are close. Exact once ``n_iter`` reaches the parameter
    count. ``iterations`` is the number of Hessian-vector products taken; ``residuals`` are each
    pair's ||H x - theta x|| on a float64 copy of the model (one more product each, not counted)."""
    _check_positive_int(top_n, "top_n")
    _check_positive_int(n_iter, "n_iter")
    batches, n_samples, params, n_params = _eigenproblem(model, batches, top_n)
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 2, (n_params,), generator=generator, dtype=torch.float64) * 2 - 1
    with eval_mode(model):
        graph = _gradient_graph(model, params, batches, n_samples)
        alphas, betas, basis = _lanczos(lambda v: _hvp_flat(model, params, batches, n_samples, v, graph), start,
                                        max(n_iter, top_n))
    ritz, u = torch.linalg.eigh(_tridiagonal(alphas, betas))
    ritz, u = ritz.flip(0)[:top_n], u.flip(1)[:, :top_n]
    # Not the next off-diagonal entry times the last component of u (the residual of the products
    # as taken, which ignores their float32 rounding): each pair's residual on the true Hessian.
    residuals = _float64_residuals(model, batches, n_samples, basis.T @ u, ritz)
    return TopEigenvalues(eigenvalues=[float(r) for r in ritz], top_n=top_n, max_iter=n_iter, tol=0.0,
                          seed=seed, n_samples=n_samples, iterations=len(alphas), residuals=residuals)


def hutchpp_trace(model: nn.Module, batches: Batches, sketch: int = 33, tol: float = 0.01,
                  max_probes: int = 300, min_probes: int = 10, seed: int = 0) -> HessianTrace:
    """tr(H) by Hutch++ with a variance-based stop.

    A sketch of ``sketch`` Rademacher vectors gives Q = orth(H S); tr(Q^T H Q) is exact on that
    subspace. The rest, tr((I - QQ^T) H (I - QQ^T)), is estimated by Hutchinson probes projected
    off Q, drawn in blocks until the standard error of the total falls below ``tol`` times its
    magnitude, or ``max_probes`` are used (never fewer than ``min_probes``). Exact when the
    sketch reaches the parameter count. ``vhv`` holds the deflated probe values, ``n_probes``
    the Hessian-vector products used (2 * sketch + probes)."""
    _check_positive_int(sketch, "sketch")
    _check_positive_int(max_probes, "max_probes")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    batches, n_samples = _check_batches(batches)
    params = _trainable_parameters(model)
    n_params = sum(p.numel() for p in params)
    generator = torch.Generator().manual_seed(seed)

    def rademacher(columns: int) -> torch.Tensor:
        return torch.randint(0, 2, (n_params, columns), generator=generator, dtype=torch.float64) * 2 - 1

    with eval_mode(model):
        graph = _gradient_graph(model, params, batches, n_samples)

        def apply(block: torch.Tensor) -> torch.Tensor:
            return hvp_block(model, params, batches, n_samples, block, graph)

        q, _ = torch.linalg.qr(apply(rademacher(min(sketch, n_params))))
        low_rank = float(torch.trace(q.T @ apply(q)))
        exhausted = q.shape[1] >= n_params  # the sketch spans everything: the trace is exact
        vhv = [] if exhausted else _deflated_probes(apply, rademacher, q, low_rank, tol, max_probes, min_probes)
    rest = float(np.mean(vhv)) if vhv else 0.0
    return HessianTrace(trace=low_rank + rest, vhv=vhv, n_probes=2 * q.shape[1] + len(vhv),
                        max_iter=max_probes, tol=tol, seed=seed, n_samples=n_samples)


def krylov_top_eigenvalues_and_trace(model: nn.Module, batches: Batches, top_n: int = 1, block: int = 8,
                                     eig_tol: float = 1e-3, max_blocks: int = 20, trace_tol: float = 0.02,
                                     max_probes: int = 200, min_probes: int = 10,
                                     seed: int = 0, trace: bool = True) -> TopEigenvaluesAndTrace:
    """Top ``top_n`` eigenvalues and the trace of the Hessian from one block Krylov space.

    Block Lanczos (full reorthogonalisation) from a block S of ``max(block, top_n)`` Rademacher
    vectors: Q spans [S, HS, ..., H^(j-1) S], grown a block at a time until the residual
    ||H x - theta x|| of each of the top ``top_n`` Ritz pairs (theta, x) is at most ``eig_tol``
    times |theta| (then each theta lies within that relative distance of an eigenvalue of H; its
    error is typically of the order of the residual squared over the eigengap), never before
    two blocks (so that Q contains range(HS), Hutch++'s sketch), and at most ``max_blocks``
    blocks. The eigenvalues are the top Ritz values; the trace is tr(Q^T H Q), exact on that
    space, plus Hutchinson probes projected off Q for tr((I - QQ^T) H (I - QQ^T)), drawn ten at a
    time until the standard error falls below ``trace_tol`` times the total, or ``max_probes``
    are used (never fewer than ``min_probes``). Exact once the space reaches the parameter count.
    Every Hessian-vector product serves both quantities, and all run through one gradient graph
    when the batches are one (``_gradient_graph``; ``hvp_block`` for how a block is taken).
    Deterministic for a given ``seed``; the global torch RNG is untouched. The returned
    ``residuals`` are each top pair's ||H x - theta x|| on a float64 copy of the model (one more
    product each, not counted: ``_float64_residuals``), not the float32 ones the stop tested.
    ``trace=False`` draws no probes (for the eigenvalues alone): the trace is then NaN unless the
    space spans every parameter.
    """
    # Written here: no library offers a block Krylov eigensolver over a matrix-free batched
    # operator that also hands back its basis for trace deflation (torch.lobpcg needs an explicit
    # matrix, scipy's eigsh/lobpcg neither batch through autograd nor return the Krylov space).
    _check_positive_int(top_n, "top_n")
    _check_positive_int(block, "block")
    _check_positive_int(max_blocks, "max_blocks")
    _check_positive_int(max_probes, "max_probes")
    _check_positive_int(min_probes, "min_probes")
    if not eig_tol >= 0:
        raise ValueError(f"eig_tol must be >= 0, got {eig_tol!r}")
    if not trace_tol >= 0:
        raise ValueError(f"trace_tol must be >= 0, got {trace_tol!r}")
    batches, n_samples, params, n_params = _eigenproblem(model, batches, top_n)
    generator = torch.Generator().manual_seed(seed)
    breakdown = 10 * torch.finfo(torch.float32).eps  # the products' precision, as in _lanczos

    def rademacher(columns: int) -> torch.Tensor:
        return torch.randint(0, 2, (n_params, columns), generator=generator, dtype=torch.float64) * 2 - 1

    with eval_mode(model):
        graph = _gradient_graph(model, params, batches, n_samples)

        def apply(v: torch.Tensor) -> torch.Tensor:
            return hvp_block(model, params, batches, n_samples, v, graph)

        start = rademacher(min(max(block, top_n), n_params))
        new = _orthonormal_columns(start, 1e-8 * float(torch.linalg.matrix_norm(start, 2)))
        # The basis Q and its image HQ grow in place, one row per vector (a block never has more
        # columns than the first), and Q^T H Q by the new block's rows and columns alone: on a
        # 300k-parameter MLP, concatenating the blocks anew and recomputing Q^T H Q at every
        # block took half the family's time, the products the other half (this machine is
        # memory-bound on these tall matrices). `q`, `hq` are column views of these rows.
        capacity = min(max_blocks * new.shape[1], n_params)
        basis = torch.empty(capacity, n_params, dtype=torch.float64)
        image = torch.empty(capacity, n_params, dtype=torch.float64)
        gram = torch.empty(capacity, capacity, dtype=torch.float64)  # Q^T H Q
        k = blocks = 0
        while True:
            b = new.shape[1]
            basis[k : k + b] = new.T
            image[k : k + b] = apply(new).T
            gram[: k + b, k : k + b] = basis[: k + b] @ image[k : k + b].T
            gram[k : k + b, :k] = basis[k : k + b] @ image[:k].T
            k, blocks = k + b, blocks + 1
            q, hq, t = basis[:k].T, image[:k].T, gram[:k, :k]
            theta, u = torch.linalg.eigh((t + t.T) / 2)
            theta, u = theta.flip(0)[:top_n], u.flip(1)[:, :top_n]
            residuals = torch.linalg.vector_norm(hq @ u - (q @ u) * theta, dim=0)
            scale = float(theta.abs().max())
            converged = bool((residuals <= torch.clamp(eig_tol * theta.abs(), min=breakdown * scale)).all())
            if k >= n_params or (converged and blocks >= 2) or blocks == max_blocks:
                break
            rest = _deflate(image[k - b : k].T, q)
            new = _deflate(_orthonormal_columns(rest, breakdown * max(scale, float(torch.linalg.matrix_norm(t, 2)))), q)
            if new.shape[1] == 0:  # an invariant subspace: the Ritz values are eigenvalues
                break
        low_rank = float(torch.trace(t))
        exhausted = k >= n_params  # the space spans everything: the trace is exact
        # the stored error bars: each pair's residual on the true Hessian (the stop above used
        # the float32 products' own, which float32's rounding of the Hessian can exceed)
        residuals = torch.tensor(_float64_residuals(model, batches, n_samples, q @ u, theta))
        vhv = _deflated_probes(apply, rademacher, q, low_rank, trace_tol, max_probes, min_probes) if trace and not exhausted else []
    rest_trace = float(np.mean(vhv)) if vhv else 0.0
    total = low_rank + rest_trace if trace or exhausted else float("nan")
    return TopEigenvaluesAndTrace(
        eigenvalues=theta.tolist(), trace=total, residuals=residuals.tolist(), vhv=vhv,
        top_n=top_n, block=block, eig_tol=eig_tol, max_blocks=max_blocks, trace_tol=trace_tol,
        max_probes=max_probes, min_probes=min_probes, seed=seed, n_samples=n_samples,
        krylov_dim=q.shape[1], n_probes=q.shape[1] + len(vhv))


# Leaf modules whose output is linear in each of their own parameters and piecewise linear in
# their input (BatchNorm with running statistics, i.e. in eval mode): a network made of these
# alone, each parameter used once, is piecewise linear in every single parameter. The ones with
# parameters are those ``exact_trace`` takes per-sample gradients of, layer by layer.
_PARAMETER_LEAVES = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)
_PIECEWISE_LINEAR_LEAVES = _PARAMETER_LEAVES + (
    nn.ReLU, nn.LeakyReLU, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Identity,
)


def piecewise_linear_in_each_parameter(model: nn.Module) -> bool:
    """Whether ``model`` is an ``nn.Sequential`` tree of the leaf types above (BatchNorm with
    running statistics; Conv2d with zero padding given as numbers, one group), no module or
    parameter used twice. For such a model each output is, as a function of any single parameter
    (the others fixed), piecewise linear, so its second derivative in that parameter is 0 (almost
    everywhere, and in autograd) and the diagonal of the loss Hessian equals the diagonal of the
    generalised Gauss-Newton matrix. A residual block or any custom ``forward`` is refused: its
    code cannot be checked."""
    modules = list(model.modules())
    if len(modules) != len(list(model.modules(remove_duplicate=False))):
        return False
    if len(list(model.parameters())) != len(list(model.named_parameters(remove_duplicate=False))):
        return False
    for m in modules:
        if type(m) is nn.Sequential:
            continue
        if type(m) not in _PIECEWISE_LINEAR_LEAVES:
            return False
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None:
            return False
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)):
            return False
    return True


def exact_trace(model: nn.Module, batches: Batches, chunk_elements: int = 2**24) -> ExactTrace:
    """tr(H) exactly, at the cost of about C + 1 passes over the samples for C classes, for the
    models of ``piecewise_linear_in_each_parameter`` (ValueError otherwise).

    For the mean cross-entropy, H = (1/N) sum_n J_n^T (diag p_n - p_n p_n^T) J_n + (1/N) sum_n
    sum_c (p_nc - y_nc) d^2 f_nc; the second term has a zero diagonal for these models, so with
    s_nc = sqrt(p_nc) (e_c - p_n) (then sum_c s_nc s_nc^T = diag p_n - p_n p_n^T),
    tr(H) = (1/N) sum_n sum_c ||grad_theta (s_nc . f_n)||^2: the squared norms of per-sample
    gradients. One backward pass per class c (grad_outputs s_nc) gives every layer's output
    gradient d for all samples at once; a layer's per-sample parameter gradient is then a small
    product of d with its input a: for Linear, d a^T, whose squared norm is ||d||^2 ||a||^2;
    for Conv2d, d times the unfolded input (im2col), in chunks of at most ``chunk_elements``;
    for BatchNorm, sums of d times the normalised input. Every term is a square, so the float32
    products lose nothing to cancellation (the sums run in float64; 1e-6 relative against the
    float64 exact Hessian)."""
    # Written here: the per-sample gradient norms of a layer from its input and output gradient
    # are the known trick (Goodfellow 2015; BackPACK's DiagGGNExact computes the same diagonal),
    # but BackPACK is not among our dependencies and torch.func's vmap(jacrev) materialises
    # every per-sample gradient of the whole network (N x C x P numbers: 20x slower at 300k).
    batches, n_samples = _check_batches(batches)
    _check_positive_int(chunk_elements, "chunk_elements")
    if not piecewise_linear_in_each_parameter(model):
        raise ValueError("exact_trace needs a model piecewise linear in each parameter "
                         "(an nn.Sequential of Linear, Conv2d, BatchNorm, ReLU, pooling, Flatten)")
    params = _trainable_parameters(model)
    layers = [m for m in model.modules()
              if isinstance(m, _PARAMETER_LEAVES) and any(p.requires_grad for p in m.parameters(recurse=False))]
    device = params[0].device
    total = torch.zeros((), dtype=torch.float64, device=device)
    seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        # a zero leaf added to the output: its gradient is the output's, whatever in-place
        # activation follows
        probe = torch.zeros_like(output, requires_grad=True)
        seen[module] = (inputs[0].detach(), probe)
        return output + probe

    hooks = [m.register_forward_hook(record) for m in layers]
    try:
        with eval_mode(model), _grads_set_aside(params), torch.enable_grad():
            for x, _ in batches:
                seen.clear()
                logits = model(x.to(device))
                p = torch.softmax(logits.detach().double(), dim=-1)
                probes = [seen[m][1] for m in layers]
                inputs = [_layer_input(m, seen[m][0]) for m in layers]  # (once per batch, not per class)
                for c in range(p.shape[1]):
                    s = p[:, c:c + 1].sqrt() * (F.one_hot(torch.tensor(c, device=device), p.shape[1]) - p)
                    grads = torch.autograd.grad(logits, probes, grad_outputs=s.to(logits.dtype), retain_graph=True)
                    for m, a, d in zip(layers, inputs, grads):
                        total += _per_sample_squared_norms(m, a, d, chunk_elements)
    finally:
        for h in hooks:
            h.remove()
        seen.clear()
    return ExactTrace(trace=float(total) / n_samples, n_samples=n_samples)


def _layer_input(m: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """A layer's input in the form its per-sample gradient needs: for BatchNorm the normalised
    input; for Conv2d the unfolded one (im2col, N x L x Cin k k); for Linear N x positions x in."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        shape = (1, -1) + (1,) * (a.dim() - 2)
        return (a - m.running_mean.view(shape)) / (m.running_var.view(shape) + m.eps).sqrt()
    if isinstance(m, nn.Conv2d):
        return F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride).transpose(1, 2)
    return a.reshape(len(a), -1, a.shape[-1])  # (Linear over (N, ..., features): positions of a sample add up)


def _per_sample_squared_norms(m: nn.Module, a: torch.Tensor, d: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """Sum over samples of the squared norm of the per-sample gradient of ``m``'s trainable
    parameters, given its input ``a`` (as `_layer_input` gives it) and the gradient ``d`` of its
    output (float64 sum)."""
    weight, bias = m.weight, m.bias
    total = torch.zeros((), dtype=torch.float64, device=d.device)
    if bias is not None and bias.requires_grad:
        channel = 1 if isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)) else d.dim() - 1
        per_sample = d.movedim(channel, -1).reshape(len(d), -1, d.shape[channel]).sum(1)
        total += per_sample.double().square().sum()
    if weight is None or not weight.requires_grad:
        return total
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        per_sample = (d * a).reshape(len(d), d.shape[1], -1).sum(2)
        return total + per_sample.double().square().sum()
    # the per-sample weight gradient is d^T a: (out x positions) times (positions x in)
    d = d.reshape(len(d), d.shape[1], -1).transpose(1, 2) if isinstance(m, nn.Conv2d) else d.reshape(len(d), -1, d.shape[-1])
    if a.shape[1] == 1:  # one position: ||d a^T||^2 = ||d||^2 ||a||^2
        return total + (d.double().square().sum((1, 2)) * a.double().square().sum((1, 2))).sum()
    chunk = max(1, chunk_elements // (d.shape[2] * a.shape[2]))
    for d_part, a_part in zip(d.split(chunk), a.split(chunk)):
        total += torch.bmm(d_part.transpose(1, 2), a_part).double().square().sum()
    return total


def exact_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The dense Hessian, in float64, of the mean cross-entropy over (x, y) with respect to the
    trainable parameters (``named_parameters()`` order), the model in eval mode: the reference
    the estimators are checked against. It costs one product per parameter: small models only.
    The model itself is left untouched (a float64 copy is differentiated)."""
    m64 = copy.deepcopy(model).double().eval()
    named = [(n, p) for n, p in m64.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        pieces = theta.split([p.numel() for _, p in named])
        params = {n: t.view_as(p) for (n, p), t in zip(named, pieces)}
        return F.cross_entropy(functional_call(m64, params, (x.double(),)), y)

    return torch.autograd.functional.hessian(loss, flat)


def hvp(model: nn.Module, batches: Batches, v: torch.Tensor) -> torch.Tensor:
    """Hessian-vector product H v of the mean cross-entropy, by double backpropagation.

    ``v`` is a flat vector over the trainable parameters in ``named_parameters()`` order; the
    result has the same layout, ``v``'s dtype, and is detached. The model is evaluated in
    ``eval()`` mode.
    """
    batches, n_samples = _check_batches(batches)
    params = _trainable_parameters(model)
    n_params = sum(p.numel() for p in params)
    if v.dim() != 1 or v.numel() != n_params:
        raise ValueError(f"v must be a flat vector of {n_params} elements, got shape "
                         f"{tuple(v.shape)}")
    with eval_mode(model):
        return _hvp_flat(model, params, batches, n_samples, v).to(v.dtype)


def _lanczos(matvec, start: torch.Tensor, n_iter: int) -> tuple[list[float], list[float], torch.Tensor]:
    """Lanczos tridiagonalisation with full reorthogonalisation, in float64.

    Returns the diagonal ``alphas`` and off-diagonal ``betas`` of T (len(betas) ==
    len(alphas) - 1) and the basis (one row per step). Each new direction is orthogonalised
    against all previous ones twice (classical Gram-Schmidt, "twice is enough"). Stops early when
    the residual norm falls below 10 float32 epsilons (the usual precision of the products) times the largest entry
    of T so far, i.e. an invariant subspace has been found, or after ``len(start)`` steps.
    ``start`` need not be normalised.
    """
    steps = min(n_iter, start.numel())
    basis = torch.empty(steps, start.numel(), dtype=torch.float64)
    breakdown = 10 * torch.finfo(torch.float32).eps
    alphas: list[float] = []
    betas: list[float] = []
    v = start / torch.linalg.vector_norm(start)
    scale = 0.0
    for j in range(steps):
        basis[j] = v
        w = matvec(v)
        alphas.append(float(w @ v))
        previous = basis[: j + 1]
        for _ in range(2):
            w = w - previous.T @ (previous @ w)
        beta = float(torch.linalg.vector_norm(w))
        scale = max(scale, abs(alphas[-1]), beta)
        if beta <= breakdown * scale or j == steps - 1:  # (an invariant subspace, or the last step)
            break
        betas.append(beta)
        v = w / beta
    return alphas, betas, basis[: len(alphas)]


def _float64_residuals(model: nn.Module, batches: Batches, n_samples: int, vectors: torch.Tensor,
                       values: torch.Tensor) -> list[float]:
    """||H x - theta x|| of each Ritz pair (theta, x) (x the unit columns of ``vectors``), with
    H x taken on a float64 copy of the model and its inputs: a bound on the distance from theta to
    an eigenvalue of the Hessian of the stored weights themselves.

    The solvers' products run in the model's float32, whose Hessian can be further from the true
    one than their own residuals say: where a model's predictions are confident, the p(1 - p)
    terms of the softmax lose their digits. On a width-32 digits MLP of the smoke zoo, float32
    moved the top eigenvalue 1.1e-5 relatively (||H32 - H64||_2 = 8.4e-3, top 8.198) while the
    Lanczos identity (the next off-diagonal entry times the last component of u) gave 4e-27."""
    exact = copy.deepcopy(model).double()
    params = _trainable_parameters(exact)
    wide = [(x.double() if x.is_floating_point() else x, y) for x, y in batches]
    out = []
    with eval_mode(exact):
        graph = _gradient_graph(exact, params, wide, n_samples)
        for x, theta in zip(vectors.T, values):
            x = x / torch.linalg.vector_norm(x)
            hx = _hvp_flat(exact, params, wide, n_samples, x, graph)
            out.append(float(torch.linalg.vector_norm(hx - float(theta) * x)))
    return out


def _deflate(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """w projected off the orthonormal columns of q (classical Gram-Schmidt twice)."""
    for _ in range(2):
        w = w - q @ (q.T @ w)
    return w


def _deflated_probes(apply, rademacher, q: torch.Tensor, low_rank: float, tol: float, max_probes: int,
                     min_probes: int) -> list[float]:
    """Hutchinson values v^T H v of Rademacher probes projected off q, drawn ten at a time until
    their standard error falls below ``tol`` times the total trace (``low_rank`` + their mean),
    or ``max_probes`` are drawn (never fewer than ``min_probes``)."""
    vhv: list[float] = []
    while len(vhv) < max_probes:
        probes = _deflate(rademacher(min(10, max_probes - len(vhv))), q)
        vhv += (probes * apply(probes)).sum(0).tolist()
        if len(vhv) >= max(min_probes, 2):
            stderr = float(np.std(vhv, ddof=1) / np.sqrt(len(vhv)))
            if stderr <= tol * abs(low_rank + float(np.mean(vhv))):
                break
    return vhv


def _stderr(values: list[float]) -> float:
    """Standard deviation (ddof=1) over sqrt(n); 0 for no values, NaN for one."""
    if not values:
        return 0.0
    if len(values) == 1:
        return float("nan")
    return float(np.std(values, ddof=1) / np.sqrt(len(values)))


def _tridiagonal(alphas: list[float], betas: list[float]) -> torch.Tensor:
    """The symmetric tridiagonal matrix with diagonal ``alphas`` and off-diagonal ``betas``."""
    off = torch.tensor(betas, dtype=torch.float64)
    return (torch.diag(torch.tensor(alphas, dtype=torch.float64))
            + torch.diag(off, 1) + torch.diag(off, -1))


def _hvp_flat(model: nn.Module, params: list[nn.Parameter], batches: Batches, n_samples: int,
              v: torch.Tensor, graph: list[tuple[torch.Tensor, ...]] | None = None) -> torch.Tensor:
    """H v as a flat float64 vector on ``v``'s device, summing size-weighted per-batch products.

    Uses ``torch.autograd.grad`` throughout, so no ``.grad`` is written. Parameters that do not
    reach the loss get zero rows. ``graph``: the batches' gradients kept with their graph
    (``_gradient_graph``), which each product then only backpropagates through.
    """
    pieces = [chunk.view_as(p).to(p)
              for chunk, p in zip(v.split([p.numel() for p in params]), params)]
    total = _hvp_sum(model, params, batches, n_samples, pieces, batched=False, graph=graph)
    return torch.cat([t.reshape(-1) for t in total]).to(v.device, torch.float64)


# Through a kept gradient graph (`_gradient_graph`), a block's products taken one by one cost
# less than one batched pass once a product's arithmetic (parameters x samples) reaches this:
# on 640-sample digits MLPs (1 thread, here) 8 products took 0.75x the batched pass's time at
# width 64 (5.7e6) and 0.74x at 512, the same at 32 (2.2e6), and 2x at widths 4-16 (autograd's
# vmap of the backward pays off on small products, not on large ones).
UNBATCHED_FROM = 4_000_000


def hvp_block(model: nn.Module, params: list[nn.Parameter], batches: Batches, n_samples: int,
               block: torch.Tensor, graph: list[tuple[torch.Tensor, ...]] | None = None) -> torch.Tensor:
    """H V for the columns of ``block`` (n_params x k), as a float64 matrix of the same shape.

    One forward and gradient pass per batch (none with a kept ``graph``), then one
    double-backward pass with the k tangents batched (``is_grads_batched``: autograd vmaps the
    backward graph), so the per-product overhead of ``_hvp_flat`` is paid once per block; on
    640-sample digits MLPs (widths 8, 32) a product costs 2-5x less in blocks of 8-32. Through a
    kept graph, large products are taken one by one instead (UNBATCHED_FROM). Same conventions
    (and ``graph``) as ``_hvp_flat``.
    """
    k = block.shape[1]
    if graph is not None and block.shape[0] * n_samples >= UNBATCHED_FROM:
        return torch.stack([_hvp_flat(model, params, batches, n_samples, v, graph) for v in block.T], 1).to(block.device)
    pieces = [chunk.T.reshape(k, *p.shape).to(p)
              for chunk, p in zip(block.split([p.numel() for p in params]), params)]
    total = _hvp_sum(model, params, batches, n_samples, pieces, batched=True, graph=graph)
    return torch.cat([t.reshape(k, -1) for t in total], dim=1).T.to(block.device, torch.float64)


def _hvp_sum(model: nn.Module, params: list[nn.Parameter], batches: Batches, n_samples: int,
             pieces: list[torch.Tensor], batched: bool,
             graph: list[tuple[torch.Tensor, ...]] | None = None) -> list[torch.Tensor]:
    """Per parameter, the size-weighted sum over batches of H times its tangent(s) ``pieces``
    (shaped like the parameter, with a leading tangent axis when ``batched``); through the kept
    ``graph`` when given, else through each batch's gradients computed anew."""
    total = [torch.zeros_like(piece) for piece in pieces]
    for grads in graph if graph is not None else _gradients(model, params, batches, n_samples):
        pairs = [(g, piece) for g, piece in zip(grads, pieces) if g.requires_grad]
        if not pairs:
            continue
        products = torch.autograd.grad([g for g, _ in pairs], params,
                                       grad_outputs=[piece for _, piece in pairs],
                                       is_grads_batched=batched, allow_unused=True,
                                       materialize_grads=True, retain_graph=graph is not None)
        for acc, product in zip(total, products):
            acc.add_(product)
    return total


def _gradients(model: nn.Module, params: list[nn.Parameter], batches: Batches, n_samples: int):
    """Per batch, the gradients of its size-weighted share of the loss, with their graph."""
    device = params[0].device
    for x, y in batches:
        loss = F.cross_entropy(model(x.to(device)), y.to(device)) * (len(x) / n_samples)
        yield torch.autograd.grad(loss, params, create_graph=True, allow_unused=True, materialize_grads=True)


def _gradient_graph(model: nn.Module, params: list[nn.Parameter], batches: Batches,
                    n_samples: int) -> list[tuple[torch.Tensor, ...]] | None:
    """The batches' gradients with their graph, kept for many products, when there is one batch
    (the metric families' case); None for several (their graphs would all stay in memory).
    Each product is then one backward pass through the kept graph instead of a forward, a
    gradient and that pass, with bit-identical products: on the 300k-parameter digits MLP of
    width 512 the SLQ density's 30 products took 1.17 s instead of 1.63 s (1.4x), while batched
    blocks of 8 gained little by it alone (what gained there is UNBATCHED_FROM). Call it inside
    ``eval_mode``, as the products are."""
    return list(_gradients(model, params, batches, n_samples)) if len(batches) == 1 else None


def _orthonormal_columns(w: torch.Tensor, floor: float) -> torch.Tensor:
    """An orthonormal basis of the span of ``w``'s columns, without the directions whose singular
    value is at most ``floor`` (an SVD: QR without pivoting does not reveal the rank)."""
    u, s, _ = torch.linalg.svd(w, full_matrices=False)
    return u[:, s > floor]


class _CountingHessian(pyhessian.hessian):
    """PyHessian's ``hessian`` in data-loader mode, counting full-data Hessian-vector products."""

    hvp_calls = 0

    def dataloader_hv_product(self, v):
        self.hvp_calls += 1
        return super().dataloader_hv_product(v)


@contextlib.contextmanager
def _pyhessian_session(model: nn.Module, batches: Batches, seed: int) -> Iterator[_CountingHessian]:
    """A PyHessian object over ``batches`` with its pitfalls handled.

    cuda=False (its default assumes a GPU); the training flags and ``.grad`` it changes are
    restored afterwards (its constructor leaves the model in eval(), and its backward passes
    leave gradients); its random probes come from the global torch RNG, which is forked and
    seeded here; its warning about ``backward(create_graph=True)`` reference cycles is silenced
    in this block only (it sets the gradients to None after each product, which breaks them).
    """
    params = _trainable_parameters(model)
    with eval_mode(model), _grads_set_aside(params), torch.random.fork_rng(devices=[]), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True",
                                category=UserWarning)
        torch.manual_seed(seed)
        yield _CountingHessian(model, nn.CrossEntropyLoss(), dataloader=batches, cuda=False)




@contextlib.contextmanager
def _grads_set_aside(params: list[nn.Parameter]) -> Iterator[None]:
    """Clear ``.grad`` during the block (stale gradients must not add in), then put it back."""
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, grad in zip(params, saved):
            p.grad = grad


def _eigenproblem(model: nn.Module, batches: Batches, top_n: int):
    """(batches, sample count, trainable parameters, their count), checked for ``top_n`` eigenvalues."""
    batches, n_samples = _check_batches(batches)
    params = _trainable_parameters(model)
    n_params = sum(p.numel() for p in params)
    if top_n > n_params:
        raise ValueError(f"top_n ({top_n}) exceeds the number of parameters ({n_params})")
    return batches, n_samples, params, n_params


def _trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with requires_grad, in named_parameters() order; ValueError if none."""
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return params


def _check_batches(batches: Batches) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """Materialise ``batches`` as a list and return it with the total number of samples."""
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty")
    n_samples = 0
    for i, batch in enumerate(batches):
        if len(batch) != 2:
            raise ValueError(f"batch {i} is not an (x, y) pair")
        x, y = batch
        if len(x) == 0 or len(x) != len(y):
            raise ValueError(f"batch {i} has {len(x)} inputs and {len(y)} labels; "
                             "need the same positive number")
        n_samples += len(x)
    return batches, n_samples


def _check_positive_int(value: int, name: str) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_iteration_settings(max_iter: int, tol: float) -> None:
    _check_positive_int(max_iter, "max_iter")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")


def _check_cpu(params: list[nn.Parameter]) -> None:
    """PyHessian is called with cuda=False, so the model must sit on the CPU."""
    if any(p.device.type != "cpu" for p in params):
        raise ValueError("the PyHessian-based metrics need the model on the CPU")
