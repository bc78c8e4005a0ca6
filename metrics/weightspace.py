"""Weight-space statistics of a model: per-layer summaries, norms and distances.

The per-layer statistics (mean, variance, 1/25/50/75/99th percentiles) are those the 2022
"Model Zoos" benchmark (Schuerholt et al.) feeds to its property predictors; the L2 norm, the
distance from initialisation and the distance to partner models (other seeds) are the usual
weight-space companions.

Which tensors count: only float *parameters*. Buffers are skipped: they are statistics of the
data (BatchNorm's running mean and variance) or counters, not learned weights. When a
``nn.Module`` is given its ``named_parameters()`` are used exactly; a state dict does not say
which entries are buffers, so non-float entries and BatchNorm's ``running_mean``,
``running_var`` and ``num_batches_tracked`` are dropped by name. Other float buffers in a state
dict (rare) are counted as parameters: pass the module to exclude them.

Non-finite weights never raise: any statistic that involves a NaN or infinite weight is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

StateDict = Mapping[str, torch.Tensor]
Weights = StateDict | nn.Module

QUANTILES = {"p1": 0.01, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p99": 0.99}
LAYER_STATISTICS = ("mean", "var", *QUANTILES, "l2_norm")
# torch.quantile refuses inputs with more than 2**24 (16M) elements.
TORCH_QUANTILE_MAX_NUMEL = 2**24
_BATCHNORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _finite_or_nan(value: float) -> float:
    """``value`` as a float, or NaN if it is infinite or NaN."""
    value = float(value)
    return value if math.isfinite(value) else math.nan


def _quantiles(x: torch.Tensor) -> dict[str, float]:
    """The percentiles of a flat float64 tensor, by linear interpolation (numpy's default).

    ``torch.quantile`` up to 16M elements; beyond its limit ``numpy.percentile``, which uses
    the same definition (method "linear") with no size limit, so both give the same values.
    """
    levels = list(QUANTILES.values())
    if x.numel() <= TORCH_QUANTILE_MAX_NUMEL:
        values = torch.quantile(x, torch.tensor(levels, dtype=torch.float64)).tolist()
    else:
        values = np.percentile(x.numpy(), [100.0 * q for q in levels]).tolist()
    return dict(zip(QUANTILES, values))


def layer_statistics(tensor: torch.Tensor) -> dict[str, float]:
    """Mean, population variance, p1/p25/p50/p75/p99 and L2 norm of a tensor's entries.

    Computed in float64. The variance is the population variance (ddof = 0, numpy's default),
    so a one-element tensor has variance 0. An empty tensor, or one with any NaN or infinite
    entry, gives NaN for every statistic.
    """
    x = tensor.detach().to(device="cpu", dtype=torch.float64).flatten()
    if x.numel() == 0 or not bool(torch.isfinite(x).all()):
        return {name: math.nan for name in LAYER_STATISTICS}
    return {
        "mean": x.mean().item(),
        "var": x.var(correction=0).item(),
        **_quantiles(x),
        "l2_norm": torch.linalg.vector_norm(x).item(),
    }


def _parameters(weights: Weights) -> dict[str, torch.Tensor]:
    """The float parameter tensors of a module or a state dict (see the module docstring)."""
    if isinstance(weights, nn.Module):
        items = weights.named_parameters()
    else:
        items = (
            (key, value)
            for key, value in weights.items()
            if value.is_floating_point() and key.rsplit(".", 1)[-1] not in _BATCHNORM_BUFFERS
        )
    return {key: value.detach().to(device="cpu", dtype=torch.float64) for key, value in items}


def _check_same_architecture(params: StateDict, other: StateDict, what: str) -> None:
    """Raise ValueError unless both parameter sets have the same names and shapes."""
    if set(params) != set(other):
        diff = sorted(set(params) ^ set(other))
        raise ValueError(f"{what} has a different architecture: parameters in only one: {diff[:5]}")
    for key, value in params.items():
        if value.shape != other[key].shape:
            raise ValueError(
                f"{what} has a different architecture: {key!r} has shape "
                f"{tuple(other[key].shape)}, expected {tuple(value.shape)}"
            )


def _norm(params: StateDict) -> float:
    """L2 norm of all parameters taken as one vector (NaN if any is non-finite)."""
    squares = sum(float(torch.sum(value**2)) for value in params.values())
    return _finite_or_nan(math.sqrt(squares))


def _distance(params: StateDict, other: StateDict) -> float:
    """L2 distance between two parameter sets of the same architecture."""
    return _norm({key: value - other[key] for key, value in params.items()})


def weight_statistics(
    state_dict: Weights,
    init_state_dict: Weights | None = None,
    partners: Sequence[Weights] = (),
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Whole-model and per-layer weight statistics.

    ``state_dict``, ``init_state_dict`` and each partner may be a state dict or a module; only
    float parameters are used (buffers are skipped, see the module docstring). Returns
    ``(model_metrics, layer_metrics)``:

    * ``model_metrics``: ``n_params``; ``l2_norm`` (all parameters as one vector);
      ``dist_init_l2`` = ||theta - theta_0|| and ``dist_init_rel`` = ||theta - theta_0|| /
      ||theta_0|| (NaN without an initialisation, or when ||theta_0|| = 0);
      ``dist_partners_l2_mean``, the mean of ||theta - theta_p|| over the partners (NaN without
      partners), and ``n_partners``. The keys are always present, so rows line up in a table.
    * ``layer_metrics``: ``{parameter name: layer_statistics(tensor)}``.

    Raises ValueError if the initialisation or a partner has other parameter names or shapes.
    """
    params = _parameters(state_dict)
    layer_metrics = {key: layer_statistics(value) for key, value in params.items()}
    model_metrics = {
        "n_params": float(sum(value.numel() for value in params.values())),
        "l2_norm": _norm(params),
        "dist_init_l2": math.nan,
        "dist_init_rel": math.nan,
        "dist_partners_l2_mean": math.nan,
        "n_partners": float(len(partners)),
    }
    if init_state_dict is not None:
        init = _parameters(init_state_dict)
        _check_same_architecture(params, init, "the initialisation")
        distance, init_norm = _distance(params, init), _norm(init)
        model_metrics["dist_init_l2"] = distance
        model_metrics["dist_init_rel"] = distance / init_norm if init_norm > 0 else math.nan
    if partners:
        distances = []
        for index, partner in enumerate(partners):
            partner_params = _parameters(partner)
            _check_same_architecture(params, partner_params, f"partner {index}")
            distances.append(_distance(params, partner_params))
        model_metrics["dist_partners_l2_mean"] = float(np.mean(distances))
    return model_metrics, layer_metrics
