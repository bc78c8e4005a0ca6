"""Linear centred kernel alignment (CKA) between the representations of two networks.

Kornblith, Norouzi, Lee & Hinton 2019, "Similarity of Neural Network Representations
Revisited", eq. (5): for column-centred feature matrices X (n x d1) and Y (n x d2),

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F),

the linear-kernel HSIC normalised to [0, 1]. It is invariant to orthogonal transforms and
isotropic scaling of either representation, not to arbitrary invertible linear maps.
"""

from __future__ import annotations


import numpy as np
import torch
from torch import nn

from .modes import eval_mode


def linear_cka(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019) between feature matrices x (n x d1) and y (n x d2).

    Rows are samples (the same samples, in the same order, in both); columns are centred
    here and everything is computed in float64. Returns NaN when either representation is
    constant over the samples (zero variance: CKA is undefined there).
    """
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    y = torch.as_tensor(y).detach().to("cpu", torch.float64)
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"x and y must be 2-D (samples x features), got shapes "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of rows, got {x.shape[0]} "
                         f"and {y.shape[0]}")
    if x.shape[0] < 2:
        raise ValueError("CKA needs at least 2 samples")
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    norm_x = torch.linalg.matrix_norm(x.T @ x)
    norm_y = torch.linalg.matrix_norm(y.T @ y)
    if norm_x == 0 or norm_y == 0:
        return float("nan")
    return float(torch.linalg.matrix_norm(y.T @ x) ** 2 / (norm_x * norm_y))


def representations(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> dict:
    """The logits and the penultimate representation of ``model`` on inputs ``x``.

    The penultimate representation is the input of the model's last ``nn.Linear`` module (the
    last in ``model.modules()`` order), captured by a forward hook and flattened per sample.
    Runs in eval() mode under ``torch.no_grad()`` in batches of ``batch_size``, and restores
    every submodule's training flag. Returns detached CPU tensors
    ``{"logits": (n, C), "penultimate": (n, d)}``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) == 0:
        raise ValueError("x is empty")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear module to take the penultimate "
                         "representation from")
    captured: list[torch.Tensor] = []
    handle = linears[-1].register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0]))
    device = linears[-1].weight.device
    logits, penultimate = [], []
    try:
        with eval_mode(model), torch.no_grad():
            for chunk in x.split(batch_size):
                captured.clear()
                out = model(chunk.to(device))
                if len(captured) != 1:
                    raise ValueError(f"the last nn.Linear ran {len(captured)} times in one "
                                     "forward pass; expected once")
                logits.append(out.reshape(len(chunk), -1).cpu())
                penultimate.append(captured[0].reshape(len(chunk), -1).cpu())
    finally:
        handle.remove()
    return {"logits": torch.cat(logits), "penultimate": torch.cat(penultimate)}


def cka_between(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor,
                batch_size: int = 1024) -> dict:
    """Linear CKA between two models' logits and penultimate representations on the same x.

    Returns ``{"cka_logits": float, "cka_penultimate": float}``; see ``representations`` and
    ``linear_cka``.
    """
    rep_a = representations(model_a, x, batch_size)
    rep_b = representations(model_b, x, batch_size)
    return {"cka_logits": linear_cka(rep_a["logits"], rep_b["logits"]),
            "cka_penultimate": linear_cka(rep_a["penultimate"], rep_b["penultimate"])}


