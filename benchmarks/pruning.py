"""Pruning: which weights to remove, and the protocol that scores it on each zoo model.

Every method returns a 0/1 mask per prunable weight (the weight matrices of Linear and Conv2d
layers; biases and BatchNorm are kept). Layer-wise and global magnitude pruning use torch's own
`torch.nn.utils.prune` (l1_unstructured, global_unstructured); AlphaPruning and FARMS allocate
per-layer sparsities from each layer's heavy-tailed alpha (computed by `metrics.spectral`) and
then prune each layer by magnitude.

    AlphaPruning: Lu et al. 2024, "AlphaPruning: using heavy-tailed self regularization theory
    for improved layer-wise pruning of large language models".
    FARMS: Hu et al. 2025, "Eigenspectrum analysis of neural networks without aspect ratio bias".
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import prune

from metrics.spectral import esd, farms_alpha, fit_power_law, layer_matrices

from .evaluation import accuracy, finetune
from .registry import Parameters, register_method, register_protocol


def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every Linear and Conv2d, in order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Zero the masked weights in place (and return the model)."""
    with torch.no_grad():
        for name, layer in prunable(model):
            layer.weight.mul_(masks[name])
    return model


def sparsity(model: nn.Module) -> float:
    """Fraction of zero entries over the prunable weights."""
    weights = [layer.weight for _, layer in prunable(model)]
    return float(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))


def layer_magnitude_masks(model: nn.Module, sparsities: list[float]) -> dict[str, torch.Tensor]:
    """Per layer, the mask of torch's l1_unstructured at that layer's sparsity."""
    copy_ = copy.deepcopy(model)
    masks = {}
    for (name, layer), amount in zip(prunable(copy_), sparsities):
        prune.l1_unstructured(layer, "weight", amount=float(amount))
        masks[name] = layer.weight_mask.detach().clone()
    return masks


def allocate_by_alpha(alphas: np.ndarray, sizes: np.ndarray, target: float, eps: float) -> np.ndarray:
    """AlphaPruning's allocation: s_i = (alpha_i - min) / (max - min) * 2 eps + (1 - eps), then
    one factor rescales them so that the parameter-weighted mean equals `target` (higher alpha,
    i.e. a less trained layer, is pruned more). Clipped to [0, 1]; the factor is solved by
    bisection so the clipped mean still meets the target."""
    alphas, sizes = np.asarray(alphas, float), np.asarray(sizes, float)
    finite = np.isfinite(alphas)
    alphas = np.where(finite, alphas, np.nanmedian(alphas[finite]) if finite.any() else 1.0)
    spread = alphas.max() - alphas.min()
    raw = (alphas - alphas.min()) / spread * 2 * eps + (1 - eps) if spread > 0 else np.ones_like(alphas)
    weighted = lambda c: float(np.sum(np.clip(c * raw, 0, 1) * sizes) / sizes.sum())  # noqa: E731
    lo, hi = 0.0, 1.0 / raw.min()
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if weighted(mid) < target else (lo, mid)
    return np.clip((lo + hi) / 2 * raw, 0, 1)


# --------------------------------------------------------------------------- methods


class PruneParameters(Parameters):
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of the prunable weights removed")


@register_method("random", kind="pruning", parameters=PruneParameters)
def random_masks(model, p: PruneParameters, generator: torch.Generator):
    """Each layer loses the same fraction, chosen uniformly at random (the floor)."""
    masks = {}
    for name, layer in prunable(model):
        n = layer.weight.numel()
        drop = torch.randperm(n, generator=generator)[: int(round(p.sparsity * n))]
        mask = torch.ones(n)
        mask[drop] = 0
        masks[name] = mask.reshape(layer.weight.shape)
    return masks


@register_method("magnitude_layerwise", kind="pruning", parameters=PruneParameters)
def magnitude_layerwise(model, p: PruneParameters, generator):
    """The smallest |w| of each layer, the same fraction per layer (l1_unstructured)."""
    return layer_magnitude_masks(model, [p.sparsity] * len(prunable(model)))


@register_method("magnitude_global", kind="pruning", parameters=PruneParameters)
def magnitude_global(model, p: PruneParameters, generator):
    """The smallest |w| over all layers at once (global_unstructured)."""
    copy_ = copy.deepcopy(model)
    layers = prunable(copy_)
    prune.global_unstructured([(layer, "weight") for _, layer in layers], pruning_method=prune.L1Unstructured, amount=p.sparsity)
    return {name: layer.weight_mask.detach().clone() for name, layer in layers}


class AlphaParameters(PruneParameters):
    eps: float = Field(0.2, gt=0.0, lt=1.0, description="half-width of the sparsity range around the target")
    xmin: str = Field("median", pattern="^(median|ks)$", description="the power-law fit's xmin: the median eigenvalue or by KS")
    min_eigenvalues: int = Field(20, ge=2, description="layers with fewer eigenvalues get the median alpha")


@register_method("alpha_pruning", kind="pruning", parameters=AlphaParameters)
def alpha_pruning(model, p: AlphaParameters, generator):
    """Layer sparsities from each layer's ESD alpha (AlphaPruning), magnitude within layers."""
    alphas = [fit_power_law(esd(matrices), xmin=p.xmin)["alpha"] for _, matrices in layer_matrices(model)]
    return _allocated(model, alphas, p)


class FarmsParameters(AlphaParameters):
    window: tuple[int, int] = (16, 32)
    positions: int = Field(10, ge=1)


@register_method("farms_pruning", kind="pruning", parameters=FarmsParameters)
def farms_pruning(model, p: FarmsParameters, generator):
    """AlphaPruning's allocation with FARMS' alpha (fixed-aspect-ratio windows; the zoo's
    layers are small, so the window defaults to 16 x 32)."""
    alphas = [farms_alpha(matrices, p.window, p.positions, xmin=p.xmin) for _, matrices in layer_matrices(model)]
    return _allocated(model, alphas, p)


def _allocated(model, alphas, p: AlphaParameters):
    """Magnitude masks at the alpha-allocated sparsities. A fit on a few eigenvalues is noise
    (a 10-class head has 10): such a layer gets the median alpha of the others (nan here; see
    `allocate_by_alpha`), else a 512 x 10 head fitted at alpha 4 was pruned to 100%."""
    counts = [len(esd(matrices)) for _, matrices in layer_matrices(model)]
    alphas = [a if n >= p.min_eigenvalues else float("nan") for a, n in zip(alphas, counts)]
    sizes = np.array([layer.weight.numel() for _, layer in prunable(model)])
    return layer_magnitude_masks(model, list(allocate_by_alpha(np.array(alphas), sizes, p.sparsity, p.eps)))


# --------------------------------------------------------------------------- protocol


class PruneSettings(Parameters):
    seed: int = 0
    finetune_epochs: int = Field(0, ge=0, description="epochs of masked SGD after pruning (0: none)")
    finetune_lr: float = Field(0.01, gt=0.0)
    batch_size: int = Field(32, ge=1)


@register_protocol("prune", kind="pruning", unit="model", settings=PruneSettings,
                   metrics={"test_acc": "higher", "test_acc_before": "higher", "acc_drop": "lower",
                            "test_acc_finetuned": "higher", "sparsity": "higher"})
def prune_model(unit, call, settings: PruneSettings):
    """Prune the model's final weights; test accuracy before, after, and after fine-tuning."""
    model = unit.handle.load_model(unit.model_ids[0])
    split = unit.holdout()
    before = accuracy(model, split.x_test, split.y_test)
    masks = call.method.function(model, call.parameters, torch.Generator().manual_seed(settings.seed))
    pruned = apply_masks(copy.deepcopy(model), masks)
    after = accuracy(pruned, split.x_test, split.y_test)
    out = dict(test_acc=after, test_acc_before=before, acc_drop=before - after, sparsity=sparsity(pruned))
    if settings.finetune_epochs:
        out["test_acc_finetuned"] = accuracy(_masked_finetune(pruned, masks, split, settings), split.x_test, split.y_test)
    return out


def _masked_finetune(model, masks, split, s: PruneSettings):
    """Fine-tune on the training split with the pruned weights kept at zero."""
    return finetune(model, split.x_train, split.y_train, s.finetune_epochs, s.finetune_lr, s.batch_size, s.seed,
                    after_step=lambda m: apply_masks(m, masks))
