"""Linear CKA (Kornblith et al. 2019): its invariances, and the representations it compares."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from metrics.cka import cka_between, linear_cka, representations


def _features(n=500, d=20, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _related_pair():
    """X and Y = X W + noise: CKA strictly between 0 and 1, so invariances are not trivial."""
    x = _features(d=20, seed=0)
    w = _features(n=20, d=12, seed=1)
    return x, x @ w + 3.0 * _features(d=12, seed=2)


def _random_orthogonal(d, seed):
    q, r = torch.linalg.qr(_features(n=d, d=d, seed=seed))
    return q * torch.sign(torch.diagonal(r))


def test_cka_of_a_representation_with_itself_is_one():
    x = _features()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x.numpy(), (x @ _features(n=20, d=20, seed=5)).float()) < 1.0


def test_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    x, y = _related_pair()
    reference = linear_cka(x, y)
    assert 0.2 < reference < 0.9
    q_x, q_y = _random_orthogonal(20, seed=3), _random_orthogonal(12, seed=4)
    assert torch.allclose(q_x.T @ q_x, torch.eye(20, dtype=torch.float64), atol=1e-12)
    assert linear_cka(x @ q_x, y @ q_y) == pytest.approx(reference, rel=1e-10)
    assert linear_cka(7.5 * x, 0.01 * y) == pytest.approx(reference, rel=1e-10)
    # a constant shift is removed by the centring
    assert linear_cka(x + 4.0, y - 2.0) == pytest.approx(reference, rel=1e-10)


def test_independent_random_features_have_small_cka():
    # For independent isotropic Gaussians, E||Y^T X||_F^2 ~ n d1 d2 and ||X^T X||_F ~
    # n sqrt(d1 (1 + d1/n)), so CKA ~ sqrt(d1 d2) / n = 0.01 here; the numerator is a sum of
    # d1 d2 = 100 roughly chi-square terms (relative std ~ sqrt(2/100) = 14%), so a bound of
    # 3x the expectation is about 14 standard deviations away.
    n, d = 1000, 10
    expected = math.sqrt(d * d) / n
    values = [linear_cka(_features(n, d, seed=s), _features(n, d, seed=100 + s))
              for s in range(5)]
    assert max(values) < 3 * expected
    assert np.mean(values) == pytest.approx(expected, rel=0.3)


def test_constant_representation_gives_nan():
    assert math.isnan(linear_cka(torch.ones(10, 3), _features(n=10, d=3)))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="same number of rows"):
        linear_cka(_features(n=10), _features(n=11))
    with pytest.raises(ValueError, match="2-D"):
        linear_cka(torch.ones(10), torch.ones(10, 2))
    with pytest.raises(ValueError, match="at least 2"):
        linear_cka(torch.ones(1, 3), torch.ones(1, 2))


def _small_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    model.train()(torch.randn(64, 4) * 2 + 1)  # move the running statistics off 0 / 1
    return model


def test_representations_match_a_manual_forward_in_eval_mode():
    model = _small_network()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(10, 4)
    lin1, bn, _, lin2 = model
    hidden = torch.relu((x @ lin1.weight.T + lin1.bias - bn.running_mean)
                        / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias)
    expected_logits = hidden @ lin2.weight.T + lin2.bias

    reps = representations(model, x, batch_size=3)  # 4 uneven batches
    assert torch.allclose(reps["penultimate"], hidden, atol=1e-6)
    assert torch.allclose(reps["logits"], expected_logits, atol=1e-6)
    assert not reps["logits"].requires_grad
    assert model.training
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())


def test_cka_between_a_model_and_itself_and_another():
    model = _small_network()
    other = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(50, 4)
    same = cka_between(model, model, x)
    assert same == pytest.approx({"cka_logits": 1.0, "cka_penultimate": 1.0}, abs=1e-9)
    different = cka_between(model, other, x, batch_size=16)
    assert set(different) == {"cka_logits", "cka_penultimate"}
    assert all(0.0 <= v < 1.0 for v in different.values())


def test_representations_bad_input_raises():
    with pytest.raises(ValueError, match="no nn.Linear"):
        representations(nn.Sequential(nn.ReLU()), torch.ones(3, 2))
    with pytest.raises(ValueError, match="batch_size"):
        representations(nn.Linear(2, 2), torch.ones(3, 2), batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        representations(nn.Linear(2, 2), torch.ones(0, 2))
