"""Train one model from its spec: the reference path, deterministic on CPU.

Everything random draws from generators derived from the model's seed (initialisation, data
order, augmentation each their own stream), never from torch's global RNG, and the step reads no
global state: the same spec and seed give bitwise-identical weights, and a population of
same-shape models can later be trained as one stacked computation with the same streams.
"""

from __future__ import annotations

import hashlib
import time
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from zoo.architectures import build_model
from zoo.catalog import ModelSpec, Training
from zoo.datasets import Data
from zoo.evaluation import evaluate
from zoo.storage import TrainedModel
from zoo.weights import flatten, tensor_index


def derive_seed(seed: int, stream: str) -> int:
    """An independent 63-bit seed for one random stream ('init', 'data', 'augment') of a model."""
    digest = hashlib.sha256(f"{seed}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def initial_model(spec: ModelSpec) -> nn.Module:
    return build_model(spec.architecture, spec.input_shape, spec.n_classes, seed=derive_seed(spec.seed, "init"))


def make_optimizer(params, t: Training) -> torch.optim.Optimizer:
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


def make_schedule(optimizer: torch.optim.Optimizer, t: Training, total_steps: int):
    """Per-step learning-rate schedule: constant, cosine to 0, OneCycle (peak = lr), or step
    (x0.1 at 50% and 75% of training)."""
    if t.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if t.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=t.lr, total_steps=total_steps)
    if t.schedule == "step":
        milestones = [total_steps // 2, (3 * total_steps) // 4]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def steps_per_epoch(n_train: int, t: Training) -> int:
    return t.steps_per_epoch or -(-n_train // t.batch_size)


def epoch_batches(n_train: int, t: Training, generator: torch.Generator) -> Iterator[list[torch.Tensor]]:
    """Index batches epoch by epoch. Without `steps_per_epoch`, an epoch is one pass over a fresh
    permutation (the last batch may be short). With it, an epoch is that many full batches cut
    from a stream of fresh permutations, so every data size gets the same step budget."""
    if t.steps_per_epoch is None:
        while True:
            yield list(torch.randperm(n_train, generator=generator).split(t.batch_size))
    buffer = torch.empty(0, dtype=torch.int64)
    while True:
        batches = []
        for _ in range(t.steps_per_epoch):
            while len(buffer) < t.batch_size:
                buffer = torch.cat([buffer, torch.randperm(n_train, generator=generator)])
            batches.append(buffer[: t.batch_size])
            buffer = buffer[t.batch_size :]
        yield batches


def augment(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random crop (zero padding) of an image batch (B, C, H, W),
    vectorised over the batch."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if padding == 0:
        return x
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b)[:, None, None, None]
    channels = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, channels, rows, cols]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """One SGD step on one batch; reads and writes nothing but the model and its optimizer."""
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def train(spec: ModelSpec, data: Data) -> TrainedModel:
    """Train the model `spec` describes on `data`, evaluating every epoch (epoch 0 = the
    initialisation) and keeping the flat weights at the declared checkpoint epochs."""
    t = spec.training
    start = time.perf_counter()
    model = initial_model(spec)
    order = torch.Generator().manual_seed(derive_seed(spec.seed, "data"))
    augmentation = torch.Generator().manual_seed(derive_seed(spec.seed, "augment"))
    optimizer = make_optimizer(model.parameters(), t)
    schedule = make_schedule(optimizer, t, t.epochs * steps_per_epoch(len(data.x_train), t))
    wanted = set(spec.checkpoints)
    curves, checkpoints = [], {}

    def record(epoch: int) -> None:
        train_loss, train_acc = evaluate(model, data.x_train, data.y_train, t.eval_batch_size)
        test_loss, test_acc = evaluate(model, data.x_test, data.y_test, t.eval_batch_size)
        curves.append(dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, test_loss=test_loss, test_acc=test_acc))
        if epoch in wanted:
            checkpoints[epoch] = flatten(model)

    record(0)
    batches = epoch_batches(len(data.x_train), t, order)
    for epoch in range(1, t.epochs + 1):
        model.train()
        for idx in next(batches):
            x = data.x_train[idx]
            if t.augmentation == "flip-crop":
                x = augment(x, t.crop_padding, augmentation)
            train_step(model, optimizer, x, data.y_train[idx])
            schedule.step()
        record(epoch)
    return TrainedModel(spec, curves, checkpoints, tensor_index(model), time.perf_counter() - start)
