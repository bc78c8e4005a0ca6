"""Train a population of same-shape MLPs as one stacked computation.

Each model keeps its own initialisation, data order and learning rate (the same generators as
the reference path in `training.py`), but the M models' weights live in stacked tensors
(M, fan_in, fan_out) and every step is a handful of batched matmuls (`torch.baddbmm`) instead of
M small ones: a small model is bound by per-step overhead, so this is where the machine's time
goes. Same initialisation and batches give the same models as the reference path (to float
rounding: about 1e-7 after an epoch).

Written by hand because torch.func's vmap over a functional model was 3x slower than stacked
matmuls here (see ../shared/reference/performance.md) and no library trains populations.
"""

from __future__ import annotations

import json
import math
import time

import torch
from torch.nn import functional as F

from zoo.catalog import ModelSpec
from zoo.datasets import Data
from zoo.evaluation import evaluate
from zoo.storage import TrainedModel
from zoo.weights import tensor_index

from .training import derive_seed, epoch_batches, initial_model, make_optimizer, make_schedule, steps_per_epoch

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "gelu": F.gelu}
MAX_STACKED_PARAMS = 100_000


def stack_key(spec: ModelSpec) -> str | None:
    """Models with equal keys train as one stack; None: this model takes the reference path.

    Stackable: MLPs of at most MAX_STACKED_PARAMS parameters trained by SGD without
    augmentation (larger ones are bound by arithmetic, not per-step overhead: measured here, a
    stack of four 512-wide digits MLPs ran 0.9x the speed of one at a time). Inside a stack the
    seed, learning rate, momentum and weight decay may differ per model; everything that shapes
    the computation (architecture, data, batch size, step count, schedule kind, checkpoints) is
    shared."""
    t = spec.training
    if spec.architecture["name"] != "mlp" or t.optimizer != "sgd" or t.augmentation != "none":
        return None
    a = spec.architecture
    n_in, width = math.prod(spec.input_shape), a["width"]
    if n_in * width + (a["depth"] - 1) * width * width + width * spec.n_classes > MAX_STACKED_PARAMS:
        return None
    shared = t.model_dump(exclude={"lr", "momentum", "weight_decay"})
    return json.dumps([spec.zoo, spec.dataset, spec.architecture, shared, spec.checkpoints], sort_keys=True)


def group_into_stacks(specs: list[ModelSpec], max_models: int = 256) -> list[list[ModelSpec]]:
    """Stacks of at most `max_models` same-key models, in first-seen order; unstackable models
    alone. Stacks are cut from a whole zoo's model list, never from what happens to be missing,
    so a model is always trained in the same company: the batched matmuls then give it the same
    bits whichever run trains it (a stack of one and a stack of two can differ in the last bit)."""
    groups: dict[str, list[ModelSpec]] = {}
    singles = []
    for spec in specs:
        key = stack_key(spec)
        if key is None:
            singles.append([spec])
        else:
            groups.setdefault(key, []).append(spec)
    stacks = [g[i : i + max_models] for g in groups.values() for i in range(0, len(g), max_models)]
    return stacks + singles


class _Stack:
    """The stacked weights of M MLPs: per layer W (M, in, out) and b (M, 1, out)."""

    def __init__(self, specs: list[ModelSpec]):
        self.specs = specs
        self.references = [initial_model(s) for s in specs]  # the reference path's initialisation
        linears = [[m for m in model if isinstance(m, torch.nn.Linear)] for model in self.references]
        self.weights = [torch.stack([layers[k].weight.detach().T for layers in linears]).contiguous().requires_grad_()
                        for k in range(len(linears[0]))]
        self.biases = [torch.stack([layers[k].bias.detach()[None] for layers in linears]).contiguous().requires_grad_()
                       for k in range(len(linears[0]))]
        self.activation = ACTIVATIONS[specs[0].architecture["activation"]]
        self.params = [p for pair in zip(self.weights, self.biases) for p in pair]  # named_parameters order

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, B, in) -> logits (M, B, classes)."""
        h = x
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)
            if k < len(self.weights) - 1:
                h = self.activation(h)
        return h

    @torch.no_grad()
    def module(self, m: int) -> torch.nn.Module:
        """Model m as an ordinary module holding its current stacked weights."""
        model = self.references[m]
        linears = [layer for layer in model if isinstance(layer, torch.nn.Linear)]
        for layer, w, b in zip(linears, self.weights, self.biases):
            layer.weight.copy_(w[m].T)
            layer.bias.copy_(b[m, 0])
        return model

    def flat(self, m: int) -> torch.Tensor:
        """Model m's parameters as the reference path flattens them (weights out x in)."""
        pieces = []
        for w, b in zip(self.weights, self.biases):
            pieces += [w[m].detach().T.reshape(-1), b[m, 0].detach()]
        return torch.cat(pieces)


def train_stack(specs: list[ModelSpec], data: Data) -> list[TrainedModel]:
    """Train the stackable models `specs` (one `stack_key`) together; one TrainedModel each."""
    if len({stack_key(s) for s in specs}) != 1 or stack_key(specs[0]) is None:
        raise ValueError("train_stack takes models of one stack_key")
    start = time.perf_counter()
    t = specs[0].training
    stack = _Stack(specs)
    n_models, n_train = len(specs), len(data.x_train)
    x_train = data.x_train.reshape(n_train, -1)
    lrs, momenta = _schedules(specs, n_train)  # (steps + 1, M, 1, 1) each
    decay = torch.tensor([s.training.weight_decay for s in specs]).reshape(-1, 1, 1)
    decay = decay if decay.any() else None
    buffers: list[torch.Tensor | None] = [None] * len(stack.params)
    streams = [epoch_batches(n_train, t, torch.Generator().manual_seed(derive_seed(s.seed, "data"))) for s in specs]
    wanted = set(specs[0].checkpoints)
    curves: list[list[dict]] = [[] for _ in specs]
    checkpoints: list[dict[int, torch.Tensor]] = [{} for _ in specs]

    def record(epoch: int) -> None:
        # Curves by the one evaluation every stage uses, on each model as a module: a model
        # loaded from the store reproduces its stored numbers exactly.
        for m in range(n_models):
            model = stack.module(m)
            train_loss, train_acc = evaluate(model, data.x_train, data.y_train, t.eval_batch_size)
            test_loss, test_acc = evaluate(model, data.x_test, data.y_test, t.eval_batch_size)
            curves[m].append(dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, test_loss=test_loss, test_acc=test_acc))
            if epoch in wanted:
                checkpoints[m][epoch] = stack.flat(m).numpy().copy()

    record(0)
    step_count = 0
    for epoch in range(1, t.epochs + 1):
        per_model = [next(stream) for stream in streams]
        for step in range(len(per_model[0])):
            idx = torch.stack([batches[step] for batches in per_model])  # (M, B)
            logits = stack.logits(x_train[idx])
            losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), data.y_train[idx].reshape(-1), reduction="none")
            # The sum over models of each model's mean loss: model m's gradient is its own.
            grads = torch.autograd.grad(losses.reshape(n_models, -1).mean(1).sum(), stack.params)
            with torch.no_grad():
                for k, (p, g) in enumerate(zip(stack.params, grads)):
                    buffers[k] = _sgd_step(p, g, buffers[k], lrs[step_count], momenta[step_count], decay, t.nesterov)
            step_count += 1
        record(epoch)
    seconds = (time.perf_counter() - start) / n_models
    index = tensor_index(stack.references[0])
    return [TrainedModel(spec, curves[m], checkpoints[m], index, seconds) for m, spec in enumerate(specs)]


def _sgd_step(p, g, buffer, lr, momentum, decay, nesterov: bool):
    """torch.optim.SGD's update, with per-model lr, momentum and weight decay ((M, 1, 1) tensors;
    decay None when every model has none)."""
    shape = (-1,) + (1,) * (p.dim() - 1)
    if decay is not None:
        g = g + decay.reshape(shape) * p
    momentum = momentum.reshape(shape)
    buffer = g.clone() if buffer is None else torch.addcmul(g, momentum, buffer)
    step = torch.addcmul(g, momentum, buffer) if nesterov else buffer
    p.sub_(lr.reshape(shape) * step)
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
            optimizer = make_optimizer([torch.zeros(1, requires_grad=True)], spec.training)
            group = optimizer.param_groups[0]
            if spec.training.schedule == "constant":  # nothing changes: no simulation
                cache[key] = ([group["lr"]] * (total + 1), [group.get("momentum", 0.0)] * (total + 1))
            else:
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
