"""Spectral ("heavy-tailed self-regularisation") metrics of weight matrices.

Definitions follow Martin & Mahoney (JMLR 2021, "Implicit self-regularization in deep neural
networks"; Nature Communications 2021, "Predicting trends in the quality of state-of-the-art
neural networks without access to training or testing data"), as popularised by WeightWatcher:
the empirical spectral density (ESD) of a layer is the set of eigenvalues lambda of W^T W, i.e.
the squared singular values of W, and its tail is fitted by a continuous power law
p(lambda) ~ lambda^(-alpha) for lambda >= xmin (Clauset, Shalizi & Newman 2009).
AlphaPruning (Lu et al., NeurIPS 2024) uses the same alpha, optionally with xmin at the median
eigenvalue; FARMS (Hu et al., ICML 2025) fits alpha on the pooled ESD of fixed-aspect-ratio
submatrices to remove the bias that a layer's aspect ratio puts on alpha.

Conventions (chosen to agree with WeightWatcher 0.7.x where it matters):

* A matrix of shape out x in contributes min(out, in) eigenvalues (the nonzero part of the
  spectrum of W^T W); no 1/sqrt(N) normalisation is applied.
* Conv2d weights (out x in x kh x kw) give one out x in matrix per kernel position; the kh*kw
  spectra are pooled into one ESD. (WeightWatcher additionally scales conv weights by
  sqrt(1/2) by default, which shifts its conv norms by log10(2); alpha is scale-free.)
* The power-law fit and the entropy use only eigenvalues > ``EIG_THRESHOLD`` (1e-5); the norm
  metrics use every eigenvalue.
* WeightWatcher switches to a different estimator below 20 eigenvalues; this module always
  uses the plain MLE, so tiny layers disagree with WeightWatcher (neither value is meaningful
  there: look at ``n_eigs``).

Every spectrum is computed by :func:`layer_eigenvalues`, which stacks same-shape matrices and, in
float64, forms their Gram matrices (the smaller of W W^T and W^T W) with one batched matmul and
diagonalises them with one batched ``eigvalsh`` call (with torch's matmul and eigvalsh, measured
on one CPU thread: 1.5x faster than ``torch.linalg.svdvals`` on 128 x 128 and 512 x 512
matrices, 2.3x on 100 x 200, 5x on 64 x 512; on the CPU numpy's matmul and eigvalsh are used,
another 1.4x on 512 x 512; see ``_gram_eigvalsh``). A matrix whose Gram could lose accuracy near
the 1e-5 threshold goes through ``svdvals`` instead. Because each matrix of a batch is
multiplied and factorised on its own, results do not depend on what else is in the batch, so a
population analysed at once (:func:`spectral_metrics_many`) gives the same numbers as one model
at a time.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from threadpoolctl import threadpool_limits  # installed with scikit-learn, a dependency
from torch import Tensor, nn

EIG_THRESHOLD = 1e-5
"""Eigenvalues at or below this are treated as zero (dropped from the fit and the rank)."""

_KS_BLOCK_ELEMENTS = 1 << 18
"""Working-set size (array elements) of one block of the vectorised KS scan."""

_KS_COARSE_POINTS = 64
"""Points of the first (coarsest) grid of the pruned KS search (see ``_ks_argmin``)."""

_KS_REFINE = 4
"""Factor by which the pruned KS search refines its grid from one round to the next."""

_KS_MIN_STEP = 4
"""Grid spacing below which the pruned KS search stops refining and scans the survivors."""

_SVD_BATCH_ELEMENTS = 1 << 24
"""Largest number of matrix elements stacked into one batched call (128 MB in float64)."""

_GRAM_ERROR_LIMIT = 1e-9
"""Largest tolerated rounding error (absolute) of an eigenvalue computed from a Gram matrix.

Forming G = W^T W and diagonalising it (both backward stable) errs by about 2 k eps lambda_max
on every eigenvalue of a k x k Gram, where the SVD of W errs by about eps sigma_max on every
singular value. Matrices for which 2 k eps lambda_max exceeds this limit (1e-4 of
``EIG_THRESHOLD``: for k = 512, lambda_max above ~4400) go through ``torch.linalg.svdvals``, so
rounding can neither lift a zero eigenvalue above the threshold nor move a kept one noticeably.
"""

METRIC_KEYS = (
    "alpha",
    "alpha_weighted",
    "log_norm",
    "log_spectral_norm",
    "log_alpha_norm",
    "stable_rank",
    "entropy",
    "n_eigs",
    "xmin",
    "ks_distance",
)


# --------------------------------------------------------------------------- matrices and ESDs


def layer_matrices(module: nn.Module) -> list[tuple[str, list[Tensor]]]:
    """The weight matrices of every nn.Linear and nn.Conv2d in ``module``.

    Returns ``(name, matrices)`` pairs in ``named_modules()`` order, where ``name`` is the name
    ``named_modules()`` gives (``""`` when ``module`` itself is the layer). A Linear layer gives
    its weight (out x in) as one matrix; a Conv2d layer (weight out x in/groups x kh x kw) gives
    kh*kw matrices of shape out x in/groups, one per kernel position in row-major order, whose
    spectra are later pooled (Martin & Mahoney 2021). Other layers are skipped. Matrices are
    detached views of the parameters.

    Raises:
        ValueError: if ``module`` contains no Linear or Conv2d layer.
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"expected a torch.nn.Module, got {type(module).__name__}")
    layers = []
    for name, layer in module.named_modules():
        if isinstance(layer, nn.Linear):
            layers.append((name, [layer.weight.detach()]))
        elif isinstance(layer, nn.Conv2d):
            w = layer.weight.detach()
            slices = w.permute(2, 3, 0, 1).reshape(-1, w.shape[0], w.shape[1])
            layers.append((name, list(slices.unbind(0))))
    if not layers:
        raise ValueError(
            f"{type(module).__name__} has no nn.Linear or nn.Conv2d layer to analyse"
        )
    return layers


def _check_matrices(matrices: list[Tensor], label: str = "a") -> None:
    """Raise ValueError unless ``matrices`` is a non-empty list of finite 2-D tensors.

    ``label`` names the matrices' owner in the message (e.g. "layer 'fc1'").
    """
    if isinstance(matrices, Tensor) or not len(matrices):
        raise ValueError("expected a non-empty list of 2-D tensors")
    for m in matrices:
        if not isinstance(m, Tensor) or m.ndim != 2 or m.numel() == 0:
            raise ValueError(f"expected non-empty 2-D tensors, got {getattr(m, 'shape', m)!r}")
        if not torch.isfinite(m).all():
            raise ValueError(f"{label} {tuple(m.shape)} weight matrix has non-finite entries")


def layer_eigenvalues(matrices: list[Tensor]) -> list[np.ndarray]:
    """Eigenvalues of W^T W (squared singular values, float64, ascending) of each matrix.

    Same-shape matrices (on the same device) are stacked, in chunks of at most
    ``_SVD_BATCH_ELEMENTS`` elements; each chunk's Gram matrices (the smaller of W W^T and
    W^T W, k = min(rows, cols)) are formed by one batched matmul and diagonalised by one batched
    symmetric eigensolver call (``_gram_eigvalsh``); tiny negative rounding is clipped to 0.
    Matrices whose largest eigenvalue makes the Gram's rounding exceed ``_GRAM_ERROR_LIMIT`` are
    recomputed, batched, by ``torch.linalg.svdvals``. The result is returned in input order.

    Written here because no library call gives the spectra of a batch of matrices faster:
    ``svdvals`` bidiagonalises W itself, 1.5x (square) to 5x (64 x 512) slower on one CPU thread
    than matmul + ``eigvalsh`` at these sizes (see the module docstring).
    """
    groups: dict[tuple, list[int]] = defaultdict(list)
    for k, m in enumerate(matrices):
        groups[(tuple(m.shape), m.device)].append(k)
    out: list[np.ndarray] = [np.empty(0)] * len(matrices)
    # numpy's BLAS (used by _gram_eigvalsh on the CPU) gets as many threads as torch
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        for (shape, device), idx in groups.items():
            size = min(shape)
            per_call = max(1, _SVD_BATCH_ELEMENTS // (shape[0] * shape[1]))
            for start in range(0, len(idx), per_call):
                chunk = idx[start : start + per_call]
                batch = torch.empty((len(chunk), *shape), dtype=torch.float64, device=device)
                for row, k in zip(batch, chunk):  # one pass (stack, then convert, is two)
                    row.copy_(matrices[k].detach())
                values = _gram_eigvalsh(batch).clamp_(min=0.0)
                unsafe = 2 * size * np.finfo(np.float64).eps * values[:, -1] > _GRAM_ERROR_LIMIT
                if unsafe.any():
                    singular = torch.linalg.svdvals(batch[unsafe])
                    values[unsafe] = (singular * singular).flip(-1)
                for k, eigs in zip(chunk, values.cpu().numpy()):
                    out[k] = eigs
    return out


def _gram_eigvalsh(batch: Tensor) -> Tensor:
    """Eigenvalues (ascending) of the smaller Gram matrix of each matrix of a float64 batch.

    One batched matmul forms the Grams (W W^T for wide matrices, W^T W for tall ones) and one
    batched symmetric eigensolver call (LAPACK syevd, one matrix at a time) diagonalises them.
    On the CPU both run in numpy rather than torch: the torch CPU wheels link MKL, which on the
    AMD EPYC this was measured on (one thread, float64) took 9.1 ms for a 512 x 512 Gram and
    17-20 ms for its eigenvalues, against 4.4 ms and 15-17 ms with the OpenBLAS that the numpy
    wheels ship. Callers limit numpy's BLAS threads (``threadpool_limits``).
    """
    wide = batch.shape[-2] <= batch.shape[-1]
    if batch.device.type != "cpu":
        return torch.linalg.eigvalsh(batch @ batch.mT if wide else batch.mT @ batch)
    w = batch.numpy()
    gram = np.matmul(w, w.transpose(0, 2, 1)) if wide else np.matmul(w.transpose(0, 2, 1), w)
    return torch.from_numpy(np.linalg.eigvalsh(gram))


def _pooled_esds(groups: list[list[Tensor]]) -> list[np.ndarray]:
    """The pooled ESD of each group of matrices, with all spectra batched across groups."""
    flat = [m for matrices in groups for m in matrices]
    eigs = layer_eigenvalues(flat)
    esds, pos = [], 0
    for matrices in groups:
        part = eigs[pos : pos + len(matrices)]
        esds.append(part[0] if len(part) == 1 else np.sort(np.concatenate(part)))
        pos += len(matrices)
    return esds


def esd(matrices: list[Tensor]) -> np.ndarray:
    """Empirical spectral density: pooled eigenvalues of W^T W over ``matrices``, ascending.

    Each matrix contributes its min(rows, cols) squared singular values (Martin & Mahoney
    2021), computed in float64 as the eigenvalues of its smaller Gram matrix (or by
    ``torch.linalg.svdvals`` where that would be inaccurate; see ``_GRAM_ERROR_LIMIT``), with
    same-shape matrices stacked in one call. Pass the kh*kw slices of a Conv2d layer to pool
    them.

    Raises:
        ValueError: on an empty list, a tensor that is not 2-D, or non-finite entries.
    """
    _check_matrices(matrices)
    return _pooled_esds([list(matrices)])[0]


# --------------------------------------------------------------------------- power-law fit


def _ks_distances(log_x: np.ndarray, alpha: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """KS distance of the power-law fit for each candidate xmin = x[starts[c]].

    ``log_x`` are the logs of the sorted data, ``alpha[c]`` the exponent fitted to the tail
    x[starts[c]:]. For a tail of n points t_0 <= ... <= t_{n-1}, the distance is
    max_j |F(t_j) - j/n| with F(t) = 1 - (t/xmin)^(1-alpha): the empirical CDF is taken just
    below each point, the convention of the ``powerlaw`` package (Alstott et al. 2014) and
    WeightWatcher. Candidates with a non-finite alpha get distance inf. The scan is vectorised
    over candidates and done in blocks of candidates so that the O(N^2) work never needs an
    N x N array; points before a candidate's xmin are clipped to contribute 0.
    """
    size = len(log_x)
    dist = np.full(len(starts), np.inf)
    block = max(1, _KS_BLOCK_ELEMENTS // size)
    for lo in range(0, len(starts), block):
        rows = starts[lo : lo + block]
        first = rows.min()
        inv_n = (1.0 / (size - rows))[:, None]
        gap = log_x[None, first:] - log_x[rows, None]  # ln(t / xmin)
        np.maximum(gap, 0.0, out=gap)
        gap *= (1.0 - alpha[lo : lo + block])[:, None]
        np.expm1(gap, out=gap)  # -F(t)
        empirical = np.arange(first, size, dtype=np.float64)[None, :] - rows[:, None]
        np.maximum(empirical, 0.0, out=empirical)
        empirical *= inv_n  # j / n
        gap += empirical
        np.abs(gap, out=gap)
        dist[lo : lo + block] = gap.max(axis=1)
    dist[~np.isfinite(alpha)] = np.inf
    return dist


def _ks_bounds(log_x: np.ndarray, alpha: np.ndarray, starts: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds on each candidate's KS distance (see ``_ks_distances``).

    Only the grid points g = 0, step, 2 step, ..., N - 1 are evaluated. At a grid point inside a
    candidate's tail the term |F(t_g) - e_g| (e_j = (j - k) / n, the empirical CDF) is exact, so
    the largest such term is a lower bound. Between consecutive grid points a <= j <= b both F
    (alpha > 1) and e increase with j, so |F(t_j) - e_j| <= max(F(t_b) - e_a, e_b - F(t_a)), and
    the largest such term over the intervals is an upper bound; grid points before the
    candidate's xmin are clipped to it (F = e = 0) like in ``_ks_distances``, so the interval
    holding xmin is bounded from xmin on. ``starts`` must be ascending and ``alpha`` finite.
    Costs len(starts) * N / step instead of len(starts) * N.
    """
    size = len(log_x)
    grid = np.unique(np.append(np.arange(0, size, step), size - 1))
    lower, upper = np.empty(len(starts)), np.empty(len(starts))
    block = max(1, _KS_BLOCK_ELEMENTS // len(grid))
    for lo in range(0, len(starts), block):
        rows = starts[lo : lo + block]
        g = grid[np.searchsorted(grid, rows[0], side="right") - 1 :]  # from the last point <= rows[0]
        gap = log_x[None, g] - log_x[rows, None]
        np.maximum(gap, 0.0, out=gap)
        gap *= (1.0 - alpha[lo : lo + block])[:, None]
        np.expm1(gap, out=gap)  # -F(t)
        empirical = (g[None, :] - rows[:, None]).astype(np.float64)
        np.maximum(empirical, 0.0, out=empirical)
        empirical *= (1.0 / (size - rows))[:, None]  # as in _ks_distances, so exact terms agree
        above = np.subtract(-gap[:, 1:], empirical[:, :-1])  # F(t_b) - e_a
        below = np.add(empirical[:, 1:], gap[:, :-1])  # e_b - F(t_a)
        np.maximum(above, below, out=above)
        upper[lo : lo + block] = above.max(axis=1)
        gap += empirical
        np.abs(gap, out=gap)
        lower[lo : lo + block] = gap.max(axis=1)
    return lower, upper


def _ks_argmin(log_x: np.ndarray, alpha: np.ndarray, starts: np.ndarray) -> tuple[int, float]:
    """(position in ``starts``, KS distance) of the candidate with the smallest KS distance.

    The same answer as ``argmin(_ks_distances(log_x, alpha, starts))`` (first of equal
    distances; (0, inf) when no alpha is finite), found without scanning every candidate's whole
    tail when there are many: candidates are bounded on a coarse grid (``_ks_bounds``, first
    about ``_KS_COARSE_POINTS`` points), those whose lower bound exceeds the smallest upper
    bound are dropped (they cannot win), the grid is refined ``_KS_REFINE``-fold on the
    survivors while its spacing is at least ``_KS_MIN_STEP``, and the survivors are scanned
    exactly; below 4 * 64 values the exact scan runs at once. On the pooled FARMS ESD (10^4
    eigenvalues) of a trained 512-wide layer this evaluates a few 10^6 array elements instead
    of 10^8 (~10x faster); on a pure power-law sample, whose KS distance is nearly flat over
    hundreds of candidates, little is pruned and it costs about as much as the full scan.

    Written here because the ``powerlaw`` package (and WeightWatcher's fit) loop over every
    candidate in Python with an O(N) scan each, and no library prunes the xmin search.
    """
    keep = np.flatnonzero(np.isfinite(alpha))
    if not len(keep):
        return 0, float("inf")
    size = len(log_x)
    step, best_upper = max(1, size // _KS_COARSE_POINTS), np.inf
    while step >= _KS_MIN_STEP and len(keep) > 1:
        lower, upper = _ks_bounds(log_x, alpha[keep], starts[keep], step)
        best_upper = min(best_upper, upper.min())
        # the slack covers rounding: no candidate within it of the best can be dropped
        keep = keep[lower <= best_upper + 1e-12]
        step //= _KS_REFINE
    dist = _ks_distances(log_x, alpha[keep], starts[keep])
    best = int(np.argmin(dist))
    return int(keep[best]), float(dist[best])


def fit_power_law(eigs: np.ndarray, xmin: str = "ks") -> dict:
    """Fit a continuous power law to the tail of an ESD (Clauset, Shalizi & Newman 2009).

    Eigenvalues <= 1e-5 (``EIG_THRESHOLD``) are dropped first (they are numerically zero and
    would dominate log-ratios). For a candidate xmin = x_k of the N remaining sorted values the
    tail is the n = N - k largest values x_k..x_{N-1} and the maximum-likelihood exponent is
    alpha = 1 + n / sum_{i>=k} ln(x_i / xmin).

    ``xmin="ks"`` (Martin & Mahoney; WeightWatcher): every value except the largest is a
    candidate (a tail needs at least 2 points), and the candidate whose fitted CDF
    1 - (x/xmin)^(1-alpha) is closest in Kolmogorov-Smirnov distance to the tail's empirical
    CDF wins (see ``_ks_distances``); candidates whose tail has no spread (all values equal,
    so the MLE is undefined) are never chosen. The search over candidates is vectorised and,
    for large ESDs, pruned by bounds without changing its result (see ``_ks_argmin``).
    ``xmin="median"`` (AlphaPruning 2024): xmin = x_k with k = N // 2, clipped to N - 2 so the
    tail keeps 2 points.

    Returns ``{"alpha", "xmin", "ks_distance", "n_tail"}``; with fewer than 2 usable values,
    or no tail with spread, alpha, xmin and ks_distance are nan and n_tail is 0. Never raises
    on degenerate spectra.

    Raises:
        ValueError: if ``xmin`` is not "ks" or "median", or ``eigs`` is not a 1-D array of
            non-NaN numbers.
    """
    if xmin not in ("ks", "median"):
        raise ValueError(f'xmin must be "ks" or "median", got {xmin!r}')
    values = np.asarray(eigs, dtype=np.float64)
    if values.ndim != 1 or np.isnan(values).any():
        raise ValueError("eigs must be a 1-D array without NaN")
    x = np.sort(values[values > EIG_THRESHOLD])
    failed = {"alpha": float("nan"), "xmin": float("nan"), "ks_distance": float("nan"), "n_tail": 0}
    if len(x) < 2 or not np.isfinite(x[-1]):
        return failed

    log_x = np.log(x)
    size = len(x)
    if xmin == "ks":
        starts = np.arange(size - 1)
    else:
        starts = np.array([min(size // 2, size - 2)])
    n = size - starts
    tail_log_sum = np.cumsum(log_x[::-1])[::-1]  # tail_log_sum[k] = sum_{i>=k} ln x_i
    spread = tail_log_sum[starts] - n * log_x[starts]
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.where(spread > 0, 1.0 + n / spread, np.nan)
    best, dist = _ks_argmin(log_x, alpha, starts)
    if not np.isfinite(dist):
        return failed
    return {
        "alpha": float(alpha[best]),
        "xmin": float(x[starts[best]]),
        "ks_distance": dist,
        "n_tail": int(n[best]),
    }


# --------------------------------------------------------------------------- per-layer metrics


def layer_spectral_metrics(eigs: np.ndarray) -> dict[str, float]:
    """The Martin & Mahoney metrics of one layer's ESD (eigenvalues of W^T W).

    Keys (all floats):

    * ``alpha``, ``xmin``, ``ks_distance``: power-law fit of the tail (:func:`fit_power_law`,
      xmin by minimum KS distance).
    * ``alpha_weighted`` = alpha * log10(lambda_max).
    * ``log_norm`` = log10(sum lambda) (log squared Frobenius norm).
    * ``log_spectral_norm`` = log10(lambda_max).
    * ``log_alpha_norm`` = log10(sum lambda^alpha) (= ||W||_{2 alpha}^{2 alpha}, a Schatten norm).
    * ``stable_rank`` = sum lambda / lambda_max.
    * ``entropy``: normalised spectral entropy -sum p ln p / ln(r), with p = lambda / sum
      lambda over the r eigenvalues > 1e-5 (r is the rank at that absolute threshold;
      WeightWatcher uses a relative numerical-rank tolerance instead, which differs only for
      nearly rank-deficient matrices). It lies in [0, 1] and is nan when r < 2 (a single
      eigenvalue is both the most and the least spread spectrum, so 0/0 has no value).
    * ``n_eigs``: number of eigenvalues given (including any <= 1e-5), as float. Alphas from
      fewer than ~50 eigenvalues are unreliable.

    Norm metrics use all eigenvalues. With fewer than 2 usable eigenvalues the alpha-type values
    (alpha, alpha_weighted, log_alpha_norm, xmin, ks_distance) are nan; an all-zero spectrum
    gives log norms of -inf; an empty one gives nan everywhere except n_eigs = 0. Never raises
    on degenerate spectra.
    """
    lam = np.asarray(eigs, dtype=np.float64)
    fit = fit_power_law(lam)
    alpha = fit["alpha"]
    metrics = dict.fromkeys(METRIC_KEYS, float("nan"))
    metrics.update(alpha=alpha, xmin=fit["xmin"], ks_distance=fit["ks_distance"], n_eigs=float(lam.size))
    if lam.size == 0:
        return metrics
    total, top = lam.sum(), lam.max()
    usable = lam[lam > EIG_THRESHOLD]
    with np.errstate(divide="ignore", invalid="ignore"):
        metrics["log_norm"] = float(np.log10(total))
        metrics["log_spectral_norm"] = float(np.log10(top))
        metrics["stable_rank"] = float(total / top)
        metrics["alpha_weighted"] = float(alpha * np.log10(top))
        if np.isfinite(alpha):  # factor out lambda_max^alpha so large alphas cannot overflow
            scaled = np.sum((lam / top) ** alpha)
            metrics["log_alpha_norm"] = float(alpha * np.log10(top) + np.log10(scaled))
    if usable.size >= 2:
        p = usable / usable.sum()
        metrics["entropy"] = float(-np.sum(p * np.log(p)) / np.log(usable.size))
    return metrics


# --------------------------------------------------------------------------- FARMS


def _farms_window_shape(shape: tuple[int, int], window: tuple[int, int]) -> tuple[int, int]:
    """Window size for a matrix of ``shape`` (already oriented like the window).

    The window is used as given when it fits; otherwise both sides are scaled by the same
    factor min(rows / window_rows, cols / window_cols) and floored (at least 1), so the aspect
    ratio is kept (up to rounding) and small layers still give a spectrum.
    """
    scale = min(1.0, shape[0] / window[0], shape[1] / window[1])
    return max(1, int(window[0] * scale)), max(1, int(window[1] * scale))


def _farms_submatrices(
    matrix: Tensor, window: tuple[int, int], positions: int
) -> list[Tensor]:
    """The overlapping fixed-aspect-ratio submatrices FARMS pools for one matrix.

    The matrix is transposed when its orientation (tall or wide) differs from the window's; a
    submatrix's nonzero spectrum does not depend on orientation, so out x in and in x out
    layers are treated alike. Window corners lie on a ``positions`` x ``positions`` grid
    spread evenly (rounded) from the first to the last possible offset along each axis;
    duplicate offsets (a window as long as the matrix) are used once.
    """
    if (matrix.shape[0] > matrix.shape[1]) != (window[0] > window[1]):
        matrix = matrix.T
    rows, cols = _farms_window_shape(tuple(matrix.shape), window)
    row_starts = np.unique(np.round(np.linspace(0, matrix.shape[0] - rows, positions)).astype(int))
    col_starts = np.unique(np.round(np.linspace(0, matrix.shape[1] - cols, positions)).astype(int))
    return [matrix[r : r + rows, c : c + cols] for r in row_starts for c in col_starts]


def _check_farms_args(window: tuple[int, int], positions: int) -> None:
    """Raise ValueError unless ``window`` is two positive ints and ``positions`` >= 1."""
    if len(window) != 2 or min(window) < 1 or positions < 1:
        raise ValueError(f"FARMS needs a window of two positive sizes and positions >= 1, got {window}, {positions}")


def farms_alpha(
    matrices: list[Tensor],
    window: tuple[int, int] = (100, 200),
    positions: int = 10,
    xmin: str = "ks",
) -> float:
    """FARMS alpha (Hu et al. 2025): power-law exponent of the pooled ESD of submatrices.

    Each matrix (e.g. one Linear weight, or the kh*kw slices of a Conv2d) is covered by
    ``positions`` x ``positions`` overlapping windows of ``window`` = (rows, cols) (default
    100 x 200, aspect ratio Q = 2, as in the paper); the eigenvalues of all windows are pooled
    and fitted with :func:`fit_power_law`. A fixed aspect ratio removes the dependence of alpha
    on the layer's shape. Windows larger than the matrix are shrunk keeping their aspect ratio
    (see ``_farms_window_shape``), so small layers work; a matrix no larger than the window
    gives a single window, i.e. the ordinary alpha. All window SVDs are batched.

    Returns nan when the pooled ESD has fewer than 2 usable eigenvalues.

    Raises:
        ValueError: on bad matrices, a non-positive window or positions < 1.
    """
    _check_farms_args(window, positions)
    _check_matrices(matrices)
    windows = [w for m in matrices for w in _farms_submatrices(m, window, positions)]
    return fit_power_law(_pooled_esds([windows])[0], xmin=xmin)["alpha"]


# --------------------------------------------------------------------------- whole models


def spectral_metrics(
    module: nn.Module,
    farms_window: tuple[int, int] | None = (100, 200),
    farms_positions: int = 10,
) -> dict[str, dict[str, float]]:
    """Spectral metrics of every Linear/Conv2d layer of ``module``.

    Returns layer name -> :func:`layer_spectral_metrics` dict plus ``farms_alpha``
    (:func:`farms_alpha` with ``farms_window`` and ``farms_positions``; nan when
    ``farms_window`` is None, which skips the FARMS SVDs and fit).

    Raises:
        ValueError: if the module has no Linear/Conv2d layer or non-finite weights.
    """
    return spectral_metrics_many([module], farms_window, farms_positions)[0]


def spectral_metrics_many(
    modules: list[nn.Module],
    farms_window: tuple[int, int] | None = (100, 200),
    farms_positions: int = 10,
) -> list[dict[str, dict[str, float]]]:
    """:func:`spectral_metrics` of each module of a population, with the SVDs batched.

    The full-layer matrices and the FARMS windows of all modules are collected first, and
    every set of same-shape matrices (e.g. layer 2 of every model of a zoo) is factorised in
    one batched call; the results equal those of :func:`spectral_metrics` on each module.
    """
    if farms_window is not None:
        _check_farms_args(farms_window, farms_positions)
    per_module = [layer_matrices(module) for module in modules]
    groups = []
    for layers in per_module:
        for name, matrices in layers:
            _check_matrices(matrices, f"layer {name!r}:")
            groups.append(matrices)
            if farms_window is not None:
                groups.append(
                    [w for m in matrices for w in _farms_submatrices(m, farms_window, farms_positions)]
                )
    esds = iter(_pooled_esds(groups))
    results = []
    for layers in per_module:
        metrics = {}
        for name, _ in layers:
            metrics[name] = layer_spectral_metrics(next(esds))
            farms = fit_power_law(next(esds))["alpha"] if farms_window is not None else float("nan")
            metrics[name]["farms_alpha"] = farms
        results.append(metrics)
    return results
