"""Hidden-unit permutations of the zoo's sequential architectures.

Permuting the hidden units of a layer (its output rows, its bias, its BatchNorm's parameters and
statistics, and the matching input columns of the next weight layer) leaves the network's
function unchanged. Weight matching aligns models by such permutations before averaging them,
and weight-space learning uses random ones as data augmentation.

A `PermutationSpec` lists, for every hidden layer, the tensors and axes its permutation moves.
It is derived from the module itself (any nn.Sequential of Linear, Conv2d, BatchNorm and
shape-free layers, which covers every architecture the catalog builds), so no architecture
needs a hand-written table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ZooError

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Axis:
    name: str  # state-dict key
    axis: int  # the axis the permutation acts on
    block: int = 1  # consecutive entries per unit (a Linear after Flatten of C x H x W: H*W)


@dataclass(frozen=True)
class Group:
    """One hidden layer's units: `size` of them, moving every axis in `axes` together."""

    size: int
    axes: tuple[Axis, ...]


PermutationSpec = list[Group]

_NEUTRAL = (nn.ReLU, nn.Tanh, nn.GELU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity)


def permutation_spec(model: nn.Module) -> PermutationSpec:
    """The hidden-unit groups of a sequential model (every weight layer but the last)."""
    if not isinstance(model, nn.Sequential):
        raise ZooError(f"permutations need an nn.Sequential model, got {type(model).__name__}")
    groups: list[Group] = []
    open_axes: list[Axis] | None = None  # the current hidden layer's axes, still collecting
    size = 0
    flattened = False
    for index, layer in enumerate(model):
        prefix = f"{index}."
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            if open_axes is not None:  # this layer's inputs close the previous hidden layer
                in_features = layer.weight.shape[1]
                if in_features % size:
                    raise ZooError(f"layer {index}: {in_features} inputs do not split into {size} units")
                block = in_features // size if flattened else 1
                open_axes.append(Axis(prefix + "weight", 1, block))
                groups.append(Group(size, tuple(open_axes)))
            size = layer.weight.shape[0]
            open_axes = [Axis(prefix + "weight", 0)] + ([Axis(prefix + "bias", 0)] if layer.bias is not None else [])
            flattened = False
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
            if open_axes is None:
                raise ZooError(f"layer {index}: BatchNorm before any weight layer")
            open_axes += [Axis(prefix + n, 0) for n in ("weight", "bias", "running_mean", "running_var")
                          if getattr(layer, n, None) is not None]
        elif isinstance(layer, nn.Flatten):
            flattened = True
        elif not isinstance(layer, _NEUTRAL):
            raise ZooError(f"layer {index} ({type(layer).__name__}): cannot derive its permutations")
    return groups  # the last weight layer's outputs (the classes) are not permuted


def permute_state(state: StateDict, spec: PermutationSpec, perms: list[torch.Tensor]) -> StateDict:
    """`state` with group k's units reordered by perms[k] (new unit j = old unit perms[k][j])."""
    out = dict(state)
    for group, perm in zip(spec, perms):
        for a in group.axes:
            out[a.name] = _take(out[a.name], a, perm)
    return out


def random_permutations(spec: PermutationSpec, generator: torch.Generator) -> list[torch.Tensor]:
    return [torch.randperm(g.size, generator=generator) for g in spec]


def _take(tensor: torch.Tensor, a: Axis, perm: torch.Tensor) -> torch.Tensor:
    if a.block == 1:
        return tensor.index_select(a.axis, perm)
    index = (perm[:, None] * a.block + torch.arange(a.block)).reshape(-1)
    return tensor.index_select(a.axis, index)
