"""The stored `cka`, `spectral` and `connectivity` values of real zoos against computations
written here, from the stored weights and data only (numpy / plain torch; nothing from
metrics.cka, metrics.spectral or metrics.connectivity is called).

Two zoos, every checkpoint measured (`--epoch all`) and every stored pair, model and layer
checked: the shipped `smoke` zoo (MLPs 64-w-w-10 on digits, no BatchNorm; 4 cells x 2 seeds,
checkpoints 0, 1, 3), its metrics run by `zoo metrics smoke --epoch all --only
cka,spectral,connectivity` into a copy of the session's root, and a BatchNorm CNN zoo written
here (digits as 1x8x8 images, two conv-BN-ReLU blocks of width 4 and 8, one cell x 2 seeds,
checkpoints 0, 3), generated with the debug executor, whose connectivity depends on
re-estimating the BatchNorm statistics at every point of the path.

Not recomputed: FARMS alpha (only its model mean is checked against the stored layer rows) and
the trained Bezier bend (see test_bezier_rows_agree_with_the_linear_endpoints; with
bezier_epochs = 0 the Bezier rows are checked in full against the linear path).

What each family is documented to store (metrics/families.py and the family modules):

* cka (pair): linear CKA ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) of column-centred float64
  features, on the first `samples` test samples, of the logits and of the penultimate
  representation (the input of the last nn.Linear, flattened), the stored float32 models in eval
  mode.
* spectral (model, with per-layer rows in `layer_metrics`): per Linear/Conv2d layer the ESD =
  eigenvalues of W^T W (min(out, in) per matrix; a Conv2d gives one out x in matrix per kernel
  position, pooled), log10 norms, stable rank, entropy (natural log over the eigenvalues > 1e-5,
  normalised by ln r) and the power-law MLE alpha with xmin at the minimum KS distance; per model
  the means over the layers with >= `min_eigenvalues` eigenvalues.
* connectivity (pair): loss and error along the linear path at linspace(0, 1, n_points), BatchNorm
  re-estimated at every point on the training batches; mc = (v0 + v1)/2 - v(t*) with t* the
  interior point farthest from (v0 + v1)/2 (first of ties), barrier = max_t v(t) - max(v0, v1).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import zoo
from generators.launcher import LaunchOptions, generate
from metrics.runner import run_metrics
from zoo.catalog import load_catalog
from zoo.cli import main
from zoo.storage import Store

from ..conftest import REPO

FAMILIES = "cka,spectral,connectivity"
LAYER_KEYS = ("alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "log_alpha_norm", "stable_rank", "entropy",
              "n_eigs", "xmin", "ks_distance")
MEAN_KEYS = ("alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "log_alpha_norm", "stable_rank", "entropy",
             "farms_alpha")
QUANTITIES = [(split, q) for split in ("train", "test") for q in ("loss", "error")]
EPOCHS = {"smoke": [0, 1, 3], "bncnn": [0, 3]}  # the checkpoints, all measured (`--epoch all`)

CNN_ZOO = {
    "description": "BatchNorm CNNs on digits images for tests: one cell, two seeds",
    # 600 training samples: with connectivity batches of 128 the last one is partial (88), so
    # a re-estimation that averaged over samples instead of over batches would show
    "dataset": {"name": "digits", "train_size": 600},
    "architecture": {"name": "cnn", "depth": 2, "batchnorm": True},
    "load": {"name": "width", "values": [4]},
    "temperature": {"name": "batch_size", "values": [32]},
    "seeds": [0, 1],
    "training": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "epochs": 3},
    "checkpoints": [0, 3],
    "metrics": {"connectivity": {"bezier": False}},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here on one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def smoke(smoke_root, tmp_path_factory):
    """A copy of the smoke zoo after `zoo metrics smoke --epoch all --only cka,spectral,connectivity`
    (checkpoints 0, 1 and 3: at initialisation some paths are flat enough that an endpoint lies
    farther from the endpoints' mean than any interior point, which tells mc's interior-only t*
    from a search over all points)."""
    root = tmp_path_factory.mktemp("families-smoke") / "root"
    shutil.copytree(smoke_root, root)
    assert main(["metrics", "smoke", "--root", str(root), "--epoch", "all", "--executor", "debug", "--no-progress",
                 "--jobs-dir", str(root.parent / "jobs"), "--only", FAMILIES]) == 0
    return root


@pytest.fixture(scope="module")
def bncnn(tmp_path_factory):
    """The BatchNorm CNN zoo, generated and measured here (debug executor)."""
    base = tmp_path_factory.mktemp("families-bncnn")
    catalog = base / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"zoos": {"bncnn": CNN_ZOO}}))
    config = load_catalog(catalog)["bncnn"]
    store = Store(base / "root", create=True)
    report = generate(config, store, LaunchOptions(executor="debug", jobs_dir=base / "jobs"), progress=False)
    assert report.trained == 2 and not report.failed
    report = run_metrics(config, store, FAMILIES.split(","), "all",
                         LaunchOptions(executor="debug", jobs_dir=base / "metrics-jobs"), progress=False)
    assert not report.failed_jobs and not report.failed and not report.warnings
    return store.root


@pytest.fixture(params=["smoke", "bncnn"])
def root(request):
    return request.getfixturevalue(request.param)


def _pairs(z, family: str) -> dict[tuple[str, str, int], tuple[dict[str, float], dict]]:
    """{(model_a, model_b, epoch): ({name: value}, recorded settings)} of a pair family."""
    rows = z.sql("select model_a, model_b, epoch, name, value, settings from pair_metrics where family = ?", [family])
    out = {}
    for (a, b, epoch), group in rows.groupby(["model_a", "model_b", "epoch"]):
        recorded = {json.dumps(json.loads(s)["settings"], sort_keys=True) for s in group["settings"]}
        assert len(recorded) == 1
        out[(a, b, int(epoch))] = (dict(zip(group["name"], group["value"])), json.loads(recorded.pop()))
    # one pair per cell (two seeds per cell, in seed order) and checkpoint
    models = z.models()
    cells = models.groupby(["zoo", "load", "temperature"])["model_id"].apply(list)
    assert all(len(ids) == 2 for ids in cells)
    assert sorted(out) == sorted((ids[0], ids[1], e) for ids in cells for e in EPOCHS[models.zoo.iloc[0]])
    return out


def _close(stored: float, expected: float, rel: float, abs_: float = 0.0) -> bool:
    """pytest.approx, with NaN equal to NaN and infinities equal to themselves."""
    if np.isnan(expected) or np.isnan(stored):
        return bool(np.isnan(expected) and np.isnan(stored))
    return stored == pytest.approx(expected, rel=rel, abs=abs_)


# --- CKA -----------------------------------------------------------------------------------


def _features(model: nn.Sequential, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(logits, penultimate) in float64: the penultimate representation is the output of the
    module that feeds the final nn.Linear (the last ReLU of an MLP, the Flatten after a CNN's
    global pooling), captured by a forward hook; the stored float32 model runs in eval mode."""
    assert isinstance(model, nn.Sequential) and isinstance(model[-1], nn.Linear)
    # (no Linear nested in a submodule: model[-1] is the last Linear in modules() order)
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == sum(isinstance(m, nn.Linear) for m in model)
    captured = []
    handle = model[-2].register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        model.eval()
        with torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
    (penultimate,) = captured
    assert penultimate.shape == (len(x), model[-1].in_features)
    return logits.double().numpy(), penultimate.reshape(len(x), -1).double().numpy()


def _linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_cka_matches_linear_cka_of_hooked_features(root):
    z = zoo.open(root)
    for (a, b, epoch), (values, settings) in _pairs(z, "cka").items():
        assert settings == {"samples": 1280, "batch_size": 1024}
        x = z.data(a).x_test[: settings["samples"]]
        assert len(x) == 360 and values["cka_samples"] == len(x)  # digits: 360 test samples in all
        fa, pa = _features(z.load_model(a, epoch), x)
        fb, pb = _features(z.load_model(b, epoch), x)
        # Both sides compute the same float32 forward pass (one batch: 360 < 1024) and the formula
        # in float64, so they agree to float64 rounding of the sums (seen: 2e-15 relative); 1e-5
        # also leaves room for a run on a GPU (float32 features rounded differently, ~1e-7
        # relative, moving CKA by ~1e-6 at most), and is far below any difference of definition
        # (uncentred features, the pre-activation layer, train mode move CKA by > 1e-2 here).
        assert values["cka_logits"] == pytest.approx(_linear_cka(fa, fb), rel=1e-5)
        assert values["cka_penultimate"] == pytest.approx(_linear_cka(pa, pb), rel=1e-5)
        assert 0 < values["cka_logits"] < 1 and 0 < values["cka_penultimate"] < 1


# --- spectral ------------------------------------------------------------------------------


def _esd(weight: np.ndarray) -> np.ndarray:
    """Eigenvalues of W^T W: squared singular values (float64 SVD, not a Gram matrix), min(out,
    in) per matrix; a conv weight (out, in, kh, kw) gives one out x in matrix per kernel position,
    their spectra pooled."""
    w = weight.astype(np.float64)
    matrices = [w] if w.ndim == 2 else [w[:, :, i, j] for i in range(w.shape[2]) for j in range(w.shape[3])]
    return np.sort(np.concatenate([np.linalg.svd(m, compute_uv=False) ** 2 for m in matrices]))


def _power_law(eigs: np.ndarray) -> tuple[float, float, float]:
    """(alpha, xmin, KS distance): continuous power-law MLE over the eigenvalues > 1e-5, xmin the
    candidate (every value but the largest) of least KS distance max_j |F(t_j) - j/n| over the
    tail t_0 <= ... <= t_{n-1} (the empirical CDF just below each point, the convention the family
    documents), first of ties; candidates whose tail has no spread are skipped."""
    x = np.sort(eigs[eigs > 1e-5])
    best = (np.inf, np.nan, np.nan)
    for k in range(len(x) - 1):
        tail = x[k:]
        n = len(tail)
        spread = np.sum(np.log(tail / x[k]))
        if spread <= 0:
            continue
        alpha = 1.0 + n / spread
        cdf = 1.0 - (tail / x[k]) ** (1.0 - alpha)
        ks = np.max(np.abs(cdf - np.arange(n) / n))
        if ks < best[0]:
            best = (ks, alpha, x[k])
    return best[1], best[2], best[0]


def _layer_metrics(eigs: np.ndarray) -> dict[str, float]:
    alpha, xmin, ks = _power_law(eigs)
    top, total = eigs.max(), eigs.sum()
    usable = eigs[eigs > 1e-5]
    p = usable / usable.sum()
    return {
        "alpha": alpha, "xmin": xmin, "ks_distance": ks,
        "alpha_weighted": alpha * np.log10(top),
        "log_norm": np.log10(total),  # log10 ||W||_F^2
        "log_spectral_norm": np.log10(top),
        "log_alpha_norm": np.log10(np.sum(eigs**alpha)),
        "stable_rank": total / top,
        "entropy": -np.sum(p * np.log(p)) / np.log(len(usable)) if len(usable) >= 2 else np.nan,
        "n_eigs": float(len(eigs)),
    }


def test_spectral_layers_and_means_match_numpy(root):
    z = zoo.open(root)
    models = z.models()
    layers = z.sql("select model_id, epoch, layer, name, value from layer_metrics where family = 'spectral'")
    means = z.sql("select model_id, epoch, name, value, settings from metrics where family = 'spectral'")
    measured = {(m, e) for m in models.model_id for e in EPOCHS[models.zoo.iloc[0]]}
    assert set(zip(layers.model_id, layers.epoch)) == set(zip(means.model_id, means.epoch)) == measured
    n_fitted = 0
    for model_id, epoch in sorted(measured):
        mine = means[(means.model_id == model_id) & (means.epoch == epoch)]
        settings = json.loads(mine.settings.iloc[0])["settings"]
        assert settings["min_eigenvalues"] == 20
        stored_means = dict(zip(mine.name, mine.value))
        assert len(stored_means) == len(mine)
        stored = layers[(layers.model_id == model_id) & (layers.epoch == epoch)]
        model = z.load_model(model_id, epoch)
        expected = {name: _layer_metrics(_esd(m.weight.detach().numpy()))
                    for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        assert set(stored.layer) == set(expected)  # every Linear and Conv2d layer, no other
        for layer, exp in expected.items():
            rows = stored[stored.layer == layer]
            got = dict(zip(rows.name, rows.value))
            assert len(got) == len(rows) and set(got) == set(LAYER_KEYS) | {"farms_alpha"}
            for key in LAYER_KEYS:
                # both sides take float64 spectra of the same float32 weights (the family by Gram
                # matrices, here by SVD): eigenvalues agree to ~k eps lambda_max, every derived
                # value to ~1e-13 (seen: <= 1e-12 relative, log_alpha_norm); 1e-8 leaves margin
                # for other BLAS/LAPACK builds yet catches any change of convention (log base,
                # normalisation, threshold, KS convention or xmin candidate all move values by
                # orders of magnitude more)
                assert _close(got[key], float(exp[key]), rel=1e-8, abs_=1e-12), (model_id, epoch, layer, key, got[key], exp[key])
        fitted = [layer for layer, exp in expected.items() if exp["n_eigs"] >= settings["min_eigenvalues"]]
        n_fitted += len(fitted)
        assert stored_means["n_layers_fitted"] == len(fitted)
        for key in MEAN_KEYS:
            # farms_alpha is not recomputed here: its model mean is checked against its stored rows
            values = [float(stored[(stored.layer == layer) & (stored.name == key)].value.iloc[0]) if key == "farms_alpha"
                      else expected[layer][key] for layer in fitted]
            assert _close(stored_means[f"{key}_mean"], float(np.mean(values)) if values else np.nan, rel=1e-8, abs_=1e-12)
    assert n_fitted > 0  # some layer of the zoo is large enough to enter the means


# --- connectivity --------------------------------------------------------------------------


def _batches(x, y, n, batch_size):
    n = len(x) if n is None else min(n, len(x))
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


def _reestimate_batchnorm(model: nn.Module, train) -> None:
    """Fresh running statistics, each the plain average over the training batches (momentum
    None: cumulative average of the per-batch mean and unbiased variance)."""
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for x, _ in train:
            model(x)
    model.eval()


def _loss_and_error(model: nn.Module, batches) -> tuple[float, float]:
    model.eval()
    loss, wrong, count = 0.0, 0, 0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x)
            loss += float(F.cross_entropy(logits.double(), y, reduction="sum"))
            wrong += int((logits.argmax(dim=1) != y).sum())
            count += len(y)
    return loss / count, wrong / count


def _linear_path(z, a: str, b: str, epoch: int, settings: dict) -> dict[str, np.ndarray]:
    """{'train_loss': v(t), ...} along (1 - t) a + t b, t in linspace(0, 1, n_points), between the
    two models' states at `epoch`."""
    data = z.data(a)
    train = _batches(data.x_train, data.y_train, settings["train_samples"], settings["batch_size"])
    test = _batches(data.x_test, data.y_test, settings["test_samples"], settings["batch_size"])
    sd_a, sd_b = z.load_model(a, epoch).state_dict(), z.load_model(b, epoch).state_dict()
    work = z.load_model(a, epoch)
    curve = {f"{split}_{q}": [] for split, q in QUANTITIES}
    for t in np.linspace(0.0, 1.0, settings["n_points"]):
        t = float(t)
        # float tensors interpolated; integer buffers (num_batches_tracked, reset below) from a
        work.load_state_dict({k: (1 - t) * v + t * sd_b[k] if v.is_floating_point() else v for k, v in sd_a.items()})
        _reestimate_batchnorm(work, train)
        for split, batches in (("train", train), ("test", test)):
            loss, error = _loss_and_error(work, batches)
            curve[f"{split}_loss"].append(loss)
            curve[f"{split}_error"].append(error)
    return {k: np.array(v) for k, v in curve.items()}


def _mc(v: np.ndarray, interior_only: bool = True) -> float:
    reference = (v[0] + v[-1]) / 2
    candidates = v[1:-1] if interior_only else v
    return float(reference - candidates[np.argmax(np.abs(candidates - reference))])


def _barrier(v: np.ndarray) -> float:
    return float(v.max() - max(v[0], v[-1]))


def _tolerance(quantity: str) -> float:
    # the same float32 forward passes on the same batches: logits are bitwise those of the family,
    # so errors (counts / N) agree exactly and losses to the float32 accumulation of the family's
    # per-batch sums (~1e-7 relative of losses ~0.1-2.5; seen: <= 3e-7 absolute); 1e-5 absolute
    # covers that with margin, while one misclassified sample moves an error by >= 1/1437 ~ 7e-4
    # and skipping the BatchNorm re-estimation moves the CNN's losses by 0.02 (initialisation) to
    # 0.5 (trained)
    return 1e-5 if quantity == "loss" else 1e-9


_PATHS: dict = {}


def _stored_linear(root):
    """[(a, b, epoch, stored values, recorded settings, recomputed linear path)] of the zoo's pairs."""
    if root not in _PATHS:
        z = zoo.open(root)
        _PATHS[root] = [(a, b, epoch, values, settings, _linear_path(z, a, b, epoch, settings))
                        for (a, b, epoch), (values, settings) in _pairs(z, "connectivity").items()]
    return _PATHS[root]


def test_linear_connectivity_matches_a_recomputed_path(root):
    z = zoo.open(root)
    endpoint_t_star = 0  # quantities whose all-points t* would be an endpoint (and give another mc)
    for a, b, epoch, values, settings, curve in _stored_linear(root):
        batchnorm = any(isinstance(m, nn.BatchNorm2d) for m in z.load_model(a).modules())
        assert settings["n_points"] == 5 and settings["batch_size"] == 128
        assert settings["train_samples"] is None and settings["test_samples"] is None
        assert settings["bezier"] is (not batchnorm)
        names = {f"{kind}_{path}_{split}_{q}" for kind in ("mc", "barrier") for path in ("linear", "bezier")
                 for split, q in QUANTITIES if path == "linear" or settings["bezier"]}
        assert set(values) == names
        for split, q in QUANTITIES:
            v = curve[f"{split}_{q}"]
            assert values[f"mc_linear_{split}_{q}"] == pytest.approx(_mc(v), abs=_tolerance(q)), (a, b, split, q, v)
            assert values[f"barrier_linear_{split}_{q}"] == pytest.approx(_barrier(v), abs=_tolerance(q)), (a, b, split, q, v)
            endpoint_t_star += abs(_mc(v, interior_only=False) - _mc(v)) > 10 * _tolerance(q)
        if not batchnorm:
            # without BatchNorm the endpoints are the stored models themselves: their test values
            # are the stored curves at that epoch (zoo.evaluation, batches of 2048)
            for model_id, k in ((a, 0), (b, -1)):
                c = z.sql("select test_loss, test_acc from curves where model_id = ? and epoch = ?",
                          [model_id, epoch]).iloc[0]
                assert curve["test_loss"][k] == pytest.approx(c.test_loss, abs=1e-5)
                assert curve["test_error"][k] == pytest.approx(1 - c.test_acc, abs=1e-9)
    if z.models().zoo.iloc[0] == "smoke":
        # the smoke zoo at initialisation has paths where the published all-points t* is an
        # endpoint: there the stored mc is the interior-only one the family documents
        assert endpoint_t_star > 0


def test_batchnorm_reestimation_matters_for_the_cnn(bncnn):
    """The CNN check above is sensitive to the re-estimation: with the stored models' own running
    statistics interpolated instead, the path's losses differ from the stored ones' path."""
    z = zoo.open(bncnn)
    ((a, b, epoch, values, settings, curve),) = [p for p in _stored_linear(bncnn) if p[2] == EPOCHS["bncnn"][-1]]
    data = z.data(a)
    test = _batches(data.x_test, data.y_test, None, settings["batch_size"])
    sd_a, sd_b = z.load_model(a, epoch).state_dict(), z.load_model(b, epoch).state_dict()
    work = z.load_model(a, epoch)
    work.load_state_dict({k: 0.5 * v + 0.5 * sd_b[k] if v.is_floating_point() else v for k, v in sd_a.items()})
    assert abs(_loss_and_error(work, test)[0] - curve["test_loss"][2]) > 1e-2


def test_bezier_rows_agree_with_the_linear_endpoints(smoke):
    """The trained Bezier bend is not recomputed here (that would re-implement the family's
    training loop and its seeded stream of t draws); what depends only on the endpoints is
    checked. The curve passes through both stored models, so its endpoint values are the linear
    path's v0, v1 (recomputed above), and each stored mc / barrier must be (v0+v1)/2 or max(v0,
    v1) shifted to an interior value of the curve: an error rate a multiple of 1/N, a positive
    loss; the peak is no farther from (v0+v1)/2 than v(t*) is; no barrier means no interior
    value above max(v0, v1)."""
    z = zoo.open(smoke)
    for a, b, epoch, values, settings, curve in _stored_linear(smoke):
        sizes = {"train": len(z.data(a).x_train), "test": len(z.data(a).x_test)}
        for split, q in QUANTITIES:
            v = curve[f"{split}_{q}"]
            reference, worse = (v[0] + v[-1]) / 2, max(v[0], v[-1])
            at_t_star = reference - values[f"mc_bezier_{split}_{q}"]
            barrier = values[f"barrier_bezier_{split}_{q}"]
            assert barrier >= 0
            peak = worse + barrier  # the largest interior value when barrier > 0
            if barrier == 0:
                assert at_t_star <= worse + _tolerance(q)
            else:
                assert abs(at_t_star - reference) >= abs(peak - reference) - _tolerance(q)
            if q == "error":
                for value in (at_t_star, peak):
                    count = value * sizes[split]
                    assert 0 <= value <= 1 and count == pytest.approx(round(count), abs=1e-6), (split, value)
            else:
                assert at_t_star > 0


def test_bezier_without_training_is_the_linear_path(smoke, tmp_path):
    """With bezier_epochs = 0 the bend stays at (a + b) / 2 and the quadratic curve is the linear
    path: its stored values must equal the linear path recomputed here (up to the float32
    rounding of the two formulas for the same point: an error may move by one sample)."""
    root = tmp_path / "root"
    shutil.copytree(smoke, root)
    config = load_catalog(REPO / "catalog.yaml")["smoke"].model_copy(
        update={"metrics": {"connectivity": {"bezier_epochs": 0}}})
    report = run_metrics(config, Store(root), ["connectivity"], "final",
                         LaunchOptions(executor="debug", jobs_dir=tmp_path / "jobs"), progress=False)
    assert not report.failed_jobs and not report.failed and report.computed == 4
    z = zoo.open(root)
    rows = z.sql("select model_a, model_b, name, value from pair_metrics where family = 'connectivity' "
                 "and epoch = 3 and json_extract(settings, '$.settings.bezier_epochs')::int = 0")
    assert len(rows) == 4 * 16
    for a, b, epoch, _, settings, curve in _stored_linear(smoke):
        if epoch != EPOCHS["smoke"][-1]:
            continue
        values = rows[(rows.model_a == a) & (rows.model_b == b)].set_index("name")["value"]
        n = len(z.data(a).x_test)
        for split, q in QUANTITIES:
            v = curve[f"{split}_{q}"]
            tol = 1e-5 if q == "loss" else 2.0 / n
            assert values[f"mc_bezier_{split}_{q}"] == pytest.approx(_mc(v), abs=tol)
            assert values[f"barrier_bezier_{split}_{q}"] == pytest.approx(_barrier(v), abs=tol)
