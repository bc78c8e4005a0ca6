"""The stored Hessian metrics of the `smoke` zoo against the exact Hessian, model by model.

The exact values are written here: ``torch.func.hessian`` of the mean cross-entropy, in float64,
of each stored final model on the same first-n samples the metric records
(``hessian_samples_*``); its trace, and its top eigenvalue by ``scipy.sparse.linalg.eigsh``.
The width-8 models (682 parameters) run by default; the width-32 ones (3,466 parameters: about
a minute of exact Hessian each on a loaded 2-core machine) are marked slow.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
import torch.nn.functional as F
from torch.func import functional_call

import zoo
from metrics import hessian
from metrics.families import FAMILIES, ModelContext
from metrics.runner import run_metrics
from zoo.catalog import load_catalog
from zoo.launch import LaunchOptions
from zoo.storage import Store

from ..conftest import REPO

# krylov-unbatched: the default method with every block's products taken one by one through the
# kept gradient graph (metrics.hessian.UNBATCHED_FROM, which these small models stay under)
METHODS = {"krylov": {}, "krylov-unbatched": {}, "lanczos": {"method": "lanczos"}}
_EXACT: dict = {}


@pytest.fixture(scope="module")
def stored(smoke_root, tmp_path_factory):
    """{method: (root, metrics table)} after `zoo metrics --only hessian` with each method."""
    out = {}
    for method, settings in METHODS.items():
        root = tmp_path_factory.mktemp(f"hessian-{method}") / "root"
        shutil.copytree(smoke_root, root)
        config = load_catalog(REPO / "catalog.yaml")["smoke"].model_copy(update={"metrics": {"hessian": settings}})
        with pytest.MonkeyPatch.context() as patch:  # (the debug executor computes in this process)
            if method == "krylov-unbatched":
                patch.setattr(hessian, "UNBATCHED_FROM", 0)
            report = run_metrics(config, Store(root, create=True), ["hessian"], "final",
                                 LaunchOptions(executor="debug", jobs_dir=root.parent / "jobs"), progress=False)
        assert not report.failed_jobs and not report.warnings
        out[method] = (root, zoo.open(root).sql("select model_id, name, value from metrics where family = 'hessian'"))
    return out


def _exact(z, model_id: str, split: str, n: int) -> tuple[float, float, np.ndarray]:
    """(trace, top eigenvalue, H) of the float64 loss Hessian on the first n samples of split."""
    key = (model_id, split, n)
    if key not in _EXACT:
        model = z.load_model(model_id).double().eval()
        data = z.data(model_id)
        x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
        x, y = x[:n].double(), y[:n]
        names = [name for name, _ in model.named_parameters()]
        shapes = [p.shape for p in model.parameters()]
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

        def loss(theta):
            pieces = theta.split([s.numel() for s in shapes])
            return F.cross_entropy(functional_call(model, {k: t.view(s) for k, t, s in zip(names, pieces, shapes)}, (x,)), y)

        hess = torch.func.hessian(loss)(flat).numpy()
        top = scipy.sparse.linalg.eigsh(hess, k=1, which="LA", tol=1e-12)[0][0]
        _EXACT[key] = (float(np.trace(hess)), float(top), hess)
    return _EXACT[key]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here on one thread (conftest.one_thread)."""


@pytest.mark.parametrize("width", [8, pytest.param(32, marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", list(METHODS))
def test_stored_trace_and_top_eigenvalue_match_the_exact_hessian(stored, method, width):
    root, rows = stored[method]
    z = zoo.open(root)
    models = z.models()
    ids = list(models[models["load"] == width]["model_id"])
    assert len(ids) == 4
    for model_id in ids:
        v = rows[rows.model_id == model_id].set_index("name")["value"]
        for split in ("train", "test"):
            n = int(v[f"hessian_samples_{split}"])
            assert n == (640 if split == "train" else 360)  # digits: 360 test samples in all
            trace, top, _ = _exact(z, model_id, split, n)
            # the trace is exact for these piecewise-linear models (stderr 0), to float32 rounding
            assert v[f"hessian_trace_stderr_{split}"] == 0 and v[f"hessian_trace_probes_{split}"] == 0
            assert v[f"hessian_trace_{split}"] == pytest.approx(trace, rel=1e-5)
            # the issue asks for 0.5%; the residual bound holds and the value is far closer
            eig, residual = v[f"hessian_top_eig_{split}"], v[f"hessian_top_eig_stderr_{split}"]
            assert eig == pytest.approx(top, rel=5e-3)
            assert abs(eig - top) <= residual + 1e-5 * top
            assert eig <= top * (1 + 1e-5)  # a Ritz value is below the top eigenvalue


def test_stored_density_weights_and_first_moment(stored, smoke_root):
    """Each stored density's weights sum to 1, and P times its first moment is a Hutchinson
    estimate of tr(H) with `density_probes` (1) Rademacher probes: unbiased, with standard
    deviation sigma = sqrt(2 (||H||_F^2 - sum_i H_ii^2) / density_probes) (computed here from the
    exact Hessian). Every smoke model's value lies within 4 sigma of the exact trace, and their
    standardised errors average near 0 (no shared bias: each model has its own probe)."""
    root, _ = stored["krylov"]
    z = zoo.open(root)
    dens = z.sql("select model_id, eigenvalue, weight from densities where split = 'train'")
    models = z.models()
    standardised = []
    for model_id in models[models["load"] == 8]["model_id"]:
        d = dens[dens.model_id == model_id]
        assert d["weight"].sum() == pytest.approx(1.0, abs=1e-9)
        trace, top, hess = _exact(z, model_id, "train", 640)
        n_params = hess.shape[0]
        sigma = np.sqrt(2 * (np.sum(hess**2) - np.sum(np.diag(hess) ** 2)))
        implied = n_params * float((d["eigenvalue"] * d["weight"]).sum())
        assert abs(implied - trace) <= 4 * sigma
        assert d["eigenvalue"].max() <= top * (1 + 1e-4)
        standardised.append((implied - trace) / sigma)
    assert abs(np.mean(standardised)) < 4 / np.sqrt(len(standardised))


def _twin_contexts(smoke_root, model_id):
    """Two contexts holding the same stored model and data under different model ids."""
    z = zoo.open(smoke_root)
    model, data = z.load_model(model_id), z.data(model_id)
    contexts = []
    for name in (model_id, model_id + "-twin"):
        ctx = ModelContext(z, name, 3)
        ctx.__dict__.update(model=model, placed=model, data=data)  # fills the cached properties
        contexts.append(ctx)
    return contexts


@pytest.mark.parametrize("method", ["krylov", "lanczos", "pyhessian"])
def test_probe_streams_differ_between_models_and_repeat_on_rerun(smoke_root, method):
    """The same weights under two model ids get different probes (so different stochastic
    traces and densities), and a rerun gives bit-identical values."""
    z = zoo.open(smoke_root)
    models = z.models()
    model_id = models[models["load"] == 8]["model_id"].iloc[0]
    family = FAMILIES["hessian"]
    settings = family.resolve({"method": method, "trace_exact_max_params": 0, "train_samples": 128,
                               "test_samples": 128, "trace_max_probes": 20, "max_iter": 20})
    first = family.compute(_twin_contexts(smoke_root, model_id), settings)
    again = family.compute(_twin_contexts(smoke_root, model_id), settings)
    assert [r.metrics for r in first] == [r.metrics for r in again]
    assert [r.densities for r in first] == [r.densities for r in again]
    a, b = first
    assert a.metrics["hessian_trace_train"] != b.metrics["hessian_trace_train"]
    assert a.metrics["hessian_trace_stderr_train"] > 0 and b.metrics["hessian_trace_stderr_train"] > 0
    assert a.densities != b.densities
