"""Train one model from its spec: the reference path, deterministic on CPU.

Everything random draws from generators derived from the model's seed (initialisation, data
order, augmentation each their own stream), never from torch's global RNG, and the step reads no
global state: the same spec and seed give bitwise-identical weights, and a population of
same-shape models can later be trained as one stacked computation with the same streams.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from zoo.architectures import build_model
from zoo.catalog import ModelSpec, Training
from zoo.datasets import Data
from zoo.device import run_device, set_determinism
from zoo.evaluation import evaluate
from zoo.rows import TrainedModel
from zoo.weights import flatten, tensor_index

from .resume import Saver, TrainingState, load_state


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


def batch_sizes(n_train: int, t: Training) -> list[int]:
    """The sizes of one epoch's batches, in order (`BatchOrder.next_epoch`)."""
    if t.steps_per_epoch is not None:
        return [t.batch_size] * t.steps_per_epoch
    return [min(t.batch_size, n_train - start) for start in range(0, n_train, t.batch_size)]


class BatchOrder:
    """Index batches epoch by epoch. Without `steps_per_epoch`, an epoch is one pass over a fresh
    permutation (the last batch may be short). With it, an epoch is that many full batches cut
    from a stream of fresh permutations, so every data size gets the same step budget. Its
    `state()` (the generator's and the stream's leftover indices) restores the order exactly."""

    def __init__(self, n_train: int, t: Training, generator: torch.Generator):
        self.n_train, self.t, self.generator = n_train, t, generator
        self.buffer = torch.empty(0, dtype=torch.int64)

    def next_epoch(self) -> list[torch.Tensor]:
        t = self.t
        if t.steps_per_epoch is None:
            return list(self.next_epoch_indices().split(t.batch_size))
        batches = []
        for _ in range(t.steps_per_epoch):
            while len(self.buffer) < t.batch_size:
                self.buffer = torch.cat([self.buffer, torch.randperm(self.n_train, generator=self.generator)])
            batches.append(self.buffer[: t.batch_size])
            self.buffer = self.buffer[t.batch_size :]
        return batches

    def next_epoch_indices(self) -> torch.Tensor:
        """The next epoch's batches one after another, as one index tensor (cut by `batch_sizes`).
        Without a step budget this is the permutation itself: splitting it into batches and
        concatenating them again took 1.1-1.7 ms per epoch of a 32-model stack (measured here)."""
        if self.t.steps_per_epoch is None:
            return torch.randperm(self.n_train, generator=self.generator)
        return torch.cat(self.next_epoch())

    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.generator.get_state(), self.buffer.clone()

    def restore(self, generator_state: torch.Tensor, buffer: torch.Tensor) -> None:
        self.generator.set_state(generator_state)
        self.buffer = buffer.clone()


def epoch_indices(n_train: int, t: Training, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """`BatchOrder`'s epochs as an endless stream of index tensors (`next_epoch_indices`)."""
    order = BatchOrder(n_train, t, generator)
    while True:
        yield order.next_epoch_indices()


def augment(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random crop (zero padding) of an image batch (B, C, H, W),
    vectorised over the batch. The few random numbers are drawn from the model's own CPU stream
    (the same bits on any device); the images stay where they are (on the GPU when training there)."""
    b, _, h, w = x.shape
    device = x.device
    flip = (torch.rand(b, generator=generator) < 0.5).to(device, non_blocking=True)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if padding == 0:
        return x
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(device, non_blocking=True)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(device, non_blocking=True)
    rows = (dy[:, None] + torch.arange(h, device=device)[None, :])[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=device)[None, :])[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=device)[:, None, None, None]
    channels = torch.arange(x.shape[1], device=device)[None, :, None, None]
    return padded[batch, channels, rows, cols]


def rotate(x: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image of a batch (B, C, H, W) by its own angle, uniform in +-degrees, about
    its centre (bilinear, zeros outside), vectorised over the batch."""
    angles = (torch.rand(len(x), generator=generator) * 2 - 1) * (degrees * torch.pi / 180)
    return rotate_by(x, angles.to(x.device, non_blocking=True))


def rotate_by(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate image i of a batch by angles[i] radians, counter-clockwise."""
    cos, sin, zero = angles.cos(), angles.sin(), torch.zeros_like(angles)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               micro_batch_size: int | None = None, precision: str = "float32") -> torch.Tensor:
    """One SGD step on one batch; reads and writes nothing but the model and its optimizer, and
    returns the batch's loss as a tensor on the device (reading it would wait for the device:
    the loop never does).

    With `micro_batch_size`, the batch runs in chunks whose summed losses (each divided by the
    whole batch's size) accumulate the batch's gradient before the one step: the same step
    (BatchNorm aside, which normalises each chunk by its own statistics) in less memory. With
    precision "bf16", the forward pass runs under bfloat16 autocast; the loss is float32."""
    optimizer.zero_grad(set_to_none=True)
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    if micro_batch_size is None or micro_batch_size >= len(x):
        with autocast:
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        optimizer.step()
        return loss.detach()
    total = torch.zeros((), device=x.device)
    for start in range(0, len(x), micro_batch_size):
        with autocast:
            logits = model(x[start:start + micro_batch_size])
        loss = F.cross_entropy(logits.float(), y[start:start + micro_batch_size], reduction="sum") / len(x)
        loss.backward()
        total += loss.detach()
    optimizer.step()
    return total


def train(spec: ModelSpec, data: Data, resume: Path | None = None) -> TrainedModel:
    """Train the model `spec` describes on `data`, evaluating every epoch (epoch 0 = the
    initialisation) and keeping the flat weights at the declared checkpoint epochs.

    With `resume` (a file path), the training state is saved there at epoch ends now and then,
    and a state found there at the start is continued from (see `resume.py`): same bits."""
    t = spec.training
    start = time.perf_counter()
    device = run_device()
    if device.type == "cuda":
        set_determinism(t.deterministic)
    model = initial_model(spec).to(device, memory_format=torch.channels_last if t.channels_last else torch.preserve_format)
    order = BatchOrder(len(data.x_train), t, torch.Generator().manual_seed(derive_seed(spec.seed, "data")))
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

    saver = Saver(resume, spec)
    state = load_state(resume, spec) if resume is not None else None
    spent_before, first_epoch = 0.0, 1
    if state is None:
        record(0)
    else:
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        schedule.load_state_dict(state.schedule)
        order.restore(state.generators["order"], state.buffers["order"])
        augmentation.set_state(state.generators["augment"])
        curves, checkpoints = state.curves, state.checkpoints
        spent_before, first_epoch = state.seconds, state.epoch + 1
    # the training data lives on the device for the whole run; a step reads nothing back to the host
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    for epoch in range(first_epoch, t.epochs + 1):
        model.train()
        for idx in order.next_epoch():
            idx = idx.to(device, non_blocking=True)
            x = x_train[idx]
            if t.augmentation != "none":  # its random numbers from the model's own CPU stream, applied on the device
                x = augment(x, t.crop_padding, augmentation)
                if t.augmentation == "flip-crop-rotate":
                    x = rotate(x, t.rotation_degrees, augmentation)
            if t.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            train_step(model, optimizer, x, y_train[idx], t.micro_batch_size, t.precision)
            schedule.step()
        record(epoch)
        if saver.due(epoch):
            generator_state, buffer = order.state()
            saver.save(TrainingState(
                epoch=epoch, model=model.state_dict(), optimizer=optimizer.state_dict(), schedule=schedule.state_dict(),
                generators={"order": generator_state, "augment": augmentation.get_state()}, buffers={"order": buffer},
                curves=curves, checkpoints=checkpoints, seconds=spent_before + time.perf_counter() - start))
    return TrainedModel(spec, curves, checkpoints, tensor_index(model), spent_before + time.perf_counter() - start,
                        resumed_from=state.epoch if state is not None else None)
