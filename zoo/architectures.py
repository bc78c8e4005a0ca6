"""Width-parameterised architectures, registered by name and built from a resolved spec.

Each architecture declares its options (a pydantic model; unknown options are errors) and is
built from (options, input_shape, n_classes). Initialisation draws from an explicit
`torch.Generator`, never from torch's global RNG, so a model's initial weights depend on its seed
alone and a population can be initialised model by model or all at once with the same result.

A stored config comes from whoever made the zoo, so every numeric option has bounds, and each
architecture also counts its parameters from its options, without torch and without building
anything: a model over the parameter budget (env ZOO_MAX_PARAMS, default 1e9, 4 GB as float32;
the largest shipped model, ResNet-50 at width 256 for TinyImageNet, has about 0.38e9) is refused
in one line before any memory is allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

from pydantic import Field

from .errors import ZooError, limit_from_env
from .registry import Registry
from .settings import Settings

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch is imported inside the builders, not here: the catalog validates options with this module,
# and `zoo catalog` / `zoo sql` should not pay torch's import time.

MAX_PARAMS = 1_000_000_000  # the default parameter budget (env ZOO_MAX_PARAMS)
WIDE, DEEP = 1 << 16, 1000  # bounds of channel/embedding widths and of layer counts


class ArchOptions(Settings):
    """An architecture's options (see zoo.settings)."""


@dataclass(frozen=True)
class Architecture:
    name: str
    options: type[ArchOptions]
    build: Callable[[ArchOptions, tuple[int, ...], int], nn.Module]
    count: Callable[[ArchOptions, tuple[int, ...], int], int]  # the parameters `build` would make


ARCHITECTURES: Registry[Architecture] = Registry("architecture")


def register_architecture(name: str, options: type[ArchOptions], count: Callable[[ArchOptions, tuple[int, ...], int], int]):
    """Register a builder `(options, input_shape, n_classes) -> nn.Module` under `name`, with
    `count`, the same signature, giving the number of parameters it builds (without torch)."""

    def wrap(build):
        ARCHITECTURES.add(name, Architecture(name, options, build, count), build)
        return build

    return wrap


def get_architecture(name: str) -> Architecture:
    return ARCHITECTURES.find(name)


def build_model(arch_spec: dict, input_shape: tuple[int, ...], n_classes: int, seed: int | None = None) -> nn.Module:
    """Build the architecture a resolved spec ({"name": ..., **options}) names.

    With `seed`, the weights are initialised from a generator seeded with it."""
    import torch

    spec = dict(arch_spec)
    arch = get_architecture(spec.pop("name"))
    options = arch.options(**spec)
    check_parameters(arch, options, tuple(input_shape), n_classes)
    model = arch.build(options, tuple(input_shape), n_classes)
    if seed is not None:
        initialize(model, torch.Generator().manual_seed(seed))
    return model


def check_parameters(arch: Architecture, options: ArchOptions, input_shape: tuple[int, ...], n_classes: int) -> int:
    """The model's parameter count, counted without building it; a ZooError over the budget."""
    n, budget = arch.count(options, tuple(input_shape), n_classes), limit_from_env("ZOO_MAX_PARAMS", MAX_PARAMS)
    if n > budget:
        raise ZooError(f"{arch.name} with {_options_text(options)} has {n:,} parameters, "
                       f"over the budget of {budget:,} (env ZOO_MAX_PARAMS)")
    return n


def _options_text(options: ArchOptions) -> str:
    return ", ".join(f"{k} {v}" for k, v in options.model_dump().items())


def _image(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ZooError(f"architecture {name} needs image inputs (C, H, W), got input shape {input_shape}")
    return input_shape


def _conv_bn(n_in: int, n_out: int, kernel: int) -> int:
    """Parameters of a bias-free convolution and its BatchNorm."""
    return n_in * n_out * kernel * kernel + 2 * n_out


def initialize(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """PyTorch's default initialisation (kaiming-uniform a=sqrt(5) weights, uniform(+-1/sqrt(fan_in))
    biases, BatchNorm and LayerNorm 1/0), drawn from `generator` in module order."""
    import torch
    from torch import nn

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                if module.bias is not None:
                    fan_in = module.weight[0].numel()
                    bound = 1 / math.sqrt(fan_in)
                    module.bias.uniform_(-bound, bound, generator=generator)
            elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                module.reset_parameters()
            if hasattr(module, "reset_extra_parameters"):  # parameters outside layers (a ViT's tokens)
                module.reset_extra_parameters(generator)
    return model


class MLPOptions(ArchOptions):
    width: int = Field(32, ge=1, le=1_000_000, description="hidden units per layer")
    depth: int = Field(2, ge=1, le=DEEP, description="hidden layers")
    activation: Literal["relu", "tanh", "gelu"] = "relu"


def count_mlp(o: MLPOptions, input_shape: tuple[int, ...], n_classes: int) -> int:
    sizes = [math.prod(input_shape)] + [o.width] * o.depth + [n_classes]
    return sum(n_in * n_out + n_out for n_in, n_out in zip(sizes, sizes[1:]))


@register_architecture("mlp", MLPOptions, count_mlp)
def build_mlp(o: MLPOptions, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """Flatten -> [Linear(width) -> activation] x depth -> Linear(n_classes)."""
    from torch import nn

    activation = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}[o.activation]
    layers: list[nn.Module] = [nn.Flatten()]
    n_in = math.prod(input_shape)
    for _ in range(o.depth):
        layers += [nn.Linear(n_in, o.width), activation()]
        n_in = o.width
    layers.append(nn.Linear(n_in, n_classes))
    return nn.Sequential(*layers)


class CNNOptions(ArchOptions):
    width: int = Field(16, ge=1, le=WIDE, description="channels of the first block; block k has width * 2^k")
    depth: int = Field(2, ge=1, le=16, description="conv blocks, each conv -> [BatchNorm] -> ReLU -> 2x2 max-pool")
    batchnorm: bool = True
    kernel_size: int = Field(3, ge=1, le=64)


def count_cnn(o: CNNOptions, input_shape: tuple[int, ...], n_classes: int) -> int:
    channels, total = _image("cnn", input_shape)[0], 0
    for k in range(o.depth):
        out = o.width * 2**k
        total += _conv_bn(channels, out, o.kernel_size) if o.batchnorm else channels * out * o.kernel_size**2 + out
        channels = out
    return total + channels * n_classes + n_classes


@register_architecture("cnn", CNNOptions, count_cnn)
def build_cnn(o: CNNOptions, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """Small CNN: conv blocks (channels width, 2*width, ...), global average pool, linear head."""
    from torch import nn

    channels, size = input_shape[0], min(_image("cnn", input_shape)[1:])
    if size < 2 ** (o.depth - 1):
        raise ZooError(f"architecture cnn: depth {o.depth} pools a {size}-pixel input below 1 pixel")
    layers: list[nn.Module] = []
    for k in range(o.depth):
        out = o.width * 2**k
        layers.append(nn.Conv2d(channels, out, o.kernel_size, padding=o.kernel_size // 2, bias=not o.batchnorm))
        if o.batchnorm:
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.ReLU())
        if k < o.depth - 1:
            layers.append(nn.MaxPool2d(2))
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, n_classes)]
    return nn.Sequential(*layers)


# --- ResNet-18 / ResNet-50, width-parameterised (the phase-zoo papers' definition) -----------


class ResNetOptions(ArchOptions):
    width: int = Field(64, ge=1, le=WIDE, description="channels of the first stage; stages have w, 2w, 4w, 8w (64: the standard ResNet)")
    depth: Literal[18, 50] = 18


def count_resnet(o: ResNetOptions, input_shape: tuple[int, ...], n_classes: int) -> int:
    bottleneck = o.depth == 50
    channels = o.width
    total = _conv_bn(_image("resnet", input_shape)[0], channels, 3)
    for stage, n in enumerate([3, 4, 6, 3] if bottleneck else [2, 2, 2, 2]):
        planes = o.width * 2**stage
        out = planes * 4 if bottleneck else planes
        for k in range(n):
            if bottleneck:
                total += _conv_bn(channels, planes, 1) + _conv_bn(planes, planes, 3) + _conv_bn(planes, out, 1)
            else:
                total += _conv_bn(channels, planes, 3) + _conv_bn(planes, planes, 3)
            if (stage > 0 and k == 0) or channels != out:  # the projection shortcut
                total += _conv_bn(channels, out, 1)
            channels = out
    return total + channels * n_classes + n_classes


@register_architecture("resnet", ResNetOptions, count_resnet)
def build_resnet(o: ResNetOptions, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """ResNet-18 (basic blocks 2-2-2-2) or ResNet-50 (bottlenecks 3-4-6-3, expansion 4) for small
    images: a 3x3 stride-1 stem, no max-pool, stages of w, 2w, 4w, 8w channels (stride 2 from the
    second on, with a 1x1 projection shortcut where the shape changes), convolutions without
    bias, BatchNorm, global average pool, a linear head. At w=64 with 10 classes ResNet-18 has
    11,173,962 parameters, as the standard CIFAR ResNet-18."""
    from torch import nn

    from ._resnet import BasicBlock, Bottleneck

    _image("resnet", input_shape)
    bottleneck = o.depth == 50
    blocks = [3, 4, 6, 3] if bottleneck else [2, 2, 2, 2]
    expansion = 4 if bottleneck else 1
    layers: list[nn.Module] = [nn.Conv2d(input_shape[0], o.width, 3, 1, 1, bias=False), nn.BatchNorm2d(o.width), nn.ReLU()]
    channels = o.width
    for stage, n in enumerate(blocks):
        planes = o.width * 2**stage
        for k in range(n):
            stride = 2 if stage > 0 and k == 0 else 1
            layers.append((Bottleneck if bottleneck else BasicBlock)(channels, planes, stride))
            channels = planes * expansion
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, n_classes)]
    return nn.Sequential(*layers)


# --- a small ViT whose embedding dimension is the load axis ----------------------------------


class ViTOptions(ArchOptions):
    width: int = Field(192, ge=1, le=WIDE, description="embedding dimension (the load axis)")
    depth: int = Field(6, ge=1, le=DEEP, description="transformer blocks")
    heads: int = Field(4, ge=1, le=1024)
    patch_size: int = Field(4, ge=1, le=1024)
    mlp_ratio: int = Field(2, ge=1, le=64)


def count_vit(o: ViTOptions, input_shape: tuple[int, ...], n_classes: int) -> int:
    channels, height, width = _image("vit", input_shape)
    d, hidden = o.width, o.mlp_ratio * o.width
    n_patches = (height // o.patch_size) * (width // o.patch_size)
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)  # norms, attention, MLP
    embedding = channels * d * o.patch_size**2 + d + d + (n_patches + 1) * d  # patches, class token, positions
    return embedding + o.depth * block + 2 * d + d * n_classes + n_classes


@register_architecture("vit", ViTOptions, count_vit)
def build_vit(o: ViTOptions, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """Patch embedding (a strided convolution), a class token and learned position embeddings,
    pre-norm transformer blocks (multi-head self-attention, GELU MLP), a final LayerNorm, and a
    linear head on the class token."""
    from ._vit import ViT

    _image("vit", input_shape)
    if o.width % o.heads:
        raise ZooError(f"architecture vit: width {o.width} is not divisible by heads {o.heads}")
    if input_shape[1] % o.patch_size or input_shape[2] % o.patch_size:
        raise ZooError(f"architecture vit: patch size {o.patch_size} does not tile a {input_shape[1]}x{input_shape[2]} image")
    n_patches = (input_shape[1] // o.patch_size) * (input_shape[2] // o.patch_size)
    return ViT(input_shape[0], n_patches, n_classes, o.width, o.depth, o.heads, o.patch_size, o.mlp_ratio)
