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
# digits MLPs, 300k parameters, ran 0.9x the speed of one at a time: arithmetic-bound).
MAX_STACKED_MLP_PARAMS = 100_000
# CNNs: a stack's first feature maps per step (models x batch x width x H x W) hold at most this
# many values. On the 2-core CI machine (2026-12-01, 1 thread, Fashion-MNIST 28 x 28, width 4) a
# training step took 8.1 / 7.0 / 7.7 / 13.2 / 13.6 ms per model in stacks of 2 / 4 / 8 / 16 / 32
# at batch 128 (1.6M values at 4 models), and 2.4 / 1.8 / 2.3 / 1.8 / 2.9 ms at batch 32: past
# about 2M values the activations leave the cache and a step slows by half (the plain loop:
# 18 and 6.4 ms). A CNN that cannot stack two models within it takes the reference path (width
# 4 at batch 512, width 16 at batch 128: the stack ran 0.7-0.8x the plain loop there).
CNN_STACK_VALUES = 1 << 21
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
    a = spec.architecture
    if a["name"] == "mlp":
        n_in, width = math.prod(spec.input_shape), a["width"]
        return n_in * width + (a["depth"] - 1) * width * width + width * spec.n_classes <= MAX_STACKED_MLP_PARAMS
    return 2 * _feature_map(spec) <= CNN_STACK_VALUES


def _feature_map(spec: ModelSpec) -> int:
    """Values in a CNN's first feature map per step: batch x width x H x W."""
    return spec.training.batch_size * spec.architecture["width"] * math.prod(spec.input_shape[1:])


def models_per_stack(spec: ModelSpec, max_models: int = STACK_SIZE) -> int:
    """How many models of `spec`'s key train as one stack: `max_models`, fewer for CNNs whose
    activations would leave the cache (`CNN_STACK_VALUES`). Depends on the zoo alone."""
    if spec.architecture["name"] == "cnn" and _pays_on_a_cpu(spec):
        return min(max_models, CNN_STACK_VALUES // _feature_map(spec))
    return max_models  # (MLPs; and CNNs too big for a CPU stack, which stack on CUDA alone)


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
    """Stacks of at most `max_models` same-key models (fewer for large CNNs: `models_per_stack`),
    in first-seen order, a key's models cut into stacks of equal size (jobs then take equal
    shares); unstackable models
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
    stacks = []
    for group in groups.values():  # as few stacks as the size allows, of sizes differing by at most one
        n = -(-len(group) // models_per_stack(group[0], max_models))  # (64 at most 20: 4 x 16, not 20, 20, 20, 4)
        stacks += [group[len(group) * k // n : len(group) * (k + 1) // n] for k in range(n)]
    return stacks + singles
