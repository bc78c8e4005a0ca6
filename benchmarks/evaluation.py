"""What every protocol shares: the held-out split methods select on, accuracy, and models
rebuilt from state dicts.

The zoo's models were trained on the whole training split, so a method that *selects* (greedy
soup picks ingredients, a sweep picks lambda) must select on data no model saw: the test split
is cut in two fixed halves, `validation` (selection) and `test` (reporting).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from zoo.datasets import Data
from zoo.evaluation import evaluate

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Holdout:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def holdout(data: Data, seed: int = 0) -> Holdout:
    """The training split, and the test split cut into validation and test halves by a fixed
    permutation (seeded, so every method and every rerun sees the same halves)."""
    order = torch.randperm(len(data.x_test), generator=torch.Generator().manual_seed(seed))
    half = len(order) // 2
    val, test = order[:half], order[half:]
    return Holdout(data.x_train, data.y_train, data.x_test[val], data.y_test[val], data.x_test[test], data.y_test[test])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return evaluate(model, x, y)[1]


def with_state(template: nn.Module, state: StateDict) -> nn.Module:
    """A copy of `template` holding `state` (float tensors; integer buffers kept from `state`
    when present), in eval mode."""
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model.eval()


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> nn.Module:
    """Recompute every BatchNorm's running statistics on `x` (cumulative average over the
    batches, as torch.optim.swa_utils.update_bn does), in place; returns the model in eval mode."""
    from torch.optim.swa_utils import update_bn

    update_bn([x[i : i + batch_size] for i in range(0, len(x), batch_size)], model)
    return model.eval()


def finetune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch_size: int,
             seed: int, after_step: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """A short plain-SGD fine-tune (momentum 0.9, a seeded shuffle per epoch) in train mode, in
    place; `after_step` runs after every optimizer step (pruning re-applies its masks there).
    Returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
            if after_step is not None:
                after_step(model)
    return model.eval()
