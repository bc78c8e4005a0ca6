"""Property prediction: splits, the DeepSets model's invariance, probing's outputs, and the
protocol's scores against computations written here with scikit-learn and torch alone."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.metrics import r2_score
from sklearn.preprocessing import StandardScaler

import benchmarks  # noqa: F401  (registers the methods)
import zoo
from benchmarks.deepsets import DeepSetsEstimator, DeepSetsParameters, unit_sets
from benchmarks.prediction import ModelInputs, PredictionSettings, predict_properties, split, weight_features
from benchmarks.probing import ProbeOutputs
from benchmarks.registry import METHODS
from zoo.permutations import permutation_spec, permute_state, random_permutations
from zoo.population import properties


class Unit:
    def __init__(self, z, ids):
        self.handle, self.model_ids = z, ids


class Call:
    def __init__(self, name, **parameters):
        self.method = METHODS[name]
        self.parameters = self.method.parameters(**parameters)


@pytest.fixture(scope="module")
def smoke(smoke_root):
    z = zoo.open(smoke_root)
    ids = list(z.sql("select model_id from models where zoo = 'smoke' order by load, temperature, seed")["model_id"])
    return z, ids


def inputs_of(z, ids, epoch=None):
    props = properties(z, ids, epoch)
    return ModelInputs(z, ids, [int(e) for e in props["epoch"]], weight_features(z, ids, epoch)), props


# --------------------------------------------------------------------------- splits


def test_a_split_by_cell_holds_out_whole_cells_and_one_by_model_keeps_a_models_checkpoints_together():
    grid = [(w, b) for w in (4, 8, 16, 32) for b in (16, 64, 256)]
    props = pd.DataFrame([{"model_id": f"m{w}-{b}-{s}", "load": w, "temperature": b, "epoch": e}
                          for w, b in grid for s in range(3) for e in (1, 5)])
    train, test = split(props, "cell", 0.25, seed=7)
    cells = lambda rows: set(zip(props["load"][rows], props["temperature"][rows]))  # noqa: E731
    assert len(cells(test)) == 3 and not cells(train) & cells(test) and len(train) + len(test) == len(props)
    train, test = split(props, "model", 0.3, seed=7)
    assert not set(props["model_id"][train]) & set(props["model_id"][test])
    assert len(set(props["model_id"][test])) == round(0.3 * 36)
    again = split(props, "model", 0.3, seed=7)
    assert np.array_equal(again[1], test) and not np.array_equal(split(props, "model", 0.3, seed=8)[1], test)
    with pytest.raises(ValueError, match="too few"):
        split(props.iloc[:6], "cell", 0.5, seed=0)


# --------------------------------------------------------------------------- deepsets


def test_deepsets_predicts_the_same_for_a_model_with_permuted_hidden_units(smoke):
    z, ids = smoke
    inputs, props = inputs_of(z, ids)
    estimator = DeepSetsEstimator("regression", DeepSetsParameters(epochs=30, hidden=16), seed=0)
    estimator.fit(inputs, props["test_acc"].to_numpy(float))
    states = inputs.states()
    spec = permutation_spec(z.load_model(ids[0]))
    generator = torch.Generator().manual_seed(1)
    permuted = {}
    for m, e, state in zip(inputs.model_ids, inputs.epochs, states):
        spec = permutation_spec(z.load_model(m))
        permuted[(m, e)] = permute_state(state, spec, random_permutations(spec, generator))
        assert any(not torch.equal(permuted[(m, e)][k], state[k]) for k in state)
    moved = ModelInputs(z, inputs.model_ids, inputs.epochs, inputs.statistics, permuted)
    before, after = estimator.predict(inputs), estimator.predict(moved)
    assert np.allclose(before, after, atol=1e-5, rtol=0)
    # a change that is not a hidden-unit permutation (two input pixels swapped) is seen
    swapped = {k: {n: t.clone() for n, t in s.items()} for k, s in permuted.items()}
    for s in swapped.values():
        s["1.weight"][:, [20, 21]] = s["1.weight"][:, [21, 20]]
    assert not np.allclose(before, estimator.predict(ModelInputs(z, inputs.model_ids, inputs.epochs, inputs.statistics, swapped)),
                           atol=1e-5, rtol=0)


def test_a_permutation_of_the_weights_permutes_the_rows_of_each_unit_set(smoke):
    """What `augment` relies on: permuting the weights = permuting each set's rows."""
    z, ids = smoke
    model = z.load_model(ids[-1])
    spec = permutation_spec(model)
    state = model.state_dict()
    names = {n for n, _ in model.named_parameters()}
    perms = random_permutations(spec, torch.Generator().manual_seed(3))
    sets, fixed = unit_sets(state, names, spec)
    moved_sets, moved_fixed = unit_sets(permute_state(state, spec, perms), names, spec)
    assert len(sets) == 2 and torch.equal(fixed, moved_fixed) and fixed.numel() == 10  # the output bias
    for rows, moved, perm in zip(sets, moved_sets, perms):
        assert torch.allclose(rows[perm], moved, atol=1e-6)
    # a first-layer unit: its 64 input weights raw, its bias, 7 statistics of its outgoing column
    assert sets[0].shape[1] == 64 + 1 + 7 and torch.equal(sets[0][:, :64], state["1.weight"].float())


# --------------------------------------------------------------------------- probing


def test_probing_reads_the_models_class_probabilities_on_training_inputs(smoke):
    z, ids = smoke
    inputs, _ = inputs_of(z, ids)
    features = ProbeOutputs(n_probes=5, probes="data", seed=4).fit(inputs.take(np.array([3, 4]))).transform(inputs)
    x = z.data(ids[3]).x_train.float()  # (the probes come from the first fitted row's training inputs)
    chosen = torch.randperm(len(x), generator=torch.Generator().manual_seed(4))[:5]
    with torch.no_grad():
        expected = torch.softmax(z.load_model(ids[2])(x[chosen]).double(), 1).reshape(-1).numpy()
    assert features.shape == (8, 5 * 10) and np.allclose(features[2], expected, atol=1e-6)


# --------------------------------------------------------------------------- the protocol


def test_gbt_scores_equal_scikit_learn_on_the_same_split_and_statistics(smoke):
    z, ids = smoke
    rows = predict_properties(Unit(z, ids), Call("gbt", min_samples_leaf=1), PredictionSettings(test_fraction=0.25, seed=3))
    scores = {r["metric"]: r["value"] for r in rows if r["phase"] == "all"}
    # recomputed without the project's helpers: statistics from the state dicts, the split by hand
    order = np.random.default_rng(3).permutation(8)
    test, train = np.sort(order[:2]), np.sort(order[2:])
    stats = []
    for m in ids:
        row = []
        for _, t in z.load_model(m).named_parameters():
            v = t.detach().double().flatten()
            row += [v.mean().item(), v.var(correction=0).item(), *np.quantile(v.numpy(), [0.01, 0.25, 0.5, 0.75, 0.99])]
        stats.append(row)
    x = np.array(stats)
    acc = properties(z, ids)["test_acc"].to_numpy(float)
    scaler = StandardScaler().fit(x[train])
    model = HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05, max_leaf_nodes=15, min_samples_leaf=1,
                                          random_state=3).fit(scaler.transform(x[train]), acc[train])
    expected = r2_score(acc[test], model.predict(scaler.transform(x[test])))
    assert scores["n_test"] == 2 and scores["r2_test_acc"] == pytest.approx(expected, abs=1e-9)


def test_several_checkpoints_add_the_epoch_target(smoke):
    z, ids = smoke
    settings = PredictionSettings(epochs=[1, 3], test_fraction=0.25, seed=0)
    rows = predict_properties(Unit(z, ids), Call("linear"), settings)
    scores = {r["metric"]: r["value"] for r in rows if r["phase"] == "all"}
    assert scores["n_test"] == 4 and "r2_epoch" in scores  # 2 models x 2 checkpoints held out
    assert "r2_epoch" not in {r["metric"] for r in predict_properties(Unit(z, ids), Call("linear"), PredictionSettings())}


def test_deepsets_unit_sets_of_a_batchnorm_cnn_follow_its_channel_permutations():
    """The same invariance for convolutions: a channel carries its kernels, BatchNorm entries and
    (after Flatten) its block of the classifier's columns."""
    from zoo.architectures import build_model

    model = build_model({"name": "cnn", "width": 4, "depth": 2, "batchnorm": True}, (1, 8, 8), 10, seed=0)
    spec = permutation_spec(model)
    state = {k: v + 0.01 * torch.randn(v.shape) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    names = {n for n, _ in model.named_parameters()}
    perms = random_permutations(spec, torch.Generator().manual_seed(5))
    sets, fixed = unit_sets(state, names, spec)
    moved_sets, moved_fixed = unit_sets(permute_state(state, spec, perms), names, spec)
    assert len(sets) == len(spec) >= 2 and torch.equal(fixed, moved_fixed)
    for rows, moved, perm, group in zip(sets, moved_sets, perms, spec):
        assert rows.shape[0] == group.size and torch.allclose(rows[perm], moved, atol=1e-6)
