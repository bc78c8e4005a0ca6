"""Train a population of same-shape models as one stacked computation.

Each model keeps its own initialisation, data order, augmentation and learning rate (the same
generators as the reference path in `training.py`), but the M models' weights live in stacked
tensors with a leading model axis, and every step runs each layer once for all M models: a
linear layer is one batched matmul (`torch.baddbmm`), a convolution one grouped convolution
(`groups=M`, channels-last), a BatchNorm one call over the M*C channels (each model's channels
are normalised over its own batch, exactly as alone). A small model is bound by per-step
overhead, so this is where the machine's time goes. Same initialisation and batches give the
same models as the reference path, to float rounding (about 1e-7 after an epoch).

Three engines: MLPs of ReLU or Tanh (`_MLPStack`) and the catalog's CNNs (`_CNNStack`) with the
backward pass written out, and every other stackable model (GELU MLPs, other layer mixes) through
autograd (`_Stack`). All give `gradients`, `evaluate` and `module`; `train_stack` draws the
batches and takes the SGD steps.

Written by hand because torch.func's vmap over a functional model was 3x slower than stacked
matmuls here (see ../shared/reference/performance.md) and no library trains populations.
"""

from __future__ import annotations

import functools
import math
import time

import torch
from torch import nn
from torch.nn import functional as F

from zoo.device import run_device
from zoo.catalog import ModelSpec
from zoo.datasets import Data
from zoo.rows import TrainedModel
from zoo.weights import flatten, tensor_index

from .plan import shape_key
from .training import augment, batch_sizes, derive_seed, epoch_indices, initial_model, make_optimizer, make_schedule, steps_per_epoch

_ACTIVATIONS = {nn.ReLU: torch.relu, nn.Tanh: torch.tanh, nn.GELU: F.gelu}


class _Stack:
    """M same-shape models as stacked tensors, run layer by layer for all M at once.

    The reference modules (their initialisation is the reference path's) describe the layers;
    every parameter is stacked along a new leading model axis, so a per-model learning rate is an
    (M, 1, ...) tensor. Activations flow either as vectors (M, B, F) or as images
    (B, M*C, H, W), channels-last, model m owning channels m*C .. (m+1)*C - 1."""

    SUPPORTED = (nn.Flatten, nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, *_ACTIVATIONS)
    # Activation values per evaluation chunk (`evaluate`). Chunks of 8 MB stay in the cache:
    # CNN stacks on Fashion-MNIST evaluated 1.7-1.9x faster than with 64 MB chunks (2026-12-01,
    # 20 models of width 4 and 4 of width 8, 1 thread), whose tensors also took fresh pages
    # from the kernel at every allocation.
    EVAL_VALUES = 1 << 21

    def __init__(self, specs: list[ModelSpec], device: torch.device):
        self.specs = specs
        self.references = [initial_model(s) for s in specs]
        self.layers = list(self.references[0])
        unsupported = {type(layer).__name__ for layer in self.layers if not isinstance(layer, self.SUPPORTED)}
        if unsupported:
            raise ValueError(f"cannot stack layers {sorted(unsupported)}")
        # named_parameters order of each model, stacked: (M, *shape); Linear weights as (M, in, out)
        self.names = [name for name, _ in self.references[0].named_parameters()]
        self.params = []
        for name in self.names:
            tensors = [dict(model.named_parameters())[name].detach() for model in self.references]
            stacked = torch.stack([t.T if self._is_linear_weight(name) else t for t in tensors])
            self.params.append(stacked.to(device).contiguous().requires_grad_())
        self.param = dict(zip(self.names, self.params))
        self.buffers = {  # BatchNorm running statistics, (M * C,) each, updated in place
            name: torch.cat([dict(model.named_buffers())[name].detach() for model in self.references]).to(device)
            for name, buffer in self.references[0].named_buffers()
            if buffer.is_floating_point()
        }
        self.steps = 0  # BatchNorm's num_batches_tracked: training steps taken (`gradients`)

    def _is_linear_weight(self, name: str) -> bool:
        index, _, kind = name.rpartition(".")
        return kind == "weight" and isinstance(self.layers[int(index)], nn.Linear)

    def logits(self, x: torch.Tensor, training: bool = True) -> torch.Tensor:
        """Each model's logits (M, B, classes) on its own batch, x (M, B, *input_shape), or on
        one shared batch, x (B, *input_shape). In training mode BatchNorm normalises by the batch
        and updates its running statistics; otherwise it uses them."""
        n_models = len(self.specs)
        shared = x.dim() == len(self.specs[0].input_shape) + 1
        batch = x.shape[0] if shared else x.shape[1]
        h, image = x, False
        if isinstance(self.layers[0], nn.Conv2d):
            h = as_channels_last(x if shared else x.transpose(0, 1).reshape(batch, -1, *x.shape[3:]))
            image = True
        elif shared:  # the first Linear of all models as one matmul against the shared inputs
            h = x.reshape(batch, -1)[None]
        fast_pool = not torch.is_grad_enabled()  # (max_pool_2x2 has no autograd rule of max_pool2d's ties)
        for k, layer in enumerate(self.layers):
            p = lambda name: self.param.get(f"{k}.{name}")  # noqa: E731
            if fast_pool and relu_then_pool_2x2(self.layers, k):
                continue  # taken after the pool, on a quarter of the values: the same values (ReLU is monotone)
            if isinstance(layer, nn.Flatten):
                h = h.reshape(batch, n_models, -1).transpose(0, 1) if image else h.reshape(h.shape[0], batch, -1)
                image = False
            elif isinstance(layer, nn.Linear):
                weight, bias = p("weight"), p("bias")
                if h.shape[0] == 1 < n_models:  # shared inputs: (1, B, in) @ (in, M * out)
                    h = torch.addmm(bias.reshape(-1), h[0], weight.transpose(0, 1).reshape(weight.shape[1], -1))
                    h = h.reshape(batch, n_models, -1).transpose(0, 1)
                else:
                    h = torch.baddbmm(bias[:, None, :], h, weight)
            elif isinstance(layer, nn.Conv2d):
                weight, bias = p("weight"), p("bias")
                groups = 1 if k == 0 and shared else n_models  # shared inputs: every model's filters in one convolution
                h = F.conv2d(h, weight.reshape(-1, *weight.shape[2:]), None if bias is None else bias.reshape(-1),
                             layer.stride, layer.padding, layer.dilation, groups=groups)
            elif isinstance(layer, nn.BatchNorm2d):
                h = F.batch_norm(h, self.buffers[f"{k}.running_mean"], self.buffers[f"{k}.running_var"],
                                 p("weight").reshape(-1), p("bias").reshape(-1), training, layer.momentum, layer.eps)
            elif isinstance(layer, nn.MaxPool2d):
                if fast_pool and _is_pool_2x2(layer):
                    h = max_pool_2x2(h)
                    if relu_then_pool_2x2(self.layers, k - 1):
                        h = h.relu_()
                else:
                    h = F.max_pool2d(h, layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.ceil_mode)
            elif isinstance(layer, nn.AdaptiveAvgPool2d):
                if layer.output_size not in (1, (1, 1)):
                    raise ValueError("cannot stack AdaptiveAvgPool2d to more than 1x1")
                h = h.mean((2, 3), keepdim=True)
            else:
                h = _ACTIVATIONS[type(layer)](h)
        return h

    def gradients(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """The gradient of each model's mean cross-entropy on its own batch, x (M, B, *input_shape),
        y (M, B), by autograd, for every parameter (as `params`); BatchNorm's running statistics
        are updated on the way (and counted: `steps`)."""
        logits = self.logits(x)
        self.steps += 1
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
        # The sum over models of each model's mean loss: model m's gradient is its own.
        return list(torch.autograd.grad(losses.reshape(len(self.specs), -1).mean(1).sum(), self.params))

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[tuple[float, float]]:
        """Every model's (mean cross-entropy, accuracy) on one data split, in eval mode: the same
        definition as `zoo.evaluation.evaluate` (batches of `batch_size` or fewer, each batch's
        summed loss added in double precision), computed for all models at once. A model loaded
        from the store reproduces these numbers to float rounding (about 1e-7 relative)."""
        return _scores(lambda xs: self.logits(xs, training=False), x, y, self.evaluation_chunk(x, batch_size), len(self.specs),
                       self.params[0].device)

    def evaluation_chunk(self, x: torch.Tensor, batch_size: int) -> int:
        """How many samples of `x` `evaluate` runs at once: at most `batch_size`, and few enough that
        the activations held at once (M x chunk x the widest feature map) stay within `EVAL_VALUES`."""
        widest = max(p.shape[1 if p.dim() == 2 else 1] for p in self.params if p.dim() >= 2) * max(1, math.prod(x.shape[2:]))
        return max(1, min(batch_size, self.EVAL_VALUES // (len(self.specs) * widest)))

    @torch.no_grad()
    def module(self, m: int) -> nn.Module:
        """Model m as an ordinary module holding its current stacked weights and statistics."""
        model = self.references[m]
        params = dict(model.named_parameters())
        for name, stacked in zip(self.names, self.params):
            params[name].copy_(stacked[m].T if self._is_linear_weight(name) else stacked[m])
        for name, buffer in model.named_buffers():
            if name in self.buffers:
                size = buffer.numel()
                buffer.copy_(self.buffers[name][m * size : (m + 1) * size])
            else:  # num_batches_tracked
                buffer.fill_(self.steps)
        return model


class _CNNStack(_Stack):
    """M same-shape CNNs of the catalog's `cnn` kind ([Conv2d -> BatchNorm2d? -> ReLU ->
    MaxPool2d(2)?] x depth -> global average pool -> Flatten -> Linear) with the backward pass
    written out, the engine for CNN stacks.

    The same stacked layout and forward as `_Stack` (images (B, M*C, H, W), channels-last; one
    grouped convolution, one BatchNorm and one max-pool for all models), but each step calls the
    forward kernels and then their backward kernels directly (`convolution_backward`,
    `native_batch_norm_backward`, `max_pool2d_with_indices_backward`, `threshold_backward`; each
    ReLU before a max-pool taken after it, on a quarter of the values), every gradient kept
    channels-last. Through autograd, the ReLU's backward met a max-pool
    gradient in the other memory layout and took a strided path: a third of a step on
    Fashion-MNIST-sized images (28 x 28, batch 128, 4 channels; measured here). A test checks
    every gradient and running statistic against autograd on each model alone."""

    @classmethod
    def fits(cls, layers: list[nn.Module]) -> bool:
        if len(layers) < 4 or not isinstance(layers[0], nn.Conv2d) or [type(x) for x in layers[-3:]] != [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear]:
            return False
        if layers[-3].output_size not in (1, (1, 1)):
            return False
        for layer in layers[:-3]:
            if isinstance(layer, nn.MaxPool2d):
                if not _is_pool_2x2(layer):
                    return False
            elif not isinstance(layer, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU)):
                return False
        return True

    def __init__(self, specs: list[ModelSpec], device: torch.device):
        super().__init__(specs, device)
        for p in self.params:
            p.requires_grad_(False)

    @torch.no_grad()
    def gradients(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """As `_Stack.gradients` (x (M, B, *input_shape), y (M, B)), without autograd."""
        aten = torch.ops.aten
        n_models, batch = y.shape
        h = as_channels_last(x.transpose(0, 1).reshape(batch, -1, *x.shape[3:]))
        saved = []  # per layer: what its backward needs
        body = self.layers[:-3]
        for k, layer in enumerate(body):
            p = lambda name: self.param.get(f"{k}.{name}")  # noqa: E731
            if isinstance(layer, nn.Conv2d):
                weight, bias = p("weight"), p("bias")
                saved.append(h)
                h = F.conv2d(h, weight.reshape(-1, *weight.shape[2:]), None if bias is None else bias.reshape(-1),
                             layer.stride, layer.padding, layer.dilation, groups=n_models)
            elif isinstance(layer, nn.BatchNorm2d):
                out, mean, invstd = aten.native_batch_norm(
                    h, p("weight").reshape(-1), p("bias").reshape(-1), self.buffers[f"{k}.running_mean"],
                    self.buffers[f"{k}.running_var"], True, layer.momentum, layer.eps)
                saved.append((h, mean, invstd))
                h = out
            elif isinstance(layer, nn.ReLU):
                if relu_then_pool_2x2(body, k):
                    saved.append(None)  # taken after the pool (below)
                else:
                    h = h.relu_()  # (in place: BatchNorm's backward needs its input, not its output)
                    saved.append(h)
            else:  # MaxPool2d(2)
                pooled, indices = aten.max_pool2d_with_indices(h, [2, 2], [2, 2], [0, 0], [1, 1], False)
                if relu_then_pool_2x2(body, k - 1):
                    # ReLU then max-pool = max-pool then ReLU (ReLU is monotone): the same values, on a
                    # quarter of them; where the indices differ (a window of values <= 0), the
                    # ReLU's backward sends nothing through
                    pooled = pooled.relu_()
                saved.append((h, indices, pooled))
                h = pooled
        pooled = h.mean((2, 3)).reshape(batch, n_models, -1).transpose(0, 1)  # (M, B, C)
        weight, bias = self.params[-2], self.params[-1]  # (M, C, classes), (M, classes)
        logits = torch.baddbmm(bias[:, None, :], pooled, weight)
        g = torch.softmax(logits, 2)
        g.scatter_add_(2, y[:, :, None], _minus_ones(n_models, batch, g.device, g.dtype)).div_(batch)
        grads: dict[int, torch.Tensor] = {len(self.params) - 2: torch.bmm(pooled.transpose(1, 2), g), len(self.params) - 1: g.sum(1)}
        g = torch.bmm(g, weight.transpose(1, 2)).transpose(0, 1).reshape(batch, -1, 1, 1).div_(h.shape[2] * h.shape[3])
        g = g.expand(h.shape)  # the average pool's backward, as a broadcast (the ReLU's backward reads it)
        index = {name: i for i, name in enumerate(self.names)}
        for k in reversed(range(len(body))):
            layer, kept = body[k], saved[k]
            if isinstance(layer, nn.ReLU):
                if not relu_then_pool_2x2(body, k):  # (else taken at the max-pool)
                    g = aten.threshold_backward(g, kept, 0).contiguous(memory_format=torch.channels_last)
            elif isinstance(layer, nn.MaxPool2d):
                inputs, indices, pooled = kept
                g = g.contiguous(memory_format=torch.channels_last)
                if relu_then_pool_2x2(body, k - 1):
                    # the ReLU's backward on the pooled map, a quarter of the values (0.05 vs 0.45 ms
                    # for 4 models of width 4 at batch 128, measured here)
                    g = aten.threshold_backward(g, pooled, 0)
                g = aten.max_pool2d_with_indices_backward(g, inputs, [2, 2], [2, 2], [0, 0], [1, 1], False, indices)
            elif isinstance(layer, nn.BatchNorm2d):
                inputs, mean, invstd = kept
                g, g_weight, g_bias = aten.native_batch_norm_backward(
                    g, inputs, self.param[f"{k}.weight"].reshape(-1), self.buffers[f"{k}.running_mean"],
                    self.buffers[f"{k}.running_var"], mean, invstd, True, layer.eps, [True, True, True])
                grads[index[f"{k}.weight"]] = g_weight.reshape(n_models, -1)
                grads[index[f"{k}.bias"]] = g_bias.reshape(n_models, -1)
            else:  # Conv2d
                weight, bias = self.param[f"{k}.weight"], self.param.get(f"{k}.bias")
                g_input, g_weight, g_bias = aten.convolution_backward(
                    g, kept, weight.reshape(-1, *weight.shape[2:]), None if bias is None else [bias.numel()],
                    list(layer.stride), list(layer.padding), list(layer.dilation), False, [0, 0], n_models,
                    [k > 0, True, bias is not None])
                grads[index[f"{k}.weight"]] = g_weight.reshape(weight.shape)
                if bias is not None:
                    grads[index[f"{k}.bias"]] = g_bias.reshape(bias.shape)
                g = g_input
        self.steps += 1
        return [grads[i] for i in range(len(self.params))]


class _MLPStack:
    """M same-shape MLPs (Flatten -> [Linear -> ReLU or Tanh] x depth -> Linear) with the backward
    pass written out, the engine for MLP stacks.

    Autograd's bookkeeping cost as much as the arithmetic on these small layers, so each step is
    the forward matmuls, softmax minus one-hot, and for each layer two batched matmuls (weight
    gradient, input gradient) and the activation's derivative (a 64-model stack of the digits
    MLP trained 1.7x faster than through autograd, measured once here, 2026-11-30). The last
    layer's outputs are padded with zero columns to a multiple of 16: oneDNN's batched kernels
    are 3-4x faster at a multiple of 8 than at 10 columns, and torch's softmax at a multiple of
    its vector width (16 floats with AVX-512; see `gradients`). The padding stays zero (its
    gradient is zero) and is never seen outside. A test checks every gradient against autograd.
    Evaluation runs in chunks of `EVAL_CHUNK` samples, whose activations for 256 models stay in
    cache (3x faster than one 2048-sample chunk)."""

    EVAL_CHUNK = 128
    ACTIVATIONS = {nn.ReLU: (torch.relu, lambda g, h: torch.ops.aten.threshold_backward(g, h, 0)),
                   nn.Tanh: (torch.tanh, lambda g, h: torch.ops.aten.tanh_backward(g, h))}

    @classmethod
    def fits(cls, layers: list[nn.Module]) -> bool:
        kinds = [type(layer) for layer in layers]
        return (len(kinds) >= 2 and kinds[0] is nn.Flatten and kinds[-1] is nn.Linear
                and all(k is nn.Linear for k in kinds[1::2]) and len(set(kinds[2:-1:2])) <= 1
                and all(k in cls.ACTIVATIONS for k in kinds[2:-1:2]))

    def __init__(self, specs: list[ModelSpec], device: torch.device):
        self.specs = specs
        self.references = [initial_model(s) for s in specs]
        layers = list(self.references[0])
        self.linears = [k for k, layer in enumerate(layers) if isinstance(layer, nn.Linear)]
        self.activation, self.derivative = self.ACTIVATIONS.get(type(layers[2]), (None, None)) if len(layers) > 2 else (None, None)
        self.n_out = layers[-1].out_features
        padded = -(-self.n_out // 16) * 16  # (a multiple of 8 for oneDNN, of 16 for the softmax)
        self.params = []  # weight (M, in, out) and bias (M, 1, out) of each Linear, in order
        for k in self.linears:
            weight = torch.stack([model[k].weight.detach().T for model in self.references])
            bias = torch.stack([model[k].bias.detach() for model in self.references])[:, None, :]
            if k == self.linears[-1]:
                weight, bias = F.pad(weight, (0, padded - self.n_out)), F.pad(bias, (0, padded - self.n_out))
            self.params += [weight.to(device).contiguous(), bias.to(device).contiguous()]
        self.padding = torch.zeros(padded, device=device)  # added to the logits: 0, then -inf on the padding
        self.padding[self.n_out :] = float("-inf")

    def gradients(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """The gradient of each model's mean cross-entropy on its own batch, x (M, B, *input_shape),
        y (M, B), for every parameter (as `params`)."""
        n_models, batch = y.shape
        x = x.reshape(n_models, batch, -1)  # (the Flatten)
        h, hidden = x, []
        for layer in range(len(self.linears)):
            weight, bias = self.params[2 * layer], self.params[2 * layer + 1]
            h = torch.baddbmm(bias, h, weight)
            if layer < len(self.linears) - 1:
                h = self.activation(h)
            hidden.append(h)
        inputs = [x] + hidden[:-1]
        # The padding columns leave the softmax as -inf (exp gives exact zeros, so their gradient
        # stays zero): torch's CPU softmax over a last dimension that is not a multiple of its
        # vector width takes a path ~8x slower per row (10 vs 16 columns, 1,024 rows: 200 vs
        # 23 us, measured here), 17% of a 32-model stack's step.
        g = torch.softmax(h.add_(self.padding), 2)
        g.scatter_add_(2, y[:, :, None], _minus_ones(n_models, batch, g.device, g.dtype)).div_(batch)
        grads: list[torch.Tensor] = [None] * len(self.params)  # type: ignore[list-item]
        for layer in reversed(range(len(self.linears))):
            grads[2 * layer] = torch.bmm(inputs[layer].transpose(1, 2), g)
            grads[2 * layer + 1] = g.sum(1, keepdim=True)
            if layer > 0:
                g = self.derivative(torch.bmm(g, self.params[2 * layer].transpose(1, 2)), inputs[layer])
        return grads

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every model's logits (M, N, classes) on one shared batch x (N, *input_shape): the first
        layer of all models is one matmul."""
        n_models = len(self.specs)
        weight, bias = self.params[0], self.params[1]
        h = torch.addmm(bias.reshape(-1), x.reshape(len(x), -1), weight.transpose(0, 1).reshape(weight.shape[1], -1))
        if len(self.linears) > 1:  # on the contiguous (N, M * width) output: on the transposed view
            h = self.activation(h)  # below, it answered strided and baddbmm copied it (a 32-model
            # stack's evaluation on 1,437 digits: 10.4 vs 6.9 ms, same values, measured here)
        h = h.reshape(len(x), n_models, -1).transpose(0, 1)
        for layer in range(1, len(self.linears)):
            h = torch.baddbmm(self.params[2 * layer + 1], h, self.params[2 * layer])
            if layer < len(self.linears) - 1:
                h = self.activation(h)
        return h[:, :, : self.n_out]

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[tuple[float, float]]:
        """As `_Stack.evaluate`: every model's (mean cross-entropy, accuracy) on one split."""
        return _scores(self.logits, x, y, min(batch_size, self.EVAL_CHUNK), len(self.specs), self.params[0].device)

    @torch.no_grad()
    def module(self, m: int) -> nn.Module:
        """Model m as an ordinary module holding its current stacked weights."""
        model = self.references[m]
        for layer, k in enumerate(self.linears):
            model[k].weight.copy_(self.params[2 * layer][m, :, : model[k].out_features].T)
            model[k].bias.copy_(self.params[2 * layer + 1][m, 0, : model[k].out_features])
        return model


@functools.lru_cache(maxsize=8)
def _minus_ones(n_models: int, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(M, B, 1) of -1, added at each sample's label to turn the softmax into the cross-entropy's
    gradient; kept across steps (read only)."""
    return torch.full((n_models, batch, 1), -1.0, device=device, dtype=dtype)


def _is_pool_2x2(layer: nn.Module) -> bool:
    """Whether `layer` is max_pool2d(2): 2 x 2 windows, stride 2, no padding or dilation, floor mode."""
    return (isinstance(layer, nn.MaxPool2d) and layer.kernel_size in (2, (2, 2)) and layer.stride in (2, (2, 2))
            and layer.padding in (0, (0, 0)) and layer.dilation in (1, (1, 1)) and not layer.ceil_mode)


def relu_then_pool_2x2(layers: list[nn.Module], k: int) -> bool:
    """Whether layers[k] is a ReLU followed by max_pool2d(2) (which the engines swap)."""
    return 0 <= k < len(layers) - 1 and isinstance(layers[k], nn.ReLU) and _is_pool_2x2(layers[k + 1])


def _windows(images: torch.Tensor) -> torch.Tensor:
    """The 2 x 2 windows of channels-last images (B, C, H, W) as a view (B, H // 2, 2, W // 2, 2, C);
    a last odd row or column is left out, as max_pool2d(2) leaves it."""
    h, w = images.shape[2:]
    rows = images.permute(0, 2, 3, 1)[:, : h - h % 2, : w - w % 2]
    return rows.unflatten(2, (w // 2, 2)).unflatten(1, (h // 2, 2))


def max_pool_2x2(images: torch.Tensor) -> torch.Tensor:
    """max_pool2d(images, 2) of channels-last images (B, C, H, W): the same values (NaN included),
    channels-last, as two elementwise maxima of strided views. max_pool2d also writes an index per
    value and took 4x as long (0.46 vs 0.11 ms for 66 x 16 x 28 x 28 values, 1 thread, measured
    here). Only where no gradient is taken: autograd's rule for torch.maximum splits ties."""
    windows = _windows(images)
    rows = torch.maximum(windows[:, :, 0], windows[:, :, 1])  # (B, H // 2, W // 2, 2, C)
    return torch.maximum(rows[:, :, :, 0], rows[:, :, :, 1]).permute(0, 3, 1, 2)


def as_channels_last(x: torch.Tensor) -> torch.Tensor:
    """A copy of images x (B, C, H, W) in channels-last strides, also when C is 1: there
    `contiguous(memory_format=torch.channels_last)` keeps the NCHW strides, a convolution then
    answers in NCHW and every later kernel takes its slow path (the max-pool 10x slower, measured
    here on the shared one-channel images of an evaluation)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last).copy_(x)


def _scores(logits_of, x: torch.Tensor, y: torch.Tensor, chunk: int, n_models: int, device) -> list[tuple[float, float]]:
    """Every model's (mean cross-entropy, accuracy) on (x, y), from `logits_of` (a chunk of
    shared inputs -> (M, chunk, classes)), `chunk` samples at a time, each chunk's summed loss
    added in double precision (as `zoo.evaluation.evaluate` adds its batches); read back once."""
    losses = torch.zeros(n_models, dtype=torch.float64, device=device)
    correct = torch.zeros(n_models, dtype=torch.int64, device=device)
    for start in range(0, len(x), chunk):
        logits = logits_of(x[start : start + chunk].to(device))
        target = y[start : start + chunk].to(device).expand(n_models, -1)
        losses += F.cross_entropy(logits.transpose(1, 2), target, reduction="none").sum(1).double()
        correct += (logits.argmax(2) == target).sum(1)
    return [(float(loss) / len(x), int(c) / len(x)) for loss, c in zip(losses.cpu(), correct.cpu())]


def build_stack(specs: list[ModelSpec], device: torch.device) -> _Stack | _MLPStack:
    """The engine that trains `specs` (one `shape_key`) as a stack, at their initialisation: the
    written-out MLP or CNN engine where the layers fit it, else the autograd one."""
    layers = list(initial_model(specs[0]))
    engine = _MLPStack if _MLPStack.fits(layers) else _CNNStack if _CNNStack.fits(layers) else _Stack
    return engine(specs, device)


def train_stack(specs: list[ModelSpec], data: Data, device: torch.device | str | None = None) -> list[TrainedModel]:
    """Train the stackable models `specs` (one `shape_key`) together; one TrainedModel each.

    The stack trains on `device` (default `run_device()`); batches are drawn and augmented on the
    CPU from each model's own generators, exactly as the reference path draws them, and the
    curves are evaluated on the CPU by the shared `evaluate`, so stored numbers reproduce when a
    model is loaded anywhere."""
    if len({shape_key(s) for s in specs}) != 1 or shape_key(specs[0]) is None:
        raise ValueError("train_stack takes models of one shape_key")
    start = time.perf_counter()
    t = specs[0].training
    device = torch.device(device) if device is not None else run_device()
    stack = build_stack(specs, device)
    n_models, n_train = len(specs), len(data.x_train)
    x_train = data.x_train.to(device)
    y_train = data.y_train.to(device)
    lrs, momenta = (s.to(device) for s in _schedules(specs, n_train))  # (steps + 1, M, 1, 1) each
    decay = torch.tensor([s.training.weight_decay for s in specs], device=device).reshape(-1, 1, 1)
    decay = decay if decay.any() else None
    # per parameter rank, shaped once to broadcast over (M, ...) parameters: reshaping them for
    # every parameter at every step took 6% of a 32-model MLP stack's time (measured here)
    schedules = {rank: (lrs.reshape(len(lrs), -1, *[1] * (rank - 1)), momenta.reshape(len(momenta), -1, *[1] * (rank - 1)),
                        None if decay is None else decay.reshape(-1, *[1] * (rank - 1)))
                 for rank in {p.dim() for p in stack.params}}
    buffers: list[torch.Tensor | None] = [None] * len(stack.params)
    streams = [epoch_indices(n_train, t, torch.Generator().manual_seed(derive_seed(s.seed, "data"))) for s in specs]
    sizes = batch_sizes(n_train, t)
    augmentations = [torch.Generator().manual_seed(derive_seed(s.seed, "augment")) for s in specs]
    wanted = set(specs[0].checkpoints)
    curves: list[list[dict]] = [[] for _ in specs]
    checkpoints: list[dict[int, torch.Tensor]] = [{} for _ in specs]

    def record(epoch: int) -> None:
        # Evaluating model by model cost as much as training the stack (measured on digits
        # MLPs), so all models are evaluated at once: equal to `evaluate` to float rounding.
        train_scores = stack.evaluate(data.x_train, data.y_train, t.eval_batch_size)
        test_scores = stack.evaluate(data.x_test, data.y_test, t.eval_batch_size)
        for m, ((train_loss, train_acc), (test_loss, test_acc)) in enumerate(zip(train_scores, test_scores)):
            curves[m].append(dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, test_loss=test_loss, test_acc=test_acc))
            if epoch in wanted:
                checkpoints[m][epoch] = flatten(stack.module(m))

    record(0)
    step_count = 0
    for epoch in range(1, t.epochs + 1):
        order = torch.stack([next(stream) for stream in streams]).to(device)  # (M, samples this epoch)
        # this epoch's schedules as tuples of per-step views (indexing the stacked tensors took two
        # selects per rank and step; views of a whole run would hold one small tensor per step)
        steps = slice(step_count, step_count + len(sizes))
        epoch_schedules = {rank: (lr[steps].unbind(), momentum[steps].unbind(), weight_decay)
                           for rank, (lr, momentum, weight_decay) in schedules.items()}
        offset = 0
        for step, size in enumerate(sizes):
            idx = order[:, offset : offset + size]  # (M, B): each model's own batch
            offset += size
            # (M, B, *input_shape): the same gather as x_train[idx], 5x faster (118 vs 22 us for a
            # 32 x 32 digits batch here; 6% of a stack's training time)
            x = x_train.index_select(0, idx.reshape(-1)).reshape(*idx.shape, *x_train.shape[1:])
            if t.augmentation == "flip-crop":  # each model's own stream, drawn as the reference path draws it
                x = torch.stack([augment(x[m], t.crop_padding, augmentations[m]) for m in range(n_models)])
            grads = stack.gradients(x, y_train.index_select(0, idx.reshape(-1)).reshape(idx.shape))
            now = {rank: (lr[step], momentum[step], weight_decay) for rank, (lr, momentum, weight_decay) in epoch_schedules.items()}
            with torch.no_grad():
                for k, (p, g) in enumerate(zip(stack.params, grads)):
                    buffers[k] = _sgd_step(p, g, buffers[k], *now[p.dim()], t.nesterov)
            step_count += 1
        record(epoch)
    seconds = (time.perf_counter() - start) / n_models
    index = tensor_index(stack.references[0])
    return [TrainedModel(spec, curves[m], checkpoints[m], index, seconds) for m, spec in enumerate(specs)]


def _sgd_step(p, g, buffer, lr, momentum, decay, nesterov: bool):
    """torch.optim.SGD's update, with per-model lr, momentum and weight decay ((M, 1, ...)
    tensors of p's rank; decay None when every model has none), in place: the gradient `g` (a
    fresh tensor, consumed) becomes the momentum buffer on the first step."""
    if decay is not None:
        g = g.addcmul_(decay, p)
    # g + momentum * buffer in one pass over the buffer (mul_ then add_ took two). Where the
    # kernel fuses the multiply-add (CUDA's does) the last bit may differ from torch.optim.SGD's
    # two roundings: equal to the reference path to float rounding, as the tests check.
    buffer = g if buffer is None else torch.addcmul(g, buffer, momentum, out=buffer)
    step = torch.addcmul(g, momentum, buffer) if nesterov else buffer
    p.addcmul_(lr, step, value=-1)
    return buffer


def _schedules(specs: list[ModelSpec], n_train: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every step's learning rate and momentum of every model, (steps + 1, M, 1, 1) each.

    Taken from the reference path's own torch optimizer and scheduler stepped on a dummy
    parameter (OneCycle also cycles the momentum), once per distinct recipe."""
    total = specs[0].training.epochs * steps_per_epoch(n_train, specs[0].training)
    cache: dict[str, tuple[list[float], list[float]]] = {}
    columns = []
    for spec in specs:
        key = spec.training.model_dump_json()
        if key not in cache:
            if spec.training.schedule == "constant":  # nothing changes: no simulation (and no torch.optim,
                # whose first use imports torch._dynamo: 3 s of a small job's start-up)
                cache[key] = ([spec.training.lr] * (total + 1), [spec.training.momentum] * (total + 1))
            else:
                optimizer = make_optimizer([torch.zeros(1, requires_grad=True)], spec.training)
                group = optimizer.param_groups[0]
                schedule = make_schedule(optimizer, spec.training, total)
                lrs, momenta = [group["lr"]], [group.get("momentum", 0.0)]
                for _ in range(total):
                    optimizer.step()  # a no-op (no gradient), so the scheduler sees the usual order
                    schedule.step()
                    lrs.append(group["lr"])
                    momenta.append(group.get("momentum", 0.0))
                cache[key] = (lrs, momenta)
        columns.append(cache[key])
    lr = torch.tensor([c[0] for c in columns]).T.reshape(total + 1, -1, 1, 1)
    momentum = torch.tensor([c[1] for c in columns]).T.reshape(total + 1, -1, 1, 1)
    return lr, momentum
