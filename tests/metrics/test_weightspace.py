"""Tests for metrics.weightspace: per-layer statistics, norms, distances, NaN handling."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from metrics import weightspace
from metrics.weightspace import LAYER_STATISTICS, layer_statistics, weight_statistics


def _numpy_statistics(array: np.ndarray) -> dict[str, float]:
    flat = array.astype(np.float64).ravel()
    stats = {"mean": flat.mean(), "var": flat.var(), "l2_norm": np.linalg.norm(flat)}
    for name, q in weightspace.QUANTILES.items():
        stats[name] = np.percentile(flat, 100 * q)
    return stats


@pytest.mark.parametrize("shape", [(1,), (7,), (33, 17), (8, 3, 3, 3), (1001,)])
def test_layer_statistics_match_numpy(shape):
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))) * 0.3 + 0.1
    stats = layer_statistics(tensor)
    expected = _numpy_statistics(tensor.numpy())
    assert set(stats) == set(LAYER_STATISTICS)
    for name, value in expected.items():
        assert stats[name] == pytest.approx(value, rel=1e-10, abs=1e-12), name


def test_large_tensor_path_matches_torch_quantile(monkeypatch):
    tensor = torch.rand(2000, generator=torch.Generator().manual_seed(0))
    small_path = layer_statistics(tensor)
    monkeypatch.setattr(weightspace, "TORCH_QUANTILE_MAX_NUMEL", 100)
    large_path = layer_statistics(tensor)
    for name in LAYER_STATISTICS:
        assert large_path[name] == pytest.approx(small_path[name], rel=1e-12), name


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_give_nan_without_raising(bad):
    weight = torch.randn(4, 3)
    weight[1, 2] = bad
    stats = layer_statistics(weight)
    assert all(math.isnan(value) for value in stats.values())

    state = {"0.weight": weight, "0.bias": torch.zeros(4)}
    init = {"0.weight": torch.zeros(4, 3), "0.bias": torch.zeros(4)}
    model_metrics, layer_metrics = weight_statistics(state, init, partners=[init])
    for key in ("l2_norm", "dist_init_l2", "dist_init_rel", "dist_partners_l2_mean"):
        assert math.isnan(model_metrics[key]), key
    assert math.isnan(layer_metrics["0.weight"]["p50"])
    assert layer_metrics["0.bias"]["l2_norm"] == 0.0


def test_empty_tensor_gives_nan():
    assert all(math.isnan(value) for value in layer_statistics(torch.empty(0, 3)).values())


def test_distance_from_init_hand_computed():
    state = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([1.0, 1.0])}
    init = {"w": torch.zeros(2, 2), "b": torch.tensor([1.0, -1.0])}
    partner_1 = {"w": torch.tensor([[1.0, 2.0], [3.0, 5.0]]), "b": torch.tensor([1.0, 1.0])}
    partner_3 = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([1.0, 4.0])}
    model_metrics, layer_metrics = weight_statistics(state, init, partners=[partner_1, partner_3])
    assert model_metrics["n_params"] == 6
    assert model_metrics["l2_norm"] == pytest.approx(math.sqrt(1 + 4 + 9 + 16 + 1 + 1))
    # ||theta - theta_0||^2 = 1 + 4 + 9 + 16 + 0 + 4; ||theta_0|| = sqrt(2)
    assert model_metrics["dist_init_l2"] == pytest.approx(math.sqrt(34))
    assert model_metrics["dist_init_rel"] == pytest.approx(math.sqrt(34) / math.sqrt(2))
    assert model_metrics["dist_partners_l2_mean"] == pytest.approx((1.0 + 3.0) / 2)
    assert model_metrics["n_partners"] == 2
    assert layer_metrics["b"]["mean"] == 1.0 and layer_metrics["b"]["var"] == 0.0


def test_distance_from_itself_is_zero_and_missing_references_are_nan():
    state = nn.Linear(5, 3).state_dict()
    model_metrics, _ = weight_statistics(state, init_state_dict=state, partners=[state])
    assert model_metrics["dist_init_l2"] == 0.0
    assert model_metrics["dist_init_rel"] == 0.0
    assert model_metrics["dist_partners_l2_mean"] == 0.0

    alone, _ = weight_statistics(state)
    assert math.isnan(alone["dist_init_l2"]) and math.isnan(alone["dist_partners_l2_mean"])
    assert alone["n_partners"] == 0

    zero_init = {key: torch.zeros_like(value) for key, value in state.items()}
    assert math.isnan(weight_statistics(state, zero_init)[0]["dist_init_rel"])


def test_buffers_are_skipped_and_module_equals_state_dict():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[1].running_mean.fill_(100.0)
    from_module = weight_statistics(model)
    from_state = weight_statistics(model.state_dict())
    assert set(from_module[1]) == {
        "0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"
    }
    assert from_module == from_state


def test_mismatched_architecture_raises():
    state = nn.Linear(5, 3).state_dict()
    with pytest.raises(ValueError, match="initialisation"):
        weight_statistics(state, init_state_dict=nn.Linear(5, 4).state_dict())
    with pytest.raises(ValueError, match="partner 0"):
        weight_statistics(state, partners=[{"weight": torch.zeros(3, 5)}])
