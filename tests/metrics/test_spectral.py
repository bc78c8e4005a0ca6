"""Tests of metrics.spectral against closed forms, hand computations and WeightWatcher."""

import functools
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from metrics import spectral
from metrics.spectral import (
    METRIC_KEYS,
    _ks_distances,
    esd,
    farms_alpha,
    fit_power_law,
    layer_matrices,
    layer_spectral_metrics,
    spectral_metrics,
    spectral_metrics_many,
)


def pareto_quantiles(n, alpha):
    """n evenly spaced quantiles of the Pareto law p(x) ~ x^-alpha on [1, inf)."""
    q = (np.arange(n) + 0.5) / n
    return (1.0 - q) ** (-1.0 / (alpha - 1.0))


def matrix_with_spectrum(rows, cols, eigs, seed):
    """U diag(sqrt(eigs)) V^T with random orthonormal U, V: W^T W has eigenvalues ``eigs``."""
    g = torch.Generator().manual_seed(seed)
    k = len(eigs)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))
    return (u * torch.as_tensor(eigs).sqrt()) @ v.T


def pareto_entries(rows, cols, mu, seed):
    """A matrix of iid symmetric Pareto entries with tail index mu."""
    g = torch.Generator().manual_seed(seed)
    magnitude = (1 - torch.rand(rows, cols, generator=g, dtype=torch.float64)) ** (-1 / mu)
    return magnitude * (2 * torch.randint(0, 2, (rows, cols), generator=g) - 1)


def reference_fit(x):
    """Plain-loop power-law fit: MLE alpha per candidate xmin, KS with the ECDF at j/n."""
    x = sorted(v for v in x if v > 1e-5)
    best = None
    for k in range(len(x) - 1):
        tail = x[k:]
        n = len(tail)
        alpha = 1 + n / sum(math.log(v / x[k]) for v in tail)
        ks = max(abs(1 - (v / x[k]) ** (1 - alpha) - j / n) for j, v in enumerate(tail))
        if best is None or ks < best[2]:
            best = (alpha, x[k], ks, n)
    return best


def linear_with_weight(w):
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


# --------------------------------------------------------------------------- alpha


@pytest.mark.parametrize("alpha", [2.5, 4.0])
def test_alpha_recovers_exponent_of_power_law_matrix(alpha):
    eigs = pareto_quantiles(300, alpha)
    layer = linear_with_weight(matrix_with_spectrum(400, 300, eigs, seed=1).float())
    metrics = spectral_metrics(layer, farms_window=None)[""]
    assert metrics["n_eigs"] == 300
    assert abs(metrics["alpha"] - alpha) < 0.1  # measured: 2.504 and 4.008


@pytest.mark.parametrize("alpha", [2.5, 4.0])
def test_alpha_on_random_pareto_samples(alpha):
    # Sampling noise of the KS-selected fit is large (at n=500 only ~45% of seeds land within
    # 0.1 of alpha=4), so check the median over seeds of larger samples.
    estimates = [
        fit_power_law((1 - np.random.default_rng(seed).random(2000)) ** (-1 / (alpha - 1)))["alpha"]
        for seed in range(5)
    ]
    assert abs(np.median(estimates) - alpha) < 0.1


def test_fit_matches_plain_loop_reference():
    x = np.random.default_rng(3).lognormal(0.0, 1.0, 80)
    fit = fit_power_law(x)
    alpha, xmin, ks, n_tail = reference_fit(x)
    assert fit["alpha"] == pytest.approx(alpha, rel=1e-12)
    assert fit["xmin"] == xmin
    assert fit["ks_distance"] == pytest.approx(ks, abs=1e-12)
    assert fit["n_tail"] == n_tail


def test_median_xmin():
    x = np.array([0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0])
    fit = fit_power_law(x, xmin="median")
    tail = x[3:]
    assert fit["xmin"] == 3.0 and fit["n_tail"] == 4
    assert fit["alpha"] == pytest.approx(1 + 4 / np.sum(np.log(tail / 3.0)), rel=1e-12)
    # two values: the tail must keep both
    assert fit_power_law(np.array([1.0, 2.0]), xmin="median")["n_tail"] == 2


def test_fit_drops_tiny_eigenvalues_and_degenerate_spectra():
    assert fit_power_law(np.array([1e-6, 1e-5, 1.0, 3.0]))["n_tail"] == 2
    for eigs in ([], [2.0], [1e-6, 1e-7, 0.0], [1.0, 1.0, 1.0]):
        assert math.isnan(fit_power_law(np.array(eigs))["alpha"])


# --------------------------------------------------------------------------- closed forms


def test_metrics_closed_form_on_diagonal_matrix():
    s = [3.0, 2.0, 1.0, 0.5]
    w = torch.zeros(4, 6)
    for i, v in enumerate(s):
        w[i, i] = v
    metrics = spectral_metrics(linear_with_weight(w), farms_window=(4, 6))[""]
    lam = [v * v for v in s]
    total = sum(lam)
    alpha, xmin, ks, _ = reference_fit(lam)
    p = [v / total for v in lam]
    expected = {
        "alpha": alpha,
        "xmin": xmin,
        "ks_distance": ks,
        "log_norm": math.log10(total),
        "log_spectral_norm": math.log10(9.0),
        "alpha_weighted": alpha * math.log10(9.0),
        "log_alpha_norm": math.log10(sum(v**alpha for v in lam)),
        "stable_rank": total / 9.0,
        "entropy": -sum(q * math.log(q) for q in p) / math.log(4),
        "n_eigs": 4.0,
        "farms_alpha": alpha,  # the window is the whole matrix
    }
    assert set(metrics) == set(METRIC_KEYS) | {"farms_alpha"}
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-10, abs=1e-12), key


def test_layer_metrics_degenerate_inputs_never_raise():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empty = layer_spectral_metrics(np.array([]))
        single = layer_spectral_metrics(np.array([2.0]))
        zeros = layer_spectral_metrics(np.zeros(3))
    assert empty["n_eigs"] == 0 and all(math.isnan(v) for k, v in empty.items() if k != "n_eigs")
    assert single["log_norm"] == pytest.approx(math.log10(2.0)) and single["stable_rank"] == 1.0
    for key in ("alpha", "alpha_weighted", "log_alpha_norm", "xmin", "ks_distance", "entropy"):
        assert math.isnan(single[key]), key
    assert zeros["log_norm"] == -math.inf and math.isnan(zeros["alpha"])


# --------------------------------------------------------------------------- layers and ESD


def test_conv2d_slices_pooled():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, (2, 3)), nn.ReLU(), nn.Flatten(), nn.Linear(7, 4))
    layers = layer_matrices(model)
    assert [name for name, _ in layers] == ["0", "3"]
    slices = layers[0][1]
    assert len(slices) == 6 and all(m.shape == (5, 3) for m in slices)
    w = model[0].weight.detach().double().numpy()
    by_hand = np.sort(
        np.concatenate([np.linalg.svd(w[:, :, i, j], compute_uv=False) ** 2 for i in range(2) for j in range(3)])
    )
    np.testing.assert_allclose(esd(slices), by_hand, rtol=1e-12, atol=1e-15)
    assert spectral_metrics(model, farms_window=None)["0"]["n_eigs"] == 18


@pytest.mark.parametrize("shape", [(40, 90), (90, 40), (64, 64), (512, 64), (7, 1)])
def test_esd_equals_squared_svd(shape):
    # the Gram + eigvalsh path against numpy's SVD of the same float64 matrix
    torch.manual_seed(sum(shape))
    w = torch.randn(shape) * 0.3
    by_hand = np.sort(np.linalg.svd(w.double().numpy(), compute_uv=False) ** 2)
    ours = esd([w])
    assert len(ours) == min(shape) and np.all(np.diff(ours) >= 0)
    np.testing.assert_allclose(ours, by_hand, rtol=1e-11, atol=1e-13 * by_hand[-1])


@pytest.mark.parametrize("shape", [(80, 50), (50, 80)])
def test_cpu_gram_path_equals_torch(shape):
    # on the CPU _gram_eigvalsh runs in numpy; elsewhere in torch (matmul + torch.linalg.eigvalsh,
    # run here on the CPU): the two must give the same spectra
    g = torch.Generator().manual_seed(9)
    w = torch.randn(6, *shape, generator=g, dtype=torch.float64)
    gram = w @ w.mT if shape[0] <= shape[1] else w.mT @ w
    assert gram.shape == (6, 50, 50)
    np.testing.assert_allclose(spectral._gram_eigvalsh(w).numpy(), torch.linalg.eigvalsh(gram).numpy(), rtol=1e-11)


@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_esd_of_rank_deficient_matrix(scale):
    # rank 3 in 60 x 200: 57 zero eigenvalues must stay below EIG_THRESHOLD. At scale 1e4
    # (lambda_max 1.2e12) eigvalsh of the Gram gives 25 of them above it (up to 3e-4), so that
    # matrix must go through svdvals (checked against numpy's SVD).
    g = torch.Generator().manual_seed(5)
    w = scale * torch.randn(60, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 200, generator=g, dtype=torch.float64)
    ours = esd([w])
    by_hand = np.sort(np.linalg.svd(w.numpy(), compute_uv=False) ** 2)
    assert np.sum(ours > 1e-5) == 3 and np.all(ours >= 0)
    np.testing.assert_allclose(ours[-3:], by_hand[-3:], rtol=1e-11)
    layer = nn.Linear(200, 60, bias=False, dtype=torch.float64)  # float32 rounding would add rank
    with torch.no_grad():
        layer.weight.copy_(w)
    metrics = spectral_metrics(layer, farms_window=None)[""]
    assert metrics["n_eigs"] == 60
    p = by_hand[-3:] / by_hand[-3:].sum()
    assert metrics["entropy"] == pytest.approx(-np.sum(p * np.log(p)) / np.log(3), rel=1e-6)


def full_scan_fit(x):
    """The unpruned search: every candidate's KS distance over its whole tail, then argmin."""
    x = np.sort(x[x > 1e-5])
    log_x = np.log(x)
    starts = np.arange(len(x) - 1)
    n = len(x) - starts
    spread = np.cumsum(log_x[::-1])[::-1][starts] - n * log_x[starts]
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.where(spread > 0, 1.0 + n / spread, np.nan)
    dist = _ks_distances(log_x, alpha, starts)
    best = int(np.argmin(dist))
    return {"alpha": alpha[best], "xmin": x[best], "ks_distance": dist[best], "n_tail": int(n[best])}


@functools.cache
def large_esds():
    """ESDs large enough for the pruned KS search: samples, spectra and tied values."""
    rng = np.random.default_rng(11)
    w = pareto_entries(300, 600, 1.5, seed=2).numpy()
    bulk = rng.standard_normal((800, 400))
    return {
        "pareto-2.5": (1 - rng.random(3000)) ** (-1 / 1.5),
        "pareto-5": (1 - rng.random(1500)) ** (-1 / 4.0),
        "lognormal": rng.lognormal(0.0, 1.0, 2000),
        "marchenko-pastur": np.linalg.eigvalsh(bulk.T @ bulk / 800),
        "mp-plus-spikes": np.append(np.linalg.eigvalsh(bulk.T @ bulk / 800), [8.0, 15.0, 40.0]),
        "heavy-tailed-matrix": np.linalg.svd(w, compute_uv=False) ** 2,
        "ties": np.round(rng.lognormal(0.0, 1.0, 2000), 1),
        "farms-pooled": esd(
            [m for m in torch.from_numpy(w).unfold(0, 100, 40).unfold(1, 200, 80).reshape(-1, 100, 200)]
        ),
    }


@pytest.mark.parametrize("name", list(large_esds()))
def test_pruned_ks_search_equals_full_scan(name):
    x = large_esds()[name]
    fit, full = fit_power_law(x), full_scan_fit(x)
    assert fit == full  # bit for bit: pruning only skips candidates that cannot win


@pytest.mark.parametrize("name", ["pareto-2.5", "pareto-5", "lognormal", "marchenko-pastur", "mp-plus-spikes",
                                  "heavy-tailed-matrix", "farms-pooled"])
def test_fit_matches_weightwatcher_fit_on_large_esds(name):
    # WeightWatcher's own fit (a Python loop over every candidate) on the same values
    from weightwatcher.WW_powerlaw import WWFit  # a test dependency

    x = large_esds()[name]
    x = x[x > 1e-5]
    fit, theirs = fit_power_law(x), WWFit(x)
    assert len(x) >= 300
    assert fit["alpha"] == pytest.approx(theirs.alpha, rel=1e-9)
    assert fit["xmin"] == theirs.xmin
    assert fit["ks_distance"] == pytest.approx(theirs.D, rel=1e-9)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        spectral_metrics(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match="xmin"):
        fit_power_law(np.ones(3), xmin="max")
    with pytest.raises(ValueError):
        esd([])
    with pytest.raises(ValueError):
        esd([torch.ones(3)])
    bad = nn.Linear(3, 3)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        spectral_metrics(bad)
    with pytest.raises(ValueError, match="window"):
        farms_alpha([torch.ones(4, 4)], window=(0, 2))


# --------------------------------------------------------------------------- populations


def small_cnn(seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(32, 20), nn.Linear(20, 5)
    )


def test_many_equals_per_model_and_batches_across_models(monkeypatch):
    models = [small_cnn(seed) for seed in range(4)]
    window = (6, 12)
    singles = [spectral_metrics(m, farms_window=window, farms_positions=3) for m in models]

    calls = []
    gram_eigvalsh = spectral._gram_eigvalsh
    monkeypatch.setattr(spectral, "_gram_eigvalsh", lambda a: calls.append(a.shape) or gram_eigvalsh(a))
    many = spectral_metrics_many(models, farms_window=window, farms_positions=3)
    # one call per distinct matrix shape, whole population at once: conv slices 8x3 and 8x8,
    # linear 20x32 and 5x20, FARMS windows 3x6, 4x8, 6x12 and 5x10 (see _farms_window_shape)
    assert len(calls) == 8 and all(shape[0] % len(models) == 0 for shape in calls)

    for one, batched in zip(singles, many):
        assert one.keys() == batched.keys()
        for name in one:
            for key, value in one[name].items():
                np.testing.assert_allclose(batched[name][key], value, rtol=0, atol=1e-9, err_msg=f"{name} {key}")


# --------------------------------------------------------------------------- FARMS


def test_farms_small_and_medium_layers():
    torch.manual_seed(0)
    small = nn.Linear(64, 32).weight.detach()
    medium = nn.Linear(400, 200).weight.detach()
    for w in (small, medium):
        assert math.isfinite(farms_alpha([w]))
    # a layer no larger than the shrunk window is one window: FARMS alpha = plain alpha
    assert farms_alpha([small]) == fit_power_law(esd([small]))["alpha"]
    # orientation does not matter
    assert farms_alpha([small.T]) == farms_alpha([small])
    # farms_window=None skips FARMS
    assert math.isnan(spectral_metrics(nn.Linear(64, 32), farms_window=None)[""]["farms_alpha"])


@pytest.mark.parametrize("mu", [1.0, 1.5])
def test_farms_on_heavy_tailed_matrix(mu):
    # iid Pareto entries with tail index mu < 2 give an ESD with power-law tail
    # alpha = 1 + mu/2 (Martin & Mahoney 2021). Measured on 300 x 600, seed 0, 6 x 6 windows:
    # mu=1 -> full 1.457, FARMS 1.470 (theory 1.5); mu=1.5 -> 1.791, 1.821 (theory 1.75);
    # over 4 seeds FARMS stayed within 0.15 of theory.
    w = pareto_entries(300, 600, mu, seed=0)
    farms = farms_alpha([w], window=(100, 200), positions=6)
    assert abs(farms - (1 + mu / 2)) < 0.15
    assert abs(farms - fit_power_law(esd([w]))["alpha"]) < 0.15


# --------------------------------------------------------------------------- WeightWatcher


def test_agrees_with_weightwatcher():
    import weightwatcher as ww  # a test dependency (pyproject: the test extra)
    torch.manual_seed(0)
    heavy = torch.distributions.StudentT(torch.tensor(2.5))
    model = nn.Sequential(  # the last layer's 300 eigenvalues take the pruned KS search
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10), nn.Conv2d(16, 32, 3),
        nn.Linear(600, 300),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(heavy.sample(p.shape) * 0.05)
    ours = spectral_metrics(model, farms_window=None)
    details = ww.WeightWatcher(model=model).analyze()
    compared = 0
    for _, row in details.iterrows():
        mine = ours[row["longname"]]
        assert mine["n_eigs"] == row["num_evals"]
        if row["num_evals"] < 50:  # WeightWatcher uses another estimator below 20 eigenvalues
            continue
        compared += 1
        assert mine["alpha"] == pytest.approx(row["alpha"], abs=1e-9)  # measured: <= 3e-15
        if isinstance(model[int(row["longname"])], nn.Linear):  # WW rescales Conv2d weights
            for key in ("log_norm", "log_spectral_norm", "stable_rank", "alpha_weighted", "log_alpha_norm"):
                assert mine[key] == pytest.approx(row[key], rel=1e-9, abs=1e-12), key
    assert compared == 4
