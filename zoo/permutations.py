"""Hidden-unit permutations of the zoo's architectures.

Permuting the hidden units of a layer (its output rows, its bias, its BatchNorm's parameters and
statistics, and the matching input columns of the next weight layer) leaves the network's
function unchanged. Weight matching aligns models by such permutations before averaging them,
and weight-space learning uses random ones as data augmentation.

A `PermutationSpec` lists, for every hidden layer, the tensors and axes its permutation moves.
It is derived from the module itself, so no architecture needs a hand-written table:
- an nn.Sequential of Linear, Conv2d, BatchNorm and shape-free layers (MLPs, CNNs): one group
  per hidden layer;
- residual blocks in such a Sequential (the ResNets): the residual stream is one group from the
  stem to the next projection shortcut (the sum of a block's body and an identity shortcut must
  keep one order), and every convolution inside a block's body has its own group;
- the ViT: the residual stream (patch embedding, class token, position embeddings, every
  LayerNorm, the attention and MLP projections that read or write the stream, the head's
  inputs) is one group, and each block's MLP hidden layer is another. The units inside the
  attention heads are not permuted (their query, key and value rows share one tensor), so
  weight matching of ViTs aligns the stream and the MLPs only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


def permutation_spec(model: nn.Module) -> PermutationSpec:
    """The hidden-unit groups of a model the catalog builds (every weight layer's outputs but the
    last's, which are the classes)."""
    from ._resnet import BasicBlock, Bottleneck
    from ._vit import ViT

    walker = _Walker((BasicBlock, Bottleneck))
    if isinstance(model, ViT):
        return walker.vit(model)
    if not isinstance(model, nn.Sequential):
        raise ZooError(f"permutations need an nn.Sequential model or the ViT, got {type(model).__name__}")
    walker.walk(model, "")
    return walker.finish()


@dataclass
class _Open:
    """A group while the walk collects its axes."""

    size: int
    axes: list[Axis] = field(default_factory=list)


class _Walker:
    """Walks a model's layers in order, opening a group at every weight layer's outputs and
    adding to it every tensor that reads or carries those units."""

    def __init__(self, residual_blocks: tuple[type, ...]):
        self.residual_blocks = residual_blocks
        self.groups: list[_Open] = []
        self.open: _Open | None = None  # the units the current activations carry
        self.flattened = False

    def finish(self) -> PermutationSpec:
        hidden = [g for g in self.groups if g is not self.open]  # the last outputs are the classes
        return [Group(g.size, tuple(g.axes)) for g in hidden]

    def walk(self, layers: nn.Sequential, prefix: str) -> None:
        for index, layer in enumerate(layers):
            name = f"{prefix}{index}."
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                self.weight(layer, name)
            elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
                if self.open is None:
                    raise ZooError(f"layer {name[:-1]}: BatchNorm before any weight layer")
                self.open.axes += [Axis(name + n, 0) for n in _NORM_TENSORS if getattr(layer, n, None) is not None]
            elif isinstance(layer, nn.Flatten):
                self.flattened = True
            elif isinstance(layer, self.residual_blocks):
                self.residual(layer, name)
            elif isinstance(layer, nn.Sequential):
                self.walk(layer, name)
            elif not isinstance(layer, _NEUTRAL):
                raise ZooError(f"layer {name[:-1]} ({type(layer).__name__}): cannot derive its permutations")

    def weight(self, layer: nn.Linear | nn.Conv2d, name: str) -> None:
        if self.open is not None:  # this layer's inputs are the open group's units
            in_features = layer.weight.shape[1]
            if in_features % self.open.size:
                raise ZooError(f"layer {name[:-1]}: {in_features} inputs do not split into {self.open.size} units")
            block = in_features // self.open.size if self.flattened else 1
            self.open.axes.append(Axis(name + "weight", 1, block))
        axes = [Axis(name + "weight", 0)] + ([Axis(name + "bias", 0)] if layer.bias is not None else [])
        self.open = _Open(layer.weight.shape[0], axes)
        self.groups.append(self.open)
        self.flattened = False

    def residual(self, block: nn.Module, name: str) -> None:
        """body(x) + shortcut(x): the body's last outputs and the shortcut's share one order,
        the stream's own (identity shortcut) or the projection's (a new stream from here)."""
        if self.open is None:
            raise ZooError(f"layer {name[:-1]}: a residual block before any weight layer")
        stream = self.open
        self.walk(block.body, name + "body.")
        body_out = self.open
        if not isinstance(block.shortcut, nn.Identity):
            self.open = stream
            self.walk(block.shortcut, name + "shortcut.")
            stream = self.open
        if body_out.size != stream.size:
            raise ZooError(f"layer {name[:-1]}: the body gives {body_out.size} channels, the shortcut {stream.size}")
        stream.axes += body_out.axes
        self.groups.remove(body_out)
        self.open = stream

    def vit(self, model: nn.Module) -> PermutationSpec:
        dim = model.embed.weight.shape[0]
        stream = _Open(dim, [Axis("embed.weight", 0), Axis("embed.bias", 0), Axis("cls", 2), Axis("position", 2)])
        hidden = []
        for i, block in enumerate(model.blocks):
            p = f"blocks.{i}."
            stream.axes += [Axis(f"{p}{norm}.{n}", 0) for norm in ("norm1", "norm2") for n in ("weight", "bias")]
            stream.axes += [Axis(p + "attention.qkv.weight", 1), Axis(p + "attention.out.weight", 0),
                            Axis(p + "attention.out.bias", 0), Axis(p + "mlp.0.weight", 1),
                            Axis(p + "mlp.2.weight", 0), Axis(p + "mlp.2.bias", 0)]
            hidden.append(_Open(block.mlp[0].weight.shape[0], [Axis(p + "mlp.0.weight", 0), Axis(p + "mlp.0.bias", 0),
                                                              Axis(p + "mlp.2.weight", 1)]))
        stream.axes += [Axis("norm.weight", 0), Axis("norm.bias", 0), Axis("head.weight", 1)]
        self.groups, self.open = [stream, *hidden], None
        return self.finish()


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
