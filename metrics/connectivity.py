"""Mode connectivity between two trained models: linear paths and quadratic Bezier curves.

Curves follow Garipov et al. 2018, "Loss Surfaces, Mode Connectivity, and Fast Ensembling of
DNNs" (a quadratic Bezier curve whose two endpoints are fixed and whose middle bend is trained
on the expected loss over t ~ U(0, 1)). The scalar ``mc`` summarising a curve follows Yang et al.
2021, "Taxonomizing local versus global structure in neural network loss landscapes", as used by
"A Model Zoo on Phase Transitions in Neural Networks" (2025)::

    mc = 0.5 * (v(0) + v(1)) - v(t*),   t* = argmax_t |v(t) - 0.5 * (v(0) + v(1))|

with v the loss or the error along the path. mc < 0: a barrier (the endpoints are poorly
connected); mc > 0: the endpoints are worse than the middle (under-trained); mc ~ 0: well
connected. Here t* is searched over the interior points only (see :func:`mode_connectivity`).

Data convention: ``batches`` is a sequence of ``(x, y)`` tensor pairs with int64 class labels;
loss is the mean cross-entropy over all samples, error is 1 - accuracy. Models are
``nn.Module`` objects of identical architecture; they are never modified (every function that
changes weights or statistics works on a deep copy or through ``functional_call``), except
:func:`reestimate_batchnorm`, whose purpose is to update the model it is given.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]
StateDict = Mapping[str, torch.Tensor]

_QUANTITIES = ("loss", "error")


def _check_same_architecture(*states: StateDict) -> None:
    """Raise ValueError unless all state dicts have the same keys and tensor shapes."""
    reference = states[0]
    for other in states[1:]:
        if set(reference) != set(other):
            diff = sorted(set(reference) ^ set(other))
            raise ValueError(f"architectures differ: keys present in only one model: {diff[:5]}")
        for key, tensor in reference.items():
            if tensor.shape != other[key].shape:
                raise ValueError(
                    f"architectures differ: {key!r} has shape {tuple(tensor.shape)} "
                    f"in one model and {tuple(other[key].shape)} in the other"
                )


def _detached_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's state dict that shares no storage with the model."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def interpolate_state(sd_a: StateDict, sd_b: StateDict, t: float) -> dict[str, torch.Tensor]:
    """The point ``(1 - t) * a + t * b`` of the linear path between two state dicts.

    Floating-point tensors are interpolated; integer buffers (``num_batches_tracked``) are
    taken from ``a``.
    """
    _check_same_architecture(sd_a, sd_b)
    return {
        key: (1.0 - t) * a + t * sd_b[key] if a.is_floating_point() else a.clone()
        for key, a in sd_a.items()
    }


def bezier_state(
    sd_a: StateDict, sd_mid: StateDict, sd_b: StateDict, t: float
) -> dict[str, torch.Tensor]:
    """The point of the quadratic Bezier curve with bends a, mid, b (Garipov et al. 2018).

    ``(1 - t)^2 a + 2 t (1 - t) mid + t^2 b``: equal to ``a`` at t = 0 and ``b`` at t = 1; with
    ``mid = (a + b) / 2`` it is the linear path. Floating-point tensors only; integer buffers are
    taken from ``a``. Differentiable with respect to ``sd_mid``.
    """
    _check_same_architecture(sd_a, sd_mid, sd_b)
    c_a, c_mid, c_b = (1.0 - t) ** 2, 2.0 * t * (1.0 - t), t**2
    return {
        key: c_a * a + c_mid * sd_mid[key] + c_b * sd_b[key] if a.is_floating_point() else a.clone()
        for key, a in sd_a.items()
    }


def _batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The model's BatchNorm layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def reestimate_batchnorm(model: nn.Module, batches: Batches) -> None:
    """Reset and recompute the BatchNorm running statistics of ``model`` in place.

    Same semantics as ``torch.optim.swa_utils.update_bn``: every BatchNorm layer is reset and
    run with ``momentum=None`` (a cumulative average) over ``batches`` in train mode, so
    ``running_mean`` is the average of the per-batch means and ``running_var`` the average of the
    per-batch unbiased variances. The layers' momenta and the model's train/eval mode are
    restored afterwards. A no-op for models without BatchNorm.
    """
    layers = _batchnorm_layers(model)
    if not layers:
        return
    if len(batches) == 0:
        raise ValueError("reestimate_batchnorm needs at least one batch")
    momenta = [layer.momentum for layer in layers]
    was_training = model.training
    try:
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None
        model.train()
        with torch.no_grad():
            for x, _ in batches:
                model(x)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.train(was_training)


def evaluate(model: nn.Module, batches: Batches) -> tuple[float, float]:
    """Mean cross-entropy and error (1 - accuracy) over all samples, in eval mode."""
    was_training = model.training
    model.eval()
    total_loss, wrong, count = 0.0, 0, 0
    try:
        with torch.no_grad():
            for x, y in batches:
                logits = model(x)
                total_loss += F.cross_entropy(logits, y, reduction="sum").item()
                wrong += int((logits.argmax(dim=1) != y).sum())
                count += len(y)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate needs at least one sample")
    return total_loss / count, wrong / count


def path_curve(
    model_a: nn.Module,
    model_b: nn.Module,
    train_batches: Batches,
    eval_sets: Mapping[str, Batches],
    ts: Sequence[float],
    mid: StateDict | None = None,
) -> dict[str, list[float]]:
    """Loss and error along the linear path (``mid=None``) or the Bezier curve through ``mid``.

    At every t the point's BatchNorm statistics are re-estimated on ``train_batches`` (as the
    phase-zoo paper does) before evaluating. Returns ``{"t": [...], "<set>_loss": [...],
    "<set>_error": [...]}`` for every name in ``eval_sets``.
    """
    sd_a, sd_b = _detached_state(model_a), _detached_state(model_b)
    _check_same_architecture(sd_a, sd_b)
    if mid is not None:
        _check_same_architecture(sd_a, mid)
    work = copy.deepcopy(model_a)
    curve: dict[str, list[float]] = {"t": [float(t) for t in ts]}
    for name in eval_sets:
        curve[f"{name}_loss"], curve[f"{name}_error"] = [], []
    for t in curve["t"]:
        if mid is None:
            point = interpolate_state(sd_a, sd_b, t)
        else:
            point = bezier_state(sd_a, mid, sd_b, t)
        work.load_state_dict(point)
        reestimate_batchnorm(work, train_batches)
        for name, batches in eval_sets.items():
            loss, error = evaluate(work, batches)
            curve[f"{name}_loss"].append(loss)
            curve[f"{name}_error"].append(error)
    return curve


def mode_connectivity(values: Sequence[float]) -> float:
    """mc = 0.5 * (v0 + v1) - v(t*), with t* the INTERIOR point farthest from the endpoint mean.

    ``values`` are v(t) at increasing t, the first and last being the endpoints. Negative: a
    barrier; positive: the endpoints are worse than the middle; ~0: well connected.

    Endpoint pitfall: the published formula takes t* = argmax over all t, endpoints included.
    Two endpoints with very different values then win the argmax themselves (|v0 - mean| =
    |v1 - mean| = |v0 - v1| / 2), giving mc = +-(v0 - v1) / 2 with a sign fixed only by which
    endpoint comes first: e.g. v = [0.1, 0.3, 0.3, 0.3, 0.9] gives +0.4, and the same path
    reversed -0.4, which fakes phase II (or a barrier). We search t* over the interior points
    only, which gives 0.2 for both orders. Ties go to the first such point.

    Returns NaN if any value is NaN or infinite (e.g. a diverged endpoint).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size < 3:
        raise ValueError("mode_connectivity needs at least 3 values: two endpoints, one interior")
    if not np.all(np.isfinite(v)):
        return float("nan")
    reference = 0.5 * (v[0] + v[-1])
    interior = v[1:-1]
    t_star = int(np.argmax(np.abs(interior - reference)))
    return float(reference - interior[t_star])


def barrier_height(values: Sequence[float]) -> float:
    """max_t v(t) - max(v0, v1): how far the path rises above its worse endpoint (>= 0).

    Unlike the mean-of-endpoints barrier of Frankle et al. 2020, this is 0 when the path never
    exceeds the worse endpoint, so a monotone path between unequal endpoints has no barrier.
    Returns NaN if any value is NaN or infinite.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size < 2:
        raise ValueError("barrier_height needs at least the two endpoint values")
    if not np.all(np.isfinite(v)):
        return float("nan")
    return float(v.max() - max(v[0], v[-1]))


def _curve_lr_factor(epoch: int, epochs: int) -> float:
    """Garipov et al.'s curve-training schedule for epoch ``epoch`` (1-based) of ``epochs``.

    Constant for the first half, linear decay to 1% of the base rate at 90%, then constant.
    """
    progress = epoch / epochs
    if progress <= 0.5:
        return 1.0
    if progress <= 0.9:
        return 1.0 - (progress - 0.5) / 0.4 * 0.99
    return 0.01


def train_bezier_midpoint(
    model_a: nn.Module,
    model_b: nn.Module,
    train_batches: Batches,
    epochs: int = 10,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Train the middle bend of the quadratic Bezier curve from ``model_a`` to ``model_b``.

    Garipov et al. 2018: the endpoints stay fixed; the bend starts at the linear midpoint
    (a + b) / 2 and is trained by SGD on the expected loss over t ~ U(0, 1), one t per step drawn
    from a ``torch.Generator`` seeded with ``seed``. The forward pass is
    ``functional_call(model, theta(t), x)`` with theta(t) the curve's point, so gradients reach
    the bend only. As in their code:

    * weight decay is an L2 penalty ``0.5 * weight_decay * ||theta(t)||^2`` on the curve's point
      (not on the bend), and the optimiser itself has no weight decay;
    * the learning rate follows their schedule per epoch (:func:`_curve_lr_factor`);
    * BatchNorm runs in train mode (batch statistics), and its running statistics are not
      part of the curve: the returned state dict holds the linear midpoint of the endpoints'
      buffers, and :func:`path_curve` re-estimates them at every t anyway.

    Batches are visited in the given order. Returns a full state dict (the trained bend for the
    parameters) usable as ``mid`` in :func:`bezier_state` and :func:`path_curve`.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    sd_a, sd_b = _detached_state(model_a), _detached_state(model_b)
    _check_same_architecture(sd_a, sd_b)
    template = copy.deepcopy(model_a).train()
    names = [name for name, _ in template.named_parameters()]
    ends_a = {name: sd_a[name] for name in names}
    ends_b = {name: sd_b[name] for name in names}
    bend = {name: (0.5 * (ends_a[name] + ends_b[name])).requires_grad_(True) for name in names}
    optimizer = torch.optim.SGD(list(bend.values()), lr=lr, momentum=momentum)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * _curve_lr_factor(epoch, epochs)
        for x, y in train_batches:
            t = float(torch.rand((), generator=generator))
            point = bezier_state(ends_a, bend, ends_b, t)
            loss = F.cross_entropy(functional_call(template, point, (x,)), y)
            loss = loss + 0.5 * weight_decay * sum((w**2).sum() for w in point.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    mid = interpolate_state(sd_a, sd_b, 0.5)
    mid.update({name: bend[name].detach() for name in names})
    return mid


def connectivity_metrics(
    model_a: nn.Module,
    model_b: nn.Module,
    train_batches: Batches,
    test_batches: Batches,
    n_points: int = 5,
    bezier: bool = True,
    bezier_epochs: int = 10,
    seed: int = 0,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
) -> dict[str, float]:
    """Mode-connectivity metrics between two models, as in the phase-zoo paper.

    For each path (``linear``, and ``bezier`` when asked: a curve trained by
    :func:`train_bezier_midpoint` for ``bezier_epochs`` epochs with ``lr``, ``momentum``,
    ``weight_decay``, ``seed``), each split (``train``, ``test``) and each quantity (``loss``,
    ``error``), evaluated at ``n_points`` values of t in linspace(0, 1) with BatchNorm
    re-estimated on the training batches at every t:

    * ``mc_<path>_<split>_<quantity>``: :func:`mode_connectivity` (interior t* only);
    * ``barrier_<path>_<split>_<quantity>``: :func:`barrier_height`, max_t v(t) - max(v0, v1).

    The settings are recorded as ``mc_n_points`` and, with the Bezier curve,
    ``mc_bezier_epochs``, ``mc_bezier_lr``, ``mc_bezier_momentum``, ``mc_bezier_weight_decay``
    and ``mc_bezier_seed``.
    """
    if n_points < 3:
        raise ValueError(f"n_points must be >= 3 to have an interior point, got {n_points}")
    ts = np.linspace(0.0, 1.0, n_points).tolist()
    eval_sets = {"train": train_batches, "test": test_batches}
    mids: dict[str, StateDict | None] = {"linear": None}
    metrics: dict[str, float] = {"mc_n_points": float(n_points)}
    if bezier:
        mids["bezier"] = train_bezier_midpoint(
            model_a, model_b, train_batches, bezier_epochs, lr, momentum, weight_decay, seed
        )
        metrics.update(
            mc_bezier_epochs=float(bezier_epochs),
            mc_bezier_lr=float(lr),
            mc_bezier_momentum=float(momentum),
            mc_bezier_weight_decay=float(weight_decay),
            mc_bezier_seed=float(seed),
        )
    for path, mid in mids.items():
        curve = path_curve(model_a, model_b, train_batches, eval_sets, ts, mid=mid)
        for split in eval_sets:
            for quantity in _QUANTITIES:
                values = curve[f"{split}_{quantity}"]
                metrics[f"mc_{path}_{split}_{quantity}"] = mode_connectivity(values)
                metrics[f"barrier_{path}_{split}_{quantity}"] = barrier_height(values)
    return metrics
