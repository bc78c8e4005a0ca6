"""`zoo metrics`, `zoo phases`, `zoo plot` on stored zoos: exactness, resumption, bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import zoo
from metrics.hessian import exact_hessian
from metrics.phases import PhaseRules, label
from metrics.runner import run_metrics
from zoo.catalog import load_catalog, parse_zoo
from zoo.cli import main
from zoo.errors import ZooError
from zoo.launch import LaunchOptions
from zoo.matrices import write_matrices
from zoo.weights import sha256
from zoo.storage import Store

from .conftest import REPO

CHEAP = {
    "hessian": {"max_iter": 20, "density_iter": 8, "train_samples": 128, "test_samples": 128},
    "connectivity": {"bezier_epochs": 2},
    "spectral": {"farms_window": [8, 16]},
}


def smoke_with(metrics: dict):
    return load_catalog(REPO / "catalog.yaml")["smoke"].model_copy(update={"metrics": metrics})


@pytest.fixture(scope="module")
def metrics_root(smoke_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics") / "root"
    shutil.copytree(smoke_root, root)
    store = Store(root, create=True)
    report = run_metrics(smoke_with(CHEAP), store, None, "final", LaunchOptions(executor="debug", jobs_dir=root.parent / "jobs"), progress=False)
    assert not report.failed_jobs and not report.warnings
    return root


def test_every_family_is_stored_with_its_settings(metrics_root):
    z = zoo.open(metrics_root)
    families = z.sql("select family, count(distinct model_id) n from metrics group by all").set_index("family")["n"]
    assert families.to_dict() == {"performance": 8, "hessian": 8, "spectral": 8, "weightspace": 8}
    pairs = z.sql("select family, count(distinct model_a || model_b) n from pair_metrics group by all").set_index("family")["n"]
    assert pairs.to_dict() == {"cka": 4, "connectivity": 4}  # 4 cells x 1 seed pair
    settings = z.sql("select distinct settings from metrics where family = 'hessian'")["settings"]
    assert len(settings) == 1 and '"max_iter": 20' in settings[0] and '"torch"' in settings[0] and '"pyhessian"' in settings[0]
    layers = z.sql("select distinct layer from layer_metrics where family = 'spectral'")["layer"]
    assert sorted(layers) == ["1", "3", "5"]
    density = z.sql("select model_id, sum(weight) w from densities group by all")
    assert len(density) == 8 and np.allclose(density["w"], 1.0)


def test_performance_family_equals_the_curves(metrics_root):
    z = zoo.open(metrics_root)
    joined = z.sql(
        """select c.train_loss, c.train_acc - c.test_acc as gap, p.name, p.value
           from metrics p join models m using (model_id) join curves c on c.model_id = m.model_id and c.epoch = m.epochs
           where p.family = 'performance' and p.name in ('train_loss', 'gap')"""
    )
    for row in joined.itertuples(index=False):
        assert row.value == (row.train_loss if row.name == "train_loss" else row.gap)


def test_rerun_skips_and_new_settings_replace_old_results(metrics_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(metrics_root, root)
    store = Store(root)
    options = LaunchOptions(executor="debug", jobs_dir=tmp_path / "jobs")
    again = run_metrics(smoke_with(CHEAP), store, ["performance", "cka"], "final", options, progress=False)
    assert again.computed == 0 and again.skipped == 8 + 4
    changed = run_metrics(smoke_with({**CHEAP, "cka": {"samples": 100}}), store, ["cka"], "final", options, progress=False)
    assert changed.computed == 4
    rows = zoo.open(root).sql("select name, value, settings from pair_metrics where family = 'cka'")
    assert len(rows) == 4 * 3 and (rows[rows.name == "cka_samples"]["value"] == 100).all()


def test_stored_hessian_matches_the_exact_hessian(tmp_path):
    body = {
        "description": "exact hessian check", "dataset": {"name": "digits", "train_size": 300},
        "architecture": {"name": "mlp", "width": 6}, "load": {"name": "width", "values": [6]},
        "temperature": {"name": "batch_size", "values": [32]}, "seeds": [0], "training": {"lr": 0.05, "epochs": 4},
        "checkpoints": [0, 4],
        "metrics": {"hessian": {"train_samples": 96, "batch_size": 32, "density": False}},  # default method
    }
    config = parse_zoo("exact", body)
    from generators.launcher import generate

    store = Store(tmp_path / "r", create=True)
    options = LaunchOptions(executor="debug", jobs_dir=tmp_path / "jobs")
    generate(config, store, options, progress=False)
    run_metrics(config, store, ["hessian"], "final", options, progress=False)
    z = zoo.open(tmp_path / "r")
    model_id = z.models()["model_id"][0]
    stored = z.sql("select name, value from metrics where family = 'hessian'").set_index("name")["value"]
    assert stored["hessian_samples_train"] == 96

    model, data = z.load_model(model_id), z.data(model_id)
    exact = exact_hessian(model, data.x_train[:96], data.y_train[:96])
    eigenvalues = torch.linalg.eigvalsh(exact)
    assert stored["hessian_top_eig_train"] == pytest.approx(float(eigenvalues[-1]), rel=1e-3)
    assert abs(stored["hessian_top_eig_train"] - float(eigenvalues[-1])) <= stored["hessian_top_eig_stderr_train"] + 1e-6
    # a small ReLU MLP: the exact trace, with a zero error bar
    assert stored["hessian_trace_train"] == pytest.approx(float(torch.trace(exact)), rel=1e-5)
    assert stored["hessian_trace_stderr_train"] == 0


def test_nan_weights_give_nan_rows_and_a_warning(smoke_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(smoke_root, root)
    z = zoo.open(root)
    model_id = z.models()["model_id"][0]
    [part] = [p for p in Store(root).zoo_dir("checkpoints", "smoke").glob("pack-*.parquet")  # (one per trained stack)
              if model_id in pq.read_table(p, columns=["model_id"]).column("model_id").to_pylist()]
    table = pq.read_table(part)
    weights = [np.full(len(w), np.nan, dtype=np.float32) if m == model_id else w
               for m, w in zip(table.column("model_id").to_pylist(), table.column("weights").to_pylist())]
    table = table.set_column(table.schema.get_field_index("weights"), "weights", pa.array(weights, pa.list_(pa.float32())))
    hashes = [sha256(np.asarray(w, dtype=np.float32)) for w in weights]  # (a model that diverged records its NaNs' hash)
    table = table.set_column(table.schema.get_field_index("sha256"), "sha256", pa.array(hashes))
    pq.write_table(table, part)
    write_matrices(part.with_suffix(".safetensors"), table)  # the pack's N x P copy, as Store.pack writes it
    report = run_metrics(smoke_with(CHEAP), Store(root, create=True), ["spectral", "hessian", "cka"], "final",
                         LaunchOptions(executor="debug", jobs_dir=tmp_path / "jobs"), progress=False)
    assert any("non-finite" in w and model_id in w for w in report.warnings)
    values = zoo.open(root).sql("select family, value from metrics where model_id = ?", [model_id])
    assert set(values["family"]) == {"spectral", "hessian"} and values["value"].isna().all()
    others = zoo.open(root).sql("select value from metrics where model_id <> ? and family = 'hessian' and name = 'hessian_trace_train'", [model_id])
    assert len(others) == 7 and others["value"].notna().all()


def test_bad_input_is_a_clear_error(smoke_root, tmp_path, capsys):
    empty = tmp_path / "empty"
    Store(empty, create=True).write_index()
    assert main(["metrics", "smoke", "--root", str(empty), "--executor", "debug"]) == 2
    assert "no stored models" in capsys.readouterr().err
    assert main(["metrics", "smoke", "--root", str(smoke_root), "--only", "hessian,magic"]) == 2
    err = capsys.readouterr().err
    assert "'magic'" in err and "hessian" in err and "connectivity" in err
    assert main(["metrics", "smoke", "--root", str(smoke_root), "--epoch", "2"]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    with pytest.raises(ZooError, match="metrics.hessain: unknown metric family"):
        run_metrics(smoke_with({"hessain": {}}), Store(smoke_root), None, "final", LaunchOptions(executor="debug"))
    with pytest.raises(ZooError, match="metrics.hessian.max_iterr: unknown field"):
        run_metrics(smoke_with({"hessian": {"max_iterr": 3}}), Store(smoke_root), None, "final", LaunchOptions(executor="debug"))


@pytest.mark.parametrize(
    "loss, mc, cka, phase",
    [(1.2, -0.2, 0.5, "I"), (1.2, 0.2, 0.5, "II"), (0.01, -0.2, 0.99, "III"), (0.01, 0.0, 0.5, "IV-A"), (0.01, 0.01, 0.99, "IV-B")],
)
def test_phase_rules_on_hand_made_values(loss, mc, cka, phase):
    assert label(loss, mc, cka, PhaseRules())[0] == phase


def test_phase_margin_shrinks_near_a_boundary():
    rules = PhaseRules(loss_threshold=0.5, mc_tolerance=0.05)
    far, near = label(0.01, -0.5, 0.99, rules), label(0.01, -0.051, 0.99, rules)
    assert far[0] == near[0] == "III" and near[1] < 0.05 < far[1]
    assert label(float("nan"), 0.0, 0.9, rules)[0] is None


def test_phases_and_plots_from_the_cli(metrics_root, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(metrics_root, root)
    assert main(["phases", "smoke", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "width" in out and "cells per phase" in out
    cells = zoo.open(root).sql("select * from cells")
    assert len(cells) == 4 and set(cells["phase"]) <= {"I", "II", "III", "IV-A", "IV-B"}
    assert {"phase_margin", "phase_agreement", "train_loss", "hessian_top_eig_train", "cka_logits"} <= set(cells.columns)
    for metric, suffix in (("hessian_trace_train", "png"), ("mc_linear_train_error", "svg")):
        out_file = tmp_path / f"d.{suffix}"
        assert main(["plot", "smoke", "--root", str(root), "--metric", metric, "--phases", "--out", str(out_file)]) == 0
        assert out_file.stat().st_size > 1000
    capsys.readouterr()
    assert main(["plot", "smoke", "--root", str(root), "--metric", "beauty", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "unknown metric 'beauty'" in err and "hessian_trace_train" in err


def test_every_checkpoint_with_epoch_all(smoke_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(smoke_root, root)
    report = run_metrics(smoke_with(CHEAP), Store(root, create=True), ["performance", "weightspace"], "all",
                         LaunchOptions(executor="debug", jobs_dir=tmp_path / "jobs"), progress=False)
    assert report.computed == 2 * 8 * 3
    rows = zoo.open(root).sql("select epoch, name, value from metrics where family = 'weightspace' and name = 'dist_init_l2'")
    assert sorted(set(rows["epoch"])) == [0, 1, 3]
    assert (rows[rows.epoch == 0]["value"] == 0).all() and (rows[rows.epoch == 3]["value"] > 0).all()


def test_the_fast_hessian_path_agrees_with_pyhessian_on_every_smoke_model(smoke_root):
    from metrics.hessian import hessian_top_eigenvalues, hessian_trace, krylov_top_eigenvalues_and_trace

    z = zoo.open(smoke_root)
    for model_id in z.models()["model_id"]:
        model, data = z.load_model(model_id), z.data(model_id)
        batches = [(data.x_train[:128], data.y_train[:128])]
        fast = krylov_top_eigenvalues_and_trace(model, batches)
        # pyhessian run to convergence (its defaults stop early: see ../shared/reference/performance.md)
        top = hessian_top_eigenvalues(model, batches, max_iter=500, tol=1e-7).eigenvalues[0]
        trace = hessian_trace(model, batches, max_iter=400, tol=0.0)
        assert fast.eigenvalues[0] == pytest.approx(top, rel=0.01)
        # Hutchinson with 400 probes: a few percent of standard error
        assert fast.trace == pytest.approx(trace.trace, rel=0.1)


def test_stored_cka_matches_an_independent_hsic_computation(metrics_root):
    """Linear CKA as HSIC with centring matrices (Kornblith et al. 2019, eq. 2 with linear
    kernels K = X X^T), in float64, of the stored models' logits and penultimate activations
    (the input of the last Linear, taken by slicing the Sequential) on the first test samples."""
    z = zoo.open(metrics_root)
    rows = z.sql("select model_a, model_b, name, value from pair_metrics where family = 'cka'")
    assert len(rows) == 4 * 3

    def cka(x, y):
        n = len(x)
        h = torch.eye(n, dtype=torch.float64) - 1.0 / n
        k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
        return float((k * l).sum() / torch.sqrt((k * k).sum() * (l * l).sum()))

    for (a, b), pair in rows.groupby(["model_a", "model_b"]):
        v = pair.set_index("name")["value"]
        n = int(v["cka_samples"])
        x = z.data(a).x_test[:n]
        ma, mb = z.load_model(a).double().eval(), z.load_model(b).double().eval()
        with torch.no_grad():
            assert v["cka_logits"] == pytest.approx(cka(ma(x.double()), mb(x.double())), abs=1e-5)
            assert v["cka_penultimate"] == pytest.approx(cka(ma[:-1](x.double()), mb[:-1](x.double())), abs=1e-5)


def test_stored_spectral_norms_match_numpy_svd(metrics_root):
    """The closed-form spectral layer metrics of the stored smoke MLPs against numpy's SVD of
    each Linear weight: log10 of the squared Frobenius and spectral norms, the stable rank."""
    z = zoo.open(metrics_root)
    rows = z.sql("select model_id, layer, name, value from layer_metrics where family = 'spectral'")
    for model_id, mine in rows.groupby("model_id"):
        model = z.load_model(model_id)
        values = mine.set_index(["layer", "name"])["value"]
        for layer in ("1", "3", "5"):
            s = np.linalg.svd(model[int(layer)].weight.detach().double().numpy(), compute_uv=False)
            assert values[(layer, "log_norm")] == pytest.approx(np.log10(np.sum(s**2)), abs=1e-6)
            assert values[(layer, "log_spectral_norm")] == pytest.approx(np.log10(s[0] ** 2), abs=1e-6)
            assert values[(layer, "stable_rank")] == pytest.approx(np.sum(s**2) / s[0] ** 2, rel=1e-6)
            assert values[(layer, "n_eigs")] == min(model[int(layer)].weight.shape)
