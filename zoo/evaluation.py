"""Loss and accuracy of a classifier on a data split: the one definition every stage uses.

Training records its curves with this function and `Root.load_model` users evaluate with it, so a
reloaded model reproduces its stored accuracy exactly (same batches, same reduction order).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode; the module's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device  # (batches move to the model: a GPU-trained one too)
        # summed on the device (the loss in float64, as a Python float would) and read back once
        total_loss = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        for start in range(0, len(x), batch_size):
            logits = model(x[start : start + batch_size].to(device))
            target = y[start : start + batch_size].to(device)
            total_loss += F.cross_entropy(logits, target, reduction="sum").double()
            correct += (logits.argmax(1) == target).sum()
        loss, right = torch.stack([total_loss, correct.double()]).tolist()
        return loss / len(x), int(right) / len(x)
    finally:
        model.train(was_training)
