"""Which models train together: a zoo's models grouped into stacks of same-shape models (trained
as one computation by `stacked.py`) and single models (the reference path, `training.py`).

Planning runs in the process that launches the jobs, so this module needs no torch (importing
torch takes 2.5-3 s here, more than training a 64-model population on the stacked engine).
"""

from __future__ import annotations

import json
import math

from zoo.catalog import ModelSpec

# Where stacking pays on a CPU (measured by perf/train_throughput.py on the 2-core machine the
# README's performance table names): MLPs up to this many parameters (a stack of four 512-wide
# digits MLPs, 300k parameters, ran 0.9x the speed of one at a time: arithmetic-bound), and CNNs
# whose first feature map per step (batch x width x H x W) is at most this many values (bigger
# convolutions are arithmetic-bound and oneDNN's grouped kernels are slower than M plain ones).
MAX_STACKED_MLP_PARAMS = 100_000
MAX_STACKED_CNN_ACTIVATIONS = 1 << 15
# Models per stack. On the 2-core CI machine (2026-11-30, 1 thread, the digits MLP 64-32-32-10,
# 20 epochs with an evaluation every epoch) a stack of 32 / 64 / 128 trained 17.6 / 18.2 / 15.3
# models/s, and past 128 a step's time per model rises again (its activations leave the cache);
# 32 gives up almost nothing and cuts a 64-model population into one stack per core. The cut
# depends on the zoo alone, never on the machine, so a model's bits do not depend on the cores
# that train it. (A GPU would take far larger stacks; not measured: no GPU was lent.)
STACK_SIZE = 32


def stack_key(spec: ModelSpec) -> str | None:
    """Models with equal keys train as one stack by default; None: this model takes the
    reference path, because stacking it does not pay (see the limits above; on CUDA every MLP
    and CNN stacks) or cannot be done (`shape_key`)."""
    key = shape_key(spec)
    if key is None or _pays_on_a_cpu(spec):
        return key
    return key if _cuda() else None


def _pays_on_a_cpu(spec: ModelSpec) -> bool:
    a, t = spec.architecture, spec.training
    if a["name"] == "mlp":
        n_in, width = math.prod(spec.input_shape), a["width"]
        return n_in * width + (a["depth"] - 1) * width * width + width * spec.n_classes <= MAX_STACKED_MLP_PARAMS
    return t.batch_size * a["width"] * math.prod(spec.input_shape[1:]) <= MAX_STACKED_CNN_ACTIVATIONS


def _cuda() -> bool:
    import torch  # only for models that stack on a GPU alone: planning a zoo of small models needs no torch

    return torch.cuda.is_available()


def shape_key(spec: ModelSpec) -> str | None:
    """Models with equal keys can train as one stack (`train_stack`); None: they cannot.

    Stackable: MLPs and CNNs trained by SGD. Inside a stack the seed, learning rate, momentum
    and weight decay may differ per model; everything that shapes the computation
    (architecture, data, batch size, step count, schedule kind, augmentation, checkpoints) is
    shared."""
    t = spec.training
    if t.optimizer != "sgd" or spec.architecture["name"] not in ("mlp", "cnn"):
        return None
    if t.augmentation == "flip-crop-rotate" or t.micro_batch_size or t.precision != "float32" or t.channels_last:
        return None  # (the reference path has these; a stack does not)
    shared = spec.training.model_dump(exclude={"lr", "momentum", "weight_decay"})
    return json.dumps([spec.zoo, spec.dataset, spec.architecture, shared, spec.checkpoints], sort_keys=True)


def group_into_stacks(specs: list[ModelSpec], max_models: int = STACK_SIZE) -> list[list[ModelSpec]]:
    """Stacks of at most `max_models` same-key models, in first-seen order; unstackable models
    alone. Stacks are cut from a whole zoo's model list, never from what happens to be missing,
    so a model is always trained in the same company: the batched kernels then give it the same
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
