"""Tests for metrics.connectivity: paths, BatchNorm re-estimation, mc, Bezier curve training."""

import copy
import math

import pytest
import torch
from torch import nn

from metrics.connectivity import (
    barrier_height,
    bezier_state,
    connectivity_metrics,
    evaluate,
    interpolate_state,
    mode_connectivity,
    path_curve,
    reestimate_batchnorm,
    train_bezier_midpoint,
)

N_FEATURES, N_CLASSES, HIDDEN = 8, 4, 32


def _make_batches(n: int, seed: int, batch: int = 128):
    """A learnable task: labels from a fixed random teacher network, inputs drawn with ``seed``."""
    teacher = torch.Generator().manual_seed(123)
    w1 = torch.randn(N_FEATURES, 16, generator=teacher)
    w2 = torch.randn(16, N_CLASSES, generator=teacher)
    x = torch.randn(n, N_FEATURES, generator=torch.Generator().manual_seed(seed))
    y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def _mlp(seed: int, batchnorm: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    norm = [nn.BatchNorm1d(HIDDEN)] if batchnorm else []
    return nn.Sequential(
        nn.Linear(N_FEATURES, HIDDEN), *norm, nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, N_CLASSES),
    )


def _fit(model: nn.Module, batches, steps: int = 150) -> nn.Module:
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def _permuted_copy(model: nn.Sequential) -> nn.Sequential:
    """The same function with the hidden units of both hidden layers permuted."""
    generator = torch.Generator().manual_seed(1)
    p1 = torch.randperm(HIDDEN, generator=generator)
    p2 = torch.randperm(HIDDEN, generator=generator)
    permuted = copy.deepcopy(model)
    with torch.no_grad():
        permuted[0].weight.copy_(model[0].weight[p1])
        permuted[0].bias.copy_(model[0].bias[p1])
        permuted[2].weight.copy_(model[2].weight[p2][:, p1])
        permuted[2].bias.copy_(model[2].bias[p2])
        permuted[4].weight.copy_(model[4].weight[:, p2])
    return permuted


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def _assert_same_state(state, model: nn.Module) -> None:
    current = model.state_dict()
    assert set(state) == set(current)
    for key, value in state.items():
        assert torch.equal(value, current[key]), key


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here on one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def data():
    return _make_batches(512, seed=0), _make_batches(256, seed=1)


@pytest.fixture(scope="module")
def barrier_pair(data):
    """A trained MLP and its hidden-unit-permuted copy: same function, a linear barrier."""
    model = _fit(_mlp(0), data[0])
    return model, _permuted_copy(model)


# --- states ------------------------------------------------------------------------------------


def test_interpolate_and_bezier_states():
    a = _mlp(0, batchnorm=True).state_dict()
    m = _mlp(1, batchnorm=True).state_dict()
    b = _mlp(2, batchnorm=True).state_dict()
    a["1.num_batches_tracked"].fill_(7)
    b["1.num_batches_tracked"].fill_(9)
    half = interpolate_state(a, b, 0.5)
    assert torch.allclose(half["0.weight"], 0.5 * (a["0.weight"] + b["0.weight"]))
    assert half["1.num_batches_tracked"].item() == 7
    at_0, at_1 = bezier_state(a, m, b, 0.0), bezier_state(a, m, b, 1.0)
    for key in a:  # the Bezier curve passes exactly through its endpoints
        assert torch.equal(at_0[key], a[key]), key
        end = b[key] if b[key].is_floating_point() else a[key]  # integer buffers come from a
        assert torch.equal(at_1[key], end), key
    quarter = bezier_state(a, m, b, 0.25)["3.weight"]
    expected = 0.5625 * a["3.weight"] + 0.375 * m["3.weight"] + 0.0625 * b["3.weight"]
    assert torch.allclose(quarter, expected)
    linear_mid = interpolate_state(a, b, 0.5)  # a Bezier through the linear midpoint is linear
    assert torch.allclose(bezier_state(a, linear_mid, b, 0.3)["0.weight"],
                          interpolate_state(a, b, 0.3)["0.weight"], atol=1e-6)


def test_mismatched_architectures_raise(data):
    small = nn.Sequential(  # the same keys as _mlp, a narrower first layer
        nn.Linear(N_FEATURES, 16), nn.ReLU(),
        nn.Linear(16, HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, N_CLASSES),
    )
    with pytest.raises(ValueError, match="shape"):
        interpolate_state(_mlp(0).state_dict(), small.state_dict(), 0.5)
    with pytest.raises(ValueError, match="keys"):
        path_curve(_mlp(0), _mlp(0, batchnorm=True), data[0], {"train": data[0]}, [0.0, 1.0])


# --- mode_connectivity and barrier_height ------------------------------------------------------


def test_mode_connectivity_hand_values():
    assert mode_connectivity([1.0, 2.0, 1.0]) == pytest.approx(-1.0)  # a barrier
    assert mode_connectivity([0.5, 0.2, 0.5]) == pytest.approx(0.3)  # the middle is better
    assert mode_connectivity([0.2, 0.5, 0.8, 0.5, 0.2]) == pytest.approx(-0.6)
    # the interior point farthest from the endpoint mean wins, whatever its sign
    assert mode_connectivity([1.0, 1.3, 0.4, 1.0]) == pytest.approx(0.6)
    assert mode_connectivity([0.3, 0.3, 0.3]) == 0.0
    assert barrier_height([0.2, 0.5, 0.8, 0.5, 0.3]) == pytest.approx(0.5)
    assert barrier_height([0.1, 0.3, 0.3, 0.3, 0.9]) == 0.0


def test_mode_connectivity_endpoint_pitfall():
    # Endpoint mean 0.5. With the endpoints in the argmax, |0.1 - 0.5| = |0.9 - 0.5| = 0.4 would
    # win and give mc = +0.4 (or -0.4 for the reversed path). Interior only: 0.5 - 0.3 = 0.2.
    values = [0.1, 0.3, 0.3, 0.3, 0.9]
    assert mode_connectivity(values) == pytest.approx(0.2)
    assert mode_connectivity(values[::-1]) == pytest.approx(0.2)


def test_mode_connectivity_rejects_short_input_and_propagates_nan():
    with pytest.raises(ValueError):
        mode_connectivity([0.1, 0.2])
    assert math.isnan(mode_connectivity([0.1, float("nan"), 0.2]))
    assert math.isnan(mode_connectivity([float("inf"), 0.1, 0.2]))
    assert math.isnan(barrier_height([0.1, 0.2, float("nan")]))


# --- BatchNorm re-estimation -------------------------------------------------------------------


def test_reestimate_batchnorm_matches_data_statistics():
    model = nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 3))
    model.eval()
    bn = model[0]
    with torch.no_grad():
        bn.running_mean.fill_(100.0)
        bn.running_var.fill_(100.0)
    x = torch.randn(300, 5) * torch.arange(1.0, 6.0) + 2.0
    y = torch.zeros(300, dtype=torch.long)

    reestimate_batchnorm(model, [(x, y)])
    assert torch.allclose(bn.running_mean, x.mean(dim=0), atol=1e-5)
    assert torch.allclose(bn.running_var, x.var(dim=0, unbiased=True), atol=1e-4)
    assert bn.momentum == 0.1 and not model.training

    # several equal batches: cumulative average of the per-batch statistics
    batches = [(x[i : i + 100], y[i : i + 100]) for i in range(0, 300, 100)]
    reestimate_batchnorm(model, batches)
    per_batch_var = torch.stack([b[0].var(dim=0, unbiased=True) for b in batches])
    assert torch.allclose(bn.running_mean, x.mean(dim=0), atol=1e-5)
    assert torch.allclose(bn.running_var, per_batch_var.mean(dim=0), atol=1e-4)
    assert bn.num_batches_tracked.item() == 3


def test_reestimate_batchnorm_is_a_no_op_without_batchnorm(data):
    model = _mlp(0)
    before = _state_copy(model)
    reestimate_batchnorm(model, data[0])
    _assert_same_state(before, model)


# --- paths and curves --------------------------------------------------------------------------


def test_identical_endpoints_give_zero_mc_on_both_paths(data):
    train, test = data
    model = _fit(_mlp(3, batchnorm=True), train, steps=30)
    twin = copy.deepcopy(model)
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    linear = path_curve(model, twin, train, {"test": test}, ts)
    bezier = path_curve(model, twin, train, {"test": test}, ts, mid=model.state_dict())
    for curve in (linear, bezier):
        assert mode_connectivity(curve["test_loss"]) == pytest.approx(0.0, abs=1e-6)
        assert mode_connectivity(curve["test_error"]) == pytest.approx(0.0, abs=1e-6)

    metrics = connectivity_metrics(model, twin, train, test, bezier_epochs=0)
    for path in ("linear", "bezier"):
        for split in ("train", "test"):
            for quantity in ("loss", "error"):
                assert metrics[f"mc_{path}_{split}_{quantity}"] == pytest.approx(0.0, abs=1e-6)
                assert metrics[f"barrier_{path}_{split}_{quantity}"] == pytest.approx(0.0, abs=1e-6)


def test_path_curve_reestimates_batchnorm_and_keeps_inputs(data):
    train, test = data
    model = _fit(_mlp(4, batchnorm=True), train, steps=30)
    with torch.no_grad():
        model[1].running_mean.fill_(5.0)  # stale statistics, replaced at every t
    before = _state_copy(model)
    curve = path_curve(model, model, train, {"test": test}, [0.0, 1.0])
    _assert_same_state(before, model)
    fixed = copy.deepcopy(model)
    reestimate_batchnorm(fixed, train)
    assert curve["test_loss"][0] == pytest.approx(evaluate(fixed, test)[0], rel=1e-6)
    assert curve["test_loss"][0] != pytest.approx(evaluate(model, test)[0], rel=1e-3)


def test_permuted_pair_has_a_linear_barrier(data, barrier_pair):
    train, _ = data
    model, permuted = barrier_pair
    curve = path_curve(model, permuted, train, {"train": train}, [0.0, 0.25, 0.5, 0.75, 1.0])
    losses = curve["train_loss"]
    assert losses[0] == pytest.approx(losses[-1], rel=1e-4)  # the same function at both ends
    assert mode_connectivity(losses) < -0.3
    assert mode_connectivity(curve["train_error"]) < -0.05
    assert barrier_height(losses) > 0.3


def test_bezier_training_lowers_the_curve_loss(data, barrier_pair):
    train, _ = data
    model, permuted = barrier_pair
    before_a, before_b = _state_copy(model), _state_copy(permuted)
    mid = train_bezier_midpoint(model, permuted, train, epochs=10, seed=0)
    _assert_same_state(before_a, model)
    _assert_same_state(before_b, permuted)
    assert set(mid) == set(before_a)

    ts = [i / 8 for i in range(9)]
    linear = path_curve(model, permuted, train, {"train": train}, ts)
    bezier = path_curve(model, permuted, train, {"train": train}, ts, mid=mid)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    assert mean(bezier["train_loss"]) < 0.7 * mean(linear["train_loss"])
    assert mode_connectivity(bezier["train_loss"]) > mode_connectivity(linear["train_loss"])
    # the curve still passes through the endpoints
    assert bezier["train_loss"][0] == linear["train_loss"][0]
    assert bezier["train_loss"][-1] == linear["train_loss"][-1]


def test_bezier_training_with_batchnorm_is_seeded_and_keeps_inputs(data):
    train, _ = data
    model_a = _fit(_mlp(5, batchnorm=True), train, steps=20)
    model_b = _fit(_mlp(6, batchnorm=True), train, steps=20)
    before = _state_copy(model_a)
    first = train_bezier_midpoint(model_a, model_b, train, epochs=1, seed=3)
    second = train_bezier_midpoint(model_a, model_b, train, epochs=1, seed=3)
    _assert_same_state(before, model_a)
    assert not model_a.training
    for key in first:
        assert torch.equal(first[key], second[key]), key
    untrained = train_bezier_midpoint(model_a, model_b, train, epochs=0)
    assert not torch.equal(first["0.weight"], untrained["0.weight"])


def test_connectivity_metrics_keys(data, barrier_pair):
    train, test = data
    metrics = connectivity_metrics(*barrier_pair, train, test, n_points=5, bezier=False)
    expected = {"mc_n_points"} | {
        f"{kind}_linear_{split}_{quantity}"
        for kind in ("mc", "barrier")
        for split in ("train", "test")
        for quantity in ("loss", "error")
    }
    assert set(metrics) == expected
    assert metrics["mc_linear_train_loss"] < 0
    with pytest.raises(ValueError):
        connectivity_metrics(*barrier_pair, train, test, n_points=2)
