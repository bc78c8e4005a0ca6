"""A model's state as one flat float32 vector, and the index that maps it back to tensors.

Parameters come first, in `named_parameters()` order, then buffers (BatchNorm running
statistics, counters), so the first `n_params` values of every stored vector are exactly the
trainable weights: N models' weights load as an (N, n_params) slice of one array.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    dtype: str
    kind: str  # "parameter" or "buffer"


def tensor_index(model: nn.Module) -> list[TensorEntry]:
    entries, offset = [], 0
    named = [(n, t, "parameter") for n, t in model.named_parameters()]
    named += [(n, t, "buffer") for n, t in model.named_buffers()]
    for name, tensor, kind in named:
        entries.append(TensorEntry(name, tuple(tensor.shape), offset, tensor.numel(), str(tensor.dtype).removeprefix("torch."), kind))
        offset += tensor.numel()
    return entries


def flatten(model: nn.Module) -> np.ndarray:
    """Parameters then buffers as one float32 vector (integer counters are exact below 2^24)."""
    import torch

    tensors = [t for _, t in model.named_parameters()] + [t for _, t in model.named_buffers()]
    if not tensors:
        return np.zeros(0, dtype=np.float32)
    return torch.cat([t.detach().reshape(-1).to(torch.float32).cpu() for t in tensors]).numpy()


def unflatten(vector: np.ndarray | torch.Tensor, index: list[TensorEntry]) -> dict[str, torch.Tensor]:
    """The state dict that `vector` encodes, each tensor in its recorded shape and dtype."""
    import torch

    flat = torch.as_tensor(np.asarray(vector, dtype=np.float32))
    return {
        e.name: flat[e.offset : e.offset + e.numel].reshape(e.shape).to(getattr(torch, e.dtype)).clone()
        for e in index
    }


def n_parameters(index: list[TensorEntry]) -> int:
    return sum(e.numel for e in index if e.kind == "parameter")


def sha256(vector: np.ndarray) -> str:
    """Hash of the little-endian float32 bytes: equal hashes mean bitwise-equal weights."""
    return hashlib.sha256(np.ascontiguousarray(vector, dtype="<f4")).hexdigest()
